//! Reading a plan cache entry (an NNEF tar, as tract writes it) on two threads: the
//! graph's parse and the tensor reads share them.
//!
//! tract's reader reads every entry of the tar, then parses `graph.nnef`. On the
//! cifar-size U-Net that text is 205 KB (1,218 statements) and tract's parser takes
//! 0.04-0.1 s over it (allocation-heavy backtracking, measured with `perf`), and the
//! reads of its 143 MB of tensors into fresh memory 0.08-0.15 s (most of it the kernel's
//! copy and page faults): the two were a third of a second start. [`read`] first lists
//! the tar's entries (their headers only), then a second thread parses the graph and
//! both threads read the tensors, each taking the next unread one, each through a file
//! handle of its own. The graph is then translated by tract as before
//! (`Nnef::model_for_proto_model`), so the model is the one tract's own reader makes
//! (tested: the same proto model and graph).
//!
//! Only what a decluttered float model holds is read here: `graph.nnef` and `.dat`
//! tensors, as regular entries. Anything else (quantisation, sub-models, other
//! resources) makes [`read`] answer `None`, and the caller uses tract's reader.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tract_nnef::ast::ProtoModel;
use tract_nnef::internal::Identifier;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::format_err;

/// The proto model of the NNEF tar at `path`; `None` when it holds anything besides
/// `graph.nnef` and tensors.
pub(crate) fn read(path: &Path) -> TractResult<Option<ProtoModel>> {
    let Some(index) = Index::of(path)? else {
        return Ok(None);
    };
    let mut text = String::new();
    open_at(path, index.graph.0)?
        .take(index.graph.1)
        .read_to_string(&mut text)?;
    let reads = Arc::new(Reads {
        path: path.to_path_buf(),
        tensors: index.tensors,
        next: AtomicUsize::new(0),
    });
    let text = Arc::new(text);
    let (helper, for_thread) = (reads.clone(), text.clone());
    let thread = std::thread::Builder::new()
        .name("esddpm-nnef-read".into())
        .spawn(move || {
            let doc = tract_nnef::ast::parse::parse_document(&for_thread);
            // A failed parse leaves the tensors unread.
            if doc.is_err() {
                helper.stop();
            }
            (doc, helper.read())
        });
    // The helper is joined on every path out: `Reads::read` returns, it does not panic
    // through here.
    let (doc, theirs, ours) = match thread {
        Ok(handle) => {
            let ours = reads.read();
            let (doc, theirs) = handle
                .join()
                .map_err(|_| format_err!("the NNEF reader's thread panicked"))?;
            (doc, theirs, ours)
        }
        // No second thread: the parse, then every tensor, here.
        Err(_) => (
            tract_nnef::ast::parse::parse_document(&text),
            Ok(HashMap::new()),
            reads.read(),
        ),
    };
    let doc = doc?;
    let mut tensors = ours?;
    tensors.extend(theirs?);
    let proto = ProtoModel {
        doc,
        tensors,
        quantization: None,
        resources: HashMap::new(),
    };
    proto.validate()?;
    Ok(Some(proto))
}

/// Where the graph and the tensors lie in the tar: `(data offset, bytes)` of each.
struct Index {
    graph: (u64, u64),
    tensors: Vec<(Identifier, u64, u64)>,
}

