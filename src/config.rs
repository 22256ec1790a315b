//! Model-folder configuration: diffusers' `scheduler_config.json`, read as it is, and
//! esddpm's own `esddpm.json`.
//!
//! Unknown keys are ignored and reported in `warnings`; a key with a wrong type or value
//! is an [`Error::Config`] that names the file and the key.

use crate::error::{Error, Result};
use esddpm_core::{
    BetaSchedule, PredictionType, SamplerConfig, SamplerKind, ScheduleConfig, Thresholding,
    TimestepSpacing, VarianceType, X0Options,
};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

const SCHEDULER_FILE: &str = "scheduler_config.json";
const ESDDPM_FILE: &str = "esddpm.json";

/// Keys of diffusers scheduler configs that esddpm does not use but knows: they are
/// accepted without a warning.
const KNOWN_UNUSED_SCHEDULER_KEYS: &[&str] = &[
    "_class_name",
    "_diffusers_version",
    "algorithm_type",
    "solver_order",
    "solver_type",
    "lower_order_final",
    "euler_at_final",
    "final_sigmas_type",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "use_lu_lambdas",
    "use_flow_sigmas",
    "flow_shift",
    "lambda_min_clipped",
    "variance_type_dpm",
    "timestep_type",
    "skip_prk_steps",
];

/// diffusers' `scheduler_config.json`, every key esddpm uses, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// `num_train_timesteps` (1000).
    pub num_train_timesteps: usize,
    /// `beta_start` (0.0001).
    pub beta_start: f64,
    /// `beta_end` (0.02).
    pub beta_end: f64,
    /// `beta_schedule` (`linear`).
    pub beta_schedule: BetaSchedule,
    /// `trained_betas` (none).
    pub trained_betas: Option<Vec<f64>>,
    /// `variance_type` (`fixed_small`).
    pub variance_type: VarianceType,
    /// `clip_sample` (true).
    pub clip_sample: bool,
    /// `clip_sample_range` (1.0).
    pub clip_sample_range: f64,
    /// `prediction_type` (`epsilon`).
    pub prediction_type: PredictionType,
    /// `thresholding` (false).
    pub thresholding: bool,
    /// `dynamic_thresholding_ratio` (0.995).
    pub dynamic_thresholding_ratio: f64,
    /// `sample_max_value` (1.0).
    pub sample_max_value: f64,
    /// `timestep_spacing` (`leading`).
    pub timestep_spacing: TimestepSpacing,
    /// `steps_offset` (0).
    pub steps_offset: u32,
    /// `set_alpha_to_one` (true).
    pub set_alpha_to_one: bool,
    /// `rescale_betas_zero_snr` (false).
    pub rescale_betas_zero_snr: bool,
    /// Keys that were present but are unknown to esddpm (ignored).
    pub warnings: Vec<String>,
}

impl Default for SchedulerConfig {
    /// diffusers' defaults, taken from the core's own defaults.
    fn default() -> Self {
        let schedule = ScheduleConfig::default();
        let x0 = X0Options::default();
        let threshold = Thresholding::default();
        let sampler = SamplerConfig::default();
        Self {
            num_train_timesteps: schedule.num_train_timesteps,
            beta_start: schedule.beta_start,
            beta_end: schedule.beta_end,
            beta_schedule: schedule.beta_schedule,
            trained_betas: None,
            variance_type: VarianceType::default(),
            clip_sample: x0.clip_sample,
            clip_sample_range: x0.clip_sample_range,
            prediction_type: x0.prediction_type,
            thresholding: x0.thresholding.is_some(),
            dynamic_thresholding_ratio: threshold.ratio,
            sample_max_value: threshold.max_value,
            timestep_spacing: TimestepSpacing::default(),
            steps_offset: 0,
            set_alpha_to_one: sampler.set_alpha_to_one,
            rescale_betas_zero_snr: schedule.rescale_betas_zero_snr,
            warnings: Vec::new(),
        }
    }
}

