//! Reading a plan cache entry (an NNEF tar, as tract writes it) with its graph parsed
//! on a second thread while this one reads the tensors.
//!
//! tract's reader reads every entry of the tar, then parses `graph.nnef`. On the
//! cifar-size U-Net that text is 205 KB (1,218 statements) and tract's parser takes
//! ~0.1 s over it (allocation-heavy backtracking, measured with `perf`), after reading
//! 143 MB of tensors into fresh memory (0.13-0.15 s): the two were a third of a second
//! start. tract writes `graph.nnef` first, so [`read`] hands its text to a thread
//! as soon as it is read and reads the tensors meanwhile; the graph is then translated
//! by tract as before (`Nnef::model_for_proto_model`), so the model is the one tract's
//! own reader makes (tested: the same proto model and graph).
//!
//! Only what a decluttered float model holds is read here: `graph.nnef` and `.dat`
//! tensors. Anything else (quantisation, sub-models, other resources) makes [`read`]
//! answer `None`, and the caller uses tract's reader.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tract_nnef::ast::{Document, ProtoModel};
use tract_nnef::internal::Identifier;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::format_err;

/// The proto model of the NNEF tar at `path`; `None` when it holds anything besides
/// `graph.nnef` and tensors.
pub(crate) fn read(path: &Path) -> TractResult<Option<ProtoModel>> {
    let mut archive = tar::Archive::new(std::fs::File::open(path)?);
    let mut parse = None;
    let mut tensors = HashMap::new();
    // The parse is joined on every path out: `read_entries` returns before any join.
    let read = read_entries(&mut archive, &mut parse, &mut tensors);
    let doc = match parse {
        Some(Parse::Thread(handle)) => Some(
            handle
                .join()
                .map_err(|_| format_err!("the NNEF parser panicked"))??,
        ),
        Some(Parse::Done(doc)) => Some(doc?),
        None => None,
    };
    if !read? {
        return Ok(None);
    }
    let Some(doc) = doc else {
        return Ok(None);
    };
    let proto = ProtoModel {
        doc,
        tensors,
        quantization: None,
        resources: HashMap::new(),
    };
    proto.validate()?;
    Ok(Some(proto))
}

/// The graph's parse: on its thread, or done here when no thread could be started.
enum Parse {
    Thread(std::thread::JoinHandle<TractResult<Document>>),
    Done(TractResult<Document>),
}

/// Reads the entries of `archive`: the graph's text to `parse` (started at once), the
/// tensors into `tensors`. `false` at the first entry of another kind (or a second
/// graph, or a tensor twice).
///
/// A thread of its own, not a scoped one: `std::thread::scope` makes the calling
/// thread's handle, which Valgrind then reports as possibly lost at exit (the C ABI's
/// test runs under Valgrind).
fn read_entries<R: Read>(
    archive: &mut tar::Archive<R>,
    parse: &mut Option<Parse>,
    tensors: &mut HashMap<Identifier, Arc<Tensor>>,
) -> TractResult<bool> {
    for entry in archive.entries()? {
        let mut entry = entry?;
        let Some(name) = name_of(&entry.path()?) else {
            continue;
        };
        if name == Path::new(tract_nnef::resource::GRAPH_NNEF_FILENAME) && parse.is_none() {
            let mut text = String::new();
            entry.read_to_string(&mut text)?;
            let shared = Arc::new(text);
            let for_thread = shared.clone();
            *parse = Some(
                match std::thread::Builder::new()
                    .name("esddpm-nnef-parse".into())
                    .spawn(move || tract_nnef::ast::parse::parse_document(&for_thread))
                {
                    Ok(handle) => Parse::Thread(handle),
                    Err(_) => Parse::Done(tract_nnef::ast::parse::parse_document(&shared)),
                },
            );
        } else if name.extension().is_some_and(|e| e == "dat") {
            let id = tract_nnef::resource::resource_path_to_id(&name)?;
            let tensor = tract_nnef::tensors::read_tensor(&mut entry)?;
            if tensors.insert(Identifier(id), Arc::new(tensor)).is_some() {
                return Ok(false);
            }
        } else {
            return Ok(false);
        }
    }
    Ok(true)
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
        let mut builder = tar::Builder::new(std::fs::File::create(&other).unwrap());
        let mut archive = tar::Archive::new(std::fs::File::open(&path).unwrap());
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let header = entry.header().clone();
            builder.append(&header, &mut entry).unwrap();
        }
        let mut header = tar::Header::new_gnu();
        header.set_size(2);
        header.set_cksum();
        builder
            .append_data(&mut header, "graph.quant", &b"{}"[..])
            .unwrap();
        builder.finish().unwrap();
        assert!(read(&other).unwrap().is_none());
        // A truncated file and a missing one are errors.
        let bytes = std::fs::read(&path).unwrap();
        let cut = dir.path().join("cut.nnef.tar");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        assert!(read(&cut).is_err());
        assert!(read(&dir.path().join("missing.tar")).is_err());
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
