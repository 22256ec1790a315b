//! The one error type of the crate.
//!
//! Every fallible function returns [`Result<T>`]; nothing in the crate panics on bad
//! input. Variants carry the offending values so that a message can say exactly what
//! was wrong, and the C ABI maps each variant to a stable status code.

use core::fmt;

/// Shorthand for `Result<T, esddpm_core::Error>`.
pub type Result<T> = core::result::Result<T, Error>;

/// Everything that can go wrong in `esddpm-core`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// `num_train_timesteps` was 0.
    NoTrainTimesteps,
    /// `beta_end` is smaller than `beta_start`.
    BetaRange {
        /// The configured `beta_start`.
        beta_start: f64,
        /// The configured `beta_end`.
        beta_end: f64,
    },
    /// A beta (given or computed) is not a finite number in (0, 1].
    InvalidBeta {
        /// Training timestep of the beta.
        timestep: usize,
        /// The offending value.
        value: f64,
    },
    /// `trained_betas` has a different length than `num_train_timesteps`.
    TrainedBetasLength {
        /// `num_train_timesteps`.
        expected: usize,
        /// Length of the given betas.
        got: usize,
    },
    /// `rescale_betas_zero_snr` needs at least two training timesteps.
    ZeroSnrNeedsTwoTimesteps,
    /// An `alphas_cumprod` table is not a non-increasing sequence in [0, 1] with a
    /// positive first value.
    InvalidAlphasCumprod {
        /// Training timestep of the first bad value.
        timestep: usize,
        /// The offending value.
        value: f64,
    },
    /// A caller buffer is shorter than required.
    BufferTooSmall {
        /// Which buffer.
        what: &'static str,
        /// Elements required.
        needed: usize,
        /// Elements given.
        got: usize,
    },
    /// A caller buffer has a different length than required.
    BufferLength {
        /// Which buffer.
        what: &'static str,
        /// Elements expected.
        expected: usize,
        /// Elements given.
        got: usize,
    },
    /// The number of inference steps is 0 or larger than the training chain.
    InvalidStepCount {
        /// The requested number of steps.
        steps: usize,
        /// The largest number allowed (`num_train_timesteps`).
        max: usize,
    },
    /// A respacing string (improved-diffusion's `timestep_respacing`) could not be used.
    InvalidRespacing(RespacingError),
    /// A timestep is not smaller than `num_train_timesteps`.
    TimestepOutOfRange {
        /// The timestep.
        timestep: u32,
        /// `num_train_timesteps`.
        num_train_timesteps: usize,
    },
    /// A timestep list is not strictly decreasing (the order the sampler runs it).
    TimestepsNotDescending {
        /// Index of the first entry that is not smaller than its predecessor.
        index: usize,
    },
    /// The early-stop start asks for more reverse steps than the chain has, or for
    /// none.
    StartBeyondChain {
        /// Requested number of reverse steps.
        steps: usize,
        /// Length of the spaced chain.
        chain_len: usize,
    },
    /// No chain timestep is at or below the requested start timestep.
    StartTimestepBelowChain {
        /// The requested start timestep.
        timestep: u32,
        /// The smallest timestep of the chain.
        smallest: u32,
    },
    /// img2img `strength` outside [0, 1], non-finite, or so small that no step is left.
    InvalidStrength(f64),
    /// DDIM `eta` negative or non-finite.
    InvalidEta(f64),
    /// Another numeric parameter outside its valid range.
    InvalidParameter {
        /// The parameter's name, as in diffusers' configs where one exists.
        name: &'static str,
        /// The offending value.
        value: f64,
    },
    /// The image shape has a zero dimension or overflows `usize`.
    InvalidShape,
    /// The model returned NaN or infinity.
    NonFiniteModelOutput {
        /// Index of the step within this run (0 = first reverse step).
        step: usize,
        /// The training timestep the model was called with.
        timestep: u32,
        /// Flat index of the first non-finite element.
        index: usize,
    },
    /// A learned variance (`variance_type = "learned"`) was negative.
    NegativeLearnedVariance {
        /// Index of the step within this run.
        step: usize,
        /// Flat index of the first negative element.
        index: usize,
    },
    /// The predicted clean sample became non-finite (for instance epsilon prediction at
    /// a zero-SNR timestep, where `alphas_cumprod` is 0).
    NonFinitePrediction {
        /// Index of the step within this run.
        step: usize,
        /// The training timestep.
        timestep: u32,
    },
    /// `step` was called after the last step, or before `init`.
    InvalidState(&'static str),
    /// A mask value outside [0, 1] or non-finite.
    InvalidMask {
        /// Flat index in the mask.
        index: usize,
        /// The offending value.
        value: f32,
    },
}