/// Typed access to one JSON object, with errors naming file and key.
struct Fields<'a> {
    file: &'a str,
    prefix: String,
    map: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn new(file: &'a str, prefix: &str, value: &'a Value) -> Result<Self> {
        let map = value.as_object().ok_or_else(|| {
            Error::config(
                file,
                if prefix.is_empty() { "(root)" } else { prefix },
                "expected a JSON object",
            )
        })?;
        Ok(Self {
            file,
            prefix: prefix.to_string(),
            map,
        })
    }

    fn key(&self, k: &str) -> String {
        if self.prefix.is_empty() {
            k.to_string()
        } else {
            format!("{}.{k}", self.prefix)
        }
    }

    fn err(&self, k: &str, msg: impl Into<String>) -> Error {
        Error::config(self.file, &self.key(k), msg)
    }

    /// The value, treating JSON null as absent.
    fn get(&self, k: &str) -> Option<&'a Value> {
        self.map.get(k).filter(|v| !v.is_null())
    }

    fn f64(&self, k: &str) -> Result<Option<f64>> {
        self.get(k)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| self.err(k, format!("expected a number, found {v}")))
            })
            .transpose()
    }

    fn usize(&self, k: &str) -> Result<Option<usize>> {
        self.get(k)
            .map(|v| {
                v.as_u64()
                    .and_then(|x| usize::try_from(x).ok())
                    .ok_or_else(|| {
                        self.err(k, format!("expected a non-negative integer, found {v}"))
                    })
            })
            .transpose()
    }

    fn bool(&self, k: &str) -> Result<Option<bool>> {
        self.get(k)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| self.err(k, format!("expected true or false, found {v}")))
            })
            .transpose()
    }

    fn str(&self, k: &str) -> Result<Option<&'a str>> {
        self.get(k)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| self.err(k, format!("expected a string, found {v}")))
            })
            .transpose()
    }

    fn name<T>(&self, k: &str, parse: fn(&str) -> Option<T>, allowed: &str) -> Result<Option<T>> {
        self.str(k)?
            .map(|s| {
                parse(s).ok_or_else(|| {
                    self.err(k, format!("unknown value {s:?}; expected one of {allowed}"))
                })
            })
            .transpose()
    }

    fn f64_list(&self, k: &str) -> Result<Option<Vec<f64>>> {
        self.get(k)
            .map(|v| {
                v.as_array()
                    .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<_>>>())
                    .ok_or_else(|| self.err(k, "expected a list of numbers"))
            })
            .transpose()
    }

    fn usize_list(&self, k: &str) -> Result<Option<Vec<usize>>> {
        self.get(k)
            .map(|v| {
                v.as_array()
                    .and_then(|a| {
                        a.iter()
                            .map(|x| x.as_u64().and_then(|u| usize::try_from(u).ok()))
                            .collect::<Option<Vec<_>>>()
                    })
                    .ok_or_else(|| self.err(k, "expected a list of non-negative integers"))
            })
            .transpose()
    }

    fn unknown_keys(&self, known: &[&str], warnings: &mut Vec<String>) {
        for k in self.map.keys() {
            if !known.contains(&k.as_str()) {
                warnings.push(format!(
                    "{}: unknown key {:?} ignored",
                    self.file,
                    self.key(k)
                ));
            }
        }
    }
}

fn parse_json(file: &str, text: &str) -> Result<Value> {
    serde_json::from_str(text)
        .map_err(|e| Error::config(file, "(root)", format!("invalid JSON: {e}")))
}

