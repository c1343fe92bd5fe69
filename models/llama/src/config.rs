//! `LlamaConfig`: HF's `config.json` for the LLaMA family, as serde sees it.

use collie_core::rope::RopeScaling;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{LlamaError, Result};

/// Model types this crate runs, with the HF class a checkpoint of each names
/// (`architectures[0]`). All share LLaMA's block; they differ in biases and defaults, and Qwen3
/// adds per-head query/key norms.
pub const MODEL_TYPES: &[(&str, &str)] = &[
    ("llama", "LlamaForCausalLM"),
    ("mistral", "MistralForCausalLM"),
    ("qwen2", "Qwen2ForCausalLM"),
    ("qwen3", "Qwen3ForCausalLM"),
    ("internlm", "InternLMForCausalLM"),
];

/// The HF class of `model_type`, if this crate runs it.
pub fn class_of(model_type: &str) -> Option<&'static str> {
    MODEL_TYPES.iter().find(|t| t.0 == model_type).map(|t| t.1)
}

/// Mirror of HF `config.json` for LLaMA-family decoders (LLaMA 1/2/3, Mistral, Qwen2, InternLM,
/// SmolLM). Unknown keys are kept in `extra` and written back on save.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LlamaConfig {
    /// HF class names, e.g. `["LlamaForCausalLM"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    /// `llama`, `mistral`, `qwen2` or `internlm`.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Rows of the embedding and LM head.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA/MQA); defaults to `num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to `hidden_size / num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// MLP activation; only `silu` is LLaMA's.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Longest context the model was trained for.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base (transformers < 5 layout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// RoPE scaling (transformers < 5 layout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<Value>,
    /// RoPE base and scaling (transformers ≥ 5 layout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<Value>,
    /// LM head shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v/o projections (LLaMA's flag).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    /// Bias on the MLP projections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_bias: Option<bool>,
    /// InternLM's name for q/k/v/o biases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bias: Option<bool>,
    /// Mistral's sliding attention window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Qwen2's switch for `sliding_window` (off by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    /// Std of the normal initialization.
    #[serde(default = "default_init")]
    pub initializer_range: f64,
    /// BOS id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<Value>,
    /// EOS id, or a list of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<Value>,
    /// Padding id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<Value>,
    /// Every other key of `config.json`, kept for the round trip.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn default_model_type() -> String {
    "llama".into()
}
fn default_act() -> String {
    "silu".into()
}
fn default_max_pos() -> usize {
    2048
}
fn default_eps() -> f64 {
    1e-6
}
fn default_init() -> f64 {
    0.02
}

pub use collie_io::family::token_ids;

impl LlamaConfig {
    /// A config with LLaMA defaults for the given shape (used by tests and benchmarks).
    pub fn new(
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
    ) -> Self {
        LlamaConfig {
            architectures: Some(vec!["LlamaForCausalLM".into()]),
            model_type: default_model_type(),
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: Some(num_key_value_heads),
            head_dim: None,
            hidden_act: default_act(),
            max_position_embeddings: default_max_pos(),
            rms_norm_eps: 1e-5,
            rope_theta: Some(10000.0),
            rope_scaling: None,
            rope_parameters: None,
            tie_word_embeddings: false,
            attention_bias: None,
            mlp_bias: None,
            bias: None,
            sliding_window: None,
            use_sliding_window: None,
            initializer_range: default_init(),
            bos_token_id: None,
            eos_token_id: None,
            pad_token_id: None,
            extra: Map::new(),
        }
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Whether q/k/v carry a bias.
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias.unwrap_or(false)
            || self.bias.unwrap_or(false)
            || self.model_type == "qwen2"
    }

    /// Whether the output projection carries a bias (Qwen2 has q/k/v biases only).
    pub fn o_bias(&self) -> bool {
        self.attention_bias.unwrap_or(false) || self.bias.unwrap_or(false)
    }

    /// Whether each attention head's queries and keys pass an RMSNorm before RoPE (Qwen3).
    pub fn qk_norm(&self) -> bool {
        self.model_type == "qwen3"
    }

