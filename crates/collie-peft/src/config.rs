//! The `[peft]` section of a run config, with peft's defaults where it is silent.

use serde::{Deserialize, Serialize};

use crate::error::{PeftError, Result};

/// Which method, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeftKind {
    /// Full fine-tuning.
    #[default]
    None,
    /// Low-rank adapters on linear layers.
    Lora,
    /// Learned per-layer key/value prefixes.
    Prefix,
    /// Learned input embeddings in front of the sequence.
    Prompt,
    /// Prompt tuning with peft's MLP prompt encoder.
    Ptuning,
    /// Learned rescaling vectors.
    Ia3,
}

impl PeftKind {
    /// The name `peft.kind` uses.
    pub fn name(self) -> &'static str {
        match self {
            PeftKind::None => "none",
            PeftKind::Lora => "lora",
            PeftKind::Prefix => "prefix",
            PeftKind::Prompt => "prompt",
            PeftKind::Ptuning => "ptuning",
            PeftKind::Ia3 => "ia3",
        }
    }

    /// peft's `peft_type` string.
    pub fn peft_type(self) -> &'static str {
        match self {
            PeftKind::None => "NONE",
            PeftKind::Lora => "LORA",
            PeftKind::Prefix => "PREFIX_TUNING",
            PeftKind::Prompt => "PROMPT_TUNING",
            PeftKind::Ptuning => "P_TUNING",
            PeftKind::Ia3 => "IA3",
        }
    }

    /// The kind of a peft `peft_type`.
    pub fn from_peft_type(s: &str) -> Option<Self> {
        Some(match s {
            "LORA" => PeftKind::Lora,
            "PREFIX_TUNING" => PeftKind::Prefix,
            "PROMPT_TUNING" => PeftKind::Prompt,
            "P_TUNING" => PeftKind::Ptuning,
            "IA3" => PeftKind::Ia3,
            _ => return None,
        })
    }

    /// Whether the method learns virtual tokens rather than adapting layers.
    pub fn is_prompt_learning(self) -> bool {
        matches!(
            self,
            PeftKind::Prefix | PeftKind::Prompt | PeftKind::Ptuning
        )
    }
}

/// Which linear layers get an adapter, as peft's `target_modules`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// A layer matches when its HF module name equals an entry or ends with `.entry`.
    Names(Vec<String>),
    /// `"all-linear"` (every linear layer but the output layer), or a regular expression the
    /// whole module name must match.
    Pattern(String),
}

/// How prompt tuning initializes its virtual tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptInit {
    /// Standard normal, as `nn.Embedding`.
    #[default]
    Random,
    /// Embeddings of `prompt_init_text`'s tokens, repeated or cut to `num_virtual_tokens`.
    Text,
    /// Embeddings of tokens drawn uniformly from the vocabulary.
    SampleVocab,
}

/// `[peft]`: the method and its options (peft's names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeftConfig {
    /// `none`, `lora`, `prefix`, `prompt`, `ptuning` or `ia3`.
    #[serde(default)]
    pub kind: PeftKind,
    /// LoRA/IA3 layers (default: `q_proj`, `v_proj` for LoRA; `k_proj`, `v_proj`, `down_proj`
    /// for IA3, peft's LLaMA defaults).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_modules: Option<TargetModules>,
    /// LoRA rank.
    #[serde(default = "default_r")]
    pub r: usize,
    /// LoRA alpha (scaling `alpha / r`).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// LoRA dropout on the adapter input.
    #[serde(default)]
    pub dropout: f64,
    /// rsLoRA scaling `alpha / sqrt(r)`.
    #[serde(default)]
    pub use_rslora: bool,
    /// IA3: layers whose *input* is scaled (default `down_proj`); must be among the targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feedforward_modules: Option<Vec<String>>,
    /// Virtual tokens of prefix / prompt / P-tuning.
    #[serde(default = "default_virtual_tokens")]
    pub num_virtual_tokens: usize,
    /// Prefix tuning: reparameterize the prefix through an MLP (peft's `prefix_projection`).
    #[serde(default)]
    pub prefix_projection: bool,
    /// Hidden width of the prefix projection / P-tuning encoder (default: the token width).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_hidden_size: Option<usize>,
    /// P-tuning encoder: `MLP` (peft's LSTM encoder is not provided).
    #[serde(default = "default_encoder_type")]
    pub encoder_reparameterization_type: String,
    /// Prompt tuning initialization.
    #[serde(default)]
    pub prompt_init: PromptInit,
    /// Text for `prompt_init = "text"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_init_text: Option<String>,
    /// Start from this adapter (a peft adapter directory or a collie-rs PEFT checkpoint) instead
    /// of a fresh initialization.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_virtual_tokens() -> usize {
    20
}
fn default_encoder_type() -> String {
    "MLP".into()
}

