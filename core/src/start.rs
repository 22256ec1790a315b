//! The early-stop start: where on the chain the reverse process begins, and the
//! one-shot forward diffusion of the prior's sample to that point.
//!
//! ES-DDPM draws `x0'` from a cheap prior (GAN, VAE), diffuses it to `T'` in one shot,
//!
//! ```text
//! x_T' = sqrt(abar_T') * x0' + sqrt(1 - abar_T') * eps,   eps ~ N(0, I)
//! ```
//!
//! and runs only the reverse steps from `T'` down. The start is written either the way
//! the ES-DDPM paper and code write it (`k` reverse steps of a spaced chain of length
//! `L`: begin at index `k - 1` of the ascending chain) or the way diffusers' img2img
//! writes it (`strength`). Both cut the same decreasing timestep list; see
//! [`StartAt::skip`].

use crate::error::{Error, Result};

/// Where the reverse process starts on a decreasing list of `N` timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum StartAt {
    /// All `N` steps (plain sampling when started from noise).
    #[default]
    Full,
    /// ES-DDPM: run the last `steps` (`k`) steps of the chain, i.e. start at index
    /// `k - 1` of the ascending spaced chain. `1 <= k <= N`.
    EarlyStop {
        /// `k`, the number of reverse steps.
        steps: usize,
    },
    /// diffusers img2img: `init = min(floor(N * strength), N)` steps are run, starting
    /// at entry `N - init`. `strength` in (0, 1]; it must leave at least one step.
    Strength(f64),
    /// Start at the first (largest) chain timestep that is `<= t`.
    Timestep(u32),
}

impl StartAt {
    /// How many leading entries of the decreasing `timesteps` are skipped; the run is
    /// `timesteps[skip..]`.
    pub fn skip(&self, timesteps: &[u32]) -> Result<usize> {
        let n = timesteps.len();
        match *self {
            StartAt::Full => {
                if n == 0 {
                    Err(Error::StartBeyondChain {
                        steps: 0,
                        chain_len: 0,
                    })
                } else {
                    Ok(0)
                }
            }
            StartAt::EarlyStop { steps } => {
                if steps == 0 || steps > n {
                    Err(Error::StartBeyondChain {
                        steps,
                        chain_len: n,
                    })
                } else {
                    Ok(n - steps)
                }
            }
            StartAt::Strength(s) => {
                if !(s.is_finite() && s > 0.0 && s <= 1.0) {
                    return Err(Error::InvalidStrength(s));
                }
                // Python: init_timestep = min(int(N * strength), N)
                let init = ((n as f64 * s) as usize).min(n);
                if init == 0 {
                    return Err(Error::InvalidStrength(s));
                }
                Ok(n - init)
            }
            StartAt::Timestep(t) => {
                timesteps
                    .iter()
                    .position(|&v| v <= t)
                    .ok_or(Error::StartTimestepBelowChain {
                        timestep: t,
                        smallest: timesteps.last().copied().unwrap_or(0),
                    })
            }
        }
    }
}

/// diffusers' `add_noise` / improved-diffusion's `q_sample`:
/// `out = sqrt(abar) * x0 + sqrt(1 - abar) * noise`, computed in f64 per element.
pub fn add_noise(x0: &[f32], noise: &[f32], abar: f64, out: &mut [f32]) -> Result<()> {
    if noise.len() != x0.len() {
        return Err(Error::BufferLength {
            what: "noise",
            expected: x0.len(),
            got: noise.len(),
        });
    }
    if out.len() != x0.len() {
        return Err(Error::BufferLength {
            what: "output",
            expected: x0.len(),
            got: out.len(),
        });
    }
    if !(abar.is_finite() && (0.0..=1.0).contains(&abar)) {
        return Err(Error::InvalidParameter {
            name: "alphas_cumprod",
            value: abar,
        });
    }
    let a = libm::sqrt(abar);
    let s = libm::sqrt(1.0 - abar);
    for ((o, &x), &e) in out.iter_mut().zip(x0).zip(noise) {
        *o = (a * f64::from(x) + s * f64::from(e)) as f32;
    }
    Ok(())
}
