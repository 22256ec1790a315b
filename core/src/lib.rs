//! # esddpm-core
//!
//! The maths of ES-DDPM (Lyu et al., "Accelerating Diffusion Models via Early Stop of the
//! Diffusion Process", arXiv 2205.12524), `#![no_std]` and without an allocator:
//!
//! 1. [`schedule`]: betas and `alphas_cumprod` of the training chain, in f64;
//! 2. [`spacing`]: which timesteps the reverse chain visits (diffusers' spacings,
//!    improved-diffusion's respacing strings, explicit lists);
//! 3. [`start`]: where the run begins (ES-DDPM's `k` steps, img2img's `strength`) and
//!    the one-shot diffusion of the prior's sample;
//! 4. [`sampler`]: DDPM, DDIM and DPM-Solver++(2M) as state machines over caller-owned
//!    buffers, with [`predict`] for the `x0` prediction and [`mask`] for inpainting;
//! 5. [`noise`]: seeded Gaussian noise, bit-identical on every platform.
//!
//! Features: none are needed (`default-features = false` builds for bare-metal targets
//! such as `thumbv7em-none-eabihf`). `alloc` adds `Vec`-returning conveniences
//! (`ScheduleConfig::alphas_cumprod_vec`, `TimestepSpacing::timesteps_vec`,
//! `Respacing::timesteps_vec`); `std` (default) implies `alloc`.
//!
//! ```
//! use esddpm_core::*;
//!
//! // The training chain (diffusers' defaults: 1000 steps, linear betas).
//! let mut abar = [0.0f64; 1000];
//! let schedule = NoiseSchedule::new(&ScheduleConfig::default(), &mut abar)?;
//! // The spaced chain: all 1000 timesteps; ES-DDPM runs the last k = 100 of them.
//! let mut chain = [0u32; 1000];
//! let chain = Respacing::parse("1000")?.fill(1000, &mut chain)?;
//! let shape = ImageShape::new(1, 1, 8, 8)?;
//! let mut sampler = Sampler::new(
//!     schedule, chain, StartAt::EarlyStop { steps: 100 },
//!     SamplerConfig::default(), shape, 42,
//! )?;
//! assert_eq!(sampler.start_timestep(), 99);
//!
//! let prior_x0 = [0.5f32; 64];                       // the prior's image, in [-1, 1]
//! let mut x = [0.0f32; 64];
//! let mut out = [0.0f32; 64];
//! let mut work = [0.0f32; 64];
//! sampler.init(&mut x, Init::Image(&prior_x0))?;
//! while let Some(call) = sampler.next_call() {
//!     // Run the U-Net on (x, call.timestep) into `out`; a stand-in here.
//!     out.iter_mut().for_each(|v| *v = 0.0);
//!     sampler.step(&mut x, &out, &mut work)?;
//! }
//! assert!(x.iter().all(|v| v.is_finite()));
//! # Ok::<(), esddpm_core::Error>(())
//! ```
#![no_std]
#![deny(missing_docs)]

#[cfg(feature = "alloc")]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod error;
pub mod mask;
pub mod noise;
#[cfg(feature = "alloc")]
mod owned;
pub mod predict;
pub mod sampler;
pub mod schedule;
pub mod shape;
pub mod spacing;
pub mod start;

pub use error::{Error, RespacingError, Result};
pub use mask::Mask;
pub use noise::{Draw, NoiseSource, NormalStream};
pub use predict::{PredictionType, Thresholding, X0Options};
pub use sampler::{
    Init, ModelCall, Sampler, SamplerConfig, SamplerKind, SamplerProgress, StepInfo, VarianceType,
};
pub use schedule::{BetaSchedule, NoiseSchedule, Posterior, ScheduleConfig, MAX_TRAIN_TIMESTEPS};
pub use shape::ImageShape;
pub use spacing::{check_timesteps, Respacing, TimestepSpacing};
pub use start::{add_noise, StartAt};
