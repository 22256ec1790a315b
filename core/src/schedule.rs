//! Noise schedules: betas, `alphas_cumprod` and the posterior coefficients, in f64.
//!
//! The forward process of a DDPM adds noise in `T = num_train_timesteps` steps with
//! variances `beta_t`. Everything a sampler needs follows from
//! `alphas_cumprod[t] = abar_t = prod_{s <= t} (1 - beta_s)`:
//!
//! ```text
//! q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)
//! ```
//!
//! [`ScheduleConfig`] holds diffusers' `scheduler_config.json` keys that define the
//! betas; [`NoiseSchedule`] is the computed `alphas_cumprod` table, stored in a buffer
//! the caller owns (no allocator needed). Formulas and operation order follow
//! diffusers' `DDPMScheduler` so that the values agree to ~1e-15 when both are
//! computed in f64.

use crate::error::{Error, Result};

/// How betas are spread over the training timesteps (diffusers' `beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BetaSchedule {
    /// `beta_t = linspace(beta_start, beta_end, T)[t]` (Ho et al. 2020).
    #[default]
    Linear,
    /// `beta_t = linspace(sqrt(beta_start), sqrt(beta_end), T)[t]^2` (latent diffusion).
    ScaledLinear,
    /// The cosine schedule of Nichol & Dhariwal:
    /// `beta_t = min(1 - f((t+1)/T) / f(t/T), 0.999)`,
    /// `f(u) = cos((u + 0.008) / 1.008 * pi / 2)^2`. Ignores `beta_start`/`beta_end`.
    SquaredcosCapV2,
    /// `beta_t = sigmoid(linspace(-6, 6, T)[t]) * (beta_end - beta_start) + beta_start`.
    Sigmoid,
}

impl BetaSchedule {
    /// Parses diffusers' name (`"linear"`, `"scaled_linear"`, `"squaredcos_cap_v2"`,
    /// `"sigmoid"`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "linear" => Some(Self::Linear),
            "scaled_linear" => Some(Self::ScaledLinear),
            "squaredcos_cap_v2" => Some(Self::SquaredcosCapV2),
            "sigmoid" => Some(Self::Sigmoid),
            _ => None,
        }
    }

    /// diffusers' name of the schedule.
    pub fn name(self) -> &'static str {
        match self {
            Self::Linear => "linear",
            Self::ScaledLinear => "scaled_linear",
            Self::SquaredcosCapV2 => "squaredcos_cap_v2",
            Self::Sigmoid => "sigmoid",
        }
    }
}

/// The betas of a training chain, as diffusers' `scheduler_config.json` gives them.
///
/// `Default` is diffusers' default: 1000 steps, linear from 1e-4 to 0.02.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScheduleConfig<'a> {
    /// `T`, the length of the training chain (diffusers' `num_train_timesteps`).
    pub num_train_timesteps: usize,
    /// First beta of `linear`, `scaled_linear` and `sigmoid`.
    pub beta_start: f64,
    /// Last beta of `linear`, `scaled_linear` and `sigmoid`.
    pub beta_end: f64,
    /// The schedule's shape; ignored when `trained_betas` is given.
    pub beta_schedule: BetaSchedule,
    /// Betas given by the user (diffusers' `trained_betas`), one per training timestep.
    pub trained_betas: Option<&'a [f64]>,
    /// Rescale the betas so that the last timestep has zero SNR (`abar_{T-1} = 0`), as
    /// Lin et al. 2023 and diffusers' `rescale_betas_zero_snr`:
    /// `sqrt(abar)' = (sqrt(abar) - sqrt(abar_{T-1})) * sqrt(abar_0) / (sqrt(abar_0) - sqrt(abar_{T-1}))`.
    pub rescale_betas_zero_snr: bool,
}

impl Default for ScheduleConfig<'_> {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 1e-4,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            rescale_betas_zero_snr: false,
        }
    }
}

/// The cap diffusers' `betas_for_alpha_bar` puts on cosine-schedule betas.
const COSINE_MAX_BETA: f64 = 0.999;

