//! The denoising U-Net: `sample` `[N, C, H, W]` f32 and `timestep` (int64 or f32, `[N]` or
//! scalar) in, C channels (epsilon, x0 or v) or 2C (learned variance) out.

use crate::error::{Error, ModelRole, Result};
use crate::memory::PlanMemory;
use crate::model::{new_state, output_shape, run_into, IoDesc, OnnxModel};
use std::sync::Arc;
use tract_onnx::prelude::*;

const ROLE: ModelRole = ModelRole::Unet;

/// A U-Net whose signature has been checked against the sample shape.
#[derive(Debug)]
pub struct Unet {
    model: OnnxModel,
    sample_input: usize,
    timestep_input: usize,
    timestep_dtype: DatumType,
    timestep_scalar: bool,
    sample_shape: [usize; 3],
    out_channels: usize,
    forward_flops: f64,
}

/// Below this many FLOPs per batch-1 forward, a lone image runs on one thread even when
/// the pipeline has several: tract's executor splits only the matrix products, and
/// on small ones the hand-offs cost more than they gain. Measured (2-core AMD EPYC,
/// docs/PERFORMANCE.md): the shipped U-Net (0.22 GFLOP) takes 5.0-5.3 ms on one thread
/// and 6.3-6.6 ms on two; the ddpm-cifar10 U-Net (12 GFLOP) 155 ms and 108 ms. Only
/// these two U-Nets were measured: one between them may sit on the wrong side.
pub const MIN_FLOPS_FOR_THREADS: f64 = 2e9;

fn sig_err(message: String) -> Error {
    Error::ModelSignature {
        role: ROLE,
        message,
    }
}

impl Unet {
    /// Checks `model` against `sample_shape` (`[C, H, W]`), optimises it for batch 1
    /// and reads its output channels.
    pub fn new(model: OnnxModel, sample_shape: [usize; 3]) -> Result<Self> {
        let inputs = model.inputs();
        if inputs.len() != 2 {
            return Err(sig_err(format!(
                "expected 2 inputs (sample, timestep), found {}: {}",
                inputs.len(),
                list(inputs)
            )));
        }
        // The sample is the input named "sample", else the one of rank 4.
        let sample_input = inputs
            .iter()
            .position(|i| i.name == "sample")
            .or_else(|| inputs.iter().position(|i| i.rank() == Some(4)))
            .unwrap_or(0);
        let timestep_input = 1 - sample_input;
        let s = &inputs[sample_input];
        if s.rank() != Some(4) {
            return Err(sig_err(format!(
                "input {s} must be a sample of rank 4 [N, C, H, W]"
            )));
        }
        if s.dtype.is_some_and(|d| d != DatumType::F32) {
            return Err(sig_err(format!("input {s} must be f32")));
        }
        if let Some(dims) = &s.dims {
            for (k, (&want, got)) in sample_shape.iter().zip(&dims[1..]).enumerate() {
                if let Some(g) = got {
                    if *g != want as i64 {
                        return Err(sig_err(format!(
                            "input {s}: dimension {} is {g}, the config says {want}",
                            k + 1
                        )));
                    }
                }
            }
        }
        let t = &inputs[timestep_input];
        let timestep_dtype = match t.dtype {
            Some(DatumType::I64) | None => DatumType::I64,
            Some(d @ (DatumType::F32 | DatumType::I32)) => d,
            Some(d) => {
                return Err(sig_err(format!(
                    "timestep input {t} has type {d:?}; expected int64 or f32"
                )))
            }
        };
        let timestep_scalar = match t.rank() {
            Some(0) => true,
            Some(1) | None => false,
            Some(r) => {
                return Err(sig_err(format!(
                    "timestep input {t} has rank {r}; expected [N] or a scalar"
                )))
            }
        };
        let mut unet = Self {
            model,
            sample_input,
            timestep_input,
            timestep_dtype,
            timestep_scalar,
            sample_shape,
            out_channels: 0,
            forward_flops: 0.0,
        };
        let plan = unet.plan(1)?;
        unet.forward_flops = crate::model::plan_flops(&plan);
        let out = output_shape(ROLE, &plan)?;
        let [c, h, w] = sample_shape;
        let ok = out.len() == 4
            && out[0] == 1
            && out[2] == h
            && out[3] == w
            && (out[1] == c || out[1] == 2 * c);
        if !ok {
            return Err(sig_err(format!(
                "output shape {out:?} at batch 1; expected [1, {c}, {h}, {w}] or [1, {}, {h}, {w}] (learned variance)",
                2 * c
            )));
        }
        unet.out_channels = out[1];
        Ok(unet)
    }