impl Index {
    /// The entries of the tar at `path`, from their headers (the data is skipped).
    /// `None` at an entry of another kind, a second graph, a tensor twice, or no graph.
    fn of(path: &Path) -> TractResult<Option<Index>> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        let mut archive = tar::Archive::new(file);
        let mut graph = None;
        let mut tensors = Vec::new();
        let mut names = std::collections::HashSet::new();
        for entry in archive.entries_with_seek()? {
            let entry = entry?;
            let Some(name) = name_of(&entry.path()?) else {
                continue;
            };
            let (pos, size) = (entry.raw_file_position(), entry.size());
            if pos.checked_add(size).is_none_or(|end| end > len) {
                return Err(format_err!(
                    "{} is truncated: an entry ends past its end",
                    path.display()
                ));
            }
            if !entry.header().entry_type().is_file() {
                return Ok(None);
            }
            if name == Path::new(tract_nnef::resource::GRAPH_NNEF_FILENAME) {
                if graph.replace((pos, size)).is_some() {
                    return Ok(None);
                }
            } else if name.extension().is_some_and(|e| e == "dat") {
                let id = Identifier(tract_nnef::resource::resource_path_to_id(&name)?);
                if !names.insert(id.clone()) {
                    return Ok(None);
                }
                tensors.push((id, pos, size));
            } else {
                return Ok(None);
            }
        }
        Ok(graph.map(|graph| Index { graph, tensors }))
    }
}

/// `path` opened at byte `pos`.
fn open_at(path: &Path, pos: u64) -> TractResult<File> {
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(pos))?;
    Ok(file)
}

/// The tensors to read, shared by the threads: each takes the next one not taken.
struct Reads {
    path: PathBuf,
    tensors: Vec<(Identifier, u64, u64)>,
    next: AtomicUsize,
}

impl Reads {
    /// Reads tensors until none is left, through a file handle of this thread's. At an
    /// error, the other thread takes no more.
    fn read(&self) -> TractResult<HashMap<Identifier, Arc<Tensor>>> {
        let result = self.read_until_done();
        if result.is_err() {
            self.stop();
        }
        result
    }

    fn read_until_done(&self) -> TractResult<HashMap<Identifier, Arc<Tensor>>> {
        let mut read = HashMap::new();
        let mut file = None;
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some((id, pos, size)) = self.tensors.get(i) else {
                return Ok(read);
            };
            let file = match &mut file {
                Some(f) => f,
                None => file.insert(File::open(&self.path)?),
            };
            file.seek(SeekFrom::Start(*pos))?;
            let tensor = tract_nnef::tensors::read_tensor(file.take(*size))?;
            read.insert(id.clone(), Arc::new(tensor));
        }
    }

    /// Leaves no tensor for either thread to take.
    fn stop(&self) {
        self.next.store(self.tensors.len(), Ordering::Relaxed);
    }
}

