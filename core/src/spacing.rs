//! Timestep selection: which training timesteps the reverse chain visits.
//!
//! Every function here writes a strictly decreasing list of training timesteps, in the
//! order the sampler runs them, into a caller buffer and returns the filled part.
//! Three families are supported:
//!
//! - diffusers' `timestep_spacing` (`leading`, `trailing`, `linspace`) with
//!   `steps_offset`, exactly as `DDPMScheduler.set_timesteps` computes it;
//! - improved-diffusion's respacing strings (`"250"`, `"ddim25"`, `"10,15,20"`), the
//!   chains ES-DDPM's official code runs on;
//! - an explicit list, checked by [`check_timesteps`].
//!
//! A respaced chain keeps a subset `S` of the training timesteps; the sampler derives
//! each step's beta from the kept `alphas_cumprod`,
//! `beta_i = 1 - abar_{s_i} / abar_{s_{i-1}}`, and calls the model with the original
//! timestep `s_i`.

use crate::error::{Error, RespacingError, Result};

/// diffusers' `timestep_spacing` (Lin et al. 2023, table 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimestepSpacing {
    /// `arange(N) * (T // N)`, reversed, plus `steps_offset`. diffusers' DDPM default.
    #[default]
    Leading,
    /// `round(arange(T, 0, -T / N)) - 1`: always includes `T - 1`.
    Trailing,
    /// `round(linspace(0, T - 1, N))`, reversed.
    Linspace,
}

impl TimestepSpacing {
    /// Parses diffusers' name (`"leading"`, `"trailing"`, `"linspace"`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "leading" => Some(Self::Leading),
            "trailing" => Some(Self::Trailing),
            "linspace" => Some(Self::Linspace),
            _ => None,
        }
    }

    /// diffusers' name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Leading => "leading",
            Self::Trailing => "trailing",
            Self::Linspace => "linspace",
        }
    }

    /// The largest number of timesteps [`Self::fill`] may write for `steps` inference
    /// steps (`trailing` can produce one more than asked when `T / N` does not divide
    /// evenly, as numpy's `arange` does).
    pub fn max_len(self, steps: usize) -> usize {
        match self {
            Self::Trailing => steps + 1,
            _ => steps,
        }
    }

    /// Writes diffusers' timesteps for `num_inference_steps` steps of a chain of
    /// `num_train_timesteps`, in decreasing order, into `out`, and returns them.
    pub fn fill(
        self,
        num_train_timesteps: usize,
        num_inference_steps: usize,
        steps_offset: u32,
        out: &mut [u32],
    ) -> Result<&[u32]> {
        let t = num_train_timesteps;
        let n = num_inference_steps;
        if t == 0 {
            return Err(Error::NoTrainTimesteps);
        }
        if n == 0 || n > t {
            return Err(Error::InvalidStepCount { steps: n, max: t });
        }
        let len = match self {
            Self::Trailing => trailing_len(t, n),
            _ => n,
        };
        if out.len() < len {
            return Err(Error::BufferTooSmall {
                what: "timesteps",
                needed: len,
                got: out.len(),
            });
        }
        let out = &mut out[..len];
        match self {
            Self::Leading => {
                let ratio = t / n;
                for (i, v) in out.iter_mut().enumerate() {
                    let k = (n - 1 - i) * ratio;
                    *v = (k as u64 + u64::from(steps_offset)).min(u64::from(u32::MAX)) as u32;
                }
            }
            Self::Trailing => {
                let step = t as f64 / n as f64;
                let start = t as f64;
                // numpy's arange fills start + i * delta with delta = (start - step) - start.
                let delta = (start - step) - start;
                for (i, v) in out.iter_mut().enumerate() {
                    let x = libm::rint(start + i as f64 * delta);
                    *v = (x as i64 - 1).max(0) as u32;
                }
            }
            Self::Linspace => {
                for (i, v) in out.iter_mut().enumerate() {
                    let k = n - 1 - i;
                    *v = libm::rint(numpy_linspace(0.0, (t - 1) as f64, n, k)) as u32;
                }
            }
        }
        check_timesteps(out, t)?;
        Ok(out)
    }
}

/// Length of numpy's `arange(T, 0, -T / N)`: `ceil((0 - T) / (-T / N))`.
fn trailing_len(t: usize, n: usize) -> usize {
    let step = t as f64 / n as f64;
    libm::ceil(-(t as f64) / -step) as usize
}

/// `numpy.linspace(start, stop, n)[i]` (endpoint included).
fn numpy_linspace(start: f64, stop: f64, n: usize, i: usize) -> f64 {
    if n == 1 {
        return start;
    }
    if i == n - 1 {
        return stop;
    }
    let step = (stop - start) / (n - 1) as f64;
    i as f64 * step + start
}

