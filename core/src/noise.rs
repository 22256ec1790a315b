//! Seeded Gaussian noise that is bit-identical on every platform.
//!
//! The generator is named and fixed, because tests and users compare images bit for bit:
//!
//! - **Bits**: ChaCha20 (`rand_chacha::ChaCha20Rng`) keyed with the 32 bytes
//!   `seed.to_le_bytes() ++ [0; 24]`. The ChaCha *stream* (64-bit nonce) is the image's
//!   index in the batch, so every image has its own stream, and the *word position* is
//!   `draw << 32`, so every use of noise ([`Draw`]) starts at its own fixed offset.
//!   Noise is therefore a pure function of `(seed, image index, draw, element)`: image
//!   `i` of a batch equals the image generated alone with the same seed and index `i`,
//!   and a run can be resumed at any step.
//! - **Normals**: Box-Muller on pairs of 53-bit uniforms, computed in f64 with `libm`
//!   (pure Rust, no platform libm) and rounded to f32:
//!
//! ```text
//! a, b = next_u64(), next_u64()
//! u1 = ((a >> 11) + 1) * 2^-53        in (0, 1]
//! u2 = (b >> 11) * 2^-53              in [0, 1)
//! r  = sqrt(-2 ln u1),  theta = 2 pi u2
//! z0 = r cos(theta),    z1 = r sin(theta)     (emitted in this order)
//! ```
//!
//! A stream yields `z0, z1` of pair 0, then of pair 1, and so on.

use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};

/// What a block of noise is used for. Each draw starts at its own position of the
/// image's ChaCha stream, `index() << 32` words, so draws never overlap (each has room
/// for 2^31 normals per image).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Draw {
    /// The prior's latent `z` (used by the runtime).
    Latent,
    /// `eps` of the early-stop start `x_T' = sqrt(abar) x0 + sqrt(1 - abar) eps`.
    Start,
    /// The noise a stochastic sampler adds at reverse step `k` of the run (0 = first).
    Step(u32),
    /// The noise that re-diffuses the known pixels of a mask after step `k`.
    Mask(u32),
}

impl Draw {
    /// The draw's index: `Latent` 0, `Start` 1, `Step(k)` `2 + 2k`, `Mask(k)` `3 + 2k`.
    pub fn index(self) -> u64 {
        match self {
            Draw::Latent => 0,
            Draw::Start => 1,
            Draw::Step(k) => 2 + 2 * u64::from(k),
            Draw::Mask(k) => 3 + 2 * u64::from(k),
        }
    }
}

/// The seed of a generation; hands out [`NormalStream`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NoiseSource {
    seed: u64,
}

impl NoiseSource {
    /// A source for `seed`.
    pub fn new(seed: u64) -> Self {
        Self { seed }
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The stream of standard normals for image `image` (its index in the batch, plus
    /// any batch offset) and `draw`.
    pub fn stream(&self, image: u64, draw: Draw) -> NormalStream {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&self.seed.to_le_bytes());
        let mut rng = ChaCha20Rng::from_seed(key);
        rng.set_stream(image);
        rng.set_word_pos(u128::from(draw.index()) << 32);
        NormalStream { rng, spare: None }
    }

    /// Fills `out` with the first `out.len()` normals of `(image, draw)`.
    pub fn fill(&self, image: u64, draw: Draw, out: &mut [f32]) {
        self.stream(image, draw).fill(out);
    }
}

/// A positioned ChaCha20 stream that yields standard normal f32 values.
#[derive(Debug, Clone)]
pub struct NormalStream {
    rng: ChaCha20Rng,
    spare: Option<f32>,
}

const TWO_POW_MINUS_53: f64 = 1.0 / (1u64 << 53) as f64;

impl NormalStream {
    /// The next Box-Muller pair `(z0, z1)`.
    #[inline]
    pub fn next_pair(&mut self) -> (f32, f32) {
        let a = self.rng.next_u64();
        let b = self.rng.next_u64();
        let u1 = ((a >> 11) + 1) as f64 * TWO_POW_MINUS_53;
        let u2 = (b >> 11) as f64 * TWO_POW_MINUS_53;
        let r = libm::sqrt(-2.0 * libm::log(u1));
        let (s, c) = libm::sincos(2.0 * core::f64::consts::PI * u2);
        ((r * c) as f32, (r * s) as f32)
    }

    /// The next standard normal value.
    #[inline]
    pub fn next_normal(&mut self) -> f32 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let (z0, z1) = self.next_pair();
        self.spare = Some(z1);
        z0
    }

    /// Fills `out` with the next normals.
    pub fn fill(&mut self, out: &mut [f32]) {
        for v in out.iter_mut() {
            *v = self.next_normal();
        }
    }
}

impl Iterator for NormalStream {
    type Item = f32;
    fn next(&mut self) -> Option<f32> {
        Some(self.next_normal())
    }
}
