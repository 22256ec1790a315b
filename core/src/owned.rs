//! Conveniences for callers with an allocator (feature `alloc`): the same computations
//! as the buffer-filling functions, returning `Vec`s.

use alloc::vec;
use alloc::vec::Vec;

use crate::error::{Error, Result};
use crate::schedule::ScheduleConfig;
use crate::spacing::{Respacing, TimestepSpacing};

impl ScheduleConfig<'_> {
    /// [`ScheduleConfig::fill_alphas_cumprod`] into a new `Vec` of
    /// `num_train_timesteps` values.
    pub fn alphas_cumprod_vec(&self) -> Result<Vec<f64>> {
        self.validate()?;
        let mut v = vec![0.0; self.num_train_timesteps];
        self.fill_alphas_cumprod(&mut v)?;
        Ok(v)
    }

    /// [`ScheduleConfig::fill_betas`] into a new `Vec`.
    pub fn betas_vec(&self) -> Result<Vec<f64>> {
        self.validate()?;
        let mut v = vec![0.0; self.num_train_timesteps];
        self.fill_betas(&mut v)?;
        Ok(v)
    }
}

impl TimestepSpacing {
    /// [`TimestepSpacing::fill`] into a new `Vec`.
    pub fn timesteps_vec(
        self,
        num_train_timesteps: usize,
        num_inference_steps: usize,
        steps_offset: u32,
    ) -> Result<Vec<u32>> {
        // Validated before allocating: `num_inference_steps` may come from a caller.
        if num_train_timesteps == 0 {
            return Err(Error::NoTrainTimesteps);
        }
        if num_inference_steps == 0 || num_inference_steps > num_train_timesteps {
            return Err(Error::InvalidStepCount {
                steps: num_inference_steps,
                max: num_train_timesteps,
            });
        }
        let mut v = vec![0; self.max_len(num_inference_steps)];
        let len = self
            .fill(
                num_train_timesteps,
                num_inference_steps,
                steps_offset,
                &mut v,
            )?
            .len();
        v.truncate(len);
        Ok(v)
    }
}

impl Respacing<'_> {
    /// [`Respacing::fill`] into a new `Vec`.
    pub fn timesteps_vec(&self, num_train_timesteps: usize) -> Result<Vec<u32>> {
        // A chain never visits more timesteps than the training chain has; checked
        // before allocating, since the string may come from a caller.
        if self.len() > num_train_timesteps {
            return Err(Error::InvalidStepCount {
                steps: self.len(),
                max: num_train_timesteps,
            });
        }
        let mut v = vec![0; self.len()];
        self.fill(num_train_timesteps, &mut v)?;
        Ok(v)
    }
}
