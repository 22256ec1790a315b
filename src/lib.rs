//! # esddpm
//!
//! ES-DDPM image generation (Lyu et al., arXiv 2205.12524): a cheap prior (GAN
//! generator, VAE decoder) gives a sample `x0'`, which is diffused in one shot to an
//! early step `T'` and denoised by a pre-trained DDPM U-Net in only `T'` steps.
//!
//! The data path, top to bottom:
//!
//! 1. [`Pipeline::from_folder`] loads a model folder: diffusers' `scheduler_config.json`,
//!    `esddpm.json`, the ONNX U-Net and priors (run by tract);
//! 2. the prior turns seeded latents into images ([`Pipeline::prior_images`]);
//! 3. [`Session`] diffuses them to `T'` and runs the sampler of [`esddpm_core`] one U-Net
//!    call per step;
//! 4. [`Images`] holds the result, f32 NCHW in [-1, 1], with 8-bit and PNG helpers.
//!
//! ```no_run
//! use esddpm::{GenerateOptions, LoadOptions, Pipeline, Start};
//! let pipeline = Pipeline::from_folder("models/fashion", &LoadOptions::default())?;
//! let images = pipeline.generate(&GenerateOptions {
//!     seed: 42,
//!     batch: 8,
//!     start: Start::EarlyStop { t_prime: Some(100) },
//!     ..Default::default()
//! })?;
//! images.save_png_grid("grid.png".as_ref(), 8)?;
//! # Ok::<(), esddpm::Error>(())
//! ```

#![deny(missing_docs)]

pub mod attention;
pub mod cache;
pub mod classifier;
mod codegen;
pub mod config;
pub mod control;
pub mod dataset;
pub mod direct_conv;
pub mod error;
pub mod eval;
pub mod fid;
mod fusion;
pub mod group_norm;
pub mod images;
mod load_threads;
pub mod memory;
pub mod model;
mod nnef_file;
mod onnx_file;
pub mod op_threads;
pub mod pipeline;
pub mod pointwise_conv;
pub mod prior;
pub mod rewrite;
pub mod session;
pub mod small_map_conv;
pub mod unet;
pub mod winograd;

#[cfg(test)]
mod test_values;

pub use config::{ClassifierEntry, EsddpmConfig, OutputRange, PriorEntry, SchedulerConfig};
pub use control::{slerp, Paste};
pub use error::{Error, ModelRole, Result};
pub use esddpm_core;
pub use images::Images;
pub use pipeline::{
    GenerateOptions, LoadOptions, MemoryFolder, Pipeline, Progress, SamplerChoice, Start,
};
pub use session::Session;
