//! The C API's parameter validation, called as a C program would: `EsdGenerateParams`
//! with arbitrary `struct_size`, enum values, seeds, counts, strings and arrays (NULL or
//! not, lengths right or wrong, NaN included) against the tiny test pipeline (loaded
//! once, 16 MiB memory limit); `EsdSchedulerParams` / `EsdSamplerParams` of the
//! sampler-only API, then its calls in arbitrary order with arbitrary model outputs.
//!
//! Invariants: no panic escapes (ESD_STATUS_PANIC is a failure here too); on failure
//! nothing is written to the caller's buffers (sentinels stay); on success the image
//! values are finite.
#![no_main]
// The C ABI's own sources (ffi/src), compiled into this target: the ffi crate is a
// staticlib/cdylib named like the runtime crate, so it cannot be a Rust dependency.
#[allow(dead_code, unused_imports)]
#[path = "../../ffi/src/pipeline.rs"]
mod pipeline;
#[allow(dead_code, unused_imports)]
#[path = "../../ffi/src/sampler.rs"]
mod sampler;
#[allow(dead_code, unused_imports)]
#[path = "../../ffi/src/session.rs"]
mod session;
#[allow(dead_code, unused_imports)]
#[path = "../../ffi/src/status.rs"]
mod status;

use arbitrary::{Arbitrary, Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use pipeline::*;
use sampler::*;
use status::*;
use std::ffi::{c_char, CString};
use std::ptr::{null, null_mut};

const TINY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/models/tiny\0");

struct Shared(*mut EsdPipeline);
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

fn pipeline() -> *const EsdPipeline {
    static P: std::sync::OnceLock<Shared> = std::sync::OnceLock::new();
    P.get_or_init(|| unsafe {
        let mut lp = std::mem::zeroed::<EsdLoadParams>();
        assert_eq!(esd_load_params_init(&mut lp), EsdStatus::Ok);
        lp.threads = 1;
        lp.memory_limit = 16 << 20;
        let mut p = null_mut();
        let s = esd_pipeline_new(TINY.as_ptr().cast(), &lp, &mut p);
        assert_eq!(s, EsdStatus::Ok);
        // Valid but long runs (1000 DDPM steps from noise, 3 images) would take a
        // minute here: cancel every run after 24 steps (ESD_STATUS_CANCELLED, which
        // must leave the buffers untouched like every failure).
        let s = esd_pipeline_set_progress(p, Some(stop_long_runs), p.cast(), 0);
        assert_eq!(s, EsdStatus::Ok);
        Shared(p)
    })
    .0
}

unsafe extern "C" fn stop_long_runs(user: *mut std::ffi::c_void, progress: *const EsdProgress) {
    if (*progress).step + 1 >= 24 {
        esd_pipeline_cancel(user as *const EsdPipeline);
    }
}

fn u32_in(u: &mut Unstructured<'_>, small: u32) -> Result<u32> {
    // Mostly small values (valid or just past the end), sometimes any u32.
    Ok(if u.ratio(1, 8)? {
        u32::arbitrary(u)?
    } else {
        u.int_in_range(0..=small)?
    })
}

fn f64_any(u: &mut Unstructured<'_>) -> Result<f64> {
    Ok(match u.int_in_range(0u8..=5)? {
        0 => f64::from_bits(u64::arbitrary(u)?),
        1 => f64::NAN,
        _ => f64::from(u.int_in_range(-500i32..=1500)?) / 1000.0,
    })
}

fn floats(u: &mut Unstructured<'_>, right: usize) -> Result<Vec<f32>> {
    let len = if u.ratio(3, 4)? {
        right
    } else {
        u.int_in_range(0..=right + 2)?
    };
    if len > 4096 {
        // Large buffers (a large but allowed shape): one value repeated, so that the
        // harness does not spend the run drawing millions of values.
        return Ok(vec![
            f32::from(u.int_in_range(-1000i16..=1000)?) / 1000.0;
            len
        ]);
    }
    (0..len)
        .map(|_| {
            Ok(match u.int_in_range(0u8..=9)? {
                0 => f32::NAN,
                1 => f32::from_bits(u32::arbitrary(u)?),
                _ => f32::from(u.int_in_range(-1000i16..=1000)?) / 1000.0,
            })
        })
        .collect()
}

/// A struct_size: the right one mostly, else smaller, zero or anything.
fn struct_size(u: &mut Unstructured<'_>, right: usize) -> Result<u32> {
    Ok(match u.int_in_range(0u8..=9)? {
        0 => 0,
        1 => u.int_in_range(0..=right as u32)?,
        2 => u32::arbitrary(u)?,
        _ => right as u32,
    })
}

unsafe fn generate(u: &mut Unstructured<'_>) -> Result<()> {
    let p = pipeline();
    let mut gp = std::mem::zeroed::<EsdGenerateParams>();
    assert_eq!(esd_generate_params_init(&mut gp), EsdStatus::Ok);
    gp.struct_size = struct_size(u, std::mem::size_of::<EsdGenerateParams>())?;
    gp.random_seed = u32_in(u, 1)?;
    gp.seed = u64::arbitrary(u)?;
    gp.first_image = u64::arbitrary(u)?;
    // Batches: small ones run; huge ones must hit the memory limit before allocating.
    gp.batch = if u.ratio(1, 6)? {
        u.int_in_range(1u32 << 16..=u32::MAX)?
    } else {
        u.int_in_range(0..=3)?
    };
    gp.start = u32_in(u, 3)?;
    // Mostly short runs (a few U-Net calls) so that the target explores parameters
    // rather than spending its time in long chains; 0 steps (the default: T' for
    // DDPM, up to 1000 calls) and any u32 now and then.
    gp.t_prime = u32_in(u, 40)?;
    gp.steps = match u.int_in_range(0u8..=15)? {
        15 => 0,
        14 => u32::arbitrary(u)?,
        _ => u.int_in_range(1..=12)?,
    };
    gp.sampler = u32_in(u, 3)?;
    gp.clip_sample = i32::arbitrary(u)? % 3;
    gp.eta = f64_any(u)?;
    gp.strength = f64_any(u)?;
    let prior = match u.int_in_range(0u8..=3)? {
        0 => Some(CString::new("mlp_cond").unwrap()),
        1 => Some(CString::new(<&str>::arbitrary(u)?.replace('\0', "")).unwrap()),
        _ => None,
    };
    gp.prior = prior.as_ref().map_or(null(), |s| s.as_ptr());
    let batch = gp.batch.min(4) as usize;
    let latents = floats(u, batch * 8)?;
    if bool::arbitrary(u)? {
        gp.latents = latents.as_ptr();
        gp.latents_len = latents.len();
    }
    let labels: Vec<i64> = (0..u.int_in_range(0..=batch + 1)?)
        .map(|_| Ok(i64::from(u.int_in_range(-2i8..=11)?)))
        .collect::<Result<_>>()?;
    if bool::arbitrary(u)? {
        gp.class_labels = labels.as_ptr();
        gp.class_labels_len = labels.len();
    }
    let init = floats(u, 256)?;
    if u.ratio(1, 3)? {
        gp.init_image = init.as_ptr();
        gp.init_image_len = init.len();
    }
    let mask = floats(u, 256)?;
    if u.ratio(1, 4)? {
        gp.inpaint_mask = mask.as_ptr();
        gp.inpaint_mask_len = mask.len();
    }
    let right = batch * 256;
    let out_len = if u.ratio(3, 4)? {
        right
    } else {
        u.int_in_range(0..=right + 4)?
    };
    let as_u8 = bool::arbitrary(u)?;
    // NULL params mean the defaults: one image, 100 DDPM steps (slow here: rare, and
    // never on exhausted input, where `ratio` is true).
    let params: *const EsdGenerateParams = if u.ratio(19, 20)? { &gp } else { null() };
    let written = if params.is_null() { 256 } else { right };
    let mut seed_used = 0xdead_beef_u64;
    if as_u8 {
        let mut out = vec![0xa5u8; out_len];
        let s = esd_pipeline_generate_u8(p, params, out.as_mut_ptr(), out_len, &mut seed_used);
        assert_ne!(s, EsdStatus::Panic);
        if s != EsdStatus::Ok {
            assert!(
                out.iter().all(|&b| b == 0xa5),
                "{s:?}: buffer written on failure"
            );
            assert_eq!(seed_used, 0xdead_beef);
        }
    } else {
        let mut out = vec![f32::from_bits(0x7fc0_1234); out_len];
        let s = esd_pipeline_generate_f32(p, params, out.as_mut_ptr(), out_len, &mut seed_used);
        assert_ne!(s, EsdStatus::Panic);
        if s == EsdStatus::Ok {
            assert!(out[..written.min(out_len)].iter().all(|v| v.is_finite()));
        } else {
            assert!(
                out.iter().all(|v| v.to_bits() == 0x7fc0_1234),
                "{s:?}: buffer written"
            );
            assert_eq!(seed_used, 0xdead_beef);
        }
    }
    Ok(())
}

unsafe fn sampler(u: &mut Unstructured<'_>) -> Result<()> {
    let mut sp = std::mem::zeroed::<EsdSchedulerParams>();
    assert_eq!(esd_scheduler_params_init(&mut sp), EsdStatus::Ok);
    sp.struct_size = struct_size(u, std::mem::size_of::<EsdSchedulerParams>())?;
    sp.num_train_timesteps = u32_in(u, 1200)?;
    sp.beta_start = f64_any(u)? / 100.0;
    sp.beta_end = f64_any(u)? / 10.0;
    sp.beta_schedule = u32_in(u, 4)?;
    sp.variance_type = u32_in(u, 6)?;
    sp.prediction_type = u32_in(u, 3)?;
    sp.clip_sample = u32_in(u, 2)?;
    sp.clip_sample_range = f64_any(u)?;
    sp.timestep_spacing = u32_in(u, 3)?;
    sp.steps_offset = u32_in(u, 2)?;
    sp.set_alpha_to_one = u32_in(u, 2)?;
    sp.rescale_betas_zero_snr = u32_in(u, 2)?;
    let mut pp = std::mem::zeroed::<EsdSamplerParams>();
    assert_eq!(esd_sampler_params_init(&mut pp), EsdStatus::Ok);
    pp.struct_size = struct_size(u, std::mem::size_of::<EsdSamplerParams>())?;
    pp.sampler = u32_in(u, 3)?;
    pp.start = u32_in(u, 3)?;
    pp.t_prime = u32_in(u, 1201)?;
    pp.steps = u32_in(u, 60)?;
    pp.strength = f64_any(u)?;
    pp.eta = f64_any(u)?;
    pp.seed = u64::arbitrary(u)?;
    pp.first_image = u64::arbitrary(u)?;
    // Shapes: small ones run; huge ones must be refused before allocating.
    let dim = |u: &mut Unstructured<'_>| -> Result<u32> {
        Ok(if u.ratio(1, 12)? {
            u32::arbitrary(u)?
        } else {
            u.int_in_range(0..=4)?
        })
    };
    pp.batch = dim(u)?;
    pp.channels = dim(u)?;
    pp.height = dim(u)?;
    pp.width = dim(u)?;
    // 16 MiB: large shapes are refused with ESD_STATUS_MEMORY_LIMIT before allocating
    // (the default, 4 GiB, is above libFuzzer's 2 GiB RSS limit).
    pp.memory_limit = 16 << 20;
    let mut s = null_mut();
    let st = esd_sampler_new(&sp, &pp, &mut s);
    assert_ne!(st, EsdStatus::Panic);
    if st != EsdStatus::Ok {
        assert!(s.is_null());
        return Ok(());
    }
    let (mut sample_len, mut output_len) = (0usize, 0usize);
    let st = esd_sampler_lengths(s, &mut sample_len, &mut output_len);
    assert_eq!(st, EsdStatus::Ok);
    for _ in 0..u.int_in_range(0usize..=40)? {
        let st = match u.int_in_range(0u8..=5)? {
            0 => {
                let img = floats(u, sample_len)?;
                let ptr = if u.ratio(1, 3)? { null() } else { img.as_ptr() };
                esd_sampler_init(s, ptr, img.len())
            }
            1 => {
                let mut call = EsdModelCall::default();
                esd_sampler_next(s, &mut call)
            }
            2 => {
                let mut out =
                    vec![f32::from_bits(0x7fc0_1234); u.int_in_range(0..=sample_len + 1)?];
                let st = esd_sampler_preview(s, out.as_mut_ptr(), out.len());
                if st != EsdStatus::Ok {
                    assert!(out.iter().all(|v| v.to_bits() == 0x7fc0_1234));
                }
                st
            }
            3 => {
                let mut out =
                    vec![f32::from_bits(0x7fc0_1234); u.int_in_range(0..=sample_len + 1)?];
                let st = esd_sampler_sample(s, out.as_mut_ptr(), out.len());
                if st != EsdStatus::Ok {
                    assert!(out.iter().all(|v| v.to_bits() == 0x7fc0_1234));
                }
                st
            }
            _ => {
                let mo = floats(u, output_len)?;
                esd_sampler_step(s, mo.as_ptr(), mo.len())
            }
        };
        assert_ne!(st, EsdStatus::Panic);
    }
    esd_sampler_free(s);
    Ok(())
}

fn call_str(status: EsdStatus) {
    let msg: *const c_char = esd_status_str(status as u32);
    assert!(!msg.is_null());
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(which) = u.int_in_range(0u8..=3) else {
        return;
    };
    unsafe {
        let _ = match which {
            0 | 1 => generate(&mut u),
            _ => sampler(&mut u),
        };
    }
    call_str(EsdStatus::Ok);
});
