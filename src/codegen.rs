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
//! Where the chain is plain reshapes (every weight of the shipped U-Nets), the weight is
//! moved out of the graph rather than shared ([`take_weight`]): tract's reshape
//! evaluation copies a shared tensor, so packing from a shared weight wrote every
//! weight twice, the copy then freed.
//!
//! Measured on the ddpm-cifar10 U-Net (143 MB of weights; docs/PERFORMANCE.md, the
//! eleventh lever): with `onnx_file`, a start's peak RSS 349 -> 204 MB (median of 4);
//! the codegen takes ~0.1 s more. Moving the weights (the fourteenth lever) took
//! ~0.1 s off the codegen again.

use std::collections::HashSet;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::TractErrorContext;
use tract_onnx::tract_core::ops::change_axes::IntoShape;
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
            // Node ids hold until the next compaction: the chains of one step are found
            // first (they share no node), their packings evaluated on two threads
            // (`load_threads`), then each folded in the graph in turn.
            let mut tried = HashSet::new();
            let mut chains = Vec::new();
            while chains.len() < FOLDS_PER_STEP {
                let Some(chain) = next_chain(model, &tried) else {
                    break;
                };
                tried.insert(chain[0]);
                chains.push(chain);
            }
            let mut taken = Vec::with_capacity(chains.len());
            for chain in chains {
                taken.push(take(model, chain)?);
            }
            let bytes = taken.iter().map(|t| t.input_mem as usize).sum();
            let evaluated = {
                let model: &TypedModel = model;
                crate::load_threads::map(taken, bytes, |t| t.evaluate(model))
            };
            let mut folded = 0;
            for e in evaluated {
                let how = e.fold(model)?;
                #[cfg(test)]
                tests::count(how);
                folded += usize::from(how != Fold::Not);
            }
            if folded == 0 {
                return Ok(folded_any);
            }
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

/// What [`fold`] did with a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fold {
    /// Left it to run in the plan (a step failed, or outgrew the allowance).
    Not,
    /// Folded it from the weight itself, taken out of the graph: the unpacked weight is
    /// freed as soon as its packed form exists.
    Moved,
    /// Folded it from a copy of the weight (tract's reshape evaluation copies a shared
    /// tensor): the weight stays in the graph until the next compaction.
    Copied,
}

/// A chain's input, ready for its evaluation ([`take`]).
struct Taken {
    chain: Vec<usize>,
    /// The weight's bytes: no step's output may outgrow them beyond tract's allowance.
    input_mem: u64,
    input: Input,
}

enum Input {
    /// The weight itself, taken out of the graph and reshaped as the chain's plain
    /// reshapes would: only the packing is evaluated. `shape` is the weight's own.
    Moved { tensor: Tensor, shape: TVec<usize> },
    /// A shared reference to the weight: every step is evaluated, the first copying.
    Shared(Arc<Tensor>),
}

/// A chain's evaluation ([`Taken::evaluate`]): the packed weight, or `None` where a
/// step failed or outgrew the allowance.
struct Evaluated {
    chain: Vec<usize>,
    packed: Option<Arc<Tensor>>,
    /// The moved weight, for its node again when the packing failed.
    unpacked: Option<(Tensor, TVec<usize>)>,
    copied: bool,
}

/// Takes the input of `chain` from the graph for its folding where tract's
/// `PropConst` would fold it.
///
/// A chain of plain reshapes is folded from the weight itself ([`take_weight`]): the
/// reshapes only relabel its shape (as their evaluation does to a tensor it owns), so
/// no copy is made, and the weight is freed once packed. Any other chain is evaluated
/// step by step from a shared reference, as `PropConst` does (the first step copies).
fn take(model: &mut TypedModel, chain: Vec<usize>) -> TractResult<Taken> {
    let weight = model.node(chain[0]).op_as::<Const>().expect("a constant");
    let input_mem = (weight.val().datum_type().size_of() * weight.val().volume()) as u64;
    let volume = weight.val().volume();
    let reshapes = reshape_dims(model, &chain[1..chain.len() - 1], volume);
    let taken = match reshapes {
        Some(dims) => take_weight(model, chain[0])?.map(|tensor| (dims, tensor)),
        None => None,
    };
    let input = match taken {
        Some((dims, mut tensor)) => {
            let shape: TVec<usize> = tensor.shape().into();
            for d in &dims {
                tensor.set_shape(d)?;
            }
            Input::Moved { tensor, shape }
        }
        None => {
            let weight = model.node(chain[0]).op_as::<Const>().expect("a constant");
            Input::Shared(weight.val().clone())
        }
    };
    Ok(Taken {
        chain,
        input_mem,
        input,
    })
}