    /// Whether the MLP projections carry a bias.
    pub fn mlp_bias(&self) -> bool {
        self.mlp_bias.unwrap_or(false)
    }

    /// The attention window, if the model limits how far back a token looks.
    pub fn window(&self) -> Option<usize> {
        match self.model_type.as_str() {
            "qwen2" | "qwen3" if !self.use_sliding_window.unwrap_or(false) => None,
            _ => self.sliding_window,
        }
    }

    /// EOS ids (a config may list several).
    pub fn eos_ids(&self) -> Vec<u32> {
        token_ids(self.eos_token_id.as_ref())
    }

    /// BOS id.
    pub fn bos_id(&self) -> Option<u32> {
        token_ids(self.bos_token_id.as_ref()).first().copied()
    }

    /// RoPE base and scaling, from `rope_parameters` (transformers 5) or `rope_theta` +
    /// `rope_scaling` (earlier versions).
    pub fn rope(&self) -> Result<(f64, RopeScaling)> {
        let params = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref());
        let obj = params.and_then(Value::as_object);
        let theta = obj
            .and_then(|o| o.get("rope_theta"))
            .and_then(Value::as_f64)
            .or(self.rope_theta)
            .unwrap_or(10000.0);
        let Some(obj) = obj else {
            return Ok((theta, RopeScaling::None));
        };
        let kind = obj
            .get("rope_type")
            .or_else(|| obj.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let num = |key: &str| -> Result<f32> {
            obj.get(key)
                .and_then(Value::as_f64)
                .map(|v| v as f32)
                .ok_or_else(|| {
                    LlamaError::Config(format!("rope scaling `{kind}` needs a numeric `{key}`"))
                })
        };
        let scaling = match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: num("factor")?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: obj
                    .get("original_max_position_embeddings")
                    .and_then(Value::as_f64)
                    .unwrap_or(self.max_position_embeddings as f64)
                    as f32,
            },
            other => {
                return Err(LlamaError::Config(format!(
                    "rope type `{other}` is not supported (default, linear, llama3 are)"
                )))
            }
        };
        Ok((theta, scaling))
    }

    /// Checks that the config describes a model this crate can build.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(LlamaError::Config(m));
        let list = |i: usize| {
            let names: Vec<&str> = MODEL_TYPES
                .iter()
                .map(|t| if i == 0 { t.0 } else { t.1 })
                .collect();
            names.join(", ")
        };
        if class_of(&self.model_type).is_none() {
            return Err(LlamaError::UnknownArchitecture(format!(
                "model_type `{}` (supported: {})",
                self.model_type,
                list(0)
            )));
        }
        if let Some(arch) = self.architectures.as_ref().and_then(|a| a.first()) {
            if !MODEL_TYPES.iter().any(|t| t.1 == arch) {
                return Err(LlamaError::UnknownArchitecture(format!(
                    "architecture `{arch}` (supported: {})",
                    list(1)
                )));
            }
        }
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
        ] {
            if v == 0 {
                return bad(format!("`{name}` must be positive"));
            }
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim()
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if self.hidden_act != "silu" {
            return bad(format!(
                "hidden_act `{}` is not supported (silu is)",
                self.hidden_act
            ));
        }
        self.rope().map(|_| ())
    }
}

impl collie_core::model::ModelConfig for LlamaConfig {
    fn model_type(&self) -> &str {
        &self.model_type
    }
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    fn hidden_size(&self) -> usize {
        self.hidden_size
    }
    fn num_layers(&self) -> usize {
        self.num_hidden_layers
    }
    fn num_heads(&self) -> usize {
        self.num_attention_heads
    }
    fn head_dim(&self) -> usize {
        LlamaConfig::head_dim(self)
    }
    fn tie_word_embeddings(&self) -> bool {
        self.tie_word_embeddings
    }
    fn eos_ids(&self) -> Vec<u32> {
        LlamaConfig::eos_ids(self)
    }
    fn pad_id(&self) -> Option<u32> {
        token_ids(self.pad_token_id.as_ref()).first().copied()
    }
}
