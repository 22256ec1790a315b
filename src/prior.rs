//! The prior: a GAN generator or VAE decoder that maps a latent `z` (`[N, D]` or
//! `[N, c, h, w]`, f32), and optionally an int64 class label `[N]`, to an image
//! `[N, C, H, W]` in a declared range, which is mapped to `[-1, 1]`.

use crate::config::{OutputRange, PriorEntry};
use crate::error::{Error, ModelRole, Result};
use crate::memory::PlanMemory;
use crate::model::{new_state, output_shape, run_into, OnnxModel};
use std::sync::Arc;
use tract_onnx::prelude::*;

const ROLE: ModelRole = ModelRole::Prior;

/// How far (as a fraction of the declared range's width) a prior's output may leave its
/// declared `output_range` before it is an error: 5%, room for a decoder without a
/// final squashing activation, far less than a [0, 255] output declared as [-1, 1].
pub const RANGE_TOLERANCE: f32 = 0.05;

fn sig_err(message: String) -> Error {
    Error::ModelSignature {
        role: ROLE,
        message,
    }
}

/// A prior whose signature has been checked against the U-Net's sample shape.
#[derive(Debug)]
pub struct Prior {
    model: OnnxModel,
    latent_input: usize,
    label_input: Option<usize>,
    latent_shape: Vec<usize>,
    output_range: OutputRange,
    num_classes: Option<usize>,
    image_shape: [usize; 3],
}

impl Prior {
    /// Checks `model` against its config entry and the image shape `[C, H, W]` it must
    /// produce; optimises it for batch 1.
    pub fn new(model: OnnxModel, entry: &PriorEntry, image_shape: [usize; 3]) -> Result<Self> {
        let inputs = model.inputs();
        if inputs.is_empty() || inputs.len() > 2 {
            return Err(sig_err(format!(
                "expected a latent input and optionally a class label, found {} inputs",
                inputs.len()
            )));
        }
        let label_input = inputs.iter().position(|i| {
            i.name == "class_label"
                || i.dtype
                    .is_some_and(|d| d == DatumType::I64 || d == DatumType::I32)
        });
        if inputs.len() == 2 && label_input.is_none() {
            return Err(sig_err(
                "with two inputs, one must be the int64 class label".into(),
            ));
        }
        let latent_input = (0..inputs.len())
            .find(|&i| Some(i) != label_input)
            .ok_or_else(|| sig_err("no latent input".into()))?;
        let z = &inputs[latent_input];
        if z.dtype.is_some_and(|d| d != DatumType::F32) {
            return Err(sig_err(format!("latent input {z} must be f32")));
        }
        if let Some(r) = z.rank() {
            if r != entry.latent_shape.len() + 1 {
                return Err(sig_err(format!(
                    "latent input {z} has rank {r}; the config's latent_shape {:?} needs rank {}",
                    entry.latent_shape,
                    entry.latent_shape.len() + 1
                )));
            }
        }
        if label_input.is_some() && entry.num_classes.is_none() {
            return Err(sig_err(
                "the model takes a class label but the config has no num_classes".into(),
            ));
        }
        if label_input.is_none() && entry.num_classes.is_some() {
            return Err(sig_err(
                "the config has num_classes but the model takes no class label".into(),
            ));
        }
        let prior = Self {
            model,
            latent_input,
            label_input,
            latent_shape: entry.latent_shape.clone(),
            output_range: entry.output_range,
            num_classes: entry.num_classes,
            image_shape,
        };
        let plan = prior.plan(1)?;
        let out = output_shape(ROLE, &plan)?;
        let [c, h, w] = image_shape;
        if out != [1, c, h, w] {
            return Err(sig_err(format!(
                "output shape {out:?} at batch 1; the U-Net needs [1, {c}, {h}, {w}]"
            )));
        }
        Ok(prior)
    }

    /// Elements of one latent.
    pub fn latent_len(&self) -> usize {
        self.latent_shape.iter().product()
    }

    /// The latent's shape without the batch.
    pub fn latent_shape(&self) -> &[usize] {
        &self.latent_shape
    }

    /// Number of classes, for a class-conditional prior.
    pub fn num_classes(&self) -> Option<usize> {
        self.num_classes
    }

    /// `[C, H, W]` of the images it makes.
    pub fn image_shape(&self) -> [usize; 3] {
        self.image_shape
    }

    /// The declared output range.
    pub fn output_range(&self) -> OutputRange {
        self.output_range
    }

