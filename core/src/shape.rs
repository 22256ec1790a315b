//! The shape of a batch of images, NCHW.

use crate::error::{Error, Result};

/// A batch of `batch` images of `channels x height x width`, stored NCHW (image-major,
/// then channel, then row), as PyTorch and ONNX models expect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImageShape {
    /// N, the number of images.
    pub batch: usize,
    /// C, channels per image.
    pub channels: usize,
    /// H, rows.
    pub height: usize,
    /// W, columns.
    pub width: usize,
}

impl ImageShape {
    /// A shape; fails when a dimension is 0 or the element count overflows `usize`.
    pub fn new(batch: usize, channels: usize, height: usize, width: usize) -> Result<Self> {
        let s = Self {
            batch,
            channels,
            height,
            width,
        };
        s.validate()?;
        Ok(s)
    }

    /// Checks that no dimension is 0 and that twice the element count fits in `usize`
    /// (learned-variance outputs have 2C channels).
    pub fn validate(&self) -> Result<()> {
        let ok = self.batch > 0
            && self.channels > 0
            && self.height > 0
            && self.width > 0
            && self
                .batch
                .checked_mul(self.channels)
                .and_then(|v| v.checked_mul(self.height))
                .and_then(|v| v.checked_mul(self.width))
                .and_then(|v| v.checked_mul(2))
                .is_some();
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidShape)
        }
    }

    /// Elements of one image, `C * H * W`.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Elements of one channel plane, `H * W`.
    pub fn plane_len(&self) -> usize {
        self.height * self.width
    }

    /// Elements of the batch, `N * C * H * W`.
    pub fn len(&self) -> usize {
        self.batch * self.image_len()
    }

    /// Always false for a validated shape.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
