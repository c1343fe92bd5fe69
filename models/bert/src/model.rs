//! The BERT encoder: `BertConfig` → `init` → [`Bert`] → `forward` (hidden states), plus
//! [`pool`] (`cls` / `mean`) and [`normalize`].
//!
//! Post-LN layers as in Devlin et al. 2019 and HF's `BertModel`: `x = LN(x + attn(x))`,
//! `x = LN(x + W₂·gelu(W₁·x))`, exact (erf) GELU, padding keys hidden from every query. Dropout
//! (hidden states and attention probabilities) acts only where gradients are recorded, as
//! `model.train()` in PyTorch.

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use collie_core::attention::{batched_matmul, swap_seq_heads};
use collie_core::nn::{
    dropout, gelu, Embedding, EmbeddingConfig, Linear, LinearConfig, Norm, NormConfig,
};

use crate::config::BertConfig;
use crate::error::Result;

/// Word, position and token-type embeddings, summed and normalized.
#[derive(Module, Debug)]
pub struct Embeddings<B: Backend> {
    /// `[vocab, hidden]`.
    pub word: Embedding<B>,
    /// `[max_positions, hidden]`.
    pub position: Embedding<B>,
    /// `[type_vocab, hidden]`.
    pub token_type: Embedding<B>,
    /// LayerNorm after the sum.
    pub norm: Norm<B>,
}

/// Multi-head self-attention with its output projection and post-LN residual.
#[derive(Module, Debug)]
pub struct SelfAttention<B: Backend> {
    /// `[hidden, hidden]`.
    pub query: Linear<B>,
    /// `[hidden, hidden]`.
    pub key: Linear<B>,
    /// `[hidden, hidden]`.
    pub value: Linear<B>,
    /// `[hidden, hidden]` (HF `attention.output.dense`).
    pub output: Linear<B>,
    /// HF `attention.output.LayerNorm`.
    pub norm: Norm<B>,
    /// Heads.
    pub n_heads: usize,
}

/// One encoder layer.
#[derive(Module, Debug)]
pub struct EncoderLayer<B: Backend> {
    /// Self-attention block.
    pub attn: SelfAttention<B>,
    /// `[hidden, intermediate]` (HF `intermediate.dense`).
    pub intermediate: Linear<B>,
    /// `[intermediate, hidden]` (HF `output.dense`).
    pub output: Linear<B>,
    /// HF `output.LayerNorm`.
    pub norm: Norm<B>,
}

/// A BERT-family encoder (no pooler: UDR and sentence-transformers pool the hidden states).
#[derive(Module, Debug)]
pub struct Bert<B: Backend> {
    /// Input embeddings.
    pub embeddings: Embeddings<B>,
    /// Encoder layers.
    pub layers: Vec<EncoderLayer<B>>,
    /// Dropout on hidden states (training only).
    pub hidden_dropout: f64,
    /// Dropout on attention probabilities (training only).
    pub attn_dropout: f64,
}

/// How a sequence of hidden states becomes one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pooling {
    /// The hidden state at position 0 (`[CLS]`): DPR / UDR.
    Cls,
    /// The mean over real (non-padding) tokens: sentence-transformers.
    #[default]
    Mean,
}

impl std::str::FromStr for Pooling {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cls" => Ok(Pooling::Cls),
            "mean" => Ok(Pooling::Mean),
            other => Err(format!("pooling `{other}`: expected cls or mean")),
        }
    }
}

impl BertConfig {
    /// Builds the encoder with lazily initialized weights (normal(0, initializer_range) for
    /// matrices and embeddings, zeros for biases, ones for norms).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<Bert<B>> {
        self.validate()?;
        let (d, std) = (self.hidden_size, self.initializer_range);
        let linear = |i: usize, o: usize| {
            LinearConfig::new(i, o)
                .with_bias(true)
                .with_init_std(std)
                .init(device)
        };
        let norm = || {
            NormConfig::new(d)
                .with_layer_norm(true)
                .with_eps(self.layer_norm_eps)
                .init(device)
        };
        let embedding = |n: usize| EmbeddingConfig::new(n, d).with_init_std(std).init(device);
        Ok(Bert {
            embeddings: Embeddings {
                word: embedding(self.vocab_size),
                position: embedding(self.max_position_embeddings),
                token_type: embedding(self.type_vocab_size),
                norm: norm(),
            },
            layers: (0..self.num_hidden_layers)
                .map(|_| EncoderLayer {
                    attn: SelfAttention {
                        query: linear(d, d),
                        key: linear(d, d),
                        value: linear(d, d),
                        output: linear(d, d),
                        norm: norm(),
                        n_heads: self.num_attention_heads,
                    },
                    intermediate: linear(d, self.intermediate_size),
                    output: linear(self.intermediate_size, d),
                    norm: norm(),
                })
                .collect(),
            hidden_dropout: self.hidden_dropout_prob,
            attn_dropout: self.attention_probs_dropout_prob,
        })
    }
}

