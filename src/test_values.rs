//! Seeded test data and models shared by the unit tests of esddpm's own operators.

use tract_onnx::prelude::*;

/// The U-Net at `path` (inputs: a sample of `shape`, one timestep per image) after
/// tract's declutter, as loading makes it before esddpm's rewrites.
pub(crate) fn decluttered(path: &str, shape: [usize; 4]) -> TypedModel {
    tract_onnx::onnx()
        .model_for_path(path)
        .unwrap()
        .with_input_fact(0, f32::fact(shape).into())
        .unwrap()
        .with_input_fact(1, i64::fact([shape[0]]).into())
        .unwrap()
        .into_typed()
        .unwrap()
        .into_decluttered()
        .unwrap()
}

/// The bits of an f32 tensor's values, for exact comparisons (panics on another type).
pub(crate) fn bits(t: &Tensor) -> Vec<u32> {
    let t = t.try_as_plain_ram().expect("a tensor in memory");
    t.as_slice::<f32>()
        .expect("f32 values")
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

/// `n` seeded values in [-1, 1) (xorshift64; the same for a seed on every platform).
pub(crate) fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}
