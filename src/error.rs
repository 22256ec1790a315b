//! The runtime's error type.

use std::path::PathBuf;

/// Shorthand for `Result<T, esddpm::Error>`.
pub type Result<T> = std::result::Result<T, Error>;

/// Which model an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelRole {
    /// The denoising U-Net.
    Unet,
    /// The prior (GAN generator or VAE decoder).
    Prior,
    /// The classifier whose features define the FID of the benchmark.
    Classifier,
}

impl std::fmt::Display for ModelRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ModelRole::Unet => "U-Net",
            ModelRole::Prior => "prior",
            ModelRole::Classifier => "classifier",
        })
    }
}

/// Everything that can go wrong in the runtime. Each variant names what was wrong and
/// where.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A config file is not valid JSON, or a key has a wrong type or value.
    #[error("{file}: {key}: {message}")]
    Config {
        /// The config file (`scheduler_config.json`, `esddpm.json`).
        file: String,
        /// The key (`(root)` for the document itself).
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A model folder lacks a file it needs.
    #[error("model folder {folder}: {message}")]
    Folder {
        /// The folder.
        folder: PathBuf,
        /// What is missing.
        message: String,
    },
    /// tract could not parse or prepare an ONNX model (truncated file, not ONNX, an
    /// operator tract does not support, ...).
    #[error("cannot load the {role} model: {message}")]
    ModelLoad {
        /// Which model.
        role: ModelRole,
        /// tract's explanation.
        message: String,
    },
    /// A model's inputs or outputs do not have the shape or type the pipeline needs.
    #[error("the {role} model has the wrong signature: {message}")]
    ModelSignature {
        /// Which model.
        role: ModelRole,
        /// What was expected and found.
        message: String,
    },
    /// tract failed while running a model.
    #[error("running the {role} model failed: {message}")]
    Inference {
        /// Which model.
        role: ModelRole,
        /// tract's explanation.
        message: String,
    },
    /// A model produced NaN or infinity.
    #[error("the {role} model produced a non-finite value (NaN or infinity){}", step.map(|s| format!(" at step {s}")).unwrap_or_default())]
    NonFiniteOutput {
        /// Which model.
        role: ModelRole,
        /// The reverse step, for the U-Net.
        step: Option<usize>,
    },
    /// A prior's output is outside the range its config declares (`output_range`), by
    /// more than 5% of the range: the file and the config do not belong together (a
    /// [0, 255] decoder declared as [-1, 1], say).
    #[error("the prior's output spans [{min}, {max}], outside its declared output_range [{lo}, {hi}]; fix output_range in esddpm.json")]
    PriorOutputRange {
        /// The smallest value the prior produced.
        min: f32,
        /// The largest value the prior produced.
        max: f32,
        /// The declared lower bound.
        lo: f32,
        /// The declared upper bound.
        hi: f32,
    },
    /// Loading a model or running a generation would need more memory than
    /// [`crate::LoadOptions::memory_limit`] allows; nothing was allocated for it.
    #[error("{what} needs about {needed} bytes, over the memory limit of {limit} bytes (LoadOptions::memory_limit)")]
    MemoryLimit {
        /// What would have been allocated.
        what: String,
        /// The estimate, in bytes.
        needed: u64,
        /// The limit, in bytes.
        limit: u64,
    },
    /// A dataset file (Fashion-MNIST IDX) is malformed.
    #[error("dataset file {path}: {message}")]
    Dataset {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An invalid generation parameter.
    #[error("invalid parameter {name}: {message}")]
    InvalidParameter {
        /// The parameter.
        name: &'static str,
        /// Why.
        message: String,
    },
    /// The run was cancelled through its cancellation flag.
    #[error("cancelled after {steps_done} steps")]
    Cancelled {
        /// Steps completed before the flag was seen.
        steps_done: usize,
    },
    /// An error of the sampler maths.
    #[error(transparent)]
    Core(#[from] esddpm_core::Error),
}

impl Error {
    pub(crate) fn config(file: &str, key: &str, message: impl Into<String>) -> Self {
        Error::Config {
            file: file.to_string(),
            key: key.to_string(),
            message: message.into(),
        }
    }
}
