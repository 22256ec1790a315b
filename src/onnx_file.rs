//! Reading an ONNX file so that its weights are in memory once at a time.
//!
//! Read plainly, a model's weights are held three times over during a load: the file's
//! bytes, the decoded protobuf's `raw_data`, and tract's tensors made from them. Here
//!
//! 1. the protobuf is decoded from the file through a 64 KiB window ([`FileBuf`], a
//!    [`Buf`] over the open file), so the file's bytes are never all in memory; the
//!    window also feeds the plan cache's hash ([`crate::cache::PlanCache`] keys), so
//!    the key of the file comes with no second read;
//! 2. each top-level initializer's `raw_data` is moved out of the protobuf and the
//!    initializer marked as external data; tract asks its data resolver for it
//!    ([`MovedInitializers`]), which hands the bytes over and forgets them, so tract's
//!    tensors replace the protobuf's bytes one initializer at a time.
//!
//! The peak is the weights once, plus one initializer and the window. Initializers
//! that are genuinely external (ONNX external data beside the model file) are read
//! from their files as tract would.

use crate::cache::KeyHasher;
use crate::error::{Error, ModelRole, Result};
use prost::bytes::Buf;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tract_onnx::data_resolver::{MmapDataResolver, ModelDataResolver};
use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::DataLocation;

/// The decoding window. The cifar-size U-Net (143 MB) decoded in 0.20-0.26 s (median
/// 0.23) through 64 KiB and 0.24-0.41 s (0.27) through 1 MiB (8 starts each, alternated;
/// the plan cache's hash blocks showed the same, [`crate::cache`]).
const WINDOW: usize = 1 << 16;

/// A moved initializer's `offset` is this plus its index: past the end of any file, so
/// it cannot be mistaken for real external data (tract's resolvers reject such offsets).
const MOVED: usize = usize::MAX / 2 + 1;

/// An ONNX file, decoded, with its initializers' bytes moved out for tract to take.
pub(crate) struct OnnxFile {
    /// The protobuf, its top-level initializers pointing at [`Self::resolver`].
    pub proto: pb::ModelProto,
    /// What tract's parser reads the moved initializers from.
    pub resolver: Arc<MovedInitializers>,
    /// The directory tract resolves external data against (the file's own).
    pub model_dir: Option<String>,
    /// The file's key: xxh3-128 of its bytes after the plan cache's prefix
    /// ([`crate::cache::PlanCache::key_of_file`]).
    pub key: String,
}

impl OnnxFile {
    /// Reads and decodes `path` (of `size` bytes when it was checked against the
    /// memory limit), moving its initializers' bytes out of the protobuf.
    pub fn read(role: ModelRole, path: &Path, size: u64) -> Result<Self> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let mut buf = FileBuf::new(file, size, WINDOW);
        let decoded = crate::model::guarded(role, "parse", || {
            use prost::Message;
            Ok(pb::ModelProto::decode(&mut buf)?)
        });
        // A read error explains a failed decode better than the decode's own error.
        let key = buf.finish().map_err(io)?;
        let mut proto = decoded?;
        let (model_dir, resolver) = match Self::located(path) {
            Some((dir, name, canonical)) => {
                let moved = move_initializers(&mut proto, &name);
                (Some(dir), MovedInitializers::new(canonical, moved))
            }
            None => (None, MovedInitializers::new(PathBuf::new(), Vec::new())),
        };
        Ok(Self {
            proto,
            resolver: Arc::new(resolver),
            model_dir,
            key,
        })
    }

    /// The file's directory and name as tract resolves external data (both UTF-8, the
    /// file inside the directory once links are followed), and its canonical path;
    /// `None` when tract could not resolve it, in which case the weights stay inline.
    fn located(path: &Path) -> Option<(String, String, PathBuf)> {
        let name = path.file_name()?.to_str()?.to_string();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let canonical = std::fs::canonicalize(path).ok()?;
        let canonical_dir = std::fs::canonicalize(dir).ok()?;
        if !canonical.starts_with(&canonical_dir) {
            return None;
        }
        Some((dir.to_str()?.to_string(), name, canonical))
    }
}

