//! Fashion-MNIST in IDX format (as Debian's `dataset-fashion-mnist` installs it, gzip'd
//! or not): the real images that the FID benchmark compares against.
//!
//! The 28x28 `u8` images are padded by 2 pixels of background (0) on each side to the
//! shipped models' 32x32 and scaled to [-1, 1] with `x / 255 * 2 - 1`, exactly as
//! `tools/train/data.py` prepares the training data.

use crate::error::{Error, Result};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Where Debian's `dataset-fashion-mnist` package puts the files.
pub const DEFAULT_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Which half of the dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The 60 000 training images (`train-images-idx3-ubyte`).
    Train,
    /// The 10 000 test images (`t10k-images-idx3-ubyte`).
    Test,
}

impl Split {
    fn file_stem(self) -> &'static str {
        match self {
            Split::Train => "train-images-idx3-ubyte",
            Split::Test => "t10k-images-idx3-ubyte",
        }
    }
}

fn bad(path: &Path, message: impl Into<String>) -> Error {
    Error::Dataset {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Reads the bytes of `stem` or `stem.gz` in `dir`.
fn read_maybe_gz(dir: &Path, stem: &str) -> Result<(PathBuf, Vec<u8>)> {
    let plain = dir.join(stem);
    let gz = dir.join(format!("{stem}.gz"));
    let io = |path: &Path, source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    if plain.exists() {
        let bytes = std::fs::read(&plain).map_err(|e| io(&plain, e))?;
        return Ok((plain, bytes));
    }
    let file = std::fs::File::open(&gz).map_err(|e| io(&gz, e))?;
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(file)
        .read_to_end(&mut bytes)
        .map_err(|e| bad(&gz, format!("not a valid gzip file: {e}")))?;
    Ok((gz, bytes))
}

/// Parses an IDX file of `u8` images: `(count, height, width, pixels)`.
///
/// IDX: two zero bytes, the type code `0x08` (u8), the number of dimensions, then each
/// dimension as a big-endian u32, then the data.
pub fn parse_idx_images(path: &Path, bytes: &[u8]) -> Result<(usize, usize, usize, Vec<u8>)> {
    if bytes.len() < 16 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad(path, "not an IDX file (bad magic number)"));
    }
    if bytes[2] != 0x08 {
        return Err(bad(
            path,
            format!("element type 0x{:02x}, expected 0x08 (u8)", bytes[2]),
        ));
    }
    if bytes[3] != 3 {
        return Err(bad(
            path,
            format!("{} dimensions, expected 3 (images)", bytes[3]),
        ));
    }
    let dim = |i: usize| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap());
    let (n, h, w) = (dim(0) as usize, dim(1) as usize, dim(2) as usize);
    let expected = n
        .checked_mul(h)
        .and_then(|v| v.checked_mul(w))
        .ok_or_else(|| bad(path, "dimensions overflow"))?;
    let data = &bytes[16..];
    if data.len() != expected {
        return Err(bad(
            path,
            format!(
                "{n}x{h}x{w} images need {expected} bytes, the file has {}",
                data.len()
            ),
        ));
    }
    Ok((n, h, w, data.to_vec()))
}

/// The images of `split` in `dir`, as `[N, 1, 32, 32]` f32 in [-1, 1] (padded, see the
/// module docs), and `N`.
pub fn load_fashion_mnist(dir: &Path, split: Split) -> Result<(usize, Vec<f32>)> {
    let (path, bytes) = read_maybe_gz(dir, split.file_stem())?;
    let (n, h, w, px) = parse_idx_images(&path, &bytes)?;
    if (h, w) != (28, 28) {
        return Err(bad(
            &path,
            format!("images are {h}x{w}, Fashion-MNIST's are 28x28"),
        ));
    }
    Ok((n, pad_to_32(&px, n)))
}

/// Pads `n` 28x28 `u8` images to 32x32 with 0 and maps them to [-1, 1].
pub fn pad_to_32(px: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![-1.0f32; n * 32 * 32];
    for i in 0..n {
        for y in 0..28 {
            for x in 0..28 {
                let v = px[i * 784 + y * 28 + x];
                out[i * 1024 + (y + 2) * 32 + (x + 2)] = f32::from(v) / 255.0 * 2.0 - 1.0;
            }
        }
    }
    out
}