/// `torch.linspace(start, end, n)[i]` in f64: torch fills the first half forwards from
/// `start` and the second half backwards from `end`.
pub(crate) fn torch_linspace(start: f64, end: f64, n: usize, i: usize) -> f64 {
    if n == 1 {
        return start;
    }
    let step = (end - start) / (n - 1) as f64;
    if i < n / 2 {
        start + step * i as f64
    } else {
        end - step * (n - 1 - i) as f64
    }
}

fn cosine_alpha_bar(u: f64) -> f64 {
    let c = libm::cos((u + 0.008) / 1.008 * core::f64::consts::PI / 2.0);
    c * c
}

/// The longest training chain a [`ScheduleConfig`] accepts (2^20 timesteps; diffusion
/// models use 1000 to 4000). It bounds every table sized by `num_train_timesteps`, so a
/// hostile config cannot ask for gigabytes.
pub const MAX_TRAIN_TIMESTEPS: usize = 1 << 20;

impl ScheduleConfig<'_> {
    /// Checks the configuration without computing the table.
    pub fn validate(&self) -> Result<()> {
        let t = self.num_train_timesteps;
        if t == 0 {
            return Err(Error::NoTrainTimesteps);
        }
        if t > MAX_TRAIN_TIMESTEPS {
            return Err(Error::InvalidParameter {
                name: "num_train_timesteps",
                value: t as f64,
            });
        }
        if let Some(betas) = self.trained_betas {
            if betas.len() != t {
                return Err(Error::TrainedBetasLength {
                    expected: t,
                    got: betas.len(),
                });
            }
        } else if self.beta_schedule != BetaSchedule::SquaredcosCapV2 {
            for (name, value) in [("beta_start", self.beta_start), ("beta_end", self.beta_end)] {
                if !value.is_finite() || value <= 0.0 || value > 1.0 {
                    return Err(Error::InvalidParameter { name, value });
                }
            }
            if self.beta_end < self.beta_start {
                return Err(Error::BetaRange {
                    beta_start: self.beta_start,
                    beta_end: self.beta_end,
                });
            }
        }
        if self.rescale_betas_zero_snr && t < 2 {
            return Err(Error::ZeroSnrNeedsTwoTimesteps);
        }
        Ok(())
    }

    /// The beta of training timestep `t` as the schedule defines it, before any
    /// zero-SNR rescaling. `t` must be below `num_train_timesteps` (not checked; the
    /// value is meaningless otherwise).
    pub fn raw_beta(&self, t: usize) -> f64 {
        let n = self.num_train_timesteps;
        if let Some(betas) = self.trained_betas {
            return betas[t];
        }
        match self.beta_schedule {
            BetaSchedule::Linear => torch_linspace(self.beta_start, self.beta_end, n, t),
            BetaSchedule::ScaledLinear => {
                let b =
                    torch_linspace(libm::sqrt(self.beta_start), libm::sqrt(self.beta_end), n, t);
                b * b
            }
            BetaSchedule::SquaredcosCapV2 => {
                let t1 = t as f64 / n as f64;
                let t2 = (t + 1) as f64 / n as f64;
                let b = 1.0 - cosine_alpha_bar(t2) / cosine_alpha_bar(t1);
                if b < COSINE_MAX_BETA {
                    b
                } else {
                    COSINE_MAX_BETA
                }
            }
            BetaSchedule::Sigmoid => {
                let x = torch_linspace(-6.0, 6.0, n, t);
                let s = 1.0 / (1.0 + libm::exp(-x));
                s * (self.beta_end - self.beta_start) + self.beta_start
            }
        }
    }

    /// Writes the final betas (after zero-SNR rescaling, if enabled) into
    /// `out[..num_train_timesteps]`.
    pub fn fill_betas(&self, out: &mut [f64]) -> Result<()> {
        self.validate()?;
        let n = self.num_train_timesteps;
        if out.len() < n {
            return Err(Error::BufferTooSmall {
                what: "betas",
                needed: n,
                got: out.len(),
            });
        }
        let out = &mut out[..n];
        for (t, b) in out.iter_mut().enumerate() {
            *b = self.raw_beta(t);
            if !b.is_finite() || *b <= 0.0 || *b > 1.0 {
                return Err(Error::InvalidBeta {
                    timestep: t,
                    value: *b,
                });
            }
        }
        if self.rescale_betas_zero_snr {
            rescale_zero_terminal_snr(out);
        }
        Ok(())
    }

    /// Writes `alphas_cumprod[t] = prod_{s <= t} (1 - beta_s)` into
    /// `out[..num_train_timesteps]` (a sequential product, as `torch.cumprod`).
    pub fn fill_alphas_cumprod(&self, out: &mut [f64]) -> Result<()> {
        self.fill_betas(out)?;
        let mut prod = 1.0;
        for v in out[..self.num_train_timesteps].iter_mut() {
            prod *= 1.0 - *v;
            *v = prod;
        }
        Ok(())
    }
}

