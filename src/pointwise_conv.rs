//! 1 × 1 convolutions as direct convolutions (issue 6, lever 16 in
//! `docs/PERFORMANCE.md`).
//!
//! tract's declutter turns a 1 × 1 convolution into a matrix product, an `EinSum`
//! `NIHW,OI->NOHW` plus a bias `Add`; when its input is a concatenation (a diffusers
//! ResNet block's shortcut in the up path reads `concat(h, skip)`), it goes further
//! and splits the product over the concatenated pieces: one `EinSum` per piece, each
//! on a `Slice` of the concatenation, summed by `Add`s:
//!
//! ```text
//! y = b + W₀ · x[0..c₁] + W₁ · x[c₁..C]          (over channels; every pixel alike)
//! ```
//!
//! On the shipped U-Net these products are small (16-64 output channels, 3% of its
//! FLOPs) and tract ran them at 10-25 GFLOP/s, ~9% of its forward.
//! [`fuse_pointwise_convs`] finds either form in a decluttered model and swaps it for
//! one [`DirectConv`] with a 1 × 1 kernel on the whole input, its weights the pieces'
//! side by side:
//!
//! ```text
//! y[n, o, i, j] = b[o] + Σ_c W[o, c] · x[n, c, i, j]      (c in order, from zero)
//! ```
//!
//! within the limits of the CPU's default [`Policy`], the same as for the other direct
//! convolutions, at batch 1: the batch esddpm runs its U-Net at. Both forms of the
//! product are matched: the one tract's declutter makes from the ONNX file, and the one
//! its NNEF reader gives back from a plan cache entry (the pixels merged into one axis
//! around it), so that a plan from the cache has the same operators, and gives the same
//! bits, as one from the file. A batched product read back from the cache has yet
//! another form; batched plans keep tract's product, from either source.
//!
//! The sum runs in another order than tract's (one chain over all channels, not one per
//! piece then their sum), so the result differs from tract's in the last bits (tested).
//! Anything else stays with tract.

use crate::direct_conv::{DirectConv, Geometry, Policy};
use crate::fusion::{bin_with_const, fuse_all, only_reader, per_channel, Fusion};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::array::{DynSlice, Slice};
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::change_axes::AxisOp;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::math::Add;

/// The axes of the matrix product tract's declutter makes of a 1 × 1 convolution:
/// `x[N, I, H, W]` and `W[O, I]`.
const ONNX_AXES: &str = "NIHW,OI->NOHW";

/// The same product as tract's NNEF reader gives it back from a plan cache entry:
/// `W[1, O, I]` and `x[N, I, H·W]` (the pixels merged by a reshape before it, split
/// again after the bias).
const NNEF_AXES: &str = "amk,akn->amn";

/// One product of a split 1 × 1 convolution: channels `start..end` of the input times
/// `weights` (`[O, end − start]`, row-major).
struct Piece {
    start: usize,
    end: usize,
    weights: Vec<f32>,
}

/// What a sum of pieces reads and which nodes it is made of.
struct Pieces {
    input: OutletId,
    pieces: Vec<Piece>,
    nodes: Vec<usize>,
}

/// The values of a constant f32 tensor of shape `[1, rows, cols]` (`lead`) or
/// `[rows, cols]`, in row-major order, with `cols`.
fn matrix(konst: &Tensor, rows: usize, lead: bool) -> Option<(usize, Vec<f32>)> {
    let shape = konst.shape();
    let shape = match (lead, shape) {
        (true, [1, rest @ ..]) | (false, rest) => rest,
        _ => return None,
    };
    if shape.len() != 2 || shape[0] != rows || konst.datum_type() != f32::datum_type() {
        return None;
    }
    let values = konst.to_plain_array_view::<f32>().ok()?;
    Some((shape[1], values.iter().copied().collect()))
}

/// Whether `node` is tract's reshape of axis `2..` from `from` dimensions to `to`
/// (merging a convolution's pixels into one axis, or splitting them again).
fn pixel_reshape(node: &TypedNode, from: usize, to: usize) -> bool {
    matches!(node.op_as::<AxisOp>(), Some(AxisOp::Reshape(2, a, b)) if a.len() == from && b.len() == to)
}