impl SchedulerConfig {
    /// Parses the text of a diffusers `scheduler_config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let file = SCHEDULER_FILE;
        let doc = parse_json(file, text)?;
        let f = Fields::new(file, "", &doc)?;
        let d = Self::default();
        let mut c = Self {
            num_train_timesteps: f.usize("num_train_timesteps")?.unwrap_or(d.num_train_timesteps),
            beta_start: f.f64("beta_start")?.unwrap_or(d.beta_start),
            beta_end: f.f64("beta_end")?.unwrap_or(d.beta_end),
            beta_schedule: f
                .name("beta_schedule", BetaSchedule::from_name, "linear, scaled_linear, squaredcos_cap_v2, sigmoid")?
                .unwrap_or(d.beta_schedule),
            trained_betas: f.f64_list("trained_betas")?,
            variance_type: f
                .name(
                    "variance_type",
                    VarianceType::from_name,
                    "fixed_small, fixed_small_log, fixed_large, fixed_large_log, learned, learned_range",
                )?
                .unwrap_or(d.variance_type),
            clip_sample: f.bool("clip_sample")?.unwrap_or(d.clip_sample),
            clip_sample_range: f.f64("clip_sample_range")?.unwrap_or(d.clip_sample_range),
            prediction_type: f
                .name("prediction_type", PredictionType::from_name, "epsilon, sample, v_prediction")?
                .unwrap_or(d.prediction_type),
            thresholding: f.bool("thresholding")?.unwrap_or(d.thresholding),
            dynamic_thresholding_ratio: f
                .f64("dynamic_thresholding_ratio")?
                .unwrap_or(d.dynamic_thresholding_ratio),
            sample_max_value: f.f64("sample_max_value")?.unwrap_or(d.sample_max_value),
            timestep_spacing: f
                .name("timestep_spacing", TimestepSpacing::from_name, "leading, trailing, linspace")?
                .unwrap_or(d.timestep_spacing),
            steps_offset: f
                .usize("steps_offset")?
                .map(|v| u32::try_from(v).map_err(|_| f.err("steps_offset", "too large")))
                .transpose()?
                .unwrap_or(d.steps_offset),
            set_alpha_to_one: f.bool("set_alpha_to_one")?.unwrap_or(d.set_alpha_to_one),
            rescale_betas_zero_snr: f
                .bool("rescale_betas_zero_snr")?
                .unwrap_or(d.rescale_betas_zero_snr),
            warnings: Vec::new(),
        };
        let mut known: Vec<&str> = vec![
            "num_train_timesteps",
            "beta_start",
            "beta_end",
            "beta_schedule",
            "trained_betas",
            "variance_type",
            "clip_sample",
            "clip_sample_range",
            "prediction_type",
            "thresholding",
            "dynamic_thresholding_ratio",
            "sample_max_value",
            "timestep_spacing",
            "steps_offset",
            "set_alpha_to_one",
            "rescale_betas_zero_snr",
        ];
        known.extend_from_slice(KNOWN_UNUSED_SCHEDULER_KEYS);
        f.unknown_keys(&known, &mut c.warnings);
        c.validate()?;
        Ok(c)
    }

    /// The schedule part, for `esddpm-core`.
    pub fn schedule(&self) -> ScheduleConfig<'_> {
        ScheduleConfig {
            num_train_timesteps: self.num_train_timesteps,
            beta_start: self.beta_start,
            beta_end: self.beta_end,
            beta_schedule: self.beta_schedule,
            trained_betas: self.trained_betas.as_deref(),
            rescale_betas_zero_snr: self.rescale_betas_zero_snr,
        }
    }

    /// The x0 options, for `esddpm-core`.
    pub fn x0_options(&self) -> X0Options {
        X0Options {
            prediction_type: self.prediction_type,
            clip_sample: self.clip_sample,
            clip_sample_range: self.clip_sample_range,
            thresholding: self.thresholding.then_some(Thresholding {
                ratio: self.dynamic_thresholding_ratio,
                max_value: self.sample_max_value,
            }),
        }
    }

    /// Checks the values with the core's rules and names the offending key.
    pub fn validate(&self) -> Result<()> {
        let file = SCHEDULER_FILE;
        self.schedule().validate().map_err(|e| {
            let key = match e {
                esddpm_core::Error::NoTrainTimesteps => "num_train_timesteps",
                esddpm_core::Error::BetaRange { .. } => "beta_end",
                esddpm_core::Error::TrainedBetasLength { .. } => "trained_betas",
                esddpm_core::Error::ZeroSnrNeedsTwoTimesteps => "rescale_betas_zero_snr",
                esddpm_core::Error::InvalidParameter { name, .. } => name,
                _ => "(root)",
            };
            Error::config(file, key, e.to_string())
        })?;
        let sampler = SamplerConfig {
            kind: SamplerKind::Ddpm {
                variance_type: self.variance_type,
            },
            x0: self.x0_options(),
            set_alpha_to_one: self.set_alpha_to_one,
        };
        sampler.validate().map_err(|e| {
            let key = match e {
                esddpm_core::Error::InvalidParameter { name, .. } => name,
                _ => "(root)",
            };
            Error::config(file, key, e.to_string())
        })?;
        // Every beta must be usable: compute the table once.
        let mut abar = vec![0.0; self.num_train_timesteps];
        self.schedule()
            .fill_alphas_cumprod(&mut abar)
            .map_err(|e| Error::config(file, "trained_betas", e.to_string()))?;
        Ok(())
    }
}

