//! Swapping a pattern of nodes for one op: the part esddpm's fused operators
//! ([`crate::group_norm`], [`crate::attention`]) share. Each finds its pattern in a
//! decluttered model, node by node; [`fuse_all`] wires the op in its place.

use tract_onnx::prelude::*;

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