/// A constant input of `node` as a `usize`.
fn const_usize(model: &TypedModel, node: &TypedNode, input: usize) -> Option<usize> {
    let konst = model
        .outlet_fact(*node.inputs.get(input)?)
        .ok()?
        .konst
        .as_ref()?;
    let value = konst.cast_to_scalar::<i64>().ok()?;
    usize::try_from(value).ok()
}

/// What a product of `cols` input channels reads at `outlet`: the channels
/// `start..start + cols` of a `Slice` (the ONNX path) or `DynSlice` (the NNEF path) on
/// axis 1 that only `reader` reads, or the whole outlet from channel 0.
fn channels(
    model: &TypedModel,
    outlet: OutletId,
    cols: usize,
    reader: usize,
    nodes: &mut Vec<usize>,
) -> Option<(OutletId, usize)> {
    let node = model.node(outlet.node);
    let bounds = if let Some(slice) = node.op_as::<Slice>() {
        let start = usize::try_from(slice.start.to_i64().ok()?).ok()?;
        let end = usize::try_from(slice.end.to_i64().ok()?).ok()?;
        (slice.axis == 1).then_some((start, end))
    } else if let Some(slice) = node.op_as::<DynSlice>() {
        let start = const_usize(model, node, 1)?;
        let end = const_usize(model, node, 2)?;
        (slice.axis == 1).then_some((start, end))
    } else {
        return Some((outlet, 0));
    };
    let (start, end) = bounds?;
    if end != start + cols || only_reader(model, outlet)?.id != reader {
        return None;
    }
    nodes.push(node.id);
    Some((node.inputs[0], start))
}

/// The 1 × 1 product at `node` (`cout` output channels, constant weights), in either
/// form ([`ONNX_AXES`], [`NNEF_AXES`]).
fn product(model: &TypedModel, node: &TypedNode, cout: usize) -> Option<Pieces> {
    let op = node.op_as::<EinSum>()?;
    if op.operating_dt != f32::datum_type() || op.q_params.is_some() || node.inputs.len() != 2 {
        return None;
    }
    let konst = |i: usize| model.outlet_fact(node.inputs[i]).ok()?.konst.clone();
    let mut nodes = vec![node.id];
    let axes = op.axes.to_string();
    let ((cols, weights), read, reader) = if axes == ONNX_AXES {
        (matrix(&*konst(1)?, cout, false)?, node.inputs[0], node.id)
    } else if axes == NNEF_AXES {
        let merge = model.node(node.inputs[1].node);
        if !pixel_reshape(merge, 2, 1) || only_reader(model, node.inputs[1])?.id != node.id {
            return None;
        }
        nodes.push(merge.id);
        (matrix(&*konst(0)?, cout, true)?, merge.inputs[0], merge.id)
    } else {
        return None;
    };
    let (input, start) = channels(model, read, cols, reader, &mut nodes)?;
    Some(Pieces {
        input,
        pieces: vec![Piece {
            start,
            end: start + cols,
            weights,
        }],
        nodes,
    })
}

/// The pieces whose sum `outlet` is: a 1 × 1 [`product`], or an `Add` of two such
/// sums, each read by nothing else than the sum.
fn pieces(model: &TypedModel, outlet: OutletId, cout: usize) -> Option<Pieces> {
    let node = model.node(outlet.node);
    let Some(op) = node.op_as::<TypedBinOp>() else {
        return product(model, node, cout);
    };
    if !op.0.is::<Add>() || op.1.is_some() || node.inputs.len() != 2 {
        return None;
    }
    let [a, b] = [node.inputs[0], node.inputs[1]];
    if [a, b].iter().any(|&i| only_reader(model, i).is_none()) {
        return None;
    }
    let (mut left, right) = (pieces(model, a, cout)?, pieces(model, b, cout)?);
    if left.input != right.input {
        return None;
    }
    left.pieces.extend(right.pieces);
    left.nodes.extend(right.nodes);
    left.nodes.push(node.id);
    Some(left)
}