impl<B: Backend> SelfAttention<B> {
    /// # Shapes
    /// - x: `[batch, seq, hidden]`, hidden_keys: `[batch, 1, 1, seq]` (`true` = padding) → same as x
    fn forward(
        &self,
        x: Tensor<B, 3>,
        hidden_keys: &Tensor<B, 4, burn::tensor::Bool>,
        p_attn: f64,
        p_hidden: f64,
    ) -> Tensor<B, 3> {
        let [b, s, d] = x.dims();
        let (h, hd) = (self.n_heads, d / self.n_heads);
        // [batch, seq, hidden] -> [batch, seq, heads, head_dim] -> [batch, heads, seq, head_dim]
        let split = |t: Tensor<B, 3>| swap_seq_heads(t.reshape([b, s, h, hd]));
        let q = split(self.query.forward(x.clone()));
        let k = split(self.key.forward(x.clone()));
        let v = split(self.value.forward(x.clone()));
        // [batch, heads, seq, seq]; the padding keys hidden (one mask row for every query)
        let scores = batched_matmul(q, k.swap_dims(2, 3));
        let scale = 1.0 / (hd as f64).sqrt();
        let probs = collie_core::attention::masked_softmax(scores, Some(hidden_keys), scale);
        let probs = dropout(probs, p_attn);
        // [batch, heads, seq, head_dim] -> [batch, seq, hidden]
        let o = swap_seq_heads(batched_matmul(probs, v)).reshape([b, s, d]);
        self.norm
            .forward(x + dropout(self.output.forward(o), p_hidden))
    }
}

impl<B: Backend> Bert<B> {
    /// Last hidden states.
    ///
    /// # Shapes
    /// - ids, mask (`1` = token, `0` = padding): `[batch, seq]` → `[batch, seq, hidden]`
    pub fn forward(&self, ids: Tensor<B, 2, Int>, mask: &Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [b, s] = ids.dims();
        let device = ids.device();
        let positions = Tensor::<B, 1, Int>::arange(0..s as i64, &device)
            .reshape([1, s])
            .expand([b, s]);
        let types = Tensor::<B, 2, Int>::zeros([b, s], &device);
        let e = &self.embeddings;
        let x = e.word.forward(ids) + e.position.forward(positions) + e.token_type.forward(types);
        let mut x = dropout(e.norm.forward(x), self.hidden_dropout);
        // [batch, seq] -> [batch, 1, 1, seq]: padding keys are hidden from every query.
        let hidden_keys = mask.clone().equal_elem(0).reshape([b, 1, 1, s]);
        for layer in &self.layers {
            x = layer
                .attn
                .forward(x, &hidden_keys, self.attn_dropout, self.hidden_dropout);
            let ff = layer
                .output
                .forward(gelu(layer.intermediate.forward(x.clone())));
            x = layer.norm.forward(x + dropout(ff, self.hidden_dropout));
        }
        x
    }

    /// Pooled sentence vectors.
    ///
    /// # Shapes
    /// - ids, mask: `[batch, seq]` → `[batch, hidden]`
    pub fn embed(
        &self,
        ids: Tensor<B, 2, Int>,
        mask: &Tensor<B, 2, Int>,
        pooling: Pooling,
    ) -> Tensor<B, 2> {
        pool(self.forward(ids, mask), mask, pooling)
    }
}

/// Pools hidden states into one vector per sequence.
///
/// # Shapes
/// - hidden: `[batch, seq, d]`, mask: `[batch, seq]` → `[batch, d]`
pub fn pool<B: Backend>(
    hidden: Tensor<B, 3>,
    mask: &Tensor<B, 2, Int>,
    pooling: Pooling,
) -> Tensor<B, 2> {
    let [b, s, d] = hidden.dims();
    match pooling {
        // [batch, 1, d] -> [batch, d]
        Pooling::Cls => hidden.slice([0..b, 0..1, 0..d]).reshape([b, d]),
        Pooling::Mean => {
            // [batch, seq] -> [batch, seq, 1]
            let m = mask.clone().float().reshape([b, s, 1]);
            let count = m.clone().sum_dim(1).clamp_min(1e-9).reshape([b, 1]);
            (hidden * m).sum_dim(1).reshape([b, d]) / count
        }
    }
}

/// Rows scaled to unit L2 norm (`torch.nn.functional.normalize`, eps 1e-12).
///
/// # Shapes
/// - x: `[batch, d]` → same
pub fn normalize<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let norm = x.clone().square().sum_dim(1).sqrt().clamp_min(1e-12);
    x / norm
}