/// The range a prior's output image is in; it is mapped to [-1, 1].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputRange {
    /// [-1, 1], used as is.
    MinusOneOne,
    /// [0, 1]: `x * 2 - 1`.
    ZeroOne,
    /// [0, 255] (uint8-like): `x / 255 * 2 - 1`, as ES-DDPM's official code.
    ZeroTo255,
}

impl OutputRange {
    /// The declared `(low, high)`.
    pub fn bounds(self) -> (f32, f32) {
        match self {
            OutputRange::MinusOneOne => (-1.0, 1.0),
            OutputRange::ZeroOne => (0.0, 1.0),
            OutputRange::ZeroTo255 => (0.0, 255.0),
        }
    }

    /// Maps one value of this range to [-1, 1].
    pub fn to_unit(self, v: f32) -> f32 {
        match self {
            OutputRange::MinusOneOne => v,
            OutputRange::ZeroOne => v * 2.0 - 1.0,
            OutputRange::ZeroTo255 => v / 255.0 * 2.0 - 1.0,
        }
    }
}

/// The dtype of the U-Net's timestep input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepDtype {
    /// int64 (PyTorch's default for `torch.tensor([t])`).
    Int64,
    /// float32.
    Float32,
}

/// The U-Net entry of `esddpm.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct UnetEntry {
    /// File name, relative to the folder.
    pub file: String,
    /// `[C, H, W]` of one sample.
    pub sample_shape: [usize; 3],
    /// Timestep dtype, if declared (otherwise read from the model).
    pub timestep_dtype: Option<TimestepDtype>,
}

/// A prior entry of `esddpm.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct PriorEntry {
    /// File name, relative to the folder.
    pub file: String,
    /// The latent's shape without the batch: `[D]` or `[c, h, w]`.
    pub latent_shape: Vec<usize>,
    /// The range of the prior's output.
    pub output_range: OutputRange,
    /// Number of classes of a class-conditional prior (input `class_label`).
    pub num_classes: Option<usize>,
}

/// The optional `classifier` entry of `esddpm.json`: the model whose penultimate
/// features define the FID of `esddpm eval`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassifierEntry {
    /// File name, relative to the folder.
    pub file: String,
    /// The name of the output that holds the features (`[N, D]`).
    pub features_output: String,
}

/// `esddpm.json`: which files make up the pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct EsddpmConfig {
    /// The U-Net.
    pub unet: UnetEntry,
    /// The priors by name.
    pub priors: BTreeMap<String, PriorEntry>,
    /// The prior used when none is named.
    pub default_prior: Option<String>,
    /// The recommended early-stop start `T'` (reverse steps of the full chain).
    pub recommended_start: usize,
    /// The evaluation classifier, if the folder ships one.
    pub classifier: Option<ClassifierEntry>,
    /// Unknown keys that were ignored.
    pub warnings: Vec<String>,
}

