//! Model loading from bytes: arbitrary and mutated ONNX files (seeded from the shipped
//! and test models) as the U-Net or as the prior of an otherwise valid model folder,
//! loaded through `Pipeline::from_memory` (parse, signature checks, optimisation for
//! batch 1) under a 256 MiB memory limit; a folder that loads then generates one image
//! in two steps.
//!
//! Every input must give a pipeline or a typed error: no crash, panic, hang or
//! allocation beyond the limit.
#![no_main]
use esddpm_runtime::{
    Error, GenerateOptions, LoadOptions, MemoryFolder, Pipeline, SamplerChoice, Start,
};
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;

const TINY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/models/tiny");

struct Tiny {
    scheduler: String,
    esddpm: String,
    unet: Vec<u8>,
    prior: Vec<u8>,
    prior_cond: Vec<u8>,
}

fn tiny() -> &'static Tiny {
    static TINY_FILES: std::sync::OnceLock<Tiny> = std::sync::OnceLock::new();
    TINY_FILES.get_or_init(|| {
        let read = |f: &str| std::fs::read(format!("{TINY}/{f}")).expect("tests/models/tiny");
        Tiny {
            scheduler: String::from_utf8(read("scheduler_config.json")).unwrap(),
            esddpm: String::from_utf8(read("esddpm.json")).unwrap(),
            unet: read("unet.onnx"),
            prior: read("prior.onnx"),
            prior_cond: read("prior_cond.onnx"),
        }
    })
}

fuzz_target!(init: {
    // tract's panics are caught by the loader and returned as `Error::ModelLoad`; the
    // library's contract is that they never escape, so a caught panic is not a crash.
    // (libfuzzer-sys aborts on any panic by default.)
    std::panic::set_hook(Box::new(|_| {}));
}, |data: &[u8]| {
    let Some((&role, model)) = data.split_first() else {
        return;
    };
    let t = tiny();
    let mut files: BTreeMap<String, &[u8]> = BTreeMap::new();
    files.insert("unet.onnx".into(), &t.unet);
    files.insert("prior.onnx".into(), &t.prior);
    files.insert("prior_cond.onnx".into(), &t.prior_cond);
    let target = match role % 3 {
        0 => "unet.onnx",
        1 => "prior.onnx",
        _ => "prior_cond.onnx",
    };
    files.insert(target.into(), model);
    let folder = MemoryFolder {
        scheduler_config: &t.scheduler,
        esddpm_config: &t.esddpm,
        files,
    };
    let options = LoadOptions {
        threads: Some(1),
        memory_limit: 256 << 20,
    };
    match Pipeline::from_memory(&folder, &options) {
        Ok(p) => {
            let r = p.generate(&GenerateOptions {
                seed: 1,
                start: Start::EarlyStop { t_prime: Some(10) },
                sampler: SamplerChoice::Ddim { eta: 0.0 },
                steps: Some(2),
                class_labels: (role % 3 == 2).then(|| vec![3]),
                prior: (role % 3 == 2).then(|| "mlp_cond".to_string()),
                ..Default::default()
            });
            if let Ok(images) = r {
                assert!(images.data.iter().all(|v| v.is_finite()));
            }
        }
        Err(Error::ModelLoad { .. })
        | Err(Error::ModelSignature { .. })
        | Err(Error::MemoryLimit { .. }) => {}
        Err(e) => panic!("unexpected error kind for a model file: {e}"),
    }
});
