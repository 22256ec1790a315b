//! Global and local control: latent interpolation, pasting into the prior's image.

use crate::error::{Error, Result};

/// Spherical interpolation between two latents (Shoemake's slerp), the usual way to walk
/// between Gaussian latents without shrinking their norm:
/// `slerp(a, b, t) = sin((1 - t) theta) / sin(theta) a + sin(t theta) / sin(theta) b`,
/// `theta = acos(a.b / (|a| |b|))`; linear interpolation when `theta` is ~0.
pub fn slerp(a: &[f32], b: &[f32], t: f32) -> Result<Vec<f32>> {
    if a.len() != b.len() {
        return Err(Error::InvalidParameter {
            name: "latents",
            message: format!(
                "cannot interpolate latents of {} and {} values",
                a.len(),
                b.len()
            ),
        });
    }
    if !t.is_finite() {
        return Err(Error::InvalidParameter {
            name: "t",
            message: format!("{t} is not finite"),
        });
    }
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let t = f64::from(t);
    let cos = if na > 0.0 && nb > 0.0 {
        (dot / (na * nb)).clamp(-1.0, 1.0)
    } else {
        1.0
    };
    let theta = cos.acos();
    let (wa, wb) = if theta.sin().abs() < 1e-6 {
        (1.0 - t, t)
    } else {
        (
            ((1.0 - t) * theta).sin() / theta.sin(),
            (t * theta).sin() / theta.sin(),
        )
    };
    Ok(a.iter()
        .zip(b)
        .map(|(x, y)| (wa * f64::from(*x) + wb * f64::from(*y)) as f32)
        .collect())
}

/// A local edit of the prior's image before diffusion (ES-DDPM's pixel-level control):
/// `x0' = keep * image + (1 - keep) * x0'` per pixel, then the short diffusion
/// harmonises the pasted region with the rest.
#[derive(Debug, Clone, PartialEq)]
pub struct Paste {
    /// One image `[C, H, W]` in [-1, 1] (only the pixels under `keep` matter).
    pub image: Vec<f32>,
    /// `H*W` weights in [0, 1]: 1 takes the pasted pixel.
    pub keep: Vec<f32>,
}

impl Paste {
    /// Applies the paste to a batch of images (`image_len` values each).
    pub fn apply(&self, images: &mut [f32], channels: usize) -> Result<()> {
        let hw = self.keep.len();
        if hw == 0
            || self.image.len() != channels * hw
            || !images.len().is_multiple_of(channels * hw)
        {
            return Err(Error::InvalidParameter {
                name: "paste",
                message: format!(
                    "paste image has {} values and mask {}; images need {} and {} per image",
                    self.image.len(),
                    hw,
                    images.len().min(channels * hw),
                    hw
                ),
            });
        }
        if let Some(v) = self.keep.iter().find(|v| !(0.0..=1.0).contains(*v)) {
            return Err(Error::InvalidParameter {
                name: "paste",
                message: format!("mask value {v} outside [0, 1]"),
            });
        }
        for img in images.chunks_mut(channels * hw) {
            for (j, v) in img.iter_mut().enumerate() {
                let k = self.keep[j % hw];
                *v = k * self.image[j] + (1.0 - k) * *v;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slerp_endpoints_and_norm() {
        let a = [1.0f32, 0.0];
        let b = [0.0f32, 1.0];
        assert_eq!(slerp(&a, &b, 0.0).unwrap(), vec![1.0, 0.0]);
        let m = slerp(&a, &b, 0.5).unwrap();
        assert!((m[0] - m[1]).abs() < 1e-6 && ((m[0] * m[0] + m[1] * m[1]) - 1.0).abs() < 1e-6);
        assert!(slerp(&a, &[1.0], 0.5).is_err());
    }
}