    /// Output channels: C, or 2C for a learned-variance model.
    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    /// FLOPs of one batch-1 forward as tract counts them (2 per multiply-add).
    pub fn forward_flops(&self) -> f64 {
        self.forward_flops
    }

    /// Whether a lone image is worth tract's multithreaded executor: a forward of at
    /// least [`MIN_FLOPS_FOR_THREADS`].
    pub fn threads_pay_at_batch_1(&self) -> bool {
        self.forward_flops >= MIN_FLOPS_FOR_THREADS
    }

    /// `[C, H, W]` of one sample.
    pub fn sample_shape(&self) -> [usize; 3] {
        self.sample_shape
    }

    /// The underlying model.
    pub fn model(&self) -> &OnnxModel {
        &self.model
    }

    /// The optimised plan for `batch` (cached).
    pub fn plan(&self, batch: usize) -> Result<Arc<TypedSimplePlan>> {
        self.model.plan(batch, |b| self.facts(b))
    }

    /// What running the plan for `batch` needs (weights, inputs, peak activations).
    pub fn memory(&self, batch: usize) -> Result<PlanMemory> {
        self.model.plan_memory(batch, |b| self.facts(b))
    }

    fn facts(&self, b: usize) -> Vec<InferenceFact> {
        let [c, h, w] = self.sample_shape;
        let mut facts = vec![InferenceFact::default(), InferenceFact::default()];
        facts[self.sample_input] = f32::fact([b, c, h, w]).into();
        facts[self.timestep_input] = if self.timestep_scalar {
            InferenceFact::dt_shape(self.timestep_dtype, TVec::<usize>::new())
        } else {
            InferenceFact::dt_shape(self.timestep_dtype, tvec![b])
        };
        facts
    }

    /// A reusable run state for `batch` (tract keeps its buffers in it between calls).
    pub fn state(&self, batch: usize) -> Result<UnetState> {
        let plan = self.plan(batch)?;
        Ok(UnetState {
            batch,
            state: new_state(ROLE, &plan)?,
        })
    }

    /// Runs the U-Net on `x` (`batch` samples) at timestep `t` into `out`
    /// (`batch * out_channels * H * W` values), with a fresh run state.
    pub fn run(
        &self,
        batch: usize,
        x: &[f32],
        t: u32,
        out: &mut [f32],
        executor: &tract_linalg::multithread::Executor,
    ) -> Result<()> {
        let mut state = self.state(batch)?;
        self.run_in(&mut state, x, t, out, executor)
    }

