//! The evaluation classifier: an ONNX image classifier whose penultimate activations
//! (a named output, `[N, D]`) are the feature space of the FID benchmark, as Inception's
//! pool features are for the usual FID.

use crate::config::ClassifierEntry;
use crate::error::{Error, ModelRole, Result};
use crate::model::{new_state, output_shape_at, run_output_into, OnnxModel};
use std::path::Path;
use tract_linalg::multithread::Executor;
use tract_onnx::prelude::*;

const ROLE: ModelRole = ModelRole::Classifier;

/// A classifier checked to take `[N, C, H, W]` f32 images in [-1, 1] and to have the
/// features output.
#[derive(Debug)]
pub struct Classifier {
    model: OnnxModel,
    features_index: usize,
    image_shape: [usize; 3],
    dim: usize,
}

impl Classifier {
    /// Loads `entry.file` from `folder` for images of `image_shape` (`[C, H, W]`).
    pub fn from_folder(
        folder: &Path,
        entry: &ClassifierEntry,
        image_shape: [usize; 3],
    ) -> Result<Self> {
        let model = OnnxModel::from_path(
            ROLE,
            &folder.join(&entry.file),
            crate::memory::DEFAULT_MEMORY_LIMIT,
        )?;
        Self::new(model, &entry.features_output, image_shape)
    }

    /// Checks `model`: one rank-4 f32 input, an output named `features_output` of shape
    /// `[N, D]`.
    pub fn new(model: OnnxModel, features_output: &str, image_shape: [usize; 3]) -> Result<Self> {
        let sig = |message: String| Error::ModelSignature {
            role: ROLE,
            message,
        };
        if model.inputs().len() != 1 {
            return Err(sig(format!(
                "expected one image input, found {}",
                model.inputs().len()
            )));
        }
        let input = &model.inputs()[0];
        if input.rank().is_some_and(|r| r != 4) || input.dtype.is_some_and(|d| d != DatumType::F32)
        {
            return Err(sig(format!("input {input} must be f32 [N, C, H, W]")));
        }
        let features_index = model
            .outputs()
            .iter()
            .position(|o| o.name == features_output)
            .ok_or_else(|| {
                sig(format!(
                    "no output named {features_output:?}; outputs: {}",
                    model
                        .outputs()
                        .iter()
                        .map(|o| o.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
        let mut c = Self {
            model,
            features_index,
            image_shape,
            dim: 0,
        };
        let plan = c.plan(1)?;
        let shape = output_shape_at(ROLE, &plan, features_index)?;
        if shape.len() != 2 || shape[0] != 1 || shape[1] == 0 {
            return Err(sig(format!(
                "features output {features_output:?} has shape {shape:?} at batch 1, expected [1, D]"
            )));
        }
        c.dim = shape[1];
        Ok(c)
    }

    fn plan(&self, batch: usize) -> Result<Arc<TypedSimplePlan>> {
        let [ch, h, w] = self.image_shape;
        self.model
            .plan(batch, move |b| vec![f32::fact([b, ch, h, w]).into()])
    }

    /// Length `D` of one feature vector.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Features of `images` (`[N, C, H, W]` in [-1, 1]), `N * D` values, computed in
    /// batches of up to `batch` images on this thread.
    pub fn features(&self, images: &[f32], batch: usize) -> Result<Vec<f32>> {
        let il: usize = self.image_shape.iter().product();
        if images.is_empty() || !images.len().is_multiple_of(il) || batch == 0 {
            return Err(Error::InvalidParameter {
                name: "images",
                message: format!(
                    "{} values are not whole images of {il} (or batch is 0)",
                    images.len()
                ),
            });
        }
        let n = images.len() / il;
        let mut out = vec![0.0f32; n * self.dim];
        let [ch, h, w] = self.image_shape;
        for (chunk, dst) in images
            .chunks(batch * il)
            .zip(out.chunks_mut(batch * self.dim))
        {
            let b = chunk.len() / il;
            let plan = self.plan(b)?;
            let mut state = new_state(ROLE, &plan)?;
            let x = Tensor::from_shape(&[b, ch, h, w], chunk).map_err(|e| Error::Inference {
                role: ROLE,
                message: e.to_string(),
            })?;
            run_output_into(
                ROLE,
                &mut state,
                &Executor::SingleThread,
                tvec![x.into()],
                self.features_index,
                dst,
            )?;
        }
        if out.iter().any(|v| !v.is_finite()) {
            return Err(Error::NonFiniteOutput {
                role: ROLE,
                step: None,
            });
        }
        Ok(out)
    }
}