    /// The underlying model.
    pub fn model(&self) -> &OnnxModel {
        &self.model
    }

    fn plan(&self, batch: usize) -> Result<Arc<TypedSimplePlan>> {
        self.model.plan(batch, |b| self.facts(b))
    }

    /// What running the plan for `batch` needs (weights, inputs, peak activations).
    pub fn memory(&self, batch: usize) -> Result<PlanMemory> {
        self.model.plan_memory(batch, |b| self.facts(b))
    }

    fn facts(&self, b: usize) -> Vec<InferenceFact> {
        let mut facts = vec![InferenceFact::default(); self.model.inputs().len()];
        let mut zshape: TVec<usize> = tvec![b];
        zshape.extend(self.latent_shape.iter().copied());
        facts[self.latent_input] = f32::fact(zshape.as_slice()).into();
        if let Some(bi) = self.label_input {
            facts[bi] = i64::fact([b]).into();
        }
        facts
    }

    /// Fails with [`Error::PriorOutputRange`] when `out` leaves the declared range by
    /// more than [`RANGE_TOLERANCE`] of its width: a prior whose output range is
    /// declared wrongly would otherwise give the U-Net images far outside [-1, 1].
    fn check_range(&self, out: &[f32]) -> Result<()> {
        let (lo, hi) = self.output_range.bounds();
        let slack = (hi - lo) * RANGE_TOLERANCE;
        let (min, max) = out
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        if min < lo - slack || max > hi + slack {
            return Err(Error::PriorOutputRange { min, max, lo, hi });
        }
        Ok(())
    }

    /// Runs the prior on `batch` latents (and labels) and writes the images, mapped to
    /// [-1, 1], into `out`. Fails on non-finite output.
    pub fn run(
        &self,
        batch: usize,
        z: &[f32],
        labels: Option<&[i64]>,
        out: &mut [f32],
        executor: &tract_linalg::multithread::Executor,
    ) -> Result<()> {
        if z.len() != batch * self.latent_len() {
            return Err(Error::InvalidParameter {
                name: "latents",
                message: format!(
                    "{} values, expected {} ({batch} x {:?})",
                    z.len(),
                    batch * self.latent_len(),
                    self.latent_shape
                ),
            });
        }
        let plan = self.plan(batch)?;
        let mut zshape = vec![batch];
        zshape.extend(self.latent_shape.iter().copied());
        let zt = Tensor::from_shape(&zshape, z).map_err(|e| Error::Inference {
            role: ROLE,
            message: e.to_string(),
        })?;
        let mut inputs: Vec<Option<TValue>> = vec![None; self.model.inputs().len()];
        inputs[self.latent_input] = Some(zt.into_tvalue());
        if let Some(bi) = self.label_input {
            let classes = self.num_classes.unwrap_or(0);
            let labels = labels.ok_or_else(|| Error::InvalidParameter {
                name: "class_labels",
                message: format!(
                    "this prior is class-conditional ({classes} classes): give a label per image"
                ),
            })?;
            if labels.len() != batch {
                return Err(Error::InvalidParameter {
                    name: "class_labels",
                    message: format!("{} labels for {batch} images", labels.len()),
                });
            }
            if let Some(bad) = labels.iter().find(|&&l| l < 0 || l as usize >= classes) {
                return Err(Error::InvalidParameter {
                    name: "class_labels",
                    message: format!("label {bad} is outside 0..{classes}"),
                });
            }
            let lt = Tensor::from_shape(&[batch], labels).map_err(|e| Error::Inference {
                role: ROLE,
                message: e.to_string(),
            })?;
            inputs[bi] = Some(lt.into_tvalue());
        } else if labels.is_some() {
            return Err(Error::InvalidParameter {
                name: "class_labels",
                message: "this prior takes no class label".into(),
            });
        }
        let inputs: TVec<TValue> = inputs
            .into_iter()
            .map(|v| v.expect("every input set"))
            .collect();
        let mut state = new_state(ROLE, &plan)?;
        run_into(ROLE, &mut state, executor, inputs, out)?;
        if out.iter().any(|v| !v.is_finite()) {
            return Err(Error::NonFiniteOutput {
                role: ROLE,
                step: None,
            });
        }
        self.check_range(out)?;
        for v in out.iter_mut() {
            *v = self.output_range.to_unit(*v);
        }
        Ok(())
    }
}