/// Moves the `raw_data` of the top-level initializers into the returned list and marks
/// each as external data at `location` (the model file's own name), `offset`
/// [`MOVED`] + its index.
fn move_initializers(proto: &mut pb::ModelProto, location: &str) -> Vec<Option<Vec<u8>>> {
    let Some(graph) = proto.graph.as_mut() else {
        return Vec::new();
    };
    let entry = |key: &str, value: String| pb::StringStringEntryProto {
        key: key.to_string(),
        value,
    };
    let mut moved = Vec::new();
    for t in &mut graph.initializer {
        if t.raw_data.is_empty() {
            continue;
        }
        let bytes = std::mem::take(&mut t.raw_data);
        t.data_location = Some(DataLocation::External as i32);
        t.external_data = vec![
            entry("location", location.to_string()),
            entry("offset", (MOVED + moved.len()).to_string()),
            entry("length", bytes.len().to_string()),
        ];
        moved.push(Some(bytes));
    }
    moved
}

/// tract's data resolver for an [`OnnxFile`]: a moved initializer's bytes are handed
/// over (and forgotten) when tract asks for them; anything else is real external data,
/// read from its file by tract's own resolver.
pub(crate) struct MovedInitializers {
    file: PathBuf,
    moved: Mutex<Vec<Option<Vec<u8>>>>,
}

impl MovedInitializers {
    fn new(file: PathBuf, moved: Vec<Option<Vec<u8>>>) -> Self {
        Self {
            file,
            moved: Mutex::new(moved),
        }
    }

    /// How many moved initializers tract has not taken yet.
    #[cfg(test)]
    pub fn left(&self) -> usize {
        let moved = self.moved.lock().unwrap_or_else(|p| p.into_inner());
        moved.iter().filter(|m| m.is_some()).count()
    }
}

impl ModelDataResolver for MovedInitializers {
    fn read_bytes_from_path(
        &self,
        buf: &mut Vec<u8>,
        p: &Path,
        offset: usize,
        length: Option<usize>,
    ) -> tract_onnx::prelude::TractResult<()> {
        if offset < MOVED || p != self.file {
            return MmapDataResolver.read_bytes_from_path(buf, p, offset, length);
        }
        let index = offset - MOVED;
        let taken = {
            let mut moved = self.moved.lock().unwrap_or_else(|p| p.into_inner());
            moved.get_mut(index).and_then(Option::take)
        };
        let Some(bytes) = taken else {
            tract_onnx::tract_core::internal::bail!(
                "initializer {index} of {p:?} was read twice or never stored"
            );
        };
        if let Some(len) = length {
            tract_onnx::tract_core::internal::ensure!(
                len == bytes.len(),
                "initializer {index}: length {len}, stored {}",
                bytes.len()
            );
        }
        if buf.is_empty() {
            *buf = bytes;
        } else {
            buf.extend_from_slice(&bytes);
        }
        Ok(())
    }
}

/// A [`Buf`] over an open file through a fixed window, hashing what it reads.
///
/// `Buf` cannot fail, so a read error (or the file ending early) is kept, the rest
/// reads as zeros, and [`FileBuf::finish`] returns the error.
struct FileBuf {
    file: File,
    window: Vec<u8>,
    start: usize,
    end: usize,
    /// Bytes not yet consumed: the window's rest and the file's unread part.
    remaining: u64,
    /// The file's bytes not yet read into the window.
    unread: u64,
    hasher: KeyHasher,
    error: Option<std::io::Error>,
}

impl FileBuf {
    fn new(file: File, size: u64, window: usize) -> Self {
        let window = window.min(usize::try_from(size).unwrap_or(window)).max(1);
        let mut buf = Self {
            file,
            window: vec![0; window],
            start: 0,
            end: 0,
            remaining: size,
            unread: size,
            hasher: KeyHasher::new(size),
            error: None,
        };
        buf.refill();
        buf
    }

