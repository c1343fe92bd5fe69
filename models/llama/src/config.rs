//! `LlamaConfig`: HF's `config.json` for the LLaMA family, as serde sees it.

use collie_core::nn::Activation;
use collie_core::rope::RopeScaling;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{LlamaError, Result};
use crate::moe::MoeSpec;

/// Model types this crate runs, with the HF class a checkpoint of each names
/// (`architectures[0]`). All share LLaMA's block; they differ in biases and defaults, Qwen3 adds
/// per-head query/key norms, and Gemma 3 adds sandwich norms, `1 + w` norms, GeGLU, a scaled
/// embedding and local layers with their own window and RoPE; CodeGen has LayerNorms, a parallel
/// block with an ungated MLP, and q/v/k fused in one layer.
pub const MODEL_TYPES: &[(&str, &str)] = &[
    ("llama", "LlamaForCausalLM"),
    ("mistral", "MistralForCausalLM"),
    ("qwen2", "Qwen2ForCausalLM"),
    ("qwen3", "Qwen3ForCausalLM"),
    ("internlm", "InternLMForCausalLM"),
    ("gemma3_text", "Gemma3ForCausalLM"),
    ("internlm2", "InternLM2ForCausalLM"),
    ("glm", "GlmForCausalLM"),
    ("mixtral", "MixtralForCausalLM"),
    ("qwen3_moe", "Qwen3MoeForCausalLM"),
    ("codegen", "CodeGenForCausalLM"),
];

/// CodeGen's `mp_num`: the groups its fused `qkv_proj` is laid out in (fixed in transformers).
pub const CODEGEN_QKV_GROUPS: usize = 4;

/// Our keys and CodeGen's (GPT-2 style) names for them in `config.json`.
const CODEGEN_KEYS: [(&str, &str); 7] = [
    ("hidden_size", "n_embd"),
    ("num_hidden_layers", "n_layer"),
    ("num_attention_heads", "n_head"),
    ("max_position_embeddings", "n_positions"),
    ("intermediate_size", "n_inner"),
    ("rms_norm_eps", "layer_norm_epsilon"),
    ("hidden_act", "activation_function"),
];

