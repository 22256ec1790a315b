//! Masks for local, pixel-level control (inpainting, RePaint / SDEdit style).
//!
//! After every reverse step that lands on noise level `abar_prev`, the pixels under the
//! mask are replaced by the known image diffused to that level with fresh noise:
//!
//! ```text
//! known_prev = sqrt(abar_prev) * known + sqrt(1 - abar_prev) * eps
//! x_prev     = keep * known_prev + (1 - keep) * x_prev
//! ```
//!
//! At the end of the chain (`abar_prev = 1`) the known pixels come back exactly. A soft
//! mask (values between 0 and 1) blends.

use crate::error::{Error, Result};
use crate::noise::{Draw, NoiseSource};
use crate::shape::ImageShape;

/// The known image and where to keep it.
///
/// - `known`: one image (`C*H*W` values, used for every image of the batch) or the
///   whole batch (`N*C*H*W`), in the sampler's value range (usually [-1, 1]);
/// - `keep`: 1 keeps the known pixel, 0 lets the model generate it; one plane (`H*W`,
///   shared by all channels), one image (`C*H*W`) or the whole batch (`N*C*H*W`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mask<'a> {
    known: &'a [f32],
    keep: &'a [f32],
    shape: ImageShape,
}

impl<'a> Mask<'a> {
    /// Checks the lengths against `shape` and that every `keep` value is in [0, 1].
    pub fn new(known: &'a [f32], keep: &'a [f32], shape: ImageShape) -> Result<Self> {
        shape.validate()?;
        if known.len() != shape.image_len() && known.len() != shape.len() {
            return Err(Error::BufferLength {
                what: "mask known image",
                expected: shape.image_len(),
                got: known.len(),
            });
        }
        if keep.len() != shape.plane_len()
            && keep.len() != shape.image_len()
            && keep.len() != shape.len()
        {
            return Err(Error::BufferLength {
                what: "mask",
                expected: shape.plane_len(),
                got: keep.len(),
            });
        }
        if let Some((index, &value)) = keep
            .iter()
            .enumerate()
            .find(|(_, v)| !(**v >= 0.0 && **v <= 1.0))
        {
            return Err(Error::InvalidMask { index, value });
        }
        if let Some(index) = known.iter().position(|v| !v.is_finite()) {
            return Err(Error::InvalidMask {
                index,
                value: known[index],
            });
        }
        Ok(Self { known, keep, shape })
    }

    /// The shape the mask was checked against.
    pub fn shape(&self) -> ImageShape {
        self.shape
    }

    /// `(keep, known)` for element `j` (index within the image) of image `n`.
    #[inline]
    pub fn at(&self, n: usize, j: usize) -> (f32, f32) {
        let il = self.shape.image_len();
        let known = if self.known.len() == il {
            self.known[j]
        } else {
            self.known[n * il + j]
        };
        let keep = if self.keep.len() == self.shape.plane_len() {
            self.keep[j % self.shape.plane_len()]
        } else if self.keep.len() == il {
            self.keep[j]
        } else {
            self.keep[n * il + j]
        };
        (keep, known)
    }

    /// Replaces the kept pixels of `x` by the known image at noise level `abar`, with
    /// noise from `draw` of each image's stream (`image_offset + n`).
    pub fn apply(
        &self,
        x: &mut [f32],
        abar: f64,
        noise: &NoiseSource,
        image_offset: u64,
        draw: Draw,
    ) {
        let il = self.shape.image_len();
        let a = libm::sqrt(abar);
        let s = libm::sqrt(1.0 - abar);
        for (n, img) in x.chunks_exact_mut(il).enumerate() {
            let mut eps = noise.stream(image_offset.wrapping_add(n as u64), draw);
            for (j, v) in img.iter_mut().enumerate() {
                let e = if s > 0.0 { eps.next_normal() } else { 0.0 };
                let (keep, known) = self.at(n, j);
                if keep > 0.0 {
                    let k = a * f64::from(known) + s * f64::from(e);
                    let keep = f64::from(keep);
                    *v = (keep * k + (1.0 - keep) * f64::from(*v)) as f32;
                }
            }
        }
    }

    /// Blends the known image into a predicted `x0` (for previews):
    /// `x0 = keep * known + (1 - keep) * x0`.
    pub fn blend_x0(&self, x0: &mut [f32]) {
        let il = self.shape.image_len();
        for (n, img) in x0.chunks_exact_mut(il).enumerate() {
            for (j, v) in img.iter_mut().enumerate() {
                let (keep, known) = self.at(n, j);
                if keep > 0.0 {
                    *v = keep * known + (1.0 - keep) * *v;
                }
            }
        }
    }
}