/// Checks that `timesteps` is non-empty, strictly decreasing and below
/// `num_train_timesteps`.
pub fn check_timesteps(timesteps: &[u32], num_train_timesteps: usize) -> Result<()> {
    let Some(&first) = timesteps.first() else {
        return Err(Error::InvalidStepCount {
            steps: 0,
            max: num_train_timesteps,
        });
    };
    if first as usize >= num_train_timesteps {
        return Err(Error::TimestepOutOfRange {
            timestep: first,
            num_train_timesteps,
        });
    }
    for (i, w) in timesteps.windows(2).enumerate() {
        if w[1] >= w[0] {
            return Err(Error::TimestepsNotDescending { index: i + 1 });
        }
    }
    Ok(())
}

/// An improved-diffusion respacing (`timestep_respacing`), parsed without allocating.
///
/// - `"ddimN"`: the smallest integer stride `k` for which `range(0, T, k)` has exactly `N`
///   entries;
/// - `"a,b,c"`: `T` is split into as many equal sections (the first `T % sections` get one
///   extra step) and section `i` keeps `count_i` timesteps evenly strided over it,
///   `start + round(j * (size - 1) / (count - 1))`, with Python's round-half-to-even on a
///   repeatedly added fractional stride, as `space_timesteps` does. `"250"` is one section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Respacing<'s> {
    spec: &'s str,
}

impl<'s> Respacing<'s> {
    /// Wraps a respacing string after checking its syntax.
    pub fn parse(spec: &'s str) -> Result<Self> {
        let r = Self { spec: spec.trim() };
        if let Some(rest) = r.spec.strip_prefix("ddim") {
            parse_count(rest)?;
        } else {
            if r.spec.is_empty() {
                return Err(RespacingError::Syntax.into());
            }
            for part in r.spec.split(',') {
                parse_count(part)?;
            }
        }
        Ok(r)
    }

    /// The string as given (trimmed).
    pub fn as_str(&self) -> &'s str {
        self.spec
    }

    /// The number of timesteps this respacing keeps (the buffer length [`Self::fill`]
    /// needs).
    pub fn len(&self) -> usize {
        if let Some(rest) = self.spec.strip_prefix("ddim") {
            parse_count(rest).unwrap_or(0)
        } else {
            self.spec
                .split(',')
                .map(|p| parse_count(p).unwrap_or(0))
                .fold(0usize, usize::saturating_add)
        }
    }

    /// True when the respacing keeps no timestep.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the kept timesteps of a chain of `num_train_timesteps`, in decreasing
    /// (sampling) order, into `out`, and returns them. Index `i` of improved-diffusion's
    /// ascending spaced chain is `result[len - 1 - i]`.
    pub fn fill<'o>(&self, num_train_timesteps: usize, out: &'o mut [u32]) -> Result<&'o [u32]> {
        let t = num_train_timesteps;
        if t == 0 {
            return Err(Error::NoTrainTimesteps);
        }
        let len = self.len();
        if len == 0 {
            return Err(RespacingError::Empty.into());
        }
        if out.len() < len {
            return Err(Error::BufferTooSmall {
                what: "timesteps",
                needed: len,
                got: out.len(),
            });
        }
        let out = &mut out[..len];
        if let Some(rest) = self.spec.strip_prefix("ddim") {
            let desired = parse_count(rest)?;
            let stride = (1..t)
                .find(|&k| t.div_ceil(k) == desired)
                .ok_or(RespacingError::NoExactStride { steps: desired })?;
            for (i, v) in out.iter_mut().enumerate() {
                *v = ((len - 1 - i) * stride) as u32;
            }
        } else {
            let sections = self.spec.split(',').count();
            let size_per = t / sections;
            let extra = t % sections;
            let mut start = 0usize;
            let mut pos = len; // fill from the back: ascending order reversed
            for (i, part) in self.spec.split(',').enumerate() {
                let count = parse_count(part)?;
                let size = size_per + usize::from(i < extra);
                if size < count {
                    return Err(RespacingError::SectionTooSmall { size, count }.into());
                }
                let frac_stride = if count <= 1 {
                    1.0
                } else {
                    (size - 1) as f64 / (count - 1) as f64
                };
                let mut cur = 0.0f64;
                for _ in 0..count {
                    pos -= 1;
                    out[pos] = (start + libm::rint(cur) as usize) as u32;
                    cur += frac_stride;
                }
                start += size;
            }
        }
        check_timesteps(out, t)?;
        Ok(out)
    }
}

fn parse_count(s: &str) -> Result<usize> {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RespacingError::Syntax.into());
    }
    s.parse::<usize>()
        .map_err(|_| RespacingError::Syntax.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn es_ddpm_example_chain_250() {
        // ES-DDPM.md: chain 250 (stride ~4), k = 25 starts at original t = 96.
        let mut buf = [0u32; 250];
        let ts = Respacing::parse("250")
            .unwrap()
            .fill(1000, &mut buf)
            .unwrap();
        assert_eq!(ts[250 - 25], 96);
        assert_eq!(ts[249], 0);
        assert_eq!(ts[0], 999);
    }

    #[test]
    fn leading_with_offset() {
        let mut buf = [0u32; 10];
        let ts = TimestepSpacing::Leading
            .fill(1000, 10, 1, &mut buf)
            .unwrap();
        assert_eq!(ts, &[901, 801, 701, 601, 501, 401, 301, 201, 101, 1]);
    }
}