    /// Reads the next part of the file into the window (zeros after an error).
    fn refill(&mut self) {
        let want = usize::try_from(self.unread)
            .unwrap_or(usize::MAX)
            .min(self.window.len());
        self.start = 0;
        self.end = want;
        if want == 0 {
            return;
        }
        if self.error.is_none() {
            match self.file.read_exact(&mut self.window[..want]) {
                Ok(()) => self.hasher.update(&self.window[..want]),
                Err(e) => self.error = Some(e),
            }
        }
        if self.error.is_some() {
            self.window[..want].fill(0);
        }
        self.unread -= want as u64;
    }

    /// Reads the rest of the file (a protobuf can end early: trailing bytes are
    /// hashed), then the key: the read error, if any, or the file having grown.
    fn finish(mut self) -> std::io::Result<String> {
        while self.remaining > 0 && self.error.is_none() {
            let n = self.chunk().len();
            self.advance(n);
        }
        if let Some(e) = self.error {
            return Err(e);
        }
        let mut probe = [0u8; 1];
        if self.file.read(&mut probe)? != 0 {
            return Err(std::io::Error::other("the file grew while it was read"));
        }
        Ok(self.hasher.finish())
    }
}

impl Buf for FileBuf {
    fn remaining(&self) -> usize {
        usize::try_from(self.remaining).unwrap_or(usize::MAX)
    }

    fn chunk(&self) -> &[u8] {
        &self.window[self.start..self.end]
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(
            cnt as u64 <= self.remaining,
            "advance past the end of the file"
        );
        while cnt > 0 {
            let n = cnt.min(self.end - self.start);
            self.start += n;
            self.remaining -= n as u64;
            cnt -= n;
            if self.start == self.end {
                self.refill();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn temp(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("esddpm-onnx-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn the_window_decodes_what_a_slice_decodes_and_hashes_like_the_cache() {
        let bytes = std::fs::read("models/fashion/unet.onnx").unwrap();
        let path = temp("window.onnx", &bytes);
        let size = bytes.len() as u64;
        for window in [1usize, 7, 4096, WINDOW] {
            let mut buf = FileBuf::new(File::open(&path).unwrap(), size, window);
            let decoded = pb::ModelProto::decode(&mut buf).unwrap();
            assert_eq!(
                decoded,
                pb::ModelProto::decode(&bytes[..]).unwrap(),
                "window {window}"
            );
            assert_eq!(
                buf.finish().unwrap(),
                crate::cache::PlanCache::key_of_bytes(&bytes)
            );
        }
    }

    #[test]
    fn a_file_that_ends_early_is_an_error_not_a_model() {
        let bytes = std::fs::read("models/fashion/unet.onnx").unwrap();
        let path = temp("short.onnx", &bytes[..bytes.len() / 2]);
        let mut buf = FileBuf::new(File::open(&path).unwrap(), bytes.len() as u64, WINDOW);
        let _ = pb::ModelProto::decode(&mut buf);
        let err = buf.finish().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof, "{err}");
    }

    #[test]
    fn every_initializer_is_moved_and_taken_once() {
        let path = Path::new("models/fashion/unet.onnx");
        let size = std::fs::metadata(path).unwrap().len();
        let file = OnnxFile::read(ModelRole::Unet, path, size).unwrap();
        let graph = file.proto.graph.as_ref().unwrap();
        assert!(graph.initializer.iter().all(|t| t.raw_data.is_empty()));
        let n = file.resolver.left();
        assert!(n > 50, "{n} initializers moved");
        let mut onnx = tract_onnx::onnx();
        onnx.provider = file.resolver.clone();
        let parsed = onnx.parse(&file.proto, file.model_dir.as_deref()).unwrap();
        assert!(parsed.unresolved_inputs.is_empty());
        assert_eq!(file.resolver.left(), 0);
        // A second parse finds the bytes gone: an error, not other weights.
        let err = onnx
            .parse(&file.proto, file.model_dir.as_deref())
            .unwrap_err();
        assert!(format!("{err:#}").contains("read twice"), "{err:#}");
    }
}
