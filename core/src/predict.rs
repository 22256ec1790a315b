//! From a model output to the predicted clean sample `x0` (and back to `eps`), with
//! clipping and dynamic thresholding.
//!
//! With `a = sqrt(abar_t)` and `s = sqrt(1 - abar_t)`, a noisy sample is
//! `x_t = a x0 + s eps`, and the model's output `m` means, by prediction type:
//!
//! ```text
//! epsilon:       x0 = (x_t - s m) / a            eps = m
//! sample:        x0 = m                          eps = (x_t - a m) / s
//! v_prediction:  x0 = a x_t - s m                eps = a m + s x_t
//! ```

use crate::error::{Error, Result};

/// What the model predicts (diffusers' `prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PredictionType {
    /// The added noise `eps` (Ho et al.).
    #[default]
    Epsilon,
    /// The clean sample `x0`.
    Sample,
    /// `v = a eps - s x0` (Salimans & Ho, progressive distillation).
    VPrediction,
}

impl PredictionType {
    /// Parses diffusers' name (`"epsilon"`, `"sample"`, `"v_prediction"`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "epsilon" => Some(Self::Epsilon),
            "sample" => Some(Self::Sample),
            "v_prediction" => Some(Self::VPrediction),
            _ => None,
        }
    }

    /// diffusers' name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Epsilon => "epsilon",
            Self::Sample => "sample",
            Self::VPrediction => "v_prediction",
        }
    }
}

/// Dynamic thresholding (Saharia et al., Imagen): per image, `s` is the `ratio`
/// quantile of `|x0|`, clamped to `[1, max_value]`, and `x0 <- clamp(x0, -s, s) / s`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholding {
    /// diffusers' `dynamic_thresholding_ratio` (default 0.995).
    pub ratio: f64,
    /// diffusers' `sample_max_value` (default 1.0).
    pub max_value: f64,
}

impl Default for Thresholding {
    fn default() -> Self {
        Self {
            ratio: 0.995,
            max_value: 1.0,
        }
    }
}

/// How the predicted `x0` is formed and bounded. `Default` is diffusers' DDPM default:
/// epsilon prediction, clip to [-1, 1], no thresholding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct X0Options {
    /// What the model predicts.
    pub prediction_type: PredictionType,
    /// Clamp `x0` to `[-clip_sample_range, clip_sample_range]` (diffusers' `clip_sample`).
    pub clip_sample: bool,
    /// diffusers' `clip_sample_range` (default 1.0).
    pub clip_sample_range: f64,
    /// Dynamic thresholding; when set, it replaces `clip_sample` (as in diffusers).
    pub thresholding: Option<Thresholding>,
}

impl Default for X0Options {
    fn default() -> Self {
        Self {
            prediction_type: PredictionType::Epsilon,
            clip_sample: true,
            clip_sample_range: 1.0,
            thresholding: None,
        }
    }
}

impl X0Options {
    /// Checks the numeric parameters.
    pub fn validate(&self) -> Result<()> {
        if self.clip_sample && !(self.clip_sample_range.is_finite() && self.clip_sample_range > 0.0)
        {
            return Err(Error::InvalidParameter {
                name: "clip_sample_range",
                value: self.clip_sample_range,
            });
        }
        if let Some(th) = self.thresholding {
            if !(th.ratio.is_finite() && th.ratio > 0.0 && th.ratio <= 1.0) {
                return Err(Error::InvalidParameter {
                    name: "dynamic_thresholding_ratio",
                    value: th.ratio,
                });
            }
            if !(th.max_value.is_finite() && th.max_value >= 1.0) {
                return Err(Error::InvalidParameter {
                    name: "sample_max_value",
                    value: th.max_value,
                });
            }
        }
        Ok(())
    }
}

/// The per-step constants of the conversions above, at noise level `abar_t`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Parameterization {
    /// `a = sqrt(abar_t)`.
    pub a: f64,
    /// `s = sqrt(1 - abar_t)`.
    pub s: f64,
    /// What the model predicts.
    pub prediction_type: PredictionType,
}

impl Parameterization {
    /// Constants at noise level `abar_t`.
    pub fn new(abar_t: f64, prediction_type: PredictionType) -> Self {
        Self {
            a: libm::sqrt(abar_t),
            s: libm::sqrt(1.0 - abar_t),
            prediction_type,
        }
    }

    /// `x0` from the noisy sample `x` and the model output `m`.
    #[inline]
    pub fn x0(&self, x: f64, m: f64) -> f64 {
        match self.prediction_type {
            PredictionType::Epsilon => (x - self.s * m) / self.a,
            PredictionType::Sample => m,
            PredictionType::VPrediction => self.a * x - self.s * m,
        }
    }

    /// `eps` from the noisy sample `x` and the model output `m` (unclipped).
    #[inline]
    pub fn eps(&self, x: f64, m: f64) -> f64 {
        match self.prediction_type {
            PredictionType::Epsilon => m,
            PredictionType::Sample => (x - self.a * m) / self.s,
            PredictionType::VPrediction => self.a * m + self.s * x,
        }
    }

    /// `eps` implied by `x` and a (possibly clipped) `x0`: `(x - a x0) / s`.
    #[inline]
    pub fn eps_from_x0(&self, x: f64, x0: f64) -> f64 {
        (x - self.a * x0) / self.s
    }
}

/// Clamps every value to `[-range, range]`.
pub fn clip(x0: &mut [f32], range: f64) {
    let r = range as f32;
    for v in x0.iter_mut() {
        *v = v.clamp(-r, r);
    }
}

/// Applies dynamic thresholding to one image's `x0` in place; `scratch` needs
/// `x0.len()` elements. The quantile interpolates linearly between order statistics,
/// as `torch.quantile` does.
pub fn threshold(x0: &mut [f32], th: Thresholding, scratch: &mut [f32]) -> Result<()> {
    let n = x0.len();
    if n == 0 {
        return Ok(());
    }
    if scratch.len() < n {
        return Err(Error::BufferTooSmall {
            what: "thresholding scratch",
            needed: n,
            got: scratch.len(),
        });
    }
    let scratch = &mut scratch[..n];
    for (d, s) in scratch.iter_mut().zip(x0.iter()) {
        *d = s.abs();
    }
    let rank = th.ratio * (n - 1) as f64;
    let lo = libm::floor(rank) as usize;
    let w = rank - lo as f64;
    let (_, &mut lo_val, upper) = scratch.select_nth_unstable_by(lo, f32::total_cmp);
    let hi_val = if lo + 1 < n {
        upper.iter().copied().fold(f32::INFINITY, f32::min)
    } else {
        lo_val
    };
    let (lo_val, hi_val) = (f64::from(lo_val), f64::from(hi_val));
    let q = lo_val + w * (hi_val - lo_val);
    let s = q.clamp(1.0, th.max_value);
    for v in x0.iter_mut() {
        *v = (f64::from(*v).clamp(-s, s) / s) as f32;
    }
    Ok(())
}