/// A 1 × 1 convolution whose output is `node`'s (module docs): the bias `Add` on the
/// ONNX path, or on the NNEF path the reshape that splits the pixels again after it.
fn pointwise_at(
    model: &TypedModel,
    node: &TypedNode,
    policy: &Policy,
) -> TractResult<Option<Fusion<DirectConv>>> {
    // (A node an earlier fusion left as garbage has no outputs.)
    let Some(output) = node.outputs.first().filter(|_| node.outputs.len() == 1) else {
        return Ok(None);
    };
    let Some(&[n, cout, h, w]) = output.fact.shape.as_concrete() else {
        return Ok(None);
    };
    // The bias `Add`, the rank of its bias and the nodes above it.
    let (add, rank, mut nodes) = if pixel_reshape(node, 1, 2) {
        let add = model.node(node.inputs[0].node);
        if only_reader(model, node.inputs[0]).is_none_or(|r| r.id != node.id) {
            return Ok(None);
        }
        (add, 3, vec![add.id])
    } else {
        (node, 4, vec![])
    };
    if add.inputs.len() != 2 || !add.op_is::<TypedBinOp>() {
        return Ok(None);
    }
    for sum in add.inputs.iter().copied() {
        let Some(bias) =
            bin_with_const::<Add>(model, add, sum).and_then(|k| per_channel(k, cout, rank))
        else {
            continue;
        };
        if only_reader(model, sum).is_none_or(|r| r.id != add.id) {
            continue;
        }
        let Some(found) = pieces(model, sum, cout) else {
            continue;
        };
        let x = model.outlet_fact(found.input)?;
        let Some(&[xn, cin, xh, xw]) = x.shape.as_concrete() else {
            continue;
        };
        if x.datum_type != f32::datum_type() || [xn, xh, xw] != [n, h, w] || n != 1 {
            continue;
        }
        // The pieces must cover the input's channels once each.
        let mut order: Vec<&Piece> = found.pieces.iter().collect();
        order.sort_by_key(|p| p.start);
        let covered = order
            .iter()
            .try_fold(0, |at, p| (p.start == at).then_some(p.end));
        if covered != Some(cin) {
            continue;
        }
        let geometry = Geometry {
            cin,
            cout,
            kernel: [1, 1],
            input: [h, w],
            pad_before: [0, 0],
            output: [h, w],
        };
        let Some(tile) = policy.tile_for(&geometry) else {
            continue;
        };
        // OIHW: each output channel's weights over the whole input, piece by piece.
        let mut weights = Vec::with_capacity(cout * cin);
        for o in 0..cout {
            for p in &order {
                let cols = p.end - p.start;
                weights.extend_from_slice(&p.weights[o * cols..][..cols]);
            }
        }
        let op = DirectConv::new(geometry, tile, &weights, Some(&bias))?;
        nodes.extend(found.nodes);
        return Ok(Some(Fusion {
            op,
            inputs: tvec![found.input],
            output: node.id.into(),
            nodes,
        }));
    }
    Ok(None)
}

/// Replaces every 1 × 1 convolution of `model` (decluttered, before `optimize`) that
/// the CPU's default [`Policy`] takes by a [`DirectConv`] (module docs). Returns how
/// many; none on a CPU without the direct kernels.
pub fn fuse_pointwise_convs(model: &mut TypedModel) -> TractResult<usize> {
    fuse_pointwise_convs_with(model, &Policy::default())
}