/// In place: betas -> rescaled betas with zero terminal SNR (Lin et al. 2023,
/// Algorithm 1), in diffusers' operation order.
fn rescale_zero_terminal_snr(betas: &mut [f64]) {
    // betas -> sqrt(alphas_cumprod)
    let mut prod = 1.0;
    for b in betas.iter_mut() {
        prod *= 1.0 - *b;
        *b = libm::sqrt(prod);
    }
    let s0 = betas[0];
    let st = betas[betas.len() - 1];
    let scale = s0 / (s0 - st);
    // sqrt(abar) -> abar, shifted and scaled
    for s in betas.iter_mut() {
        let v = (*s - st) * scale;
        *s = v * v;
    }
    // abar -> alphas -> betas, back to front so each ratio still sees abar[t-1]
    for t in (1..betas.len()).rev() {
        betas[t] = 1.0 - betas[t] / betas[t - 1];
    }
    betas[0] = 1.0 - betas[0];
}

/// The variance and mean coefficients of the forward-process posterior
/// `q(x_prev | x_t, x_0) = N(c_x0 * x_0 + c_xt * x_t, var)` between two noise levels
/// `abar_t` and `abar_prev` (`abar_prev >= abar_t`), with
/// `beta = 1 - abar_t / abar_prev`:
///
/// ```text
/// var  = beta * (1 - abar_prev) / (1 - abar_t)
/// c_x0 = beta * sqrt(abar_prev) / (1 - abar_t)
/// c_xt = (1 - abar_prev) * sqrt(1 - beta) / (1 - abar_t)
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Posterior {
    /// `beta` of this (possibly respaced) step.
    pub beta: f64,
    /// The posterior variance `var` (`beta~` in Ho et al.).
    pub variance: f64,
    /// `c_x0`, improved-diffusion's `posterior_mean_coef1`.
    pub mean_coef_x0: f64,
    /// `c_xt`, improved-diffusion's `posterior_mean_coef2`.
    pub mean_coef_xt: f64,
}

impl Posterior {
    /// Coefficients of the step from noise level `abar_t` to `abar_prev`.
    pub fn between(abar_t: f64, abar_prev: f64) -> Self {
        let alpha = abar_t / abar_prev;
        let beta = 1.0 - alpha;
        let one_minus = 1.0 - abar_t;
        Posterior {
            beta,
            variance: beta * (1.0 - abar_prev) / one_minus,
            mean_coef_x0: beta * libm::sqrt(abar_prev) / one_minus,
            mean_coef_xt: (1.0 - abar_prev) * libm::sqrt(alpha) / one_minus,
        }
    }
}

/// A computed noise schedule: the `alphas_cumprod` table of the training chain, held in
/// a buffer the caller owns.
///
/// ```
/// use esddpm_core::{NoiseSchedule, ScheduleConfig};
/// let mut storage = [0.0f64; 1000];
/// let schedule = NoiseSchedule::new(&ScheduleConfig::default(), &mut storage).unwrap();
/// assert!((schedule.alpha_cumprod(999) - 4.035e-5).abs() < 1e-7);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NoiseSchedule<'a> {
    alphas_cumprod: &'a [f64],
}

impl<'a> NoiseSchedule<'a> {
    /// Computes the table of `config` into `storage[..num_train_timesteps]` and borrows
    /// it.
    pub fn new(config: &ScheduleConfig<'_>, storage: &'a mut [f64]) -> Result<Self> {
        config.fill_alphas_cumprod(storage)?;
        Ok(Self {
            alphas_cumprod: &storage[..config.num_train_timesteps],
        })
    }

