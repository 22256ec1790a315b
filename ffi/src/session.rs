//! The step-wise session: one U-Net call per `esd_session_step`, so that a game can
//! spend one step per frame, and read the current image or the x0 preview in between.

use crate::pipeline::{options, write_seed, EsdGenerateParams, EsdPipeline};
use crate::status::{guard, guard_void, non_null, read_params, write_out, EsdStatus};
use esddpm_runtime::{Images, Pipeline, Session};
use std::sync::Arc;

/// A generation in progress (opaque). Keeps its pipeline's models alive.
pub struct EsdSession {
    // Declared first, so dropped first: it borrows `pipeline`.
    session: Session<'static>,
    _pipeline: Arc<Pipeline>,
}

/// Where a session stands.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct EsdSessionStatus {
    /// 1 once every step is done (the sample is the result).
    pub done: u32,
    /// Steps done.
    pub steps_done: u32,
    /// Steps in the run.
    pub total: u32,
    /// The timestep of the next step (0 once done).
    pub next_timestep: u32,
}

impl EsdSession {
    fn status(&self) -> EsdSessionStatus {
        let s = &self.session;
        let done = s.steps_done();
        EsdSessionStatus {
            done: u32::from(s.is_done()),
            steps_done: done as u32,
            total: s.num_steps() as u32,
            next_timestep: s.timesteps().get(done).copied().unwrap_or(0),
        }
    }
}

/// Begins a generation (the prior runs and its images are diffused to the start; no
/// U-Net call yet). `params` NULL = defaults. `*out` and `seed_used` (may be NULL) are
/// set only on success; free the session with `esd_session_free`.
///
/// # Safety
/// `pipeline` must be valid; `out` writable.
#[no_mangle]
pub unsafe extern "C" fn esd_session_begin(
    pipeline: *const EsdPipeline,
    params: *const EsdGenerateParams,
    out: *mut *mut EsdSession,
    seed_used: *mut u64,
) -> EsdStatus {
    guard(|| {
        non_null(pipeline, "pipeline")?;
        non_null(out, "out")?;
        let size = std::mem::size_of::<EsdGenerateParams>();
        let p = read_params(params, EsdGenerateParams::default(), size, "params")?;
        let o = options(&p)?;
        let arc = (*pipeline).pipeline.clone();
        // SAFETY: the session borrows the pipeline behind the Arc, which the session
        // object owns and drops after the session (field order).
        let static_ref: &'static Pipeline = &*Arc::as_ptr(&arc);
        let session = static_ref.session(&o)?;
        out.write(Box::into_raw(Box::new(EsdSession {
            session,
            _pipeline: arc,
        })));
        write_seed(seed_used, o.seed)
    })
}

/// Takes one step (one U-Net call per image). After the last step it does nothing.
/// `status` (may be NULL) receives where the session stands after the call. On failure
/// (NaN from the model, ...) the session is unchanged.
///
/// # Safety
/// `session` must be valid; `status` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn esd_session_step(
    session: *mut EsdSession,
    status: *mut EsdSessionStatus,
) -> EsdStatus {
    guard(|| {
        non_null(session, "session")?;
        let s = &mut *session;
        s.session.step()?;
        if !status.is_null() {
            status.write(s.status());
        }
        Ok(())
    })
}

/// Where the session stands.
///
/// # Safety
/// `session` must be valid; `status` writable.
#[no_mangle]
pub unsafe extern "C" fn esd_session_status(
    session: *const EsdSession,
    status: *mut EsdSessionStatus,
) -> EsdStatus {
    guard(|| {
        non_null(session, "session")?;
        non_null(status, "status")?;
        status.write((*session).status());
        Ok(())
    })
}

/// The predicted clean images of the last step (x0, NCHW floats in [-1, 1]; zeros
/// before the first step): a cheap preview.
///
/// # Safety
/// `session` must be valid; `out` must hold `out_len` floats.
#[no_mangle]
pub unsafe extern "C" fn esd_session_preview_f32(
    session: *const EsdSession,
    out: *mut f32,
    out_len: usize,
) -> EsdStatus {
    guard(|| {
        non_null(session, "session")?;
        write_out((*session).session.preview(), out, out_len, "out")
    })
}

/// The current sample as floats (NCHW; the final images once done, in [-1, 1]).
///
/// # Safety
/// `session` must be valid; `out` must hold `out_len` floats.
#[no_mangle]
pub unsafe extern "C" fn esd_session_read_f32(
    session: *const EsdSession,
    out: *mut f32,
    out_len: usize,
) -> EsdStatus {
    guard(|| {
        non_null(session, "session")?;
        write_out((*session).session.sample(), out, out_len, "out")
    })
}

/// The current sample as 8-bit pixels, laid out as `esd_pipeline_generate_u8` writes
/// them (values clipped to [-1, 1] first).
///
/// # Safety
/// `session` must be valid; `out` must hold `out_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn esd_session_read_u8(
    session: *const EsdSession,
    out: *mut u8,
    out_len: usize,
) -> EsdStatus {
    guard(|| {
        non_null(session, "session")?;
        let s = &(*session).session;
        let images = Images {
            shape: s.shape(),
            data: s.sample().to_vec(),
        };
        let bytes: Vec<u8> = (0..images.len()).flat_map(|i| images.to_u8(i)).collect();
        write_out(&bytes, out, out_len, "out")
    })
}

/// Frees a session (NULL is ignored).
///
/// # Safety
/// `session` must be NULL or from `esd_session_begin`, freed once.
#[no_mangle]
pub unsafe extern "C" fn esd_session_free(session: *mut EsdSession) {
    guard_void(|| {
        if !session.is_null() {
            drop(Box::from_raw(session));
        }
    })
}