/// [`fuse_pointwise_convs`] with another [`Policy`] (for measuring its limits).
pub fn fuse_pointwise_convs_with(model: &mut TypedModel, policy: &Policy) -> TractResult<usize> {
    fuse_all(model, |model, node| pointwise_at(model, node, policy))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::direct_conv::Tile;
    use crate::test_values::{decluttered, values};
    use tract_onnx::tract_core::ops::array::TypedConcat;
    use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec, PoolSpec};
    use tract_onnx::tract_core::ops::math;
    use tract_onnx::tract_core::ops::nn::DataFormat;
    use tract_onnx::WithOnnx;

    /// A 1 × 1 convolution with `cout` channels and a constant bias over the
    /// concatenation of sources of `pieces` channels each (`[n, c, h, w]`), decluttered
    /// by tract. Another op reads the concatenation too, as in a U-Net, where a 3 × 3
    /// convolution does (else tract drops it and the products read the sources).
    fn model(pieces: &[usize], n: usize, hw: [usize; 2], cout: usize) -> TypedModel {
        let mut model = TypedModel::default();
        let sources = pieces
            .iter()
            .enumerate()
            .map(|(i, &c)| model.add_source(format!("x{i}"), f32::fact([n, c, hw[0], hw[1]])))
            .collect::<TractResult<TVec<_>>>()
            .unwrap();
        let x = match sources.len() {
            1 => sources[0],
            _ => model
                .wire_node("concat", TypedConcat::new(1), &sources)
                .unwrap()[0],
        };
        let cin: usize = pieces.iter().sum();
        let w = Tensor::from_shape(&[cout, cin, 1, 1], &values(cout * cin, 1)).unwrap();
        let w = model.add_const("w", w).unwrap();
        let b = model.add_const("b", tensor1(&values(cout, 2))).unwrap();
        let op = Conv {
            pool_spec: PoolSpec {
                data_format: DataFormat::NCHW,
                kernel_shape: tvec![1, 1],
                padding: PaddingSpec::Valid,
                dilations: None,
                strides: None,
                input_channels: cin,
                output_channels: cout,
            },
            kernel_fmt: KernelFormat::OIHW,
            group: 1,
            q_params: None,
        };
        let y = model.wire_node("conv", op, &[x, w, b]).unwrap()[0];
        let outputs = if sources.len() > 1 {
            let other = model.wire_node("other", math::abs(), &[x]).unwrap()[0];
            vec![y, other]
        } else {
            vec![y]
        };
        model.select_output_outlets(&outputs).unwrap();
        model.into_decluttered().unwrap()
    }

    /// Every tile this CPU has may be used, up to 64 channels on rows of 8 or more.
    fn policy() -> Policy {
        Policy {
            max_output_channels: 64,
            min_output_width: 8,
            tiles: Tile::available(),
        }
    }

    fn count(model: &TypedModel, op: &str) -> usize {
        model.nodes().iter().filter(|n| n.op.name() == op).count()
    }

    fn run(model: &TypedModel, seed: u64) -> Vec<f32> {
        let inputs = model
            .input_outlets()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, &o)| {
                let shape = model
                    .outlet_fact(o)
                    .unwrap()
                    .shape
                    .as_concrete()
                    .unwrap()
                    .to_vec();
                let volume = shape.iter().product();
                Tensor::from_shape(&shape, &values(volume, seed + i as u64))
                    .unwrap()
                    .into_tvalue()
            })
            .collect();
        let plan = model
            .clone()
            .into_optimized()
            .unwrap()
            .into_runnable()
            .unwrap();
        let y = plan.run(inputs).unwrap().remove(0);
        y.try_as_plain_ram()
            .unwrap()
            .as_slice::<f32>()
            .unwrap()
            .to_vec()
    }

    /// `model` written as a plan cache entry and read back, as a cached start reads it.
    fn through_the_cache(model: &TypedModel) -> TypedModel {
        let nnef = tract_nnef::nnef().with_onnx();
        let mut tar = vec![];
        nnef.write_to_tar(model, &mut tar).unwrap();
        let mut back = nnef.model_for_read(&mut &tar[..]).unwrap();
        crate::rewrite::remove_identity_casts(&mut back).unwrap();
        back
    }

    /// Fuses `model`, and `model` read back from a plan cache entry, with [`policy`];
    /// checks the count and that the values stay within f32 rounding of tract's.
    fn fuses(model: TypedModel, expected: usize) {
        fuses_one_form(through_the_cache(&model), expected);
        fuses_one_form(model, expected);
    }

    fn fuses_one_form(model: TypedModel, expected: usize) {
        let mut fused = model.clone();
        let n = fuse_pointwise_convs_with(&mut fused, &policy()).unwrap();
        let tiles = !Tile::available().is_empty();
        assert_eq!(n, if tiles { expected } else { 0 });
        if n == 0 {
            return;
        }
        assert_eq!(count(&fused, "EsddpmDirectConv"), n);
        assert_eq!(count(&fused, "EinSum"), 0);
        for seed in [3, 4] {
            let (a, b) = (run(&model, seed), run(&fused, seed));
            assert_eq!(a.len(), b.len());
            let scale = a.iter().fold(1f32, |m, v| m.max(v.abs()));
            let diff = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(diff <= 1e-5 * scale, "max abs diff {diff} at scale {scale}");
        }
    }

    #[test]
    fn fuses_a_product_split_over_a_concatenation() {
        let model = model(&[32, 16], 1, [16, 32], 16);
        // tract split it: one product per piece.
        assert_eq!(count(&model, "EinSum"), 2);
        assert_eq!(count(&model, "Slice"), 2);
        fuses(model, 1);
    }

    #[test]
    fn fuses_three_pieces() {
        let model = model(&[8, 16, 24], 1, [8, 16], 24);
        assert_eq!(count(&model, "EinSum"), 3);
        fuses(model, 1);
    }

    #[test]
    fn fuses_a_plain_one_by_one_convolution() {
        let model = model(&[40], 1, [4, 8], 20);
        assert_eq!(count(&model, "EinSum"), 1);
        fuses(model, 1);
    }

    #[test]
    fn other_shapes_and_readers_stay_with_tract() {
        // More output channels than the policy takes, rows narrower than it takes, and a
        // batch (in both forms).
        let models = [
            model(&[16, 16], 1, [16, 16], 96),
            model(&[16, 16], 1, [16, 4], 16),
            model(&[16, 16], 2, [16, 16], 16),
            model(&[40], 3, [4, 8], 20),
        ];
        for model in models {
            for model in [through_the_cache(&model), model] {
                let mut fused = model.clone();
                assert_eq!(fuse_pointwise_convs_with(&mut fused, &policy()).unwrap(), 0);
                assert_eq!(count(&fused, "EinSum"), count(&model, "EinSum"));
            }
        }
        // A piece's product read elsewhere too.
        let mut model = model(&[16, 16], 1, [16, 16], 16);
        let einsum = model
            .nodes()
            .iter()
            .find(|n| n.op_is::<EinSum>())
            .unwrap()
            .id;
        let mut outputs = model.output_outlets().unwrap().to_vec();
        outputs.push(einsum.into());
        model.select_output_outlets(&outputs).unwrap();
        assert_eq!(fuse_pointwise_convs_with(&mut model, &policy()).unwrap(), 0);
    }

    #[test]
    fn fuses_the_shipped_unets_shortcuts_from_the_file_and_the_cache() {
        // Eight ResNet shortcuts: two in the down path, six over a concatenation in the up
        // path; with AVX2 every one fits the default policy. After the other rewrites, as a
        // load runs them (they leave nodes of their patterns as garbage in the graph).
        let model = decluttered("models/fashion/unet.onnx", [1, 1, 32, 32]);
        let with_tiles = Policy::default()
            .tiles
            .iter()
            .any(|t| Tile::available().contains(t));
        for mut model in [through_the_cache(&model), model] {
            crate::group_norm::fuse_group_norms(&mut model).unwrap();
            crate::attention::fuse_attention(&mut model).unwrap();
            crate::direct_conv::use_direct_convs(&mut model).unwrap();
            let before = count(&model, "EinSum");
            let n = fuse_pointwise_convs(&mut model).unwrap();
            if with_tiles {
                assert_eq!(n, 8);
                assert_eq!(count(&model, "EinSum"), before - 14);
            }
            crate::codegen::optimize(&mut model).unwrap();
        }
    }
}
