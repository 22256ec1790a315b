//! Reading ONNX files (`OnnxModel::from_path`): weights in an external data file load
//! like inline ones; a model from a file keeps no parsed copy, so a plan for another
//! batch size reads the file again (same bits as a model kept from bytes), and a file
//! changed since the load is an error.

use esddpm::memory::DEFAULT_MEMORY_LIMIT;
use esddpm::model::OnnxModel;
use esddpm::unet::Unet;
use esddpm::{Error, ModelRole};
use prost::Message;
use std::path::{Path, PathBuf};
use tract_onnx::pb;

fn shipped_unet() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/fashion/unet.onnx")
}

fn load(path: &Path) -> Unet {
    let model = OnnxModel::from_path(ModelRole::Unet, path, DEFAULT_MEMORY_LIMIT).unwrap();
    Unet::new(model, [1, 32, 32]).unwrap()
}

/// One forward of `batch` images at t = 417, as bits.
fn forward(unet: &Unet, batch: usize) -> Vec<u32> {
    let x: Vec<f32> = (0..batch * 1024)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let mut out = vec![0.0; x.len() * unet.out_channels()];
    let exec = tract_linalg::multithread::Executor::SingleThread;
    unet.run(batch, &x, 417, &mut out, &exec).unwrap();
    out.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn weights_in_an_external_data_file_load_like_inline_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut proto = pb::ModelProto::decode(&std::fs::read(shipped_unet()).unwrap()[..]).unwrap();
    // Every initializer's bytes go to weights.bin, as onnx.save_model(...,
    // save_as_external_data=True) writes them.
    let mut weights = Vec::new();
    let graph = proto.graph.as_mut().unwrap();
    let mut moved = 0;
    for t in &mut graph.initializer {
        if t.raw_data.is_empty() {
            continue;
        }
        let entry = |key: &str, value: String| pb::StringStringEntryProto {
            key: key.into(),
            value,
        };
        t.external_data = vec![
            entry("location", "weights.bin".into()),
            entry("offset", weights.len().to_string()),
            entry("length", t.raw_data.len().to_string()),
        ];
        t.data_location = Some(pb::tensor_proto::DataLocation::External as i32);
        weights.append(&mut t.raw_data);
        moved += 1;
    }
    assert!(moved > 50, "{moved}");
    let file = dir.path().join("unet.onnx");
    std::fs::write(&file, proto.encode_to_vec()).unwrap();
    std::fs::write(dir.path().join("weights.bin"), &weights).unwrap();
    assert!(std::fs::metadata(&file).unwrap().len() < 200_000);

    assert_eq!(forward(&load(&file), 1), forward(&load(&shipped_unet()), 1));

    // Without the data file, a clear error.
    std::fs::remove_file(dir.path().join("weights.bin")).unwrap();
    let err = OnnxModel::from_path(ModelRole::Unet, &file, DEFAULT_MEMORY_LIMIT).unwrap_err();
    assert!(matches!(err, Error::ModelLoad { .. }), "{err}");
    assert!(err.to_string().contains("weights.bin"), "{err}");
}

#[test]
fn a_plan_for_another_batch_reads_the_file_again() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("unet.onnx");
    std::fs::copy(shipped_unet(), &file).unwrap();
    let from_file = load(&file);
    let bytes = std::fs::read(&file).unwrap();
    let model = OnnxModel::from_bytes(ModelRole::Unet, &bytes, DEFAULT_MEMORY_LIMIT).unwrap();
    let from_bytes = Unet::new(model, [1, 32, 32]).unwrap();
    // Batch 2's plan comes from a second read of the file (the first plan took the
    // parsed model); from bytes, from the kept parse: the same bits.
    assert_eq!(forward(&from_file, 2), forward(&from_bytes, 2));
    assert_eq!(forward(&from_file, 1), forward(&from_bytes, 1));
    assert!(from_file.model().is_parsed());
}

#[test]
fn a_model_file_changed_before_another_plan_is_an_error_not_another_model() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("unet.onnx");
    std::fs::copy(shipped_unet(), &file).unwrap();
    let unet = load(&file);
    std::fs::copy(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/models/tiny/unet.onnx"),
        &file,
    )
    .unwrap();
    // The batch-1 plan was made at the load: it still runs.
    forward(&unet, 1);
    match unet.plan(2) {
        Err(Error::ModelLoad { role, message }) => {
            assert_eq!(role, ModelRole::Unet);
            assert!(message.contains("changed since it was loaded"), "{message}");
        }
        other => panic!("expected a ModelLoad error, got {:?}", other.map(|_| ())),
    }
}
