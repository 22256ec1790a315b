//! The model folder's config parsers: `scheduler_config.json` and `esddpm.json`.
//!
//! Any text must give a config or a typed error; a config that parses must give a
//! schedule (or a typed error), never a panic, hang or unbounded allocation.
#![no_main]
use esddpm_runtime::{EsddpmConfig, SchedulerConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = SchedulerConfig::from_json(text) {
        if let Ok(abar) = config.schedule().alphas_cumprod_vec() {
            assert_eq!(abar.len(), config.num_train_timesteps);
            // abar may reach 0 (zero terminal SNR: beta_end = 1, or rescale_betas_zero_snr).
            assert!(abar
                .iter()
                .all(|a| a.is_finite() && (0.0..=1.0).contains(a)));
        }
    }
    if let Ok(config) = EsddpmConfig::from_json(text) {
        assert!(config.unet.sample_shape.iter().all(|&d| d > 0));
    }
});
