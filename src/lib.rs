//! # esddpm
//!
//! ES-DDPM image generation: a cheap prior (GAN generator, VAE decoder) gives a sample,
//! which is diffused to an early step `T'` and denoised in only `T'` DDPM steps.
//!
//! This crate will hold the std runtime (ONNX models through tract, the pipeline, the
//! CLI). Today it re-exports the allocation-free maths of [`esddpm_core`] — schedules,
//! timestep spacing, the sampler state machines and the seeded noise — which is all a
//! caller needs to run ES-DDPM with a model of its own; see `examples/standin.rs`.

pub use esddpm_core;
pub use esddpm_core::*;