impl Taken {
    /// Evaluates the chain out of plan (the graph is only read).
    fn evaluate(self, model: &TypedModel) -> Evaluated {
        let pack = *self.chain.last().expect("a packing");
        let (packed, unpacked, copied) = match self.input {
            Input::Moved { tensor, shape } => {
                let tensor = tensor.into_tvalue();
                match eval_step(model, pack, tensor.clone(), self.input_mem) {
                    Some(packed) => (Some(packed.into_arc_tensor()), None, false),
                    None => (None, Some((tensor.into_tensor(), shape)), false),
                }
            }
            Input::Shared(weight) => {
                let mut value = Some(weight.into_tvalue());
                for &id in &self.chain[1..] {
                    value = value.and_then(|v| eval_step(model, id, v, self.input_mem));
                }
                (value.map(|v| v.into_arc_tensor()), None, true)
            }
        };
        Evaluated {
            chain: self.chain,
            packed,
            unpacked,
            copied,
        }
    }
}

impl Evaluated {
    /// Folds the chain into its packed weight, named after the packing node; or, where
    /// its evaluation failed, leaves it to run in the plan (a moved weight put back).
    fn fold(self, model: &mut TypedModel) -> TractResult<Fold> {
        let pack = *self.chain.last().expect("a packing");
        let Some(packed) = self.packed else {
            if let Some((mut tensor, shape)) = self.unpacked {
                tensor.set_shape(&shape)?;
                put_weight_back(model, self.chain[0], tensor)?;
            }
            return Ok(Fold::Not);
        };
        let exotic_fact = model.outlet_fact(pack.into())?.exotic_fact.clone();
        let name = model.node(pack).name.clone();
        let mut patch = TypedModelPatch::default();
        let konst = Const::new_with_opt_exotic_fact(packed, exotic_fact)?;
        let wire = patch.wire_node(name, konst, &[])?[0];
        patch.shunt_outside(model, pack.into(), wire)?;
        patch.apply(model)?;
        Ok(if self.copied {
            Fold::Copied
        } else {
            Fold::Moved
        })
    }
}

/// The shapes that `steps` give a tensor of `volume` values when each is a plain
/// reshape (an `IntoShape` to natural strides, which its evaluation applies to a tensor
/// it owns without moving a value); `None` when any step is something else.
fn reshape_dims(model: &TypedModel, steps: &[usize], volume: usize) -> Option<Vec<TVec<usize>>> {
    steps
        .iter()
        .map(|&id| {
            let op = model.node(id).op_as::<IntoShape>()?;
            let plain = op.len == volume
                && op.dims.iter().product::<usize>() == volume
                && *op.strides == *Tensor::natural_strides(&op.dims);
            plain.then(|| op.dims.clone())
        })
        .collect()
}

/// Evaluates node `id` on `value` out of plan: its one output, unless it fails or
/// outgrows `input_mem` beyond tract's constant-folding allowance.
fn eval_step(model: &TypedModel, id: usize, value: TValue, input_mem: u64) -> Option<TValue> {
    let mut out = model.node(id).op.eval_out_of_plan(tvec![value]).ok()??;
    let mem: u64 = out
        .iter()
        .map(|t| (t.datum_type().size_of() * t.volume()) as u64)
        .sum();
    (out.len() == 1 && mem <= input_mem.max(CONST_FOLD_MEM_BUDGET)).then(|| out.remove(0))
}