/// An entry's name as tract's reader sees it: without a leading `./`, and `None` (the
/// entry skipped, as tract skips it) when a component starts with a dot, as macOS's tar
/// writes them.
fn name_of(path: &Path) -> Option<PathBuf> {
    let path = path.strip_prefix("./").unwrap_or(path);
    let hidden = path
        .components()
        .any(|c| c.as_os_str().as_encoded_bytes().first() == Some(&b'.'));
    (!hidden).then(|| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::WithOnnx;

    /// The shipped U-Net, decluttered at batch 2, in NNEF as the plan cache writes it.
    fn cached_unet(dir: &Path) -> (tract_nnef::framework::Nnef, PathBuf) {
        let model = crate::test_values::decluttered("models/fashion/unet.onnx", [2, 1, 32, 32]);
        let nnef = tract_nnef::nnef().with_onnx();
        let path = dir.join("unet.nnef.tar");
        nnef.write_to_tar(&model, std::fs::File::create(&path).unwrap())
            .unwrap();
        (nnef, path)
    }

    #[test]
    fn reads_what_tracts_reader_reads() {
        let dir = tempfile::tempdir().unwrap();
        let (nnef, path) = cached_unet(dir.path());
        let theirs = nnef.proto_model_for_path(&path).unwrap();
        let ours = read(&path).unwrap().expect("a graph and tensors");
        assert_eq!(ours.doc, theirs.doc);
        assert!(ours.tensors.len() > 20);
        assert_eq!(ours.tensors, theirs.tensors);
        assert!(ours.quantization.is_none() && theirs.quantization.is_none());
        // And tract translates it to the same model.
        let (a, b) = (
            nnef.model_for_proto_model(&ours).unwrap(),
            nnef.model_for_proto_model(&theirs).unwrap(),
        );
        assert_eq!(format!("{:?}", a.nodes()), format!("{:?}", b.nodes()));
        assert_eq!(a.input_outlets().unwrap(), b.input_outlets().unwrap());
        assert_eq!(a.output_outlets().unwrap(), b.output_outlets().unwrap());
        assert_eq!(a.properties, b.properties);
    }

    #[test]
    fn leaves_other_entries_and_bad_files_to_tract() {
        let dir = tempfile::tempdir().unwrap();
        let (_, path) = cached_unet(dir.path());
        // A tar with one more kind of entry: tract's reader is left to read it.
        let other = dir.path().join("other.nnef.tar");
        with_entry(&path, &other, |b| {
            let mut header = tar::Header::new_gnu();
            header.set_size(2);
            header.set_cksum();
            b.append_data(&mut header, "graph.quant", &b"{}"[..])
                .unwrap();
        });
        assert!(read(&other).unwrap().is_none());
        // A truncated file and a missing one are errors.
        let bytes = std::fs::read(&path).unwrap();
        let cut = dir.path().join("cut.nnef.tar");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        assert!(read(&cut).is_err());
        assert!(read(&dir.path().join("missing.tar")).is_err());
    }

    /// A copy of the tar at `path` with `extra` appended (header, then data).
    fn with_entry(path: &Path, to: &Path, extra: impl FnOnce(&mut tar::Builder<std::fs::File>)) {
        let mut builder = tar::Builder::new(std::fs::File::create(to).unwrap());
        let mut archive = tar::Archive::new(std::fs::File::open(path).unwrap());
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let header = entry.header().clone();
            builder.append(&header, &mut entry).unwrap();
        }
        extra(&mut builder);
        builder.finish().unwrap();
    }

    #[test]
    fn a_tensor_twice_a_second_graph_or_a_link_are_left_to_tract() {
        let dir = tempfile::tempdir().unwrap();
        let (_, path) = cached_unet(dir.path());
        let index = Index::of(&path).unwrap().expect("a graph and tensors");
        let (first, _, _) = index.tensors[0].clone();
        let twice = dir.path().join("twice.nnef.tar");
        with_entry(&path, &twice, |b| {
            let mut header = tar::Header::new_gnu();
            header.set_size(3);
            header.set_cksum();
            b.append_data(&mut header, format!("{}.dat", first.0), &b"abc"[..])
                .unwrap();
        });
        assert!(read(&twice).unwrap().is_none());
        let graphs = dir.path().join("graphs.nnef.tar");
        with_entry(&path, &graphs, |b| {
            let mut header = tar::Header::new_gnu();
            header.set_size(0);
            header.set_cksum();
            b.append_data(&mut header, "graph.nnef", &b""[..]).unwrap();
        });
        assert!(read(&graphs).unwrap().is_none());
        let linked = dir.path().join("linked.nnef.tar");
        with_entry(&path, &linked, |b| {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            b.append_link(&mut header, "other.dat", "graph.nnef")
                .unwrap();
        });
        assert!(read(&linked).unwrap().is_none());
        // The tensors are all read, wherever each thread stopped.
        let proto = read(&path).unwrap().unwrap();
        assert_eq!(proto.tensors.len(), index.tensors.len());
    }

    #[test]
    fn names_are_read_as_tracts_reader_reads_them() {
        assert_eq!(
            name_of(Path::new("./graph.nnef")),
            Some("graph.nnef".into())
        );
        assert_eq!(name_of(Path::new("a/b.dat")), Some("a/b.dat".into()));
        assert_eq!(name_of(Path::new("._graph.nnef")), None);
        assert_eq!(name_of(Path::new("a/.hidden/b.dat")), None);
    }
}
