//! A fused group normalisation (issue 6, lever 7 in `docs/PERFORMANCE.md`).
//!
//! A PyTorch `GroupNorm` exported to ONNX (opset < 18) is `Reshape` →
//! `InstanceNormalization` → `Reshape` → `Mul(γ)` → `Add(β)`, and a U-Net follows most
//! of them with a SiLU. tract expands the instance norm, so after decluttering every
//! group norm is seven operators (reshape, sum, scale by `1/m`, subtract, `RmsNorm`,
//! reshape, multiply-add) and often an eighth (SiLU), each with its own output tensor
//! and dispatch. On the shipped U-Net's 27 group norms that cost ~23 µs each for
//! 2-16 K values, 12% of a forward.
//!
//! [`GroupNorm`] computes the same function in one op, for an input `x` of shape
//! `[N, C, ...]` with `G` groups of `C / G` channels (`m` values per group, `L` per
//! channel):
//!
//! ```text
//! μ = (1/m) Σ x          σ² = (1/m) Σ (x − μ)²          (per image and group)
//! y[n, c, l] = (x[n, c, l] − μ) · (γ[c] / √(σ² + ε)) + β[c]
//! y ← y · sigmoid(y)     (when the SiLU is fused)
//! ```
//!
//! The variance is computed in a second pass over the group (which is in cache), as
//! tract's decomposition does, so it stays exact for values far from zero. The SiLU is
//! tract's own kernel (`tract_linalg`'s `Silu`), applied to each group as soon as it is
//! normalised, so only the normalisation's rounding differs from tract's. From
//! [`SPLIT_MIN_VALUES`] values up, the groups are split across esddpm's operator
//! threads ([`crate::op_threads`]; lever 21 in `docs/PERFORMANCE.md`): each group is
//! computed alike wherever it runs, so the bits do not depend on the thread count.
//!
//! [`fuse_group_norms`] finds tract's decomposition in a decluttered model (before
//! `optimize`) and swaps it for the op. It matches only the exact pattern (constant γ
//! and β per channel, or none), so anything else stays with tract.

use crate::fusion::{bin_with_const, fuse_all, only_reader, per_channel, same_bits, Fusion};
use crate::op_threads;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::math::{Add, Mul, Sub};
use tract_onnx::tract_core::ops::nn::{Reduce, Reducer, RmsNorm, Silu};

/// Group normalisation of `[N, C, ...]` f32 tensors, with a per-channel affine step and
/// an optional SiLU (module docs).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    /// Number of groups `G`; divides the channels.
    pub groups: usize,
    /// The `ε` added to the variance.
    pub eps: f32,
    /// Whether a SiLU follows, `y · sigmoid(y)`.
    pub silu: bool,
    /// `γ`, one per channel.
    gamma: Arc<Vec<f32>>,
    /// `β`, one per channel.
    beta: Arc<Vec<f32>>,
}

/// Two ops are equal when they compute the same thing (values compared bit for bit, so
/// that the relation is an equivalence, as tract needs).
impl PartialEq for GroupNorm {
    fn eq(&self, other: &Self) -> bool {
        self.groups == other.groups
            && self.eps.to_bits() == other.eps.to_bits()
            && self.silu == other.silu
            && same_bits(&self.gamma, &other.gamma)
            && same_bits(&self.beta, &other.beta)
    }
}

impl Eq for GroupNorm {}

impl GroupNorm {
    /// Makes the op for `gamma.len()` channels in `groups` groups. Fails when the
    /// channels are not a positive multiple of the groups, `beta` has another length,
    /// or `eps` is negative or not finite.
    pub fn new(
        groups: usize,
        eps: f32,
        gamma: Vec<f32>,
        beta: Vec<f32>,
        silu: bool,
    ) -> TractResult<Self> {
        let channels = gamma.len();
        ensure!(
            groups >= 1 && channels >= 1 && channels.is_multiple_of(groups),
            "{channels} channels do not split into {groups} groups"
        );
        ensure!(
            beta.len() == channels,
            "{} shifts for {channels} scales",
            beta.len()
        );
        ensure!(eps.is_finite() && eps >= 0.0, "epsilon {eps}");
        Ok(GroupNorm {
            groups,
            eps,
            silu,
            gamma: Arc::new(gamma),
            beta: Arc::new(beta),
        })
    }

