//! Generated images: f32 NCHW in [-1, 1], with conversions to 8-bit pixels and PNG.

use crate::error::{Error, Result};
use esddpm_core::ImageShape;
use std::path::Path;

/// A batch of images, f32, NCHW, values in [-1, 1] (clipped on conversion only).
#[derive(Debug, Clone, PartialEq)]
pub struct Images {
    /// The batch shape.
    pub shape: ImageShape,
    /// `shape.len()` values.
    pub data: Vec<f32>,
}

/// `round((clamp(v, -1, 1) + 1) * 127.5)`.
pub fn to_u8(v: f32) -> u8 {
    ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8
}

impl Images {
    /// Image `i` (`C*H*W` values).
    pub fn image(&self, i: usize) -> &[f32] {
        let il = self.shape.image_len();
        &self.data[i * il..(i + 1) * il]
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.shape.batch
    }

    /// True when the batch is empty (never, for a generated batch).
    pub fn is_empty(&self) -> bool {
        self.shape.batch == 0
    }

    /// Image `i` as interleaved 8-bit pixels, row-major: 1 byte per pixel for one
    /// channel (gray), 3 for three (RGB).
    pub fn to_u8(&self, i: usize) -> Vec<u8> {
        let (c, hw) = (self.shape.channels, self.shape.plane_len());
        let img = self.image(i);
        let mut out = vec![0u8; c * hw];
        for p in 0..hw {
            for ch in 0..c {
                out[p * c + ch] = to_u8(img[ch * hw + p]);
            }
        }
        out
    }

    /// Image `i` as RGBA, 4 bytes per pixel (gray is replicated; alpha 255).
    pub fn to_rgba8(&self, i: usize) -> Vec<u8> {
        let (c, hw) = (self.shape.channels, self.shape.plane_len());
        let img = self.image(i);
        let mut out = vec![255u8; 4 * hw];
        for p in 0..hw {
            for k in 0..3 {
                let ch = if c >= 3 { k } else { 0 };
                out[p * 4 + k] = to_u8(img[ch * hw + p]);
            }
        }
        out
    }

    /// All images in a grid of `cols` columns with a 2-pixel white border, as 8-bit
    /// gray (C = 1) or RGB (C = 3) rows: `(width, height, pixels)`.
    pub fn grid(&self, cols: usize) -> (usize, usize, Vec<u8>) {
        let cols = cols.clamp(1, self.len().max(1));
        let rows = self.len().div_ceil(cols);
        let (h, w) = (self.shape.height, self.shape.width);
        let c = if self.shape.channels >= 3 { 3 } else { 1 };
        let (gw, gh) = (cols * (w + 2) + 2, rows * (h + 2) + 2);
        let mut px = vec![255u8; gw * gh * c];
        for i in 0..self.len() {
            let (r, col) = (i / cols, i % cols);
            let img = self.to_u8(i);
            let cc = self.shape.channels;
            for y in 0..h {
                for x in 0..w {
                    let (gy, gx) = (2 + r * (h + 2) + y, 2 + col * (w + 2) + x);
                    for k in 0..c {
                        px[(gy * gw + gx) * c + k] = img[(y * w + x) * cc + k.min(cc - 1)];
                    }
                }
            }
        }
        (gw, gh, px)
    }

    /// Writes [`Self::grid`] as a PNG file.
    pub fn save_png_grid(&self, path: &Path, cols: usize) -> Result<()> {
        let (w, h, px) = self.grid(cols);
        write_png(path, w, h, self.shape.channels.min(3), &px)
    }
}

/// Writes 8-bit pixels as a PNG file: `channels` 1 (gray) or 3 (RGB), interleaved rows.
pub fn write_png(
    path: &Path,
    width: usize,
    height: usize,
    channels: usize,
    px: &[u8],
) -> Result<()> {
    let io = |source: std::io::Error| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    if px.len() != width * height * channels || !(channels == 1 || channels == 3) {
        return Err(Error::InvalidParameter {
            name: "pixels",
            message: format!(
                "{} bytes for a {width}x{height} image of {channels} channels",
                px.len()
            ),
        });
    }
    let file = std::fs::File::create(path).map_err(io)?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), width as u32, height as u32);
    enc.set_color(if channels == 3 {
        png::ColorType::Rgb
    } else {
        png::ColorType::Grayscale
    });
    enc.set_depth(png::BitDepth::Eight);
    let png_err = |e: png::EncodingError| io(std::io::Error::other(e));
    enc.write_header()
        .map_err(png_err)?
        .write_image_data(px)
        .map_err(png_err)?;
    Ok(())
}
