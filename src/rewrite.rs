//! Load-time rewrites of tract's models that change how tract computes, never what:
//! the outputs stay bit for bit those of the model without them (tested). Natural
//! strides for constants answer a line of the profile in `docs/PERFORMANCE.md`
//! (optimised model); removing identity casts makes a decluttered model read back from
//! the plan cache the graph the ONNX path gives.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::cast::Cast;
use tract_onnx::tract_core::ops::konst::Const;

/// Gives every plain constant of `model` natural (C-order) strides.
///
/// tract's `Tensor::insert_axis` gives a new unit axis the stride of the axis it lands
/// on (or 1 at the end), so a GroupNorm's per-channel scale `[C]` reshaped to
/// `[1, C, 1, 1]` keeps strides `[1, 1, 1, 1]` where C-order says `[C, 1, 1, 1]`. The
/// data are the same, but tract's vectorised elementwise paths (`OptBinByScalar`,
/// `OptBinChain`, ...) check for natural strides and otherwise fall back to a generic
/// broadcasting loop: on the shipped U-Net that fallback was the GroupNorm's Mul+Add,
/// 22-26% of a forward. Unit axes carry no data, so resetting the strides copies
/// nothing and changes no value.
///
/// Returns how many constants were rewritten.
pub fn natural_const_strides(model: &mut TypedModel) -> TractResult<usize> {
    let mut fixed = 0;
    for id in 0..model.nodes().len() {
        let node = model.node(id);
        let Some(konst) = node.op_as::<Const>() else {
            continue;
        };
        let tensor = konst.val();
        if !tensor.is_plain() || konst.exotic_fact().is_some() {
            continue;
        }
        if tensor.strides() == &*Tensor::natural_strides(tensor.shape()) {
            continue;
        }
        // Only unit axes may have odd strides for the data to be C-order already;
        // anything else is a real view and is left alone.
        let compact = tensor
            .shape()
            .iter()
            .zip(tensor.strides())
            .zip(Tensor::natural_strides(tensor.shape()).iter())
            .all(|((&dim, &got), &want)| dim == 1 || got == want);
        if !compact {
            continue;
        }
        let shape = tensor.shape().to_vec();
        let natural = Arc::new(
            Tensor::clone(tensor)
                .into_shape(&[tensor.len()])?
                .into_shape(&shape)?,
        );
        let node = model.node_mut(id);
        node.op = Box::new(Const::new(natural.clone())?);
        if node.outputs[0].fact.konst.is_some() {
            node.outputs[0].fact.konst = Some(natural);
        }
        fixed += 1;
    }
    Ok(fixed)
}

/// Removes the casts of a value to its own type, which tract's NNEF reader inserts
/// around binary ops: a decluttered model read back from the plan cache then has the
/// same graph as one decluttered from the ONNX file, so esddpm's pattern rewrites
/// (`group_norm`, `direct_conv`) match it alike (`optimize` would remove the casts
/// anyway, but after them). Returns how many were removed.
pub fn remove_identity_casts(model: &mut TypedModel) -> TractResult<usize> {
    let mut removed = 0;
    for id in 0..model.nodes().len() {
        let node = model.node(id);
        let Some(cast) = node.op_as::<Cast>() else {
            continue;
        };
        if node.inputs.len() != 1 || model.outlet_fact(node.inputs[0])?.datum_type != cast.to {
            continue;
        }
        if let Some(patch) = TypedModelPatch::shunt_one_op(model, node)? {
            patch.apply(model)?;
            removed += 1;
        }
    }
    if removed > 0 {
        model.compact()?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_axes_get_natural_strides_and_keep_their_values() -> TractResult<()> {
        let mut t = tensor1(&[1f32, 2., 3.]);
        t.insert_axis(1)?;
        t.insert_axis(0)?;
        assert_eq!(t.strides(), &[1, 1, 1]);
        let mut model = TypedModel::default();
        let k = model.add_const("k", t)?;
        model.select_output_outlets(&[k])?;
        assert_eq!(natural_const_strides(&mut model)?, 1);
        let fixed = model.node(k.node).op_as::<Const>().unwrap().val().clone();
        assert_eq!(fixed.strides(), &[3, 1, 1]);
        assert_eq!(fixed.shape(), &[1, 3, 1]);
        assert_eq!(fixed.try_as_plain_ram()?.as_slice::<f32>()?, &[1., 2., 3.]);
        // Already natural: nothing to do.
        assert_eq!(natural_const_strides(&mut model)?, 0);
        Ok(())
    }
}