impl EsddpmConfig {
    /// Parses the text of an `esddpm.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let file = ESDDPM_FILE;
        let doc = parse_json(file, text)?;
        let root = Fields::new(file, "", &doc)?;
        let mut warnings = Vec::new();
        root.unknown_keys(
            &[
                "format",
                "unet",
                "priors",
                "default_prior",
                "recommended_start",
                "classifier",
                "data",
            ],
            &mut warnings,
        );
        if let Some(fmt) = root.str("format")? {
            if fmt != "esddpm/1" {
                return Err(root.err(
                    "format",
                    format!("unsupported format {fmt:?}; expected \"esddpm/1\""),
                ));
            }
        }
        let unet_v = root
            .get("unet")
            .ok_or_else(|| root.err("unet", "missing"))?;
        let u = Fields::new(file, "unet", unet_v)?;
        u.unknown_keys(&["file", "sample_shape", "timestep_dtype"], &mut warnings);
        let shape = u
            .usize_list("sample_shape")?
            .ok_or_else(|| u.err("sample_shape", "missing"))?;
        let sample_shape: [usize; 3] = shape
            .as_slice()
            .try_into()
            .ok()
            .filter(|s: &[usize; 3]| s.iter().all(|&d| d > 0))
            .ok_or_else(|| u.err("sample_shape", "expected [C, H, W] with positive sizes"))?;
        let timestep_dtype = match u.str("timestep_dtype")? {
            None => None,
            Some("int64") => Some(TimestepDtype::Int64),
            Some("float32") => Some(TimestepDtype::Float32),
            Some(other) => {
                return Err(u.err(
                    "timestep_dtype",
                    format!("unknown value {other:?}; expected int64 or float32"),
                ))
            }
        };
        let unet = UnetEntry {
            file: u
                .str("file")?
                .ok_or_else(|| u.err("file", "missing"))?
                .to_string(),
            sample_shape,
            timestep_dtype,
        };
        let mut priors = BTreeMap::new();
        if let Some(pv) = root.get("priors") {
            let pm = pv
                .as_object()
                .ok_or_else(|| root.err("priors", "expected an object of named priors"))?;
            for (name, v) in pm {
                let p = Fields::new(file, &format!("priors.{name}"), v)?;
                p.unknown_keys(
                    &["file", "latent_shape", "output_range", "num_classes"],
                    &mut warnings,
                );
                let latent_shape = p
                    .usize_list("latent_shape")?
                    .ok_or_else(|| p.err("latent_shape", "missing"))?;
                if latent_shape.is_empty() || latent_shape.contains(&0) {
                    return Err(p.err(
                        "latent_shape",
                        "expected [D] or [c, h, w] with positive sizes",
                    ));
                }
                let output_range = match p.f64_list("output_range")?.as_deref() {
                    None | Some([-1.0, 1.0]) => OutputRange::MinusOneOne,
                    Some([0.0, 1.0]) => OutputRange::ZeroOne,
                    Some([0.0, 255.0]) => OutputRange::ZeroTo255,
                    Some(other) => {
                        return Err(p.err(
                            "output_range",
                            format!(
                                "{other:?} is not supported; expected [-1, 1], [0, 1] or [0, 255]"
                            ),
                        ))
                    }
                };
                let num_classes = p.usize("num_classes")?;
                if num_classes == Some(0) {
                    return Err(p.err("num_classes", "must be at least 1"));
                }
                priors.insert(
                    name.clone(),
                    PriorEntry {
                        file: p
                            .str("file")?
                            .ok_or_else(|| p.err("file", "missing"))?
                            .to_string(),
                        latent_shape,
                        output_range,
                        num_classes,
                    },
                );
            }
        }
        let default_prior = root.str("default_prior")?.map(str::to_string);
        if let Some(d) = &default_prior {
            if !priors.contains_key(d) {
                return Err(root.err("default_prior", format!("{d:?} is not one of the priors")));
            }
        }
        let recommended_start = root.usize("recommended_start")?.unwrap_or(100);
        if recommended_start == 0 {
            return Err(root.err("recommended_start", "must be at least 1"));
        }
        let classifier = match root.get("classifier") {
            None => None,
            Some(v) => {
                let c = Fields::new(file, "classifier", v)?;
                c.unknown_keys(&["file", "features_output", "logits_output"], &mut warnings);
                Some(ClassifierEntry {
                    file: c
                        .str("file")?
                        .ok_or_else(|| c.err("file", "missing"))?
                        .to_string(),
                    features_output: c
                        .str("features_output")?
                        .ok_or_else(|| c.err("features_output", "missing"))?
                        .to_string(),
                })
            }
        };
        Ok(Self {
            unet,
            priors,
            default_prior,
            recommended_start,
            classifier,
            warnings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diffusers_config_reads_as_is() {
        let text = r#"{"_class_name": "DDPMScheduler", "_diffusers_version": "0.42.1",
            "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
            "clip_sample": true, "clip_sample_range": 1.0, "dynamic_thresholding_ratio": 0.995,
            "num_train_timesteps": 1000, "prediction_type": "epsilon", "rescale_betas_zero_snr": false,
            "sample_max_value": 1.0, "steps_offset": 0, "thresholding": false,
            "timestep_spacing": "leading", "trained_betas": null, "variance_type": "fixed_large",
            "something_new": 3}"#;
        let c = SchedulerConfig::from_json(text).unwrap();
        assert_eq!(c.variance_type, VarianceType::FixedLarge);
        assert_eq!(c.warnings.len(), 1);
        assert!(c.warnings[0].contains("something_new"));
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            (r#"{"beta_start": "x"}"#, "beta_start"),
            (r#"{"beta_schedule": "cosine"}"#, "beta_schedule"),
            (r#"{"beta_start": 0.1, "beta_end": 0.01}"#, "beta_end"),
            (r#"{"num_train_timesteps": 0}"#, "num_train_timesteps"),
            (r#"{"num_train_timesteps": -3}"#, "num_train_timesteps"),
            (r#"{"clip_sample": 1}"#, "clip_sample"),
            (r#"{"clip_sample_range": -1}"#, "clip_sample_range"),
            (r#"{"trained_betas": [0.1, 0.2]}"#, "trained_betas"),
            (r#"{"variance_type": "huge"}"#, "variance_type"),
            (r#"{"timestep_spacing": 3}"#, "timestep_spacing"),
            (r#"[1, 2]"#, "(root)"),
            (r#"{"#, "(root)"),
        ];
        for (text, key) in cases {
            match SchedulerConfig::from_json(text) {
                Err(Error::Config { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: expected a config error, got {other:?}"),
            }
        }
    }

    #[test]
    fn esddpm_json() {
        let text = r#"{"format": "esddpm/1", "unet": {"file": "unet.onnx", "sample_shape": [1, 32, 32], "timestep_dtype": "int64"},
            "priors": {"gan": {"file": "g.onnx", "latent_shape": [64], "output_range": [0, 255]}},
            "default_prior": "gan", "recommended_start": 100, "extra": 1}"#;
        let c = EsddpmConfig::from_json(text).unwrap();
        assert_eq!(c.priors["gan"].output_range, OutputRange::ZeroTo255);
        assert_eq!(c.warnings.len(), 1);
        let bad = [
            (
                r#"{"unet": {"file": "u", "sample_shape": [1, 32]}}"#,
                "unet.sample_shape",
            ),
            (r#"{"unet": {"sample_shape": [1, 2, 2]}}"#, "unet.file"),
            (r#"{"format": "esddpm/9", "unet": {}}"#, "format"),
            (
                r#"{"unet": {"file": "u", "sample_shape": [1,2,2]}, "priors": {"p": {"file": "p", "latent_shape": [4], "output_range": [0, 2]}}}"#,
                "priors.p.output_range",
            ),
            (
                r#"{"unet": {"file": "u", "sample_shape": [1,2,2]}, "default_prior": "nope"}"#,
                "default_prior",
            ),
        ];
        for (text, key) in bad {
            match EsddpmConfig::from_json(text) {
                Err(Error::Config { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: expected a config error, got {other:?}"),
            }
        }
    }
}