    /// Channels `C`.
    pub fn channels(&self) -> usize {
        self.gamma.len()
    }

    /// Normalises `x` (`[N, C, ...]`, f32) into a new tensor of the same shape.
    pub fn run(&self, x: &Tensor) -> TractResult<Tensor> {
        ensure!(
            x.datum_type() == f32::datum_type(),
            "input is {:?}",
            x.datum_type()
        );
        let shape = x.shape();
        ensure!(
            shape.len() >= 2 && shape[1] == self.channels(),
            "input shape {shape:?} for a group norm of {} channels",
            self.channels()
        );
        let input = crate::direct_conv::c_order_f32(x)?;
        let per_channel: usize = shape[2..].iter().product();
        // SAFETY: f32 has no invalid values, and every value is written below (each
        // group of each image is one part's).
        let mut y = unsafe { Tensor::uninitialized::<f32>(shape)? };
        let mut view = y.try_as_plain_ram_mut()?;
        let out = view.as_slice_mut::<f32>()?;
        if out.is_empty() {
            return Ok(y);
        }
        let silu = match self.silu {
            true => Some(silu_kernel()?),
            false => None,
        };
        let cg = self.channels() / self.groups;
        let group = cg * per_channel;
        let groups = input.len() / group;
        // Groups of each image, split across esddpm's operator threads when there are
        // enough values to pay for the split.
        let parts = match input.len() >= SPLIT_MIN_VALUES {
            true => op_threads::threads().min(groups),
            false => 1,
        };
        let per = groups.div_ceil(parts) * group;
        let work = input.chunks(per).zip(out.chunks_mut(per)).enumerate();
        op_threads::try_for_each(work, |(p, (x, y))| {
            let first = p * per / group;
            for (k, (x, y)) in x
                .chunks_exact(group)
                .zip(y.chunks_exact_mut(group))
                .enumerate()
            {
                let g = (first + k) % self.groups;
                let (gamma, beta) = (&self.gamma[g * cg..][..cg], &self.beta[g * cg..][..cg]);
                normalise_group(x, y, gamma, beta, per_channel, self.eps);
                // While the group is in the cache.
                if let Some(silu) = silu {
                    silu.run(y)?;
                }
            }
            Ok(())
        })?;
        Ok(y)
    }
}

/// The fewest values of a group norm split across threads. Splitting the shipped
/// U-Net's smallest ones too (the 8 × 8 maps', 4 K values) made its forward no faster
/// (lever 21), and a split is not free.
pub const SPLIT_MIN_VALUES: usize = 8192;

/// tract's SiLU kernel for this CPU, made once.
fn silu_kernel() -> TractResult<&'static dyn tract_linalg::element_wise::ElementWise<f32>> {
    static KERNEL: std::sync::OnceLock<Box<dyn tract_linalg::element_wise::ElementWise<f32>>> =
        std::sync::OnceLock::new();
    if let Some(k) = KERNEL.get() {
        return Ok(&**k);
    }
    let k = tract_linalg::routines::Func::Silu.ew_f32()?;
    Ok(&**KERNEL.get_or_init(|| k))
}

/// Lanes of the partial sums: 16 independent accumulators, which the compiler keeps in
/// vector registers.
const LANES: usize = 16;

/// `Σ f(v)` over `values`, in `LANES` partial sums (then summed in order).
#[inline(always)]
fn lane_sum(values: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        let chunk: &[f32; LANES] = chunk.try_into().expect("LANES values");
        for l in 0..LANES {
            acc[l] += f(chunk[l]);
        }
    }
    for (a, v) in acc.iter_mut().zip(rest) {
        *a += f(*v);
    }
    acc.iter().sum()
}

