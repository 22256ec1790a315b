//! Seeded test data and models shared by the unit tests of esddpm's own operators.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec, PoolSpec};
use tract_onnx::tract_core::ops::nn::DataFormat;

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

/// One tract `Conv` of `x_shape` input with `cout` channels, `kernel` and
/// `pad` (before, after) on both axes, stride `stride`; its bias is a constant, or
/// with `bias_input` the model's second input (`[cout]`).
pub(crate) fn conv_model(
    x_shape: [usize; 4],
    cout: usize,
    kernel: [usize; 2],
    pad: (usize, usize),
    stride: usize,
    bias_input: bool,
) -> TractResult<TypedModel> {
    let cin = x_shape[1];
    let mut model = TypedModel::default();
    let x = model.add_source("x", f32::fact(x_shape))?;
    let w = values(cout * cin * kernel[0] * kernel[1], 1);
    let w = model.add_const(
        "w",
        Tensor::from_shape(&[cout, cin, kernel[0], kernel[1]], &w)?,
    )?;
    let b = if bias_input {
        model.add_source("b", f32::fact([cout]))?
    } else {
        model.add_const("b", tensor1(&values(cout, 2)))?
    };
    let op = Conv {
        pool_spec: PoolSpec {
            data_format: DataFormat::NCHW,
            kernel_shape: kernel.into_iter().collect(),
            padding: PaddingSpec::Explicit(tvec![pad.0, pad.0], tvec![pad.1, pad.1]),
            dilations: None,
            strides: Some(tvec![stride, stride]),
            input_channels: cin,
            output_channels: cout,
        },
        kernel_fmt: KernelFormat::OIHW,
        group: 1,
        q_params: None,
    };
    let y = model.wire_node("conv", op, &[x, w, b])?;
    model.select_output_outlets(&y)?;
    Ok(model)
}
