//! The memory limit: what a model load or a generation will allocate, estimated and
//! checked against [`crate::LoadOptions::memory_limit`] *before* it is allocated.
//!
//! What is counted, and when it is checked:
//!
//! | what | bytes | checked |
//! |---|---|---|
//! | a model file | its size on disk | before it is read |
//! | a model's weights | the tensors it declares (initializers, `Constant` nodes): `prod(dims) * element size` | after parsing the protobuf, before tract builds tensors from it |
//! | a model's inputs for a batch | `prod(shape) * element size` of every input | before tract optimises the model for that shape |
//! | a model's plan for a batch | weights + inputs + the peak of the intermediate values over tract's evaluation order (each value is freed after its last use, as tract does) | before the plan's first run allocates them |
//! | a generation | the session's buffers (sample, model output, workspace, start image, mask, latents: `(9 N C H W + N D) * 4`) + the U-Net's and the prior's plans | before any of them is allocated |
//!
//! Not counted: tract's per-kernel scratch (packed operands, a few times one layer's
//! activations), esddpm's own operators' per-thread buffers (the Winograd
//! convolutions': the largest one's transformed input, 16 × cin × tiles floats, 6.3 MB
//! on the cifar-size U-Net, and ~1.2 MB per thread besides, and the filter transforms
//! `U` the small ones keep, at most 1 MiB each, 4.1 MB on the shipped Fashion-MNIST
//! U-Net), the allocator's
//! overhead, and values tract folds while optimising a model (constant subgraphs); the
//! limit is an estimate with that margin, not an allocator hook.

use crate::error::{Error, Result};
use std::collections::HashMap;
use tract_onnx::pb;
use tract_onnx::prelude::*;

/// The default limit: 4 GiB, far above what the shipped models need (tens of MiB) and
/// below what makes a phone or a console kill the process.
pub const DEFAULT_MEMORY_LIMIT: u64 = 4 << 30;

/// A limit of `u64::MAX` turns the checks off.
pub const UNLIMITED: u64 = u64::MAX;

/// Bytes of `count` elements of `elem` bytes, saturating (an estimate never wraps).
pub(crate) fn bytes(count: impl IntoIterator<Item = usize>, elem: usize) -> u128 {
    count
        .into_iter()
        .fold(elem as u128, |acc, d| acc.saturating_mul(d as u128))
}

/// Fails with [`Error::MemoryLimit`] when `needed > limit`.
pub(crate) fn check(limit: u64, needed: u128, what: impl FnOnce() -> String) -> Result<()> {
    if needed > u128::from(limit) {
        return Err(Error::MemoryLimit {
            what: what(),
            needed: u64::try_from(needed).unwrap_or(u64::MAX),
            limit,
        });
    }
    Ok(())
}

/// Size in bytes of one element of an ONNX `TensorProto.data_type` (8 for an unknown
/// type: the estimate errs on the large side).
fn onnx_elem_size(data_type: i32) -> usize {
    match data_type {
        2 | 3 | 9 => 1,       // uint8, int8, bool
        4 | 5 | 10 | 16 => 2, // uint16, int16, float16, bfloat16
        1 | 6 | 12 => 4,      // float, int32, uint32
        _ => 8,               // int64, uint64, double, complex, string (a pointer)...
    }
}

fn tensor_bytes(t: &pb::TensorProto) -> u128 {
    let dims = t.dims.iter().map(|&d| usize::try_from(d).unwrap_or(0));
    bytes(dims, onnx_elem_size(t.data_type))
}

fn graph_bytes(g: &pb::GraphProto, depth: usize) -> u128 {
    let mut total: u128 = g
        .initializer
        .iter()
        .map(tensor_bytes)
        .fold(0, u128::saturating_add);
    for node in &g.node {
        for a in &node.attribute {
            if let Some(t) = &a.t {
                total = total.saturating_add(tensor_bytes(t));
            }
            for t in &a.tensors {
                total = total.saturating_add(tensor_bytes(t));
            }
            // Subgraphs (If, Loop, Scan): bounded depth, a hostile file cannot recurse
            // without end.
            if depth < 16 {
                for sub in a.g.iter().chain(a.graphs.iter()) {
                    total = total.saturating_add(graph_bytes(sub, depth + 1));
                }
            }
        }
    }
    total
}