/// One group: `x` and `y` hold its channels, `per_channel` values each; `gamma` and
/// `beta` are its channels' scales and shifts. Compiled for the CPU's widest vectors
/// where it has AVX2 or AVX-512 (detected at run time; the same arithmetic, so the same
/// bits, on every path).
fn normalise_group(
    x: &[f32],
    y: &mut [f32],
    gamma: &[f32],
    beta: &[f32],
    per_channel: usize,
    eps: f32,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the features this function enables were just detected.
            return unsafe { x86::normalise_group_avx512(x, y, gamma, beta, per_channel, eps) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { x86::normalise_group_avx2(x, y, gamma, beta, per_channel, eps) };
        }
    }
    normalise_group_any(x, y, gamma, beta, per_channel, eps)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    /// [`super::normalise_group_any`] compiled for AVX-512F.
    #[target_feature(enable = "avx512f,avx2")]
    pub(super) fn normalise_group_avx512(
        x: &[f32],
        y: &mut [f32],
        gamma: &[f32],
        beta: &[f32],
        per_channel: usize,
        eps: f32,
    ) {
        super::normalise_group_any(x, y, gamma, beta, per_channel, eps)
    }

    /// [`super::normalise_group_any`] compiled for AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) fn normalise_group_avx2(
        x: &[f32],
        y: &mut [f32],
        gamma: &[f32],
        beta: &[f32],
        per_channel: usize,
        eps: f32,
    ) {
        super::normalise_group_any(x, y, gamma, beta, per_channel, eps)
    }
}

/// [`normalise_group`]'s arithmetic, inlined into each target-feature function.
#[inline(always)]
fn normalise_group_any(
    x: &[f32],
    y: &mut [f32],
    gamma: &[f32],
    beta: &[f32],
    per_channel: usize,
    eps: f32,
) {
    let m = x.len() as f32;
    let mean = lane_sum(x, |v| v) / m;
    let variance = lane_sum(x, |v| (v - mean) * (v - mean)) / m;
    let inv_std = 1.0 / (variance + eps).sqrt();
    for (((x, y), gamma), beta) in x
        .chunks_exact(per_channel)
        .zip(y.chunks_exact_mut(per_channel))
        .zip(gamma)
        .zip(beta)
    {
        let scale = gamma * inv_std;
        for (y, x) in y.iter_mut().zip(x) {
            *y = (x - mean) * scale + beta;
        }
    }
}

impl Op for GroupNorm {
    fn name(&self) -> StaticName {
        "EsddpmGroupNorm".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} channels in {} groups, eps {}, silu {}",
            self.channels(),
            self.groups,
            self.eps,
            self.silu
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for GroupNorm {
    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 1, "{} inputs to a group norm", inputs.len());
        Ok(tvec!(self.run(&inputs[0])?.into_tvalue()))
    }

    fn eval_out_of_plan(&self, inputs: TVec<TValue>) -> TractResult<Option<TVec<TValue>>> {
        ensure!(inputs.len() == 1, "{} inputs to a group norm", inputs.len());
        Ok(Some(tvec!(self.run(&inputs[0])?.into_tvalue())))
    }
}

impl TypedOp for GroupNorm {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1 && inputs[0].rank() >= 2);
        ensure!(inputs[0].datum_type == f32::datum_type());
        ensure!(inputs[0].shape[1] == self.channels().to_dim());
        Ok(tvec!(f32::fact(inputs[0].shape.iter())))
    }

    /// Four multiply-adds per value (sum, squared difference, scale and shift), plus
    /// tract's count for its SiLU.
    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let values = inputs[0].shape.volume();
        let fmas = if self.silu { 4 + 12 } else { 4 };
        Ok(tvec!((Cost::FMA(f32::datum_type()), values * fmas)))
    }
}