/// Why a respacing string was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RespacingError {
    /// The string is empty or a section is not a non-negative integer.
    Syntax,
    /// `ddimN`: no integer stride gives exactly N steps.
    NoExactStride {
        /// The requested N.
        steps: usize,
    },
    /// A section asks for more steps than it spans.
    SectionTooSmall {
        /// The section's size in training timesteps.
        size: usize,
        /// The requested count.
        count: usize,
    },
    /// All sections together keep no timestep.
    Empty,
}

impl fmt::Display for RespacingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            RespacingError::Syntax => {
                f.write_str("expected comma-separated step counts (\"10,15,20\") or \"ddimN\"")
            }
            RespacingError::NoExactStride { steps } => {
                write!(
                    f,
                    "cannot create exactly {steps} steps with an integer stride"
                )
            }
            RespacingError::SectionTooSmall { size, count } => {
                write!(f, "cannot divide a section of {size} steps into {count}")
            }
            RespacingError::Empty => f.write_str("the respacing keeps no timestep"),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::NoTrainTimesteps => f.write_str("num_train_timesteps must be at least 1"),
            Error::BetaRange { beta_start, beta_end } => write!(
                f,
                "beta_end ({beta_end}) must not be smaller than beta_start ({beta_start})"
            ),
            Error::InvalidBeta { timestep, value } => write!(
                f,
                "beta at timestep {timestep} is {value}; every beta must be finite and in (0, 1]"
            ),
            Error::TrainedBetasLength { expected, got } => write!(
                f,
                "trained_betas has {got} values but num_train_timesteps is {expected}"
            ),
            Error::ZeroSnrNeedsTwoTimesteps => {
                f.write_str("rescale_betas_zero_snr needs num_train_timesteps >= 2")
            }
            Error::InvalidAlphasCumprod { timestep, value } => write!(
                f,
                "alphas_cumprod[{timestep}] = {value}: the table must be finite, non-increasing, \
                 in [0, 1], with a positive first value"
            ),
            Error::BufferTooSmall { what, needed, got } => {
                write!(f, "{what} buffer too small: {got} elements, need {needed}")
            }
            Error::BufferLength {
                what,
                expected,
                got,
            } => write!(f, "{what} buffer has {got} elements, expected {expected}"),
            Error::InvalidStepCount { steps, max } => write!(
                f,
                "number of inference steps is {steps}; it must be between 1 and {max}"
            ),
            Error::InvalidRespacing(e) => write!(f, "invalid timestep respacing: {e}"),
            Error::TimestepOutOfRange {
                timestep,
                num_train_timesteps,
            } => write!(
                f,
                "timestep {timestep} is out of range for num_train_timesteps = {num_train_timesteps}"
            ),
            Error::TimestepsNotDescending { index } => write!(
                f,
                "timesteps must be strictly decreasing; entry {index} is not smaller than the one before"
            ),
            Error::StartBeyondChain { steps, chain_len } => write!(
                f,
                "early stop asks for {steps} reverse steps but the chain has {chain_len} (must be 1..={chain_len})"
            ),
            Error::StartTimestepBelowChain { timestep, smallest } => write!(
                f,
                "start timestep {timestep} is below the chain's smallest timestep {smallest}"
            ),
            Error::InvalidStrength(s) => write!(
                f,
                "strength {s} is invalid: it must be in (0, 1] and leave at least one step"
            ),
            Error::InvalidEta(eta) => write!(f, "eta {eta} is invalid: it must be finite and >= 0"),
            Error::InvalidParameter { name, value } => write!(f, "{name} = {value} is out of range"),
            Error::InvalidShape => {
                f.write_str("image shape has a zero dimension or is too large to address")
            }
            Error::NonFiniteModelOutput {
                step,
                timestep,
                index,
            } => write!(
                f,
                "model output is NaN or infinite at step {step} (timestep {timestep}), element {index}"
            ),
            Error::NegativeLearnedVariance { step, index } => write!(
                f,
                "learned variance is negative at step {step}, element {index}"
            ),
            Error::NonFinitePrediction { step, timestep } => write!(
                f,
                "predicted x0 is not finite at step {step} (timestep {timestep}); \
                 epsilon prediction cannot be used where alphas_cumprod is 0"
            ),
            Error::InvalidState(what) => write!(f, "invalid sampler state: {what}"),
            Error::InvalidMask { index, value } => write!(
                f,
                "mask value {value} at element {index} is invalid: it must be in [0, 1]"
            ),
        }
    }
}

impl core::error::Error for Error {}

impl From<RespacingError> for Error {
    fn from(e: RespacingError) -> Self {
        Error::InvalidRespacing(e)
    }
}