    /// Runs the U-Net on a batch (`x`: `n` images) image by image with batch-1 run
    /// states (from [`Self::state`]`(1)`), writing `out` (`n` outputs). One state: the
    /// images in turn on `executor`, run from one of its pool threads with another
    /// spinning for tract's parallel matrix products ([`crate::op_threads::on_pool`]); when the U-Net is too small for tract's threads to
    /// pay ([`Self::threads_pay_at_batch_1`]), likewise, but tract runs on one thread and
    /// `executor` goes to esddpm's own operators only. Several: contiguous runs of
    /// images on scoped OS threads, one state and one core each (tract's executor
    /// parallelises only the matrix products; whole images keep every core busy). The
    /// result is the same bits either way, and the same as each image run alone.
    pub fn run_images(
        &self,
        states: &mut [UnetState],
        x: &[f32],
        t: u32,
        out: &mut [f32],
        executor: &tract_linalg::multithread::Executor,
    ) -> Result<()> {
        let [c, h, w] = self.sample_shape;
        let il = c * h * w;
        let n = x.len() / il;
        let ol = self.out_channels * h * w;
        if n == 0 || x.len() != n * il || out.len() != n * ol || states.is_empty() {
            return Err(Error::Inference {
                role: ROLE,
                message: format!(
                    "{} sample values and {} output values for images of {il} -> {ol} values, {} run states",
                    x.len(),
                    out.len(),
                    states.len()
                ),
            });
        }
        if let [state] = states {
            // From a pool thread, with one helper spinning (`op_threads::on_pool`). A
            // small U-Net keeps tract on one thread and lends the pool to esddpm's own
            // operators only; it too runs from a pool thread: from the caller's, each
            // operator's parts were handed into the pool from outside, which woke its
            // idle thread too (a third thread on two cores).
            let single = tract_linalg::multithread::Executor::SingleThread;
            let tract = if self.threads_pay_at_batch_1() {
                executor
            } else {
                &single
            };
            return crate::op_threads::on_pool(executor, move || {
                for (xi, oi) in x.chunks(il).zip(out.chunks_mut(ol)) {
                    self.run_in(state, xi, t, oi, tract)?;
                }
                Ok(())
            });
        }
        let per = n.div_ceil(states.len());
        std::thread::scope(|scope| {
            let handles: Vec<_> = states
                .iter_mut()
                .zip(x.chunks(per * il).zip(out.chunks_mut(per * ol)))
                .map(|(state, (xs, outs))| {
                    scope.spawn(move || {
                        let single = tract_linalg::multithread::Executor::SingleThread;
                        for (xi, oi) in xs.chunks(il).zip(outs.chunks_mut(ol)) {
                            self.run_in(state, xi, t, oi, &single)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            handles.into_iter().try_for_each(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(Error::Inference {
                        role: ROLE,
                        message: "a worker thread panicked".into(),
                    })
                })
            })
        })
    }

    /// [`Self::run`] with a run state made by [`Self::state`], reused across steps.
    pub fn run_in(
        &self,
        state: &mut UnetState,
        x: &[f32],
        t: u32,
        out: &mut [f32],
        executor: &tract_linalg::multithread::Executor,
    ) -> Result<()> {
        let batch = state.batch;
        let [c, h, w] = self.sample_shape;
        let sample = Tensor::from_shape(&[batch, c, h, w], x).map_err(|e| Error::Inference {
            role: ROLE,
            message: e.to_string(),
        })?;
        let n = if self.timestep_scalar { 0 } else { batch };
        let shape: &[usize] = if self.timestep_scalar { &[] } else { &[n] };
        let timestep = match self.timestep_dtype {
            DatumType::F32 => Tensor::from_shape(shape, &vec![t as f32; n.max(1)]),
            DatumType::I32 => Tensor::from_shape(shape, &vec![t as i32; n.max(1)]),
            _ => Tensor::from_shape(shape, &vec![i64::from(t); n.max(1)]),
        }
        .map_err(|e| Error::Inference {
            role: ROLE,
            message: e.to_string(),
        })?;
        let (s, t) = (sample.into_tvalue(), timestep.into_tvalue());
        let inputs: TVec<TValue> = if self.sample_input == 0 {
            tvec![s, t]
        } else {
            tvec![t, s]
        };
        run_into(ROLE, &mut state.state, executor, inputs, out)
    }
}

/// The U-Net's reusable run state for one batch size.
pub struct UnetState {
    batch: usize,
    state: TypedSimpleState,
}

impl std::fmt::Debug for UnetState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnetState")
            .field("batch", &self.batch)
            .finish()
    }
}

fn list(inputs: &[IoDesc]) -> String {
    inputs
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}