/// tract's decomposition of a group norm starting at `node` (module docs), or `None`.
fn group_norm_at(model: &TypedModel, node: &TypedNode) -> TractResult<Option<Fusion<GroupNorm>>> {
    // Reshape [N, C, ...] -> [N, G, (C/G)·L] at axis 1.
    let Some(AxisOp::Reshape(1, from, to)) = node.op_as::<AxisOp>() else {
        return Ok(None);
    };
    let input = node.inputs[0];
    let fact = model.outlet_fact(input)?;
    let Some(shape) = fact.shape.as_concrete() else {
        return Ok(None);
    };
    let rank = shape.len();
    if fact.datum_type != f32::datum_type() || rank < 3 || to.len() != 2 {
        return Ok(None);
    }
    let (Ok(groups), Ok(m)) = (to[0].to_usize(), to[1].to_usize()) else {
        return Ok(None);
    };
    let channels = shape[1];
    let rest: usize = shape[2..].iter().product();
    let from_fits =
        from.len() == rank - 1 && from.iter().zip(&shape[1..]).all(|(d, s)| *d == s.to_dim());
    if !from_fits
        || groups == 0
        || !channels.is_multiple_of(groups)
        || m != channels / groups * rest
    {
        return Ok(None);
    }
    let grouped = OutletId::new(node.id, 0);
    let readers = &node.outputs[0].successors;
    if readers.len() != 2 || model.outputs.contains(&grouped) {
        return Ok(None);
    }
    let mut nodes = vec![node.id];

    // Σ over the group, times 1/m: the mean.
    let Some(sum) = readers
        .iter()
        .map(|r| model.node(r.node))
        .find(|n| n.op_as::<Reduce>().is_some())
    else {
        return Ok(None);
    };
    let reduce = sum.op_as::<Reduce>().expect("found as a Reduce");
    if reduce.reducer != Reducer::Sum || *reduce.axes != [2] {
        return Ok(None);
    }
    nodes.push(sum.id);
    let Some(scale) = only_reader(model, sum.id.into()) else {
        return Ok(None);
    };
    let Some(recip) = bin_with_const::<Mul>(model, scale, sum.id.into()) else {
        return Ok(None);
    };
    let recip_fits = recip.len() == 1
        && recip.datum_type() == f32::datum_type()
        && (recip.cast_to_scalar::<f32>()? * m as f32 - 1.0).abs() < 1e-6;
    if !recip_fits {
        return Ok(None);
    }
    nodes.push(scale.id);

    // x − μ, then divided by √(mean of squares + ε).
    let Some(diff) = only_reader(model, scale.id.into()) else {
        return Ok(None);
    };
    let is_sub = diff
        .op_as::<TypedBinOp>()
        .is_some_and(|op| op.0.is::<Sub>() && op.1.is_none());
    if !is_sub || diff.inputs != [grouped, OutletId::new(scale.id, 0)] {
        return Ok(None);
    }
    if !readers.iter().any(|r| r.node == diff.id) {
        return Ok(None);
    }
    nodes.push(diff.id);
    let Some(rms) = only_reader(model, diff.id.into()) else {
        return Ok(None);
    };
    let Some(rms_op) = rms.op_as::<RmsNorm>() else {
        return Ok(None);
    };
    if rms_op.axis != 2 || rms_op.eps.len() != 1 {
        return Ok(None);
    }
    let eps = rms_op.eps.cast_to_scalar::<f32>()?;
    nodes.push(rms.id);

    // A SiLU right after the normalisation (tract moves it before the reshape back
    // when there is no affine step between them, as with γ = 1, β = 0).
    let is_silu = |n: &TypedNode| {
        n.op_as::<ElementWiseOp>()
            .is_some_and(|op| op.0.is::<Silu>())
    };
    let mut output = OutletId::new(rms.id, 0);
    let mut silu = false;
    if let Some(next) = only_reader(model, output).filter(|n| is_silu(n)) {
        silu = true;
        nodes.push(next.id);
        output = OutletId::new(next.id, 0);
    }

    // Back to [N, C, ...].
    let Some(back) = only_reader(model, output) else {
        return Ok(None);
    };
    match back.op_as::<AxisOp>() {
        Some(AxisOp::Reshape(1, f, t)) if f == to && t == from => {}
        _ => return Ok(None),
    }
    nodes.push(back.id);
    output = OutletId::new(back.id, 0);

    // Then, unless the SiLU came already: an optional per-channel scale, shift and
    // SiLU.
    let mut gamma = vec![1f32; channels];
    let mut beta = vec![0f32; channels];
    if !silu {
        if let Some(next) = only_reader(model, output) {
            if let Some(g) = bin_with_const::<Mul>(model, next, output)
                .and_then(|k| per_channel(k, channels, rank))
            {
                gamma = g;
                nodes.push(next.id);
                output = OutletId::new(next.id, 0);
            }
        }
        if let Some(next) = only_reader(model, output) {
            if let Some(b) = bin_with_const::<Add>(model, next, output)
                .and_then(|k| per_channel(k, channels, rank))
            {
                beta = b;
                nodes.push(next.id);
                output = OutletId::new(next.id, 0);
            }
        }
        if let Some(next) = only_reader(model, output).filter(|n| is_silu(n)) {
            silu = true;
            nodes.push(next.id);
            output = OutletId::new(next.id, 0);
        }
    }
    let op = GroupNorm::new(groups, eps, gamma, beta, silu)?;
    Ok(Some(Fusion {
        op,
        inputs: tvec![input],
        output,
        nodes,
    }))
}

