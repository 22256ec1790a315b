//! tract's codegen with its weight packing done a few weights at a time, so that a
//! model's weights are not held twice at the load's peak.
//!
//! tract's codegen pass turns each convolution and matrix product into a kernel call
//! fed by a packing operator (`OptMatMulPack`) whose input is the weight, through a
//! few reshapes. Its constant folding (`PropConst`) then packs every weight in one
//! pass, and only compacts the graph after it: each unpacked weight stays alive until
//! all are packed, so the load's peak holds the weights twice.
//!
//! [`optimize`] runs tract's own codegen optimiser with one pass added right after its
//! codegen pass: [`FoldPacking`] does the constant folding of those chains (weight,
//! reshapes, packing) as `PropConst` would — the same evaluations and memory rule, the
//! same constant, named after the packing node — [`FOLDS_PER_STEP`] chains at a time,
//! compacting the graph between steps so that each unpacked weight is freed soon after
//! its packed form exists, and giving free memory back to the OS
//! ([`return_free_memory`]). Everything else stays with tract's passes. The plan is
//! the one `TypedModel::optimize` makes (tested: same operators, same bits).
//!
//! Measured on the ddpm-cifar10 U-Net (143 MB of weights; docs/PERFORMANCE.md, the
//! eleventh lever): with `onnx_file`, a start's peak RSS 349 -> 204 MB (median of 4);
//! the codegen takes ~0.1 s more.

use std::collections::HashSet;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::ops::matmul::pack::{OptMatMulPack, OptSimpleMatMulPack};
use tract_onnx::tract_core::optim::{
    Optimizer, OptimizerSession, TypedPass, CONST_FOLD_MEM_BUDGET,
};

/// Chains folded between two compactions: each packs one weight tensor. On the cifar
/// U-Net, 4 and 8 gave the same peak (199-202 MB), 8 the shorter codegen; 16 reached
/// 203-207 MB; all at once 275 MB.
const FOLDS_PER_STEP: usize = 8;

/// Where the added pass goes in tract's codegen optimiser: after its third pass,
/// `codegen` (after `PropConst` and `MergeConsecutiveSameRoleAxes`).
const AFTER_CODEGEN: usize = 3;

/// The longest chain of reshapes between a weight and its packing that is folded here
/// (tract's convolutions use up to three).
const MAX_CHAIN: usize = 8;

/// Optimises `model` like `TypedModel::optimize`, holding its weights about once.
pub(crate) fn optimize(model: &mut TypedModel) -> TractResult<()> {
    let mut optimizer = Optimizer::codegen();
    optimizer.add_pass(AFTER_CODEGEN, Box::new(FoldPacking));
    model.optimize_with_session(&mut optimizer.session())?;
    return_free_memory();
    Ok(())
}

/// The constant folding of weight packing chains, in steps (an optimiser pass that
/// works on the model directly, through `run_direct`).
#[derive(Clone, Debug)]
struct FoldPacking;

impl TypedPass for FoldPacking {
    fn reset(&mut self) -> TractResult<()> {
        Ok(())
    }

    fn next(
        &mut self,
        _session: &mut OptimizerSession,
        _model: &TypedModel,
    ) -> TractResult<Option<TypedModelPatch>> {
        Ok(None)
    }

    fn run_direct(&mut self, model: &mut TypedModel) -> TractResult<bool> {
        let mut folded_any = false;
        loop {
            let mut folded = 0;
            // Node ids hold until the next compaction: the chains tried since the last.
            let mut tried = HashSet::new();
            while folded < FOLDS_PER_STEP {
                let Some(chain) = next_chain(model, &tried) else {
                    break;
                };
                tried.insert(chain[0]);
                folded += usize::from(fold(model, &chain)?);
            }
            if folded == 0 {
                return Ok(folded_any);
            }
            #[cfg(test)]
            tests::FOLDS.with(|f| f.set(f.get() + folded));
            folded_any = true;
            model.compact()?;
            return_free_memory();
        }
    }
}