impl Default for PeftConfig {
    fn default() -> Self {
        PeftConfig {
            kind: PeftKind::None,
            target_modules: None,
            r: default_r(),
            alpha: default_alpha(),
            dropout: 0.0,
            use_rslora: false,
            feedforward_modules: None,
            num_virtual_tokens: default_virtual_tokens(),
            prefix_projection: false,
            encoder_hidden_size: None,
            encoder_reparameterization_type: default_encoder_type(),
            prompt_init: PromptInit::Random,
            prompt_init_text: None,
            adapter: None,
        }
    }
}

impl PeftConfig {
    /// A config of `kind` with the defaults.
    pub fn new(kind: PeftKind) -> Self {
        PeftConfig {
            kind,
            ..Default::default()
        }
    }

    /// Whether a method is selected.
    pub fn enabled(&self) -> bool {
        self.kind != PeftKind::None
    }

    /// The target modules, or the method's LLaMA default.
    pub fn targets(&self) -> TargetModules {
        self.target_modules.clone().unwrap_or_else(|| {
            let names: &[&str] = match self.kind {
                PeftKind::Ia3 => &["k_proj", "v_proj", "down_proj"],
                _ => &["q_proj", "v_proj"],
            };
            TargetModules::Names(names.iter().map(|s| s.to_string()).collect())
        })
    }

    /// IA3's feed-forward modules, or peft's LLaMA default.
    pub fn feedforward(&self) -> Vec<String> {
        self.feedforward_modules
            .clone()
            .unwrap_or_else(|| vec!["down_proj".into()])
    }

    /// LoRA's scaling factor.
    pub fn lora_scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Checks the options of the selected method; errors name the `peft.` key at fault.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, msg: String| Err(PeftError::Config(format!("peft.{key}: {msg}")));
        match self.kind {
            PeftKind::None => {}
            PeftKind::Lora => {
                if self.r == 0 {
                    return bad("r", "the LoRA rank must be at least 1 (got 0)".into());
                }
                if !(0.0..1.0).contains(&self.dropout) {
                    return bad(
                        "dropout",
                        format!("must be in [0, 1), got {}", self.dropout),
                    );
                }
                if !self.alpha.is_finite() {
                    return bad("alpha", format!("must be finite, got {}", self.alpha));
                }
            }
            PeftKind::Ia3 => {}
            PeftKind::Prefix | PeftKind::Prompt | PeftKind::Ptuning => {
                if self.num_virtual_tokens == 0 {
                    return bad("num_virtual_tokens", "must be at least 1 (got 0)".into());
                }
                if self.encoder_hidden_size == Some(0) {
                    return bad("encoder_hidden_size", "must be at least 1 (got 0)".into());
                }
                if self.kind == PeftKind::Ptuning && self.encoder_reparameterization_type != "MLP" {
                    return bad(
                        "encoder_reparameterization_type",
                        format!(
                            "`{}` is not available; use \"MLP\" (peft's recommended encoder)",
                            self.encoder_reparameterization_type
                        ),
                    );
                }
                if self.kind == PeftKind::Prompt
                    && self.prompt_init == PromptInit::Text
                    && self.prompt_init_text.as_deref().is_none_or(str::is_empty)
                {
                    return bad(
                        "prompt_init_text",
                        "prompt_init = \"text\" needs the text to initialize from".into(),
                    );
                }
            }
        }
        if let Some(TargetModules::Pattern(p)) = &self.target_modules {
            if p != "all-linear" {
                regex::Regex::new(p).map_err(|e| {
                    PeftError::Config(format!("peft.target_modules: invalid regex `{p}`: {e}"))
                })?;
            }
        }
        Ok(())
    }
}
