//! Layers every collie-rs model is built from.
//!
//! Models use these instead of `burn::nn` equivalents because PEFT and tensor parallelism transform
//! them from outside: a [`Linear`] carries an optional [`Adapter`] (LoRA pair or IA3 vector) and a
//! [`ParallelMode`], so `collie_peft::apply` and `collie_core::tp` never touch model code.
//! A model exposes those slots through [`Adaptable`]; its optional [`VirtualTokens`] are the slot
//! of the prompt-learning methods.

mod activation;
mod adapter;
mod dropout;
mod embedding;
mod linear;
mod norm;
mod prompt;
pub mod quant;

pub use activation::{gelu, gelu_tanh, Activation};
pub use adapter::{Adapter, Ia3Adapter, LoraAdapter};
pub use dropout::dropout;
pub use embedding::VocabShard;
pub use embedding::{Embedding, EmbeddingConfig};
pub use linear::{matmul_2d, Linear, LinearConfig, ParallelMode};
pub use norm::{Norm, NormConfig};
pub use prompt::{EncoderActivation, VirtualTarget, VirtualTokens};
pub use quant::{BlockFormat, QuantBlocks, QuantWeight};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

/// `x` in `dtype`; no operation (and no autodiff node) when it already is.
pub fn to_dtype<B: Backend, const D: usize>(x: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if x.dtype() == dtype {
        x
    } else {
        x.cast(dtype)
    }
}

/// Sizes a transform needs to build parts that fit a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelDims {
    /// Decoder layers.
    pub layers: usize,
    /// Width of the residual stream (and of the input embeddings).
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
    /// Rows of the input embedding.
    pub vocab: usize,
}

/// One linear layer of a model as its linear-layer table lists it.
pub struct LinearSlot<'a, B: Backend> {
    /// HF module name (`model.layers.0.self_attn.q_proj`, `lm_head`).
    pub name: String,
    /// Layout under tensor parallelism (Megatron's plan; `Full`: replicated on every rank).
    pub parallel: ParallelMode,
    /// The layer.
    pub linear: &'a mut Linear<B>,
}

/// A model whose layers PEFT (and tensor parallelism) address from outside, by the module names
/// of its HF checkpoint, so the transforms never touch model code.
pub trait Adaptable<B: Backend> {
    /// The linear-layer table: every linear layer under its HF module name
    /// (`model.layers.0.self_attn.q_proj`, `lm_head`) with its tensor-parallel layout, in model
    /// order. A tied LM head is not a layer and is not listed. PEFT targeting, tensor-parallel
    /// sharding and HF naming all read this one table.
    fn linears_mut(&mut self) -> Vec<LinearSlot<'_, B>>;

    /// [`Adaptable::linears_mut`] as `(HF module name, layer)` pairs.
    fn named_linears(&mut self) -> Vec<(String, &mut Linear<B>)> {
        self.linears_mut()
            .into_iter()
            .map(|s| (s.name, s.linear))
            .collect()
    }

    /// HF module name of the output layer (peft's `all-linear` leaves it out).
    fn output_layer_name(&self) -> &'static str {
        "lm_head"
    }

    /// Whole (unsplit) parameters applied inside the tensor-parallel region, per attention head
    /// (Qwen3's query/key norms): under tensor parallelism each rank sees only its heads, so
    /// their gradients are partial sums over the group.
    fn head_local_params(&self) -> Vec<burn::module::ParamId> {
        Vec::new()
    }

    /// The slot for virtual tokens (prompt learning).
    fn virtual_tokens_mut(&mut self) -> &mut Option<VirtualTokens<B>>;

    /// The virtual tokens, if any.
    fn virtual_tokens(&self) -> Option<&VirtualTokens<B>>;

    /// The model's sizes.
    fn dims(&self) -> ModelDims;

    /// The input embedding table (prompt initialization from text or vocabulary samples).
    fn input_embedding(&self) -> &Embedding<B>;
}
