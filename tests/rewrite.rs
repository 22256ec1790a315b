//! The load-time rewrites change how tract computes, not what: the shipped U-Net's
//! output is the same bits with and without `esddpm::rewrite`, and within f32 rounding
//! with and without `esddpm::group_norm`'s fused group norms.

use esddpm::group_norm::{fuse_group_norms, GroupNorm};
use esddpm::rewrite::natural_const_strides;
use std::path::PathBuf;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::konst::Const;

fn shipped_unet() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/fashion/unet.onnx")
}

fn optimised() -> TypedModel {
    decluttered().into_optimized().unwrap()
}

fn decluttered() -> TypedModel {
    tract_onnx::onnx()
        .model_for_path(shipped_unet())
        .unwrap()
        .with_input_fact(0, f32::fact([1usize, 1, 32, 32]).into())
        .unwrap()
        .with_input_fact(1, i64::fact([1usize]).into())
        .unwrap()
        .into_typed()
        .unwrap()
        .into_decluttered()
        .unwrap()
}

fn odd_consts(model: &TypedModel) -> usize {
    model
        .nodes()
        .iter()
        .filter_map(|n| n.op_as::<Const>())
        .filter(|k| k.val().is_plain() && k.exotic_fact().is_none())
        .filter(|k| k.val().strides() != &*Tensor::natural_strides(k.val().shape()))
        .count()
}

fn run(model: TypedModel) -> Vec<f32> {
    let plan = model.into_runnable().unwrap();
    let x: Vec<f32> = (0..1024)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let out = plan
        .run(tvec![
            Tensor::from_shape(&[1, 1, 32, 32], &x)
                .unwrap()
                .into_tvalue(),
            tensor1(&[500i64]).into_tvalue(),
        ])
        .unwrap();
    out[0]
        .try_as_plain_ram()
        .unwrap()
        .as_slice::<f32>()
        .unwrap()
        .to_vec()
}

#[test]
fn natural_const_strides_keeps_the_shipped_unets_output_bit_for_bit() {
    let plain = optimised();
    let mut rewritten = plain.clone();
    let before = odd_consts(&rewritten);
    let fixed = natural_const_strides(&mut rewritten).unwrap();
    // The shipped U-Net's GroupNorm scales and shifts ([1, C, 1, 1]) are the case the
    // rewrite exists for: tract 0.23 leaves them with strides [1, 1, 1, 1].
    assert!(
        before > 0,
        "tract now gives constants natural strides: the rewrite may be obsolete"
    );
    assert_eq!(fixed, before);
    assert_eq!(odd_consts(&rewritten), 0);
    let (a, b) = (run(plain), run(rewritten));
    assert_eq!(a.len(), 1024);
    assert!(a.iter().all(|v| v.is_finite()));
    let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
    assert!(same, "the rewrite changed the U-Net's output");
}

#[test]
fn every_group_norm_of_the_shipped_unet_is_fused_within_f32_rounding() {
    let plain = decluttered();
    let mut fused = plain.clone();
    // 27 GroupNorms: two in each of the 11 ResNet blocks, one in each of the 4
    // attention blocks, and the output norm; all but the attention blocks' are
    // followed by a SiLU.
    assert_eq!(fuse_group_norms(&mut fused).unwrap(), 27);
    let ops: Vec<&GroupNorm> = fused
        .nodes()
        .iter()
        .filter_map(|n| n.op_as::<GroupNorm>())
        .collect();
    assert_eq!(ops.len(), 27);
    assert_eq!(ops.iter().filter(|op| op.silu).count(), 23);
    assert!(ops.iter().all(|op| op.groups == 8 && op.eps == 1e-5));
    let left = fused
        .nodes()
        .iter()
        .filter(|n| n.op.name().contains("RmsNorm") || n.op.name().contains("Reduce"))
        .count();
    assert_eq!(left, 0, "a group norm's pieces are left in the model");
    let (a, b) = (
        run(plain.into_optimized().unwrap()),
        run(fused.into_optimized().unwrap()),
    );
    assert!(b.iter().all(|v| v.is_finite()));
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(d < 1e-5, "fused vs tract's decomposition: max abs diff {d}");
}
