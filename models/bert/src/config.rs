//! `BertConfig`: HF's `config.json` for BERT-family encoders, as serde sees it.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{BertError, Result};

/// Mirror of HF `config.json` for `BertModel` checkpoints (BERT, MiniLM, …). Unknown keys are
/// kept in `extra`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BertConfig {
    /// `bert`.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Rows of the word embedding.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Feed-forward activation; `gelu` is the exact (erf) GELU.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Rows of the position embedding (the longest input).
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Rows of the token-type embedding.
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Dropout on hidden states during training.
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    /// Dropout on attention probabilities during training.
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    /// Padding token id.
    #[serde(default)]
    pub pad_token_id: u32,
    /// Standard deviation of the normal initialization.
    #[serde(default = "default_init")]
    pub initializer_range: f64,
    /// Everything else in `config.json`.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn default_model_type() -> String {
    "bert".into()
}
fn default_act() -> String {
    "gelu".into()
}
fn default_max_pos() -> usize {
    512
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_dropout() -> f64 {
    0.1
}
fn default_init() -> f64 {
    0.02
}

impl BertConfig {
    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Checks that this crate can build the model.
    pub fn validate(&self) -> Result<()> {
        if self.model_type != "bert" {
            return Err(BertError::Config(format!(
                "model_type `{}`: this encoder runs BERT-family checkpoints (model_type bert)",
                self.model_type
            )));
        }
        if self.hidden_act != "gelu" {
            return Err(BertError::Config(format!(
                "hidden_act `{}`: only the exact GELU (`gelu`) is implemented",
                self.hidden_act
            )));
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(BertError::Config(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if let Some(p) = self
            .extra
            .get("position_embedding_type")
            .and_then(Value::as_str)
            .filter(|p| *p != "absolute")
        {
            return Err(BertError::Config(format!(
                "position_embedding_type `{p}`: only `absolute` is implemented"
            )));
        }
        Ok(())
    }
}