/// Replaces every group norm of `model` (decluttered, before `optimize`) that tract
/// expanded from an ONNX `Reshape` → `InstanceNormalization` → `Reshape` → `Mul` →
/// `Add` (→ SiLU) with a [`GroupNorm`] (module docs). Returns how many were replaced.
///
/// A model read back from the plan cache matches too: the cache removes the casts of
/// a value to its own type that tract's NNEF reader puts inside the pattern
/// ([`crate::rewrite::remove_identity_casts`]).
pub fn fuse_group_norms(model: &mut TypedModel) -> TractResult<usize> {
    fuse_all(model, group_norm_at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values::values;
    use tract_onnx::tract_core::ops::cast::Cast;
    use tract_onnx::tract_core::ops::math;
    use tract_onnx::tract_core::ops::nn::silu::silu;

    /// The module's formula in f64, straight from its definition.
    fn reference(x: &[f32], shape: &[usize], op: &GroupNorm) -> Vec<f32> {
        let (c, g) = (shape[1], op.groups);
        let l: usize = shape[2..].iter().product();
        let m = c / g * l;
        let mut y = vec![0f32; x.len()];
        for (i, group) in x.chunks(m).enumerate() {
            let mean = group.iter().map(|&v| v as f64).sum::<f64>() / m as f64;
            let var = group
                .iter()
                .map(|&v| (v as f64 - mean).powi(2))
                .sum::<f64>()
                / m as f64;
            for (j, &v) in group.iter().enumerate() {
                let ch = (i % g) * (c / g) + j / l;
                let mut out = (v as f64 - mean) / (var + op.eps as f64).sqrt()
                    * op.gamma[ch] as f64
                    + op.beta[ch] as f64;
                if op.silu {
                    out /= 1.0 + (-out).exp();
                }
                y[i * m + j] = out as f32;
            }
        }
        y
    }

    fn op(channels: usize, groups: usize, silu: bool) -> GroupNorm {
        let gamma = values(channels, 3).iter().map(|v| 1.0 + v / 2.0).collect();
        GroupNorm::new(groups, 1e-5, gamma, values(channels, 4), silu).unwrap()
    }

    fn plain(t: &Tensor) -> Vec<f32> {
        t.to_plain_array_view::<f32>()
            .unwrap()
            .iter()
            .copied()
            .collect()
    }

    #[test]
    fn matches_the_formula_in_f64() {
        // Rank 4 and 3, one and several images, groups of one and several channels,
        // per-channel sizes that are and are not a multiple of the 16 lanes, values
        // offset far from zero (where a one-pass variance would lose its digits).
        for (shape, groups, offset) in [
            (vec![1, 16, 32, 32], 8, 0.0),
            (vec![2, 32, 8, 8], 32, 0.0),
            (vec![3, 12, 5, 7], 4, 100.0),
            (vec![2, 64, 256], 8, 0.0),
            (vec![1, 6, 1, 1], 3, -3.0),
        ] {
            for silu in [false, true] {
                let op = op(shape[1], groups, silu);
                let n = shape.iter().product();
                let x: Vec<f32> = values(n, 7).iter().map(|v| v * 2.0 + offset).collect();
                let y = op.run(&Tensor::from_shape(&shape, &x).unwrap()).unwrap();
                assert_eq!(y.shape(), &shape[..]);
                let expect = reference(&x, &shape, &op);
                let d = plain(&y)
                    .iter()
                    .zip(&expect)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(d < 2e-5, "{shape:?} silu {silu}: max abs diff {d}");
            }
        }
    }

    #[test]
    fn a_strided_input_gives_the_same_values() {
        let op = op(8, 4, true);
        let x = Tensor::from_shape(&[1, 4, 4, 8], &values(128, 9)).unwrap();
        // [1, 8, 4, 4] seen through permuted strides.
        let strided = x.permute_axes(&[0, 3, 1, 2]).unwrap();
        let contiguous = strided
            .to_plain_array_view::<f32>()
            .unwrap()
            .to_owned()
            .into_tensor();
        assert_eq!(
            plain(&op.run(&strided).unwrap()),
            plain(&op.run(&contiguous).unwrap())
        );
    }

    /// Split across two threads (by groups, the SiLU per group) a group norm gives the
    /// bits of one thread: above and below the split's threshold, groups that do and do
    /// not divide evenly between the parts, one image and several.
    #[test]
    fn two_threads_give_the_bits_of_one() {
        let pool = tract_linalg::multithread::Executor::multithread(2);
        for (shape, groups) in [
            (vec![1, 16, 32, 32], 8),
            (vec![1, 48, 32, 32], 8),
            (vec![3, 12, 16, 16], 3),
            (vec![1, 64, 8, 8], 8),
        ] {
            for silu in [false, true] {
                let op = op(shape[1], groups, silu);
                let n = shape.iter().product();
                let x = Tensor::from_shape(&shape, &values(n, 21)).unwrap();
                let one = plain(&op.run(&x).unwrap());
                let two = op_threads::scope(&pool, || {
                    assert_eq!(op_threads::threads(), 2);
                    plain(&op.run(&x).unwrap())
                });
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&one), bits(&two), "{shape:?} silu {silu}");
            }
        }
    }

    #[test]
    fn every_vector_path_gives_the_same_bits() {
        let x: Vec<f32> = values(16 * 33, 11);
        let (gamma, beta) = (values(16, 12), values(16, 13));
        let mut any = vec![0f32; x.len()];
        normalise_group_any(&x, &mut any, &gamma, &beta, 33, 1e-5);
        #[cfg(target_arch = "x86_64")]
        {
            let mut avx = vec![0f32; x.len()];
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: detected.
                unsafe { x86::normalise_group_avx2(&x, &mut avx, &gamma, &beta, 33, 1e-5) };
                assert_eq!(any, avx);
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: detected.
                unsafe { x86::normalise_group_avx512(&x, &mut avx, &gamma, &beta, 33, 1e-5) };
                assert_eq!(any, avx);
            }
        }
    }

    #[test]
    fn bad_parameters_and_inputs_are_errors() {
        let e = |r: TractResult<GroupNorm>| r.unwrap_err().to_string();
        assert!(e(GroupNorm::new(3, 1e-5, vec![1.0; 8], vec![0.0; 8], false)).contains("groups"));
        assert!(e(GroupNorm::new(0, 1e-5, vec![1.0; 8], vec![0.0; 8], false)).contains("groups"));
        assert!(e(GroupNorm::new(2, 1e-5, vec![1.0; 8], vec![0.0; 4], false)).contains("shifts"));
        assert!(e(GroupNorm::new(
            2,
            f32::NAN,
            vec![1.0; 8],
            vec![0.0; 8],
            false
        ))
        .contains("epsilon"));
        let op = op(8, 2, false);
        let wrong_channels = Tensor::zero::<f32>(&[1, 4, 2, 2]).unwrap();
        assert!(op
            .run(&wrong_channels)
            .unwrap_err()
            .to_string()
            .contains("8 channels"));
        let f64_input = Tensor::zero::<f64>(&[1, 8, 2, 2]).unwrap();
        assert!(op.run(&f64_input).unwrap_err().to_string().contains("F64"));
    }

    /// tract's decomposition of a group norm as it stands after decluttering the ONNX
    /// export (module docs): `[1, 8, 4, 4]` in 2 groups, then `γ`, `β` and a SiLU.
    /// `spoil` changes one thing about it; returns the model and its output.
    fn decomposed(spoil: &str) -> TypedModel {
        let (c, g, hw) = (8usize, 2usize, 4usize);
        let m = c / g * hw * hw;
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, c, hw, hw])).unwrap();
        let from: TVec<TDim> = tvec![c.into(), hw.into(), hw.into()];
        let to: TVec<TDim> = tvec![g.into(), m.into()];
        let w = |model: &mut TypedModel, name: &str, op: Box<dyn TypedOp>, i: &[OutletId]| {
            model.wire_node(name, op, i).unwrap()[0]
        };
        let grouped = w(
            &mut model,
            "reshape",
            Box::new(AxisOp::Reshape(1, from.clone(), to.clone())),
            &[x],
        );
        let axis = if spoil == "axes" { 1 } else { 2 };
        let sum = w(
            &mut model,
            "sum",
            Box::new(Reduce::new(tvec![axis], Reducer::Sum)),
            &[grouped],
        );
        let recip = model
            .add_const("recip", tensor3(&[[[1.0 / m as f32]]]))
            .unwrap();
        let mean = w(&mut model, "mean", Box::new(math::mul()), &[sum, recip]);
        let (grouped_in, mean) = if spoil == "casts" {
            // As tract's NNEF reader leaves them.
            let to_f32 = || {
                Box::new(Cast {
                    to: f32::datum_type(),
                })
            };
            (
                w(&mut model, "cast-x", to_f32(), &[grouped]),
                w(&mut model, "cast-mean", to_f32(), &[mean]),
            )
        } else {
            (grouped, mean)
        };
        let diff = w(
            &mut model,
            "diff",
            Box::new(math::sub()),
            &[grouped_in, mean],
        );
        let eps = tensor0(1e-5f32).into_arc_tensor();
        let normed = w(
            &mut model,
            "rms",
            Box::new(RmsNorm { axis: 2, eps }),
            &[diff],
        );
        if spoil == "early-silu" {
            // γ = 1 and β = 0 folded away, the SiLU moved before the reshape back.
            let act = w(&mut model, "silu", Box::new(silu()), &[normed]);
            let back = Box::new(AxisOp::Reshape(1, to, from));
            let y = w(&mut model, "back", back, &[act]);
            model.select_output_outlets(&[y]).unwrap();
            return model;
        }
        let back = w(
            &mut model,
            "back",
            Box::new(AxisOp::Reshape(1, to, from)),
            &[normed],
        );
        let gamma = Tensor::from_shape(&[1, c, 1, 1], &values(c, 1)).unwrap();
        let gamma = if spoil == "gamma-input" {
            model.add_source("gamma", f32::fact([1, c, 1, 1])).unwrap()
        } else {
            model.add_const("gamma", gamma).unwrap()
        };
        let gamma = if spoil == "casts" {
            let to_f32 = Box::new(Cast {
                to: f32::datum_type(),
            });
            w(&mut model, "cast-gamma", to_f32, &[gamma])
        } else {
            gamma
        };
        let scaled = w(&mut model, "scale", Box::new(math::mul()), &[back, gamma]);
        let beta = Tensor::from_shape(&[1, c, 1, 1], &values(c, 2)).unwrap();
        let beta = model.add_const("beta", beta).unwrap();
        let shifted = w(&mut model, "shift", Box::new(math::add()), &[beta, scaled]);
        let y = w(&mut model, "silu", Box::new(silu()), &[shifted]);
        let mut outputs = vec![y];
        if spoil == "shift-read-twice" {
            outputs.push(shifted);
        }
        model.select_output_outlets(&outputs).unwrap();
        model
    }

    fn fused(model: &TypedModel) -> (TypedModel, usize) {
        let mut m = model.clone();
        let n = fuse_group_norms(&mut m).unwrap();
        (m, n)
    }

    fn ops(model: &TypedModel) -> Vec<String> {
        model
            .nodes()
            .iter()
            .map(|n| n.op.name().to_string())
            .collect()
    }

    fn outputs(model: TypedModel, inputs: TVec<TValue>) -> Vec<Vec<f32>> {
        let plan = model.into_optimized().unwrap().into_runnable().unwrap();
        plan.run(inputs).unwrap().iter().map(|t| plain(t)).collect()
    }

    /// The fused op of `model`.
    fn the_op(model: &TypedModel) -> &GroupNorm {
        model
            .nodes()
            .iter()
            .find_map(|n| n.op_as::<GroupNorm>())
            .expect("a fused group norm")
    }

    /// The largest difference between the outputs of `model` and `fused` on one seeded
    /// `[1, 8, 4, 4]` input.
    fn max_diff(model: TypedModel, fused: TypedModel, seed: u64) -> f32 {
        let x = Tensor::from_shape(&[1, 8, 4, 4], &values(128, seed)).unwrap();
        let a = outputs(model, tvec![x.clone().into_tvalue()]);
        let b = outputs(fused, tvec![x.into_tvalue()]);
        assert_eq!(a.len(), b.len());
        a.iter()
            .flatten()
            .zip(b.iter().flatten())
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max)
    }

    #[test]
    fn fuses_tracts_decomposition_into_one_op() {
        let model = decomposed("");
        let (m, n) = fused(&model);
        assert_eq!(n, 1);
        let ops = ops(&m);
        assert_eq!(ops.iter().filter(|o| *o == "EsddpmGroupNorm").count(), 1);
        assert!(
            !ops.iter()
                .any(|o| o.contains("Reduce") || o.contains("RmsNorm") || o == "Silu"),
            "{ops:?}"
        );
        let op = the_op(&m);
        assert!(op.silu && op.groups == 2 && op.eps == 1e-5);
        let d = max_diff(model, m, 5);
        assert!(d < 1e-5, "fused vs tract: max abs diff {d}");
    }

    #[test]
    fn casts_to_the_same_type_do_not_hide_the_pattern_once_removed() {
        // As the plan cache does for a model it reads back.
        let mut model = decomposed("casts");
        crate::rewrite::remove_identity_casts(&mut model).unwrap();
        let (m, n) = fused(&model);
        assert_eq!(n, 1);
        let op = the_op(&m);
        assert!(op.silu && op.gamma.iter().any(|&g| g != 1.0));
        assert!(!ops(&m).iter().any(|o| o == "Cast"));
    }

    #[test]
    fn a_silu_before_the_reshape_back_is_fused() {
        let model = decomposed("early-silu");
        let (m, n) = fused(&model);
        assert_eq!(n, 1);
        let op = the_op(&m);
        assert!(op.silu && op.gamma.iter().all(|&g| g == 1.0) && op.beta.iter().all(|&b| b == 0.0));
        let d = max_diff(model, m, 8);
        assert!(d < 1e-5, "fused vs tract: max abs diff {d}");
    }

    #[test]
    fn a_value_read_elsewhere_stays_outside_the_op() {
        // The shift is a model output too: the op stops before the SiLU.
        let model = decomposed("shift-read-twice");
        let (m, n) = fused(&model);
        assert_eq!(n, 1);
        let op = the_op(&m);
        assert!(!op.silu);
        assert!(ops(&m).iter().any(|o| o == "Silu"));
        let d = max_diff(model, m, 6);
        assert!(d < 1e-5, "fused vs tract: max abs diff {d}");
    }

    #[test]
    fn other_patterns_stay_with_tract() {
        // A sum over another axis is not a group norm.
        assert_eq!(fused(&decomposed("axes")).1, 0);
        // A scale given at run time is not folded: the op stops before it.
        let (m, n) = fused(&decomposed("gamma-input"));
        assert_eq!(n, 1);
        let op = the_op(&m);
        assert!(!op.silu && op.gamma.iter().all(|&g| g == 1.0));
    }
}