/// Takes the plain tensor of constant node `id` out of the graph, when the node (its
/// op and its output's constant fact) holds the only references to it: the node is
/// left holding an empty tensor of the same type until [`put_weight_back`] or the
/// next compaction (a folded chain's weight node is dead). `None`, the node as it was,
/// otherwise.
fn take_weight(model: &mut TypedModel, id: usize) -> TractResult<Option<Tensor>> {
    let node = model.node(id);
    let Some(konst) = node.op_as::<Const>() else {
        return Ok(None);
    };
    if konst.exotic_fact().is_some() || node.outputs.len() != 1 {
        return Ok(None);
    }
    let weight = konst.val().clone();
    let empty = Const::new(Arc::new(Tensor::zero_dt(weight.datum_type(), &[0])?))?;
    let node = model.node_mut(id);
    node.op = Box::new(empty);
    // The fact's reference goes too, or the weight is not ours to move.
    drop(node.outputs[0].fact.konst.take());
    match Arc::try_unwrap(weight) {
        Ok(tensor) => Ok(Some(tensor)),
        Err(weight) => {
            put_back(model, id, weight)?;
            Ok(None)
        }
    }
}

/// Puts a weight taken by [`take_weight`] back in constant node `id`.
fn put_weight_back(model: &mut TypedModel, id: usize, tensor: Tensor) -> TractResult<()> {
    put_back(model, id, Arc::new(tensor))
}

/// Constant node `id` holding `weight` again, in its op and in its output's fact (as
/// tract's `Const` states its value there).
fn put_back(model: &mut TypedModel, id: usize, weight: Arc<Tensor>) -> TractResult<()> {
    let node = model.node_mut(id);
    node.op = Box::new(Const::new(weight.clone())?);
    node.outputs
        .first_mut()
        .context("a constant without its output")?
        .fact
        .konst = Some(weight);
    Ok(())
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
    use crate::test_values::{bits, decluttered};
    use std::cell::Cell;

    thread_local! {
        /// Chains folded by [`FoldPacking`] on this thread: from the weight itself, and
        /// from a copy.
        static FOLDS: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
    }

    pub(super) fn count(how: Fold) {
        FOLDS.with(|f| {
            let (moved, copied) = f.get();
            f.set(match how {
                Fold::Not => (moved, copied),
                Fold::Moved => (moved + 1, copied),
                Fold::Copied => (moved, copied + 1),
            })
        });
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
    fn a_weight_moves_out_only_when_the_graph_holds_it_alone() {
        let values: Vec<f32> = (0..6).map(|i| i as f32 * 0.5).collect();
        let original = Tensor::from_shape(&[2, 3], &values).unwrap();
        let shared = Arc::new(original.clone());
        let mut model = TypedModel::default();
        let id = model.add_const("w", shared.clone()).unwrap().node;
        let val = |m: &TypedModel| m.node(id).op_as::<Const>().unwrap().val().clone();
        let konst = |m: &TypedModel| m.outlet_fact(id.into()).unwrap().konst.clone();

        // Held elsewhere too: not taken, the node as it was.
        assert!(take_weight(&mut model, id).unwrap().is_none());
        assert_eq!(*val(&model), original);
        assert!(Arc::ptr_eq(&konst(&model).unwrap(), &shared));

        // Held by the graph alone: taken, the node left empty, then put back.
        drop(shared);
        let taken = take_weight(&mut model, id).unwrap().unwrap();
        assert_eq!(taken, original);
        assert_eq!(val(&model).len(), 0);
        assert!(konst(&model).is_none());
        put_weight_back(&mut model, id, taken).unwrap();
        assert_eq!(*val(&model), original);
        assert_eq!(*konst(&model).unwrap(), original);
    }

    #[test]
    fn folding_in_steps_makes_tracts_plan() {
        for batch in [1, 2] {
            let model = decluttered("models/fashion/unet.onnx", [batch, 1, 32, 32]);
            let mut theirs = model.clone();
            theirs.optimize().unwrap();
            let mut ours = model;
            FOLDS.with(|f| f.set((0, 0)));
            optimize(&mut ours).unwrap();
            let (moved, copied) = FOLDS.with(Cell::get);
            // Every weight of the shipped U-Net reaches its packing through reshapes
            // only: all are folded from the weight itself, none copied.
            assert!(moved > 20, "only {moved} packings folded in steps");
            assert_eq!(copied, 0, "{copied} weights copied to be packed");
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
            assert_eq!(bits(&a[0]), bits(&b[0]));
        }
    }
}