    /// Uses a precomputed `alphas_cumprod` table (for instance one saved with a model).
    /// It must be non-empty, finite, non-increasing, within [0, 1], with
    /// `alphas_cumprod[0] > 0`; only the last value may be 0 (zero terminal SNR).
    pub fn from_alphas_cumprod(alphas_cumprod: &'a [f64]) -> Result<Self> {
        if alphas_cumprod.is_empty() {
            return Err(Error::NoTrainTimesteps);
        }
        let mut prev = 1.0;
        let last = alphas_cumprod.len() - 1;
        for (t, &a) in alphas_cumprod.iter().enumerate() {
            let bad = !a.is_finite() || a > prev || a < 0.0 || (a == 0.0 && t != last);
            if bad {
                return Err(Error::InvalidAlphasCumprod {
                    timestep: t,
                    value: a,
                });
            }
            prev = a;
        }
        Ok(Self { alphas_cumprod })
    }

    /// `T`, the number of training timesteps.
    pub fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// The whole `alphas_cumprod` table.
    pub fn alphas_cumprod(&self) -> &'a [f64] {
        self.alphas_cumprod
    }

    /// `abar_t`. Panics if `t >= T`; use [`Self::get`] for a checked lookup.
    pub fn alpha_cumprod(&self, t: usize) -> f64 {
        self.alphas_cumprod[t]
    }

    /// `abar_t`, or an error when `t` is out of range.
    pub fn get(&self, t: u32) -> Result<f64> {
        self.alphas_cumprod
            .get(t as usize)
            .copied()
            .ok_or(Error::TimestepOutOfRange {
                timestep: t,
                num_train_timesteps: self.alphas_cumprod.len(),
            })
    }

    /// `beta_t = 1 - abar_t / abar_{t-1}` (with `abar_{-1} = 1`), recovered from the
    /// table. Panics if `t >= T`.
    pub fn beta(&self, t: usize) -> f64 {
        let prev = if t == 0 {
            1.0
        } else {
            self.alphas_cumprod[t - 1]
        };
        1.0 - self.alphas_cumprod[t] / prev
    }

    /// The posterior of the full (unspaced) chain at training timestep `t`, i.e. between
    /// `abar_t` and `abar_{t-1}` (`abar_{-1} = 1`). Panics if `t >= T`.
    pub fn posterior(&self, t: usize) -> Posterior {
        let prev = if t == 0 {
            1.0
        } else {
            self.alphas_cumprod[t - 1]
        };
        Posterior::between(self.alphas_cumprod[t], prev)
    }

    /// improved-diffusion's `posterior_log_variance_clipped[t]`: `ln(var_t)`, except at
    /// `t = 0`, where the variance is 0 and the value of `t = 1` is used. Needs `T >= 2`
    /// for `t = 0`; panics if `t >= T`.
    pub fn posterior_log_variance_clipped(&self, t: usize) -> f64 {
        let t = if t == 0 { 1 } else { t };
        libm::log(self.posterior(t).variance)
    }

    /// Signal-to-noise ratio `abar_t / (1 - abar_t)`. Panics if `t >= T`.
    pub fn snr(&self, t: usize) -> f64 {
        let a = self.alphas_cumprod[t];
        a / (1.0 - a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_default_endpoints() {
        let cfg = ScheduleConfig::default();
        assert_eq!(cfg.raw_beta(0), 1e-4);
        assert_eq!(cfg.raw_beta(999), 0.02);
        let mut buf = [0.0; 1000];
        let s = NoiseSchedule::new(&cfg, &mut buf).unwrap();
        assert!((s.beta(500) - cfg.raw_beta(500)).abs() < 1e-15);
    }

    #[test]
    fn zero_snr_ends_at_zero() {
        let cfg = ScheduleConfig {
            rescale_betas_zero_snr: true,
            ..Default::default()
        };
        let mut buf = [0.0; 1000];
        let s = NoiseSchedule::new(&cfg, &mut buf).unwrap();
        assert_eq!(s.alpha_cumprod(999), 0.0);
        let plain = {
            let mut b = [0.0; 1000];
            ScheduleConfig::default()
                .fill_alphas_cumprod(&mut b)
                .unwrap();
            b[0]
        };
        assert!((s.alpha_cumprod(0) - plain).abs() < 1e-15);
    }
}