/// Gemma 3's name for a layer that attends within the sliding window with the local RoPE.
const SLIDING: &str = "sliding_attention";
/// Gemma 3's name for a layer that attends to everything with the global RoPE.
const FULL: &str = "full_attention";

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
    /// Model width (CodeGen's `n_embd`).
    #[serde(alias = "n_embd")]
    pub hidden_size: usize,
    /// Width of the MLP (CodeGen's `n_inner`, where `null`, read as 0, means 4 · hidden_size:
    /// see [`LlamaConfig::ffn_width`]).
    #[serde(alias = "n_inner", deserialize_with = "null_as_zero")]
    pub intermediate_size: usize,
    /// Number of decoder blocks (CodeGen's `n_layer`).
    #[serde(alias = "n_layer")]
    pub num_hidden_layers: usize,
    /// Query heads (CodeGen's `n_head`).
    #[serde(alias = "n_head")]
    pub num_attention_heads: usize,
    /// Key/value heads (GQA/MQA); defaults to `num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to `hidden_size / num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// MLP activation (default `silu`, LLaMA's; CodeGen's `activation_function`).
    #[serde(
        default,
        alias = "activation_function",
        skip_serializing_if = "Option::is_none"
    )]
    pub hidden_act: Option<String>,
    /// Gemma's name for the MLP activation (`gelu_pytorch_tanh`); wins over `hidden_act`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_activation: Option<String>,
    /// Gemma 3: attention scores are scaled by `query_pre_attn_scalar^-½` instead of
    /// `head_dim^-½`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 3: `sliding_attention` or `full_attention` for every layer (default: every sixth
    /// layer full, or every `sliding_window_pattern`-th).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    /// Longest context the model was trained for (CodeGen's `n_positions`).
    #[serde(default = "default_max_pos", alias = "n_positions")]
    pub max_position_embeddings: usize,
    /// The norms' epsilon (CodeGen's `layer_norm_epsilon`).
    #[serde(default = "default_eps", alias = "layer_norm_epsilon")]
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
fn default_max_pos() -> usize {
    2048
}
fn default_eps() -> f64 {
    1e-6
}
fn default_init() -> f64 {
    0.02
}
fn null_as_zero<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<usize, D::Error> {
    Ok(Option::<usize>::deserialize(d)?.unwrap_or(0))
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
            hidden_act: Some("silu".into()),
            hidden_activation: None,
            query_pre_attn_scalar: None,
            layer_types: None,
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

    /// `config.json` as the family writes it: CodeGen's own key names (transformers maps only
    /// some of ours to them), LLaMA's for the others.
    pub fn to_json(&self) -> Result<Value> {
        let mut value = serde_json::to_value(self)
            .map_err(|e| LlamaError::Config(format!("config does not serialize: {e}")))?;
        if let (true, Some(map)) = (self.is_codegen(), value.as_object_mut()) {
            for (ours, theirs) in CODEGEN_KEYS {
                let v = map.remove(ours).unwrap_or(Value::Null);
                // n_inner 0 was `null` (4 · hidden).
                let v = if v == 0 { Value::Null } else { v };
                map.insert(theirs.into(), v);
            }
        }
        Ok(value)
    }

    /// CodeGen (`codegen`; MOSS-MOON-003 is one).
    pub fn is_codegen(&self) -> bool {
        self.model_type == "codegen"
    }

    /// Width of the MLP (CodeGen's `n_inner: null` is 4 · hidden_size).
    pub fn ffn_width(&self) -> usize {
        match self.intermediate_size {
            0 if self.is_codegen() => 4 * self.hidden_size,
            i => i,
        }
    }

    /// Whether the norms are LayerNorms (centered, with a bias) rather than RMSNorms (CodeGen).
    pub fn layer_norm(&self) -> bool {
        self.is_codegen()
    }

    /// Whether attention and MLP both read the block's one norm and add to the residual
    /// together (CodeGen), rather than one after the other.
    pub fn parallel_block(&self) -> bool {
        self.is_codegen()
    }

    /// Whether the MLP is gated (`down(act(gate(x)) · up(x))`); CodeGen's is `fc_out(act(fc_in(x)))`.
    pub fn gated_mlp(&self) -> bool {
        !self.is_codegen()
    }

    /// Groups of a fused `qkv_proj` (CodeGen's `mp_num`); 0 where q, k and v are apart.
    pub fn qkv_groups(&self) -> usize {
        if self.is_codegen() {
            CODEGEN_QKV_GROUPS
        } else {
            0
        }
    }

    /// Whether the untied LM head has a bias (CodeGen).
    pub fn lm_head_bias(&self) -> bool {
        self.is_codegen()
    }

    /// Whose module names the model's adapters and tensor-parallel plan use.
    pub fn names(&self) -> crate::layout::Names {
        if self.is_codegen() {
            crate::layout::Names::CodeGen
        } else {
            crate::layout::Names::Llama
        }
    }

    /// Whether q/k/v carry a bias.
    pub fn qkv_bias(&self) -> bool {
        // GLM's `attention_bias` defaults to true.
        self.attention_bias.unwrap_or(self.is_glm())
            || self.bias.unwrap_or(false)
            || self.model_type == "qwen2"
    }

    /// Whether the output projection carries a bias (Qwen2 and GLM have q/k/v biases only).
    pub fn o_bias(&self) -> bool {
        (self.attention_bias.unwrap_or(false) && !self.is_glm()) || self.bias.unwrap_or(false)
    }

    /// GLM (`glm`, the ChatGLM line).
    pub fn is_glm(&self) -> bool {
        self.model_type == "glm"
    }

    /// Features of each head that RoPE rotates, and whether it rotates interleaved pairs rather
    /// than halves. GLM rotates `partial_rotary_factor` (default ½) of `head_dim` on interleaved
    /// pairs, CodeGen its `rotary_dim` (`null`: all) on interleaved pairs; the other families
    /// rotate the whole head by halves (their HF attention has no partial rotary).
    pub fn rotary(&self) -> (usize, bool) {
        if self.is_codegen() {
            let dim = self.extra.get("rotary_dim").and_then(Value::as_u64);
            return (dim.map_or(self.head_dim(), |d| d as usize), true);
        }
        if !self.is_glm() {
            return (self.head_dim(), false);
        }
        let factor = (self.rope_parameters.as_ref())
            .and_then(|p| p.get("partial_rotary_factor"))
            .or_else(|| self.extra.get("partial_rotary_factor"))
            .and_then(Value::as_f64)
            .unwrap_or(0.5);
        ((self.head_dim() as f64 * factor) as usize, true)
    }

    /// Whether each attention head's queries and keys pass an RMSNorm before RoPE (Qwen3,
    /// Gemma 3).
    pub fn qk_norm(&self) -> bool {
        matches!(self.model_type.as_str(), "qwen3" | "qwen3_moe") || self.is_gemma3()
    }

    /// The sparse mixture-of-experts block of Mixtral and Qwen3-MoE, if the model has one.
    pub fn moe(&self) -> Result<Option<MoeSpec>> {
        let int = |key: &str| {
            self.extra
                .get(key)
                .and_then(Value::as_u64)
                .map(|v| v as usize)
        };
        let flag = |key: &str| self.extra.get(key).and_then(Value::as_bool);
        let (experts, intermediate, normalize) = match self.model_type.as_str() {
            "mixtral" => (
                int("num_local_experts").unwrap_or(8),
                self.intermediate_size,
                true,
            ),
            "qwen3_moe" => (
                // transformers 5 writes `num_local_experts`, earlier versions `num_experts`.
                int("num_local_experts")
                    .or(int("num_experts"))
                    .unwrap_or(128),
                int("moe_intermediate_size").unwrap_or(768),
                flag("norm_topk_prob").unwrap_or(false),
            ),
            _ => return Ok(None),
        };
        let top_k = int("num_experts_per_tok").unwrap_or(2);
        if top_k == 0 || top_k > experts {
            return Err(LlamaError::Config(format!(
                "num_experts_per_tok {top_k} must be between 1 and the {experts} experts"
            )));
        }
        let jitter = self
            .extra
            .get("router_jitter_noise")
            .and_then(Value::as_f64);
        if jitter.is_some_and(|j| j > 0.0) {
            return Err(LlamaError::Config(
                "`router_jitter_noise` > 0 (random routing noise in training) is not supported"
                    .into(),
            ));
        }
        Ok(Some(MoeSpec {
            experts,
            top_k,
            intermediate,
            normalize,
        }))
    }

    /// The weight of the load-balancing auxiliary loss that training adds (transformers'
    /// `router_aux_loss_coef`, default 0.001), where a mixture of experts sets
    /// `output_router_logits`; `None` otherwise (transformers then adds none).
    pub fn router_aux_loss_coef(&self) -> Result<Option<f64>> {
        let on = self
            .extra
            .get("output_router_logits")
            .and_then(Value::as_bool)
            == Some(true);
        if !on || self.moe()?.is_none() {
            return Ok(None);
        }
        let coef = self
            .extra
            .get("router_aux_loss_coef")
            .and_then(Value::as_f64);
        Ok(Some(coef.unwrap_or(0.001)))
    }

    /// For every layer, whether its feed-forward is the sparse MoE block (Qwen3-MoE keeps
    /// `mlp_only_layers` and the layers off its `decoder_sparse_step` dense).
    pub fn moe_layers(&self) -> Result<Vec<bool>> {
        let n = self.num_hidden_layers;
        if self.moe()?.is_none() {
            return Ok(vec![false; n]);
        }
        if self.model_type != "qwen3_moe" {
            return Ok(vec![true; n]);
        }
        let step = (self.extra.get("decoder_sparse_step"))
            .and_then(Value::as_u64)
            .unwrap_or(1)
            .max(1) as usize;
        let dense: Vec<u64> = (self.extra.get("mlp_only_layers"))
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default();
        Ok((0..n)
            .map(|i| !dense.contains(&(i as u64)) && (i + 1) % step == 0)
            .collect())
    }

    /// Gemma 3 (`gemma3_text`).
    pub fn is_gemma3(&self) -> bool {
        self.model_type == "gemma3_text"
    }

    /// Whether attention and MLP outputs pass their own norm before the residual add (Gemma 3's
    /// sandwich: `x + norm(attn(norm(x)))`).
    pub fn sandwich_norms(&self) -> bool {
        self.is_gemma3()
    }

    /// What every RMSNorm adds to its stored weight (Gemma's `1 + w`).
    pub fn norm_offset(&self) -> f64 {
        if self.is_gemma3() {
            1.0
        } else {
            0.0
        }
    }

    /// The factor on input embeddings (Gemma's `√hidden_size`).
    pub fn embed_scale(&self) -> Option<f64> {
        self.is_gemma3().then(|| (self.hidden_size as f64).sqrt())
    }

    /// The MLP activation.
    pub fn activation(&self) -> Result<Activation> {
        let name = (self.hidden_activation.as_deref())
            .or(self.hidden_act.as_deref())
            .unwrap_or("silu");
        Activation::from_hf(name).ok_or_else(|| {
            LlamaError::Config(format!(
                "hidden_act `{name}` is not supported ({} are)",
                Activation::NAMES.join(", ")
            ))
        })
    }

    /// The attention scale when it is not `head_dim^-½` (Gemma 3's `query_pre_attn_scalar`).
    pub fn attention_scale(&self) -> Option<f64> {
        let scalar = self
            .query_pre_attn_scalar
            .or(self.is_gemma3().then_some(256.0))?;
        (scalar != self.head_dim() as f64).then(|| scalar.powf(-0.5))
    }

    /// For every layer, whether it is a local one (Gemma 3's sliding layers: their own window
    /// and RoPE); all `false` for families whose layers are alike.
    pub fn local_layers(&self) -> Result<Vec<bool>> {
        let n = self.num_hidden_layers;
        if !self.is_gemma3() {
            return Ok(vec![false; n]);
        }
        let Some(types) = &self.layer_types else {
            let pattern = self
                .extra
                .get("sliding_window_pattern")
                .and_then(Value::as_u64)
                .unwrap_or(6) as usize;
            return Ok((0..n).map(|i| (i + 1) % pattern.max(1) != 0).collect());
        };
        if types.len() != n {
            return Err(LlamaError::Config(format!(
                "layer_types lists {} layers but num_hidden_layers is {n}",
                types.len()
            )));
        }
        types
            .iter()
            .map(|t| match t.as_str() {
                SLIDING => Ok(true),
                FULL => Ok(false),
                other => Err(LlamaError::Config(format!(
                    "layer type `{other}` is not supported ({SLIDING}, {FULL} are)"
                ))),
            })
            .collect()
    }

    /// Whether the MLP projections carry a bias (CodeGen's always do).
    pub fn mlp_bias(&self) -> bool {
        self.mlp_bias.unwrap_or(self.is_codegen())
    }

    /// The attention window of every layer (local layers aside), if the model limits how far
    /// back a token looks.
    pub fn window(&self) -> Option<usize> {
        match self.model_type.as_str() {
            "qwen2" | "qwen3" | "qwen3_moe" if !self.use_sliding_window.unwrap_or(false) => None,
            "gemma3_text" => None,
            _ => self.sliding_window,
        }
    }

    /// RoPE base, scaling and window of the local layers (Gemma 3), if the model has any.
    pub fn local_attention(&self) -> Result<Option<(f64, RopeScaling, usize)>> {
        if !self.local_layers()?.contains(&true) {
            return Ok(None);
        }
        let window = self.sliding_window.ok_or_else(|| {
            LlamaError::Config("sliding layers need a `sliding_window`".to_string())
        })?;
        let (theta, scaling) = self.rope_of(Some(SLIDING))?;
        Ok(Some((theta, scaling, window)))
    }

    /// EOS ids (a config may list several).
    pub fn eos_ids(&self) -> Vec<u32> {
        token_ids(self.eos_token_id.as_ref())
    }

    /// BOS id.
    pub fn bos_id(&self) -> Option<u32> {
        token_ids(self.bos_token_id.as_ref()).first().copied()
    }

    /// RoPE base and scaling (of the global layers), from `rope_parameters` (transformers 5) or
    /// `rope_theta` + `rope_scaling` (earlier versions).
    pub fn rope(&self) -> Result<(f64, RopeScaling)> {
        self.rope_of(self.is_gemma3().then_some(FULL))
    }

    /// RoPE of a layer type. Gemma 3 keeps one entry per type in `rope_parameters`; its older
    /// layout has `rope_theta` (+ `rope_scaling`) for full layers and `rope_local_base_freq` for
    /// sliding ones, which never scale.
    fn rope_of(&self, layer_type: Option<&str>) -> Result<(f64, RopeScaling)> {
        let nested = |v: &Value| match layer_type {
            Some(t) => v.get(t).cloned(),
            None => Some(v.clone()),
        };
        let local = layer_type == Some(SLIDING);
        let params = match self.rope_parameters.as_ref() {
            Some(p) => nested(p),
            None if local => None,
            None => self.rope_scaling.clone(),
        };
        let obj = params.as_ref().and_then(Value::as_object);
        let legacy_theta = if local {
            Some(
                self.extra
                    .get("rope_local_base_freq")
                    .and_then(Value::as_f64)
                    .unwrap_or(10000.0),
            )
        } else {
            self.rope_theta
        };
        let default_theta = if self.is_gemma3() { 1e6 } else { 10000.0 };
        let theta = obj
            .and_then(|o| o.get("rope_theta"))
            .and_then(Value::as_f64)
            .or(legacy_theta)
            .unwrap_or(default_theta);
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
            "dynamic" => RopeScaling::Dynamic {
                factor: num("factor")?,
                max_position_embeddings: self.max_position_embeddings,
            },
            other => {
                return Err(LlamaError::Config(format!(
                    "rope type `{other}` is not supported (default, linear, llama3, dynamic are)"
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
            ("intermediate_size", self.ffn_width()),
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
        let (rotary_dim, _) = self.rotary();
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) || rotary_dim > self.head_dim() {
            return bad(format!(
                "RoPE rotates {rotary_dim} features of head_dim {} (partial_rotary_factor): they \
                 must be even, at least 2 and at most head_dim",
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
        self.activation()?;
        if self.is_codegen() {
            if self.tie_word_embeddings {
                return bad(
                    "a CodeGen model with `tie_word_embeddings` (its LM head's bias has no \
                            tied counterpart) is not supported"
                        .into(),
                );
            }
            if self.kv_heads() != self.num_attention_heads {
                return bad(
                    "CodeGen has no grouped-query attention: `num_key_value_heads` must \
                            equal n_head"
                        .into(),
                );
            }
            if !self.num_attention_heads.is_multiple_of(CODEGEN_QKV_GROUPS) {
                return bad(format!(
                    "n_head {} is not a multiple of the {CODEGEN_QKV_GROUPS} groups CodeGen's \
                     qkv_proj is laid out in",
                    self.num_attention_heads
                ));
            }
        }
        for key in ["final_logit_softcapping", "attn_logit_softcapping"] {
            if self.extra.get(key).is_some_and(|v| !v.is_null()) {
                return bad(format!(
                    "`{key}` (Gemma 2's logit soft-capping) is not supported"
                ));
            }
        }
        if self.extra.get("use_bidirectional_attention") == Some(&Value::Bool(true)) {
            return bad(
                "`use_bidirectional_attention` is not supported (causal models only)".into(),
            );
        }
        self.local_attention()?;
        self.moe_layers()?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn codegen(heads: usize, extra: &str) -> std::result::Result<LlamaConfig, String> {
        let text = format!(
            r#"{{"model_type": "codegen", "architectures": ["CodeGenForCausalLM"], "vocab_size": 10,
               "n_embd": 48, "n_layer": 2, "n_head": {heads}, "n_inner": null, "n_positions": 32,
               "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "rotary_dim": 4{extra}}}"#
        );
        let config: LlamaConfig = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }

    #[test]
    fn codegen_reads_and_writes_its_own_keys() {
        let c = codegen(8, "").unwrap();
        assert_eq!(
            (c.hidden_size, c.num_hidden_layers, c.num_attention_heads),
            (48, 2, 8)
        );
        // n_inner null: 4 · n_embd.
        assert_eq!(c.ffn_width(), 192);
        assert_eq!((c.max_position_embeddings, c.rms_norm_eps), (32, 1e-5));
        assert_eq!(c.rotary(), (4, true));
        assert_eq!(c.activation().unwrap(), Activation::GeluTanh);
        assert!(c.layer_norm() && c.parallel_block() && !c.gated_mlp() && c.lm_head_bias());
        assert_eq!(
            (c.qkv_groups(), c.mlp_bias(), c.qkv_bias()),
            (4, true, false)
        );
        let json = c.to_json().unwrap();
        for (ours, theirs) in CODEGEN_KEYS {
            assert!(json.get(ours).is_none(), "{ours} written");
            assert!(json.get(theirs).is_some(), "{theirs} missing");
        }
        assert_eq!(json["n_inner"], Value::Null);
        assert_eq!(json["n_embd"], 48);
        let back: LlamaConfig = serde_json::from_value(json).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn codegen_refuses_what_it_cannot_build() {
        let err = codegen(8, r#", "tie_word_embeddings": true"#).unwrap_err();
        assert!(err.contains("tie_word_embeddings"), "{err}");
        let err = codegen(8, r#", "num_key_value_heads": 2"#).unwrap_err();
        assert!(err.contains("num_key_value_heads"), "{err}");
        // 6 heads of 8 features: valid attention, but not in CodeGen's 4 qkv groups.
        let err = codegen(6, "").unwrap_err();
        assert!(
            err.contains("n_head 6") && err.contains("4 groups"),
            "{err}"
        );
    }
}
