//! Swapping a pattern of nodes for one op: the part esddpm's fused operators
//! ([`crate::group_norm`], [`crate::attention`], [`crate::pointwise_conv`]) share. Each
//! finds its pattern in a decluttered model, node by node; [`fuse_all`] wires the op in
//! its place. A pattern found may leave nodes of the graph as garbage (no outputs) until
//! the compaction at the end, so a finder must not assume every node has its outputs.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::binary::{BinMiniOp, TypedBinOp};

/// A pattern found: the op that computes it, the outlets it reads, the outlet it
/// replaces and the nodes it removes.
pub(crate) struct Fusion<O> {
    pub op: O,
    pub inputs: TVec<OutletId>,
    pub output: OutletId,
    pub nodes: Vec<usize>,
}

/// Replaces every pattern that `find` reports, starting at a node of `model`, by its
/// op (named after the node whose output it replaces). Returns how many.
pub(crate) fn fuse_all<O: TypedOp>(
    model: &mut TypedModel,
    find: impl Fn(&TypedModel, &TypedNode) -> TractResult<Option<Fusion<O>>>,
) -> TractResult<usize> {
    let mut fused = 0;
    for id in 0..model.nodes().len() {
        let Some(found) = find(model, model.node(id))? else {
            continue;
        };
        let name = model.node(found.output.node).name.clone();
        let mut patch = TypedModelPatch::default();
        let inputs = found
            .inputs
            .iter()
            .map(|&i| patch.tap_model(model, i))
            .collect::<TractResult<TVec<_>>>()?;
        let y = patch.wire_node(name, found.op, &inputs)?;
        patch.shunt_outside(model, found.output, y[0])?;
        for node in found.nodes {
            patch.obliterate(node)?;
        }
        patch.apply(model)?;
        fused += 1;
    }
    if fused > 0 {
        model.compact()?;
    }
    Ok(fused)
}

/// The single node that reads `outlet`, when exactly one does and it is not a model
/// output.
pub(crate) fn only_reader(model: &TypedModel, outlet: OutletId) -> Option<&TypedNode> {
    let succ = &model.node(outlet.node).outputs[outlet.slot].successors;
    if succ.len() != 1 || model.outputs.contains(&outlet) {
        return None;
    }
    Some(model.node(succ[0].node))
}

/// When `node` is a binary op of type `B` on `from` and a constant, the constant.
pub(crate) fn bin_with_const<'m, B: BinMiniOp>(
    model: &'m TypedModel,
    node: &TypedNode,
    from: OutletId,
) -> Option<&'m Arc<Tensor>> {
    let op = node.op_as::<TypedBinOp>()?;
    if !op.0.is::<B>() || node.inputs.len() != 2 || op.1.is_some() {
        return None;
    }
    let other = match node.inputs.iter().position(|i| *i == from)? {
        0 => node.inputs[1],
        _ => node.inputs[0],
    };
    model.outlet_fact(other).ok()?.konst.as_ref()
}

/// One value per channel from a constant of shape `[1, C, 1, ...]` (rank `rank`).
pub(crate) fn per_channel(konst: &Tensor, channels: usize, rank: usize) -> Option<Vec<f32>> {
    let shape = konst.shape();
    let fits = shape.len() == rank
        && shape
            .iter()
            .enumerate()
            .all(|(axis, &d)| d == if axis == 1 { channels } else { 1 });
    if !fits || konst.datum_type() != f32::datum_type() {
        return None;
    }
    Some(
        konst
            .to_plain_array_view::<f32>()
            .ok()?
            .iter()
            .copied()
            .collect(),
    )
}

/// Whether `a` and `b` hold the same values bit for bit (so that an op's equality is
/// an equivalence, as tract needs, NaNs included), without copying them.
pub(crate) fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// [`same_bits`] of two optional value lists: both absent, or both present and equal.
pub(crate) fn same_optional_bits(a: Option<&[f32]>, b: Option<&[f32]>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => same_bits(a, b),
        _ => false,
    }
}