/// The next live chain `[weight, reshape..., packing]`: a constant whose line of single
/// successors, each with one input, ends in a packing operator.
fn next_chain(model: &TypedModel, tried: &HashSet<usize>) -> Option<Vec<usize>> {
    model.nodes().iter().find_map(|node| {
        if tried.contains(&node.id) || !node.op_is::<Const>() {
            return None;
        }
        let mut chain = vec![node.id];
        let mut id = node.id;
        while chain.len() <= MAX_CHAIN {
            let succ = model.single_succ(id).ok()??;
            if succ.inputs.len() != 1 {
                return None;
            }
            chain.push(succ.id);
            if succ.op_is::<OptMatMulPack>() || succ.op_is::<OptSimpleMatMulPack>() {
                // A packing nothing reads is a chain already folded (dead until the
                // next compaction).
                let live = succ.outputs.iter().any(|o| !o.successors.is_empty())
                    || model
                        .output_outlets()
                        .ok()?
                        .iter()
                        .any(|o| o.node == succ.id);
                return live.then_some(chain);
            }
            id = succ.id;
        }
        None
    })
}

/// Folds `chain` into one constant where tract's `PropConst` would: every step
/// evaluates out of plan, and no step's output may outgrow the weight beyond tract's
/// allowance. Returns whether it folded.
fn fold(model: &mut TypedModel, chain: &[usize]) -> TractResult<bool> {
    let weight = model.node(chain[0]).op_as::<Const>().expect("a constant");
    let input_mem = (weight.val().datum_type().size_of() * weight.val().volume()) as u64;
    let mut value: TVec<TValue> = tvec![weight.val().clone().into_tvalue()];
    for &id in &chain[1..] {
        let Ok(Some(out)) = model.node(id).op.eval_out_of_plan(value) else {
            return Ok(false);
        };
        let mem: u64 = out
            .iter()
            .map(|t| (t.datum_type().size_of() * t.volume()) as u64)
            .sum();
        if out.len() != 1 || mem > input_mem.max(CONST_FOLD_MEM_BUDGET) {
            return Ok(false);
        }
        value = out;
    }
    let pack = *chain.last().expect("a packing");
    let exotic_fact = model.outlet_fact(pack.into())?.exotic_fact.clone();
    let name = model.node(pack).name.clone();
    let mut patch = TypedModelPatch::default();
    let konst = Const::new_with_opt_exotic_fact(value.remove(0).into_arc_tensor(), exotic_fact)?;
    let wire = patch.wire_node(name, konst, &[])?[0];
    patch.shunt_outside(model, pack.into(), wire)?;
    patch.apply(model)?;
    Ok(true)
}

/// Gives the allocator's free memory back to the OS (glibc's `malloc_trim`; nothing
/// elsewhere). glibc otherwise keeps freed blocks of a few MB in its heap (its mmap
/// threshold rises with each large block freed), so weights freed during a load would
/// still count in the process's RSS, and the packed weights that replace them would not
/// always fit in their place.
pub(crate) fn return_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages to the OS; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    thread_local! {
        /// Chains folded by [`FoldPacking`] on this thread.
        pub(super) static FOLDS: Cell<usize> = const { Cell::new(0) };
    }

    fn decluttered(path: &str, shape: [usize; 4]) -> TypedModel {
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

    fn ops(model: &TypedModel) -> Vec<String> {
        model
            .eval_order()
            .unwrap()
            .iter()
            .map(|&n| format!("{} {}", model.node(n).name, model.node(n).op.name()))
            .collect()
    }

    #[test]
    fn folding_in_steps_makes_tracts_plan() {
        for batch in [1, 2] {
            let model = decluttered("models/fashion/unet.onnx", [batch, 1, 32, 32]);
            let mut theirs = model.clone();
            theirs.optimize().unwrap();
            let mut ours = model;
            FOLDS.with(|f| f.set(0));
            optimize(&mut ours).unwrap();
            let folds = FOLDS.with(Cell::get);
            assert!(folds > 20, "only {folds} packings folded in steps");
            assert_eq!(ops(&ours), ops(&theirs));
            let x: Vec<f32> = (0..batch * 1024)
                .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
                .collect();
            let inputs = || {
                tvec![
                    Tensor::from_shape(&[batch, 1, 32, 32], &x).unwrap().into(),
                    Tensor::from_shape(&[batch], &vec![417i64; batch])
                        .unwrap()
                        .into(),
                ]
            };
            let a = ours.into_runnable().unwrap().run(inputs()).unwrap();
            let b = theirs.into_runnable().unwrap().run(inputs()).unwrap();
            let bits = |t: &TValue| -> Vec<u32> {
                let t = t.try_as_plain_ram().unwrap();
                t.as_slice::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect()
            };
            assert_eq!(bits(&a[0]), bits(&b[0]));
        }
    }
}
