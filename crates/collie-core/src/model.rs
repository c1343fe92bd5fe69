//! The model contract: what the trainer, the block-wise backward (LOMO, activation
//! checkpointing), pipeline stages, tensor parallelism, PEFT and checkpoints need from a model
//! family — and nothing else.
//!
//! A decoder is a sequence of blocks: the embedding stage ([`BlockModel::embed`] plus the
//! prompt-learning slot), the [`BlockModel::layers`], then the [`BlockModel::head`] (final norm +
//! LM head). A [`BlockModel::Context`] (RoPE tables, the attention mask) is computed once per call
//! and shared by every layer, so a caller can drive the blocks one at a time. The linear layers
//! are listed by [`Adaptable::linears_mut`] with their HF module names and tensor-parallel layout:
//! that one table drives PEFT targeting, tensor-parallel sharding and HF naming.

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use crate::attention::AttentionKind;
use crate::lm::CausalLm;
use crate::nn::{Adaptable, Embedding};
use crate::router::RouterLog;

/// Keys and values of the past positions of one layer (`[batch, kv_heads, past, head_dim]`
/// each), or nothing yet.
pub type KvSlot<B> = Option<(Tensor<B, 4>, Tensor<B, 4>)>;

/// One decoder layer.
pub trait DecoderLayer<B: Backend>: Module<B> + Clone {
    /// What every layer of a call shares (RoPE tables, mask).
    type Context;

    /// The layer on `x`; `cache` holds the layer's past keys and values (decoding, prefix
    /// tuning) and is extended with the new ones.
    ///
    /// # Shapes
    /// - x: `[batch, s_q, hidden]` → same
    fn forward(
        &self,
        x: Tensor<B, 3>,
        ctx: &Self::Context,
        cache: Option<&mut KvSlot<B>>,
    ) -> Tensor<B, 3>;
}

/// The last block: final norm and projection to the vocabulary.
pub trait LmHead<B: Backend>: Module<B> + Clone {
    /// Logits of the hidden states `x`; a tied head projects with the input embedding's table.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]` → `[batch, seq, vocab]` (this rank's vocabulary columns under
    ///   tensor parallelism)
    fn forward(&self, x: Tensor<B, 3>, embed: &Embedding<B>) -> Tensor<B, 3>;

    /// Whether the projection is the input embedding's table (no weights of its own).
    fn is_tied(&self) -> bool;
}

/// A family's configuration (HF's `config.json`): the sizes generic code reads.
pub trait ModelConfig: Clone + std::fmt::Debug + Send + Sync + 'static {
    /// HF `model_type`.
    fn model_type(&self) -> &str;
    /// Rows of the input embedding.
    fn vocab_size(&self) -> usize;
    /// Width of the residual stream.
    fn hidden_size(&self) -> usize;
    /// Decoder layers.
    fn num_layers(&self) -> usize;
    /// Query heads.
    fn num_heads(&self) -> usize;
    /// Width of one head.
    fn head_dim(&self) -> usize;
    /// Whether the LM head is the embedding table.
    fn tie_word_embeddings(&self) -> bool;
    /// End-of-sequence token ids (`eos_token_id`, a number or a list).
    fn eos_ids(&self) -> Vec<u32>;
    /// Padding token id, if the config names one.
    fn pad_id(&self) -> Option<u32>;
}

/// The block contract every model family implements.
pub trait BlockModel<B: Backend>: Module<B> + Adaptable<B> + CausalLm<B> + Clone + Send {
    /// The family's `config.json`.
    type Config: ModelConfig;
    /// One decoder layer.
    type Layer: DecoderLayer<B, Context = Self::Context>;
    /// Final norm + LM head.
    type Head: LmHead<B>;
    /// Per-call inputs shared by the layers.
    type Context: Clone;

    /// The input embedding (its table is also the LM head when tied).
    fn embed(&self) -> &Embedding<B>;
    /// The input embedding, mutably.
    fn embed_mut(&mut self) -> &mut Embedding<B>;
    /// The decoder layers.
    fn layers(&self) -> &[Self::Layer];
    /// The decoder layers, mutably.
    fn layers_mut(&mut self) -> &mut [Self::Layer];
    /// The head block.
    fn head(&self) -> &Self::Head;
    /// The head block, mutably.
    fn head_mut(&mut self) -> &mut Self::Head;

    /// Embeddings of `ids` as the first layer reads them (a family's embedding scale applied;
    /// virtual tokens are not: callers prepend them).
    ///
    /// # Shapes
    /// - ids: `[batch, seq]` → `[batch, seq, hidden]`
    fn embed_tokens(embed: &Embedding<B>, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        embed.forward(ids)
    }

    /// The [`Self::Context`] of `s_q` new tokens after `past` slots that already hold keys.
    ///
    /// `segments` covers the real tokens of all `past + s_q` slots: an HF attention mask (`1` =
    /// token, `0` = padding) or the document ids of packed rows; `positions` (of the new tokens)
    /// default to counting real tokens. Virtual tokens (prompt learning) are accounted for.
    ///
    /// # Shapes
    /// - segments: `[batch, past + s_q]`, positions: `[batch, s_q]`
    fn context(
        &self,
        batch: usize,
        s_q: usize,
        past: usize,
        segments: Option<&Tensor<B, 2, Int>>,
        positions: Option<Tensor<B, 2, Int>>,
        device: &B::Device,
    ) -> Self::Context;

    /// A fresh [`RouterLog`] attached to `ctx`, so that the mixture-of-experts layers run with
    /// that context record their routing for the load-balancing loss; `None` (the default) when
    /// the model adds no such loss. Its real tokens are the non-padding ones of `segments`
    /// (`[batch, seq]`, as [`BlockModel::context`] takes them) and prompt tuning's virtual tokens.
    fn log_routing(
        &self,
        ctx: &mut Self::Context,
        segments: &Tensor<B, 2, Int>,
    ) -> Option<std::sync::Arc<RouterLog<B>>> {
        let _ = (ctx, segments);
        None
    }

    /// The attention implementation every layer runs.
    fn set_attention(&mut self, kind: AttentionKind);

    /// Config keys and the sizes that a tensor-parallel degree must divide (heads, key/value
    /// heads, intermediate size, vocabulary), for a clear error naming the key.
    fn tp_divisible(&self) -> Vec<(&'static str, usize)>;

    /// Divides (`split`) or multiplies back the per-rank head counts after the linear layers of
    /// the table were split over `tp` ranks.
    fn scale_heads(&mut self, tp: usize, split: bool);
}

/// Parameters of the embedding stage, each decoder layer and the head, in block order (the
/// pipeline partition weighs stages by them).
pub fn block_params<B: Backend, M: BlockModel<B>>(model: &M) -> Vec<usize> {
    let mut params = vec![lazy_num_params(model.embed())];
    params.extend(model.layers().iter().map(lazy_num_params));
    params.push(lazy_num_params(model.head()));
    params
}

/// Burn's `num_params` without reading any lazy parameter (a model being loaded stays unread).
pub fn lazy_num_params<B: Backend, M: Module<B>>(module: &M) -> usize {
    struct Count(usize);
    impl<B: Backend> burn::module::ModuleVisitor<B> for Count {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
            self.0 += param.lazy_shape().num_elements();
        }
    }
    let mut count = Count(0);
    module.visit(&mut count);
    count.0
}