/// The bytes of the tensors an ONNX model declares (initializers and constants), from
/// their declared dimensions, before any is built.
pub(crate) fn declared_weight_bytes(model: &pb::ModelProto) -> u128 {
    model.graph.as_ref().map_or(0, |g| graph_bytes(g, 0))
}

/// What a typed, optimised plan needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PlanMemory {
    /// Constant tensors (weights) held by the plan.
    pub weights: u64,
    /// The peak of the intermediate values (inputs and outputs included) over tract's
    /// evaluation order, each freed after its last use.
    pub activations: u64,
}

impl PlanMemory {
    /// Everything: weights + peak activations (which include the inputs).
    pub fn total(&self) -> u64 {
        self.weights.saturating_add(self.activations)
    }
}

fn fact_bytes(fact: &TypedFact) -> u128 {
    match fact.shape.as_concrete() {
        Some(shape) => bytes(shape.iter().copied(), fact.datum_type.size_of()),
        // A symbolic dimension after the inputs were fixed: count nothing rather than
        // guess (tract has resolved every dimension of the pipeline's models).
        None => 0,
    }
}

/// Estimates what running `plan` needs, by walking tract's evaluation order.
pub(crate) fn plan_memory(plan: &TypedSimplePlan) -> PlanMemory {
    let model = plan.model();
    let order = plan.order_without_consts();
    let mut weights: u128 = 0;
    for node in model.nodes() {
        if node.op_is::<tract_onnx::tract_core::ops::konst::Const>() {
            for o in &node.outputs {
                weights = weights.saturating_add(fact_bytes(&o.fact));
            }
        }
    }
    let outputs: Vec<OutletId> = model
        .output_outlets()
        .map(|o| o.to_vec())
        .unwrap_or_default();
    // Position of each outlet's last use; outputs live to the end.
    let mut last_use: HashMap<OutletId, usize> = HashMap::new();
    for (pos, &n) in order.iter().enumerate() {
        for input in &model.node(n).inputs {
            last_use.insert(*input, pos);
        }
    }
    for o in &outputs {
        last_use.insert(*o, usize::MAX);
    }
    let is_const = |o: &OutletId| {
        model
            .node(o.node)
            .op_is::<tract_onnx::tract_core::ops::konst::Const>()
    };
    let (mut live, mut peak) = (0u128, 0u128);
    for (pos, &n) in order.iter().enumerate() {
        let node = model.node(n);
        for (slot, o) in node.outputs.iter().enumerate() {
            let id = OutletId::new(n, slot);
            if !is_const(&id) {
                live = live.saturating_add(fact_bytes(&o.fact));
            }
        }
        peak = peak.max(live);
        // Free what this node was the last user of, and its own unused outputs.
        let mut freed: Vec<OutletId> = node
            .inputs
            .iter()
            .filter(|i| last_use.get(i) == Some(&pos))
            .copied()
            .collect();
        freed.extend(
            (0..node.outputs.len())
                .map(|slot| OutletId::new(n, slot))
                .filter(|o| !last_use.contains_key(o)),
        );
        freed.sort();
        freed.dedup();
        for o in freed {
            if !is_const(&o) {
                if let Ok(f) = model.outlet_fact(o) {
                    live = live.saturating_sub(fact_bytes(f));
                }
            }
        }
    }
    let clamp = |v: u128| u64::try_from(v).unwrap_or(u64::MAX);
    PlanMemory {
        weights: clamp(weights),
        activations: clamp(peak),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_saturate_instead_of_wrapping() {
        assert_eq!(bytes([2, 3], 4), 24);
        assert_eq!(bytes([usize::MAX, usize::MAX, usize::MAX], 4), u128::MAX);
        assert!(check(10, 11, || "x".into()).is_err());
        assert!(check(10, 10, || "x".into()).is_ok());
        assert!(check(UNLIMITED, u128::from(u64::MAX), || "x".into()).is_ok());
    }

    #[test]
    fn onnx_element_sizes() {
        assert_eq!(onnx_elem_size(1), 4); // float
        assert_eq!(onnx_elem_size(7), 8); // int64
        assert_eq!(onnx_elem_size(10), 2); // float16
        assert_eq!(onnx_elem_size(9), 1); // bool
    }
}
