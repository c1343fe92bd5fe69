//! The LLaMA-family decoder: `LlamaConfig` → `init` → [`Llama`] → `forward`.
//!
//! The model is a sequence of blocks (the block contract, docs/architecture.md): [`Llama::embed`], then
//! [`Llama::layers`], then [`Llama::head`] (final norm + LM head). A [`BlockContext`] (RoPE tables
//! and mask) is computed once per call and shared by every block, so block-wise backward,
//! activation checkpointing and pipeline stages can drive the blocks one at a time.

use std::sync::Arc;

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use collie_core::attention::{
    attention, positions_from_padding, swap_seq_heads, AttentionKind, AttnMask,
};
use collie_core::lm::RowCache;
use collie_core::model::{BlockModel, DecoderLayer, KvSlot, LmHead};
use collie_core::nn::ParallelMode::{Column, ColumnParts, Full, Row};
use collie_core::nn::{
    Activation, Embedding, EmbeddingConfig, Linear, LinearConfig, Norm, NormConfig, ParallelMode,
    VirtualTarget, VirtualTokens,
};
use collie_core::rope::{apply_rotary_heads, Rope};
use collie_core::router::RouterLog;

use crate::config::LlamaConfig;
use crate::error::Result;
use crate::layout::Names;
use crate::moe::SparseMoe;

/// Self-attention with RoPE and grouped-query heads.
///
/// Queries, keys and values come from three layers, or from one (`qkv_proj`) where the
/// checkpoint fuses them (CodeGen): kept fused, that layer is what PEFT adapts under the
/// checkpoint's own module name.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// `[hidden, heads · head_dim]`; `None` with a fused `qkv_proj`.
    pub q_proj: Option<Linear<B>>,
    /// `[hidden, kv_heads · head_dim]`; `None` with a fused `qkv_proj`.
    pub k_proj: Option<Linear<B>>,
    /// `[hidden, kv_heads · head_dim]`; `None` with a fused `qkv_proj`.
    pub v_proj: Option<Linear<B>>,
    /// CodeGen's `[hidden, 3 · heads · head_dim]`: `qkv_groups` groups (its `mp_num`), each
    /// the queries, then the values, then the keys of `heads / qkv_groups` consecutive heads.
    /// The groups are contiguous, so tensor parallelism splits the layer as one column layer
    /// when its ranks divide the groups.
    pub qkv_proj: Option<Linear<B>>,
    /// Groups of `qkv_proj` on this rank (0 without it).
    pub qkv_groups: usize,
    /// `[heads · head_dim, hidden]`.
    pub o_proj: Linear<B>,
    /// Query heads (local to this rank under tensor parallelism).
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// RMSNorm over each query head's `head_dim` features before RoPE (Qwen3).
    pub q_norm: Option<Norm<B>>,
    /// RMSNorm over each key head's `head_dim` features before RoPE (Qwen3).
    pub k_norm: Option<Norm<B>>,
    /// Factor on the scores other than `head_dim^-½` (Gemma 3's `query_pre_attn_scalar^-½`).
    #[module(skip)]
    pub scale: Option<f64>,
}

/// Gated feed-forward: `down(act(gate(x)) · up(x))` (SwiGLU with `silu`, GeGLU with GELU), or
/// without a gate `down(act(up(x)))` (CodeGen's `fc_in` / `fc_out`).
///
/// Gate and up are two layers, or one (`gate_up_proj`) where the checkpoint fuses them (GLM):
/// kept fused, that layer is what PEFT adapts under the checkpoint's own module name.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// `[hidden, intermediate]`; `None` in a fused or ungated MLP.
    pub gate_proj: Option<Linear<B>>,
    /// `[hidden, intermediate]`; `None` in a fused MLP.
    pub up_proj: Option<Linear<B>>,
    /// `[hidden, 2 · intermediate]`: the gate's outputs, then the up projection's (GLM);
    /// tensor parallelism splits each half on its own (`ColumnParts(2)`).
    pub gate_up_proj: Option<Linear<B>>,
    /// `[intermediate, hidden]`.
    pub down_proj: Linear<B>,
    /// The gate's activation.
    #[module(skip)]
    pub act: Activation,
}

/// Every module of a decoder block with weights: our path, HF's name under `model.layers.N.`,
/// llama.cpp's under `blk.N.`, and the tensor-parallel layout (Megatron's: q/k/v and gate/up
/// split their outputs, o and down their inputs; norms stay whole). The one table that HF and
/// GGUF naming, PEFT targeting and tensor parallelism read.
///
/// HF reuses one name: in a sandwich-norm block (Gemma 3) `post_attention_layernorm` is the norm
/// after attention and the norm before the MLP is [`SANDWICH_MLP_NORM`]; [`hf_module`] knows.
pub const BLOCK_MODULES: [(&str, &str, &str, ParallelMode); 16] = [
    ("attn_norm", "input_layernorm", "attn_norm", Full),
    ("attn.q_proj", "self_attn.q_proj", "attn_q", Column),
    ("attn.k_proj", "self_attn.k_proj", "attn_k", Column),
    ("attn.v_proj", "self_attn.v_proj", "attn_v", Column),
    // CodeGen's fused q/v/k (its own names come from `layout::CodeGen`; no GGUF).
    ("attn.qkv_proj", "self_attn.qkv_proj", "", Column),
    ("attn.q_norm", "self_attn.q_norm", "attn_q_norm", Full),
    ("attn.k_norm", "self_attn.k_norm", "attn_k_norm", Full),
    ("attn.o_proj", "self_attn.o_proj", "attn_output", Row),
    (
        "post_attn_norm",
        "post_attention_layernorm",
        "post_attention_norm",
        Full,
    ),
    ("mlp_norm", "post_attention_layernorm", "ffn_norm", Full),
    ("mlp.gate_proj", "mlp.gate_proj", "ffn_gate", Column),
    ("mlp.up_proj", "mlp.up_proj", "ffn_up", Column),
    // GLM's fused gate and up (no GGUF file of this family is read).
    ("mlp.gate_up_proj", "mlp.gate_up_proj", "", ColumnParts(2)),
    ("mlp.down_proj", "mlp.down_proj", "ffn_down", Row),
    (
        "post_mlp_norm",
        "post_feedforward_layernorm",
        "post_ffw_norm",
        Full,
    ),
    // A mixture of experts' router (its experts, `moe.experts.N`, are named by `hf_module`;
    // not linear layers; llama.cpp's MoE tensors are not read, so no GGUF name).
    ("moe.gate", "mlp.gate", "", Full),
];

/// HF's name of the pre-MLP norm in a sandwich-norm block.
pub const SANDWICH_MLP_NORM: &str = "pre_feedforward_layernorm";

/// The row of [`BLOCK_MODULES`] for a module path inside a block (`attn.q_proj`).
pub fn block_module(
    path: &str,
) -> Option<&'static (&'static str, &'static str, &'static str, ParallelMode)> {
    BLOCK_MODULES.iter().find(|m| m.0 == path)
}

/// HF's name of a module path inside a block, in a block with or without sandwich norms.
pub fn hf_module(path: &str, sandwich: bool) -> Option<&'static str> {
    match path {
        "mlp_norm" if sandwich => Some(SANDWICH_MLP_NORM),
        _ => block_module(path).map(|m| m.1),
    }
}

/// Where one of our parameter paths lies, for the checkpoint-name adapters (HF, GGUF,
/// InternLM2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamPath<'a> {
    /// `embed.weight`.
    Embed,
    /// `head.norm.{param}` (`weight`, or a LayerNorm's `bias`).
    FinalNorm(&'a str),
    /// `head.lm_head.{param}` (`weight`, or CodeGen's `bias`).
    LmHead(&'a str),
    /// `layers.{index}.{module}.{param}` (`layers.3.attn.q_proj.weight`).
    Block {
        /// The block's index, as written.
        index: &'a str,
        /// The module path inside the block (a [`BLOCK_MODULES`] row).
        module: &'a str,
        /// `weight` or `bias`.
        param: &'a str,
    },
}

impl<'a> ParamPath<'a> {
    /// Parses `path`; `None` for parameters no base checkpoint holds (adapters, virtual
    /// tokens).
    pub fn parse(path: &'a str) -> Option<Self> {
        if path.contains(".adapter.") {
            return None;
        }
        Some(match path {
            "embed.weight" => ParamPath::Embed,
            _ => {
                if let Some(param) = path.strip_prefix("head.norm.") {
                    return Some(ParamPath::FinalNorm(param));
                }
                if let Some(param) = path.strip_prefix("head.lm_head.") {
                    return Some(ParamPath::LmHead(param));
                }
                let (index, rest) = path.strip_prefix("layers.")?.split_once('.')?;
                let (module, param) = rest.rsplit_once('.')?;
                ParamPath::Block {
                    index,
                    module,
                    param,
                }
            }
        })
    }
}

/// One pre-norm decoder block.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    /// Norm before attention (HF `input_layernorm`).
    pub attn_norm: Norm<B>,
    /// Self-attention.
    pub attn: Attention<B>,
    /// Norm of the attention output before the residual add (Gemma 3's sandwich).
    pub post_attn_norm: Option<Norm<B>>,
    /// Norm before the MLP (HF `post_attention_layernorm`; `pre_feedforward_layernorm` in a
    /// sandwich block); `None` in a parallel block (CodeGen), whose MLP reads `attn_norm`'s
    /// output as attention does.
    pub mlp_norm: Option<Norm<B>>,
    /// Dense feed-forward (absent where the block has a mixture of experts).
    pub mlp: Option<Mlp<B>>,
    /// Sparse mixture-of-experts feed-forward (Mixtral, Qwen3-MoE), in place of `mlp`.
    pub moe: Option<SparseMoe<B>>,
    /// Norm of the MLP output before the residual add (Gemma 3's sandwich).
    pub post_mlp_norm: Option<Norm<B>>,
    /// Whether this layer attends through the context's local window and RoPE (Gemma 3's
    /// sliding layers).
    #[module(skip)]
    pub local: bool,
}

/// Final norm and LM head.
#[derive(Module, Debug)]
pub struct Head<B: Backend> {
    /// Final norm (HF `model.norm`).
    pub norm: Norm<B>,
    /// `[hidden, vocab]` (with a bias in CodeGen); `None` when tied to the embedding.
    pub lm_head: Option<Linear<B>>,
}

/// A LLaMA-family causal language model.
#[derive(Module, Debug)]
pub struct Llama<B: Backend> {
    /// Token embedding `[vocab, hidden]`.
    pub embed: Embedding<B>,
    /// Decoder blocks.
    pub layers: Vec<Block<B>>,
    /// Final norm + LM head.
    pub head: Head<B>,
    /// RoPE frequencies.
    pub rope: Rope,
    /// Attention window (Mistral), if any.
    pub window: Option<usize>,
    /// RoPE and window of the local layers (Gemma 3's sliding layers), if any.
    #[module(skip)]
    pub local: Option<(Rope, usize)>,
    /// Learned virtual tokens in front of every sequence; empty unless a prompt-learning
    /// transform (`collie-peft`) fills the slot.
    pub virtual_tokens: Option<VirtualTokens<B>>,
    /// Attention implementation (HF's `attn_implementation`): the naive reference or the
    /// memory-efficient kernels; not a weight, not saved.
    #[module(skip)]
    pub attention: AttentionKind,
    /// The weight of the mixture of experts' load-balancing loss in training
    /// (`router_aux_loss_coef` where `output_router_logits` is set), if it is added.
    #[module(skip)]
    pub router_aux_loss_coef: Option<f64>,
    /// Whose module names adapters and tensor-parallel plans use (HF's LLaMA names, or
    /// CodeGen's).
    #[module(skip)]
    pub names: Names,
}

/// Per-call inputs every block shares.
#[derive(Debug, Clone)]
pub struct BlockContext<B: Backend> {
    /// `[batch, s_q, rotary_dim]` (`rotary_dim ≤ head_dim`: partial rotary rotates the first
    /// features of each head).
    pub cos: Tensor<B, 3>,
    /// `[batch, s_q, rotary_dim]`.
    pub sin: Tensor<B, 3>,
    /// Whether RoPE rotates interleaved pairs (GLM) rather than halves.
    pub interleaved: bool,
    /// Which keys each query sees (materialized for the naive path); `None` when nothing is
    /// hidden.
    pub mask: Option<AttnMask<B>>,
    /// The attention implementation every block runs.
    pub attention: AttentionKind,
    /// The same for the local layers (their RoPE tables and window), if the model has any.
    pub local: Option<Box<BlockContext<B>>>,
    /// Where the mixture-of-experts blocks record their routing for the auxiliary loss, when
    /// the call computes it.
    pub router: Option<Arc<RouterLog<B>>>,
}

/// Keys and values of past positions, one entry per block.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    /// `(k, v)`, each `[batch, kv_heads, past, head_dim]`.
    pub layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for `n_layers` blocks.
    pub fn new(n_layers: usize) -> Self {
        KvCache {
            layers: vec![None; n_layers],
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dims()[2])
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<B: Backend> RowCache<B> for KvCache<B> {
    fn slots(&self) -> usize {
        self.len()
    }

    fn select_rows(self, rows: &[usize]) -> Self {
        KvCache {
            layers: self.layers.select_rows(rows),
        }
    }

    fn pad_front(self, after: usize, n: usize) -> Self {
        KvCache {
            layers: self.layers.pad_front(after, n),
        }
    }

    fn drop_front(self, after: usize, n: usize) -> Self {
        KvCache {
            layers: self.layers.drop_front(after, n),
        }
    }

    fn cat_rows(parts: Vec<Self>) -> Self {
        KvCache {
            layers: RowCache::cat_rows(parts.into_iter().map(|c| c.layers).collect()),
        }
    }
}

impl LlamaConfig {
    /// Builds the model with lazily initialized weights (HF's init: normal(0, initializer_range)
    /// for matrices, zeros for biases, ones for norms).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<Llama<B>> {
        self.validate()?;
        let (d, hd) = (self.hidden_size, self.head_dim());
        let (h, kvh) = (self.num_attention_heads, self.kv_heads());
        let std = self.initializer_range;
        let linear = |i: usize, o: usize, bias: bool| {
            LinearConfig::new(i, o)
                .with_bias(bias)
                .with_init_std(std)
                .init(device)
        };
        let norm_of = |width: usize| {
            NormConfig::new(width)
                .with_eps(self.rms_norm_eps)
                .with_offset(self.norm_offset())
                .with_layer_norm(self.layer_norm())
                .init(device)
        };
        let qkv_groups = self.qkv_groups();
        let separate = |o: usize| (qkv_groups == 0).then(|| linear(d, o, self.qkv_bias()));
        let norm = || norm_of(d);
        let head_norm = || self.qk_norm().then(|| norm_of(hd));
        let sandwich_norm = || self.sandwich_norms().then(norm);
        let act = self.activation()?;
        let moe = self.moe()?;
        let layers = (self.local_layers()?.into_iter())
            .zip(self.moe_layers()?)
            .map(|(local, sparse)| Block {
                attn_norm: norm(),
                attn: Attention {
                    q_proj: separate(h * hd),
                    k_proj: separate(kvh * hd),
                    v_proj: separate(kvh * hd),
                    qkv_proj: (qkv_groups > 0).then(|| linear(d, 3 * h * hd, self.qkv_bias())),
                    qkv_groups,
                    o_proj: linear(h * hd, d, self.o_bias()),
                    n_heads: h,
                    n_kv_heads: kvh,
                    head_dim: hd,
                    q_norm: head_norm(),
                    k_norm: head_norm(),
                    scale: self.attention_scale(),
                },
                post_attn_norm: sandwich_norm(),
                mlp_norm: (!self.parallel_block()).then(norm),
                mlp: (!sparse).then(|| {
                    let (i, bias) = (self.ffn_width(), self.mlp_bias());
                    let fused = self.is_glm();
                    Mlp {
                        gate_proj: (!fused && self.gated_mlp()).then(|| linear(d, i, bias)),
                        up_proj: (!fused).then(|| linear(d, i, bias)),
                        gate_up_proj: fused.then(|| linear(d, 2 * i, bias)),
                        down_proj: linear(i, d, bias),
                        act,
                    }
                }),
                moe: moe
                    .filter(|_| sparse)
                    .map(|spec| spec.init(d, act, std, device)),
                post_mlp_norm: sandwich_norm(),
                local,
            })
            .collect();
        let (theta, scaling) = self.rope()?;
        let (rotary_dim, interleaved) = self.rotary();
        let rope = |theta: f64, scaling: &_| {
            let rope = Rope::new(rotary_dim, theta, scaling);
            if interleaved {
                rope.interleaved()
            } else {
                rope
            }
        };
        let local = (self.local_attention()?)
            .map(|(theta, scaling, window)| (rope(theta, &scaling), window));
        Ok(Llama {
            embed: EmbeddingConfig::new(self.vocab_size, d)
                .with_init_std(std)
                .with_scale(self.embed_scale())
                .init(device),
            layers,
            head: Head {
                norm: norm(),
                lm_head: (!self.tie_word_embeddings)
                    .then(|| linear(d, self.vocab_size, self.lm_head_bias())),
            },
            rope: rope(theta, &scaling),
            window: self.window(),
            local,
            virtual_tokens: None,
            attention: AttentionKind::default(),
            router_aux_loss_coef: self.router_aux_loss_coef()?,
            names: self.names(),
        })
    }
}

impl<B: Backend> Attention<B> {
    /// Queries, keys and values, from three layers or the fused one.
    ///
    /// # Shapes
    /// - x: `[batch, s_q, hidden]` → q `[batch, s_q, heads, head_dim]`, k and v
    ///   `[batch, s_q, kv_heads, head_dim]`
    #[allow(clippy::type_complexity)]
    fn project(&self, x: Tensor<B, 3>) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let [b, s, _] = x.dims();
        let (h, kvh, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        if let Some(qkv) = &self.qkv_proj {
            let g = self.qkv_groups;
            // [batch, s_q, 3 · heads · head_dim] -> [batch, s_q, groups, 3, heads / groups ·
            // head_dim]: per group its queries, values and keys.
            let y = qkv.forward(x).reshape([b, s, g, 3, h / g * hd]);
            // [batch, s_q, groups, 1, heads / groups · head_dim] -> [batch, s_q, heads,
            // head_dim]: head j of group i is head i · heads / groups + j.
            let part = |i: usize| y.clone().narrow(3, i, 1).reshape([b, s, h, hd]);
            return (part(0), part(2), part(1));
        }
        let separate = |l: &Option<Linear<B>>, heads: usize| {
            let l = l
                .as_ref()
                .expect("q, k and v are apart without a fused qkv_proj");
            // [batch, s_q, heads · head_dim] -> [batch, s_q, heads, head_dim]
            l.forward(x.clone()).reshape([b, s, heads, hd])
        };
        (
            separate(&self.q_proj, h),
            separate(&self.k_proj, kvh),
            separate(&self.v_proj, kvh),
        )
    }

    /// # Shapes
    /// - x: `[batch, s_q, hidden]` → `[batch, s_q, hidden]`
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        ctx: &BlockContext<B>,
        cache: Option<&mut Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    ) -> Tensor<B, 3> {
        let [b, s, _] = x.dims();
        let (h, hd) = (self.n_heads, self.head_dim);
        let (q, k, v) = self.project(x);
        // Per-head norms (Qwen3) act on each head's features, before RoPE.
        let q = match &self.q_norm {
            Some(n) => n.forward(q),
            None => q,
        };
        let k = match &self.k_norm {
            Some(n) => n.forward(k),
            None => k,
        };
        // HF scales the scores by `query_pre_attn_scalar^-½` where a family sets it; scaling the
        // queries by the ratio to `head_dim^-½` gives those scores.
        let q = match self.scale {
            Some(scale) => q.mul_scalar(scale * (hd as f64).sqrt()),
            None => q,
        };
        // [batch, s_q, heads, head_dim] -> [batch, heads, s_q, head_dim], rotated on the way
        let q = apply_rotary_heads(q, &ctx.cos, &ctx.sin, ctx.interleaved);
        let k = apply_rotary_heads(k, &ctx.cos, &ctx.sin, ctx.interleaved);
        // [batch, s_q, kv_heads, head_dim] -> [batch, kv_heads, s_q, head_dim]
        let v = swap_seq_heads(v);
        let (k, v) = match cache {
            Some(slot) => {
                let (k, v) = match slot.take() {
                    // [batch, kv_heads, past + s_q, head_dim]
                    Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
                    None => (k, v),
                };
                *slot = Some((k.clone(), v.clone()));
                (k, v)
            }
            None => (k, v),
        };
        let o = attention(q, k, v, ctx.mask.as_ref(), ctx.attention);
        // [batch, heads, s_q, head_dim] -> [batch, s_q, heads · head_dim]
        let o = swap_seq_heads(o).reshape([b, s, h * hd]);
        self.o_proj.forward(o)
    }
}

impl<B: Backend> Mlp<B> {
    /// # Shapes
    /// - x: `[batch, seq, hidden]` → same
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let (gate, up) = match (&self.gate_up_proj, &self.gate_proj, &self.up_proj) {
            (Some(fused), _, _) => {
                // [batch, seq, 2 · intermediate] -> gate and up halves (this rank's halves
                // under tensor parallelism).
                let y = fused.forward(x);
                let i = y.dims()[2] / 2;
                (y.clone().narrow(2, 0, i), y.narrow(2, i, i))
            }
            (None, Some(gate), Some(up)) => (gate.forward(x.clone()), up.forward(x)),
            (None, None, Some(up)) => {
                return self.down_proj.forward(self.act.forward(up.forward(x)))
            }
            _ => unreachable!("an MLP is built with an up projection, and a gate apart or fused"),
        };
        self.down_proj.forward(self.act.glu(gate, up))
    }
}

impl<B: Backend> Block<B> {
    /// The block's adaptable linear layers under their paths in [`BLOCK_MODULES`], in table
    /// order (a mixture of experts' router and experts are not among them: transformers holds
    /// its experts as stacked tensors, not linear layers).
    pub fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear<B>)> {
        let a = &mut self.attn;
        let qkv = [
            ("attn.q_proj", &mut a.q_proj),
            ("attn.k_proj", &mut a.k_proj),
            ("attn.v_proj", &mut a.v_proj),
            ("attn.qkv_proj", &mut a.qkv_proj),
        ];
        let mut out: Vec<(&'static str, &mut Linear<B>)> = qkv
            .into_iter()
            .filter_map(|(p, l)| Some((p, l.as_mut()?)))
            .collect();
        out.push(("attn.o_proj", &mut a.o_proj));
        if let Some(m) = &mut self.mlp {
            let gate_up = [
                ("mlp.gate_proj", &mut m.gate_proj),
                ("mlp.up_proj", &mut m.up_proj),
                ("mlp.gate_up_proj", &mut m.gate_up_proj),
            ];
            out.extend(
                gate_up
                    .into_iter()
                    .filter_map(|(p, l)| Some((p, l.as_mut()?))),
            );
            out.push(("mlp.down_proj", &mut m.down_proj));
        }
        out
    }

    /// `x + attn(norm(x))`, then `+ mlp(norm(·))`; a sandwich block also norms each output
    /// before its residual add; a parallel block (CodeGen) adds `attn(norm(x)) + mlp(norm(x))`
    /// to `x`.
    ///
    /// # Shapes
    /// - x: `[batch, s_q, hidden]` → same
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        ctx: &BlockContext<B>,
        cache: Option<&mut Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    ) -> Tensor<B, 3> {
        let router = ctx.router.clone();
        let ctx = match (&ctx.local, self.local) {
            (Some(local), true) => local,
            _ => ctx,
        };
        let post = |norm: &Option<Norm<B>>, y: Tensor<B, 3>| match norm {
            Some(n) => n.forward(y),
            None => y,
        };
        let h = self.attn_norm.forward(x.clone());
        let a = self.attn.forward(h.clone(), ctx, cache);
        let Some(mlp_norm) = &self.mlp_norm else {
            // transformers' order of the sum: attention + MLP, then the residual.
            return a + self.feed_forward(h, router.as_deref()) + x;
        };
        let x = x + post(&self.post_attn_norm, a);
        let m = self.feed_forward(mlp_norm.forward(x.clone()), router.as_deref());
        x + post(&self.post_mlp_norm, m)
    }

    /// The dense or sparse feed-forward.
    ///
    /// # Shapes
    /// - h: `[batch, s_q, hidden]` → same
    fn feed_forward(&self, h: Tensor<B, 3>, router: Option<&RouterLog<B>>) -> Tensor<B, 3> {
        match (&self.mlp, &self.moe) {
            (Some(mlp), _) => mlp.forward(h),
            (None, Some(moe)) => moe.forward(h, router),
            (None, None) => unreachable!("a block has a dense or a sparse feed-forward"),
        }
    }
}

impl<B: Backend> Head<B> {
    /// Final norm and projection to the vocabulary; a tied head multiplies by the embedding.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]` → `[batch, seq, vocab]`
    pub fn forward(&self, x: Tensor<B, 3>, embed: &Embedding<B>) -> Tensor<B, 3> {
        let x = self.norm.forward(x);
        match &self.lm_head {
            Some(lm_head) => lm_head.forward(x),
            None => embed.project(x),
        }
    }
}

impl<B: Backend> Llama<B> {
    /// Virtual tokens in front of every sequence (0 without prompt learning).
    pub fn n_virtual(&self) -> usize {
        self.virtual_tokens.as_ref().map_or(0, VirtualTokens::len)
    }

    /// Whether the virtual tokens are keys and values of every layer (prefix tuning).
    fn has_prefix(&self) -> bool {
        self.virtual_tokens
            .as_ref()
            .is_some_and(|v| matches!(v.target, VirtualTarget::Prefix { .. }))
    }

    /// Virtual tokens that a call starting a sequence (`past == 0`) adds as queries: prompt
    /// tuning's prepended embeddings.
    fn virtual_queries(&self, past: usize) -> usize {
        match &self.virtual_tokens {
            Some(v) if past == 0 && v.target == VirtualTarget::Input => v.len(),
            _ => 0,
        }
    }

    /// Slots in front of a fresh sequence that already hold keys: prefix tuning's prefix.
    fn prefix_len(&self) -> usize {
        if self.has_prefix() {
            self.n_virtual()
        } else {
            0
        }
    }

    /// Hidden states after the last block (before the final norm).
    ///
    /// # Shapes
    /// - ids: `[batch, seq]`, padding: `[batch, seq]` → `[batch, seq, hidden]`
    pub fn forward_hidden(
        &self,
        ids: Tensor<B, 2, Int>,
        padding: Option<&Tensor<B, 2, Int>>,
    ) -> Tensor<B, 3> {
        let [b, s] = ids.dims();
        let ctx = self.context(b, s, self.prefix_len(), padding, None, &ids.device());
        self.blocks(ids, &ctx)
    }

    /// Embedding and every block under one context, virtual tokens included: prompt tuning's
    /// are prepended to the input and cut from the output, prefix tuning's go into each
    /// attention as past keys and values.
    fn blocks(&self, ids: Tensor<B, 2, Int>, ctx: &BlockContext<B>) -> Tensor<B, 3> {
        let [b, s] = ids.dims();
        let mut x = self.embed.forward(ids);
        let mut prefix = Vec::new();
        if let Some(v) = &self.virtual_tokens {
            x = v.prepend(x);
            prefix = v.prefix_kv(b);
        }
        let mut prefix = prefix.into_iter();
        for layer in &self.layers {
            let mut slot = prefix.next();
            let cache = slot.is_some().then_some(&mut slot);
            x = layer.forward(x, ctx, cache);
        }
        let [_, total, d] = x.dims();
        // [batch, n + seq, hidden] -> [batch, seq, hidden]
        x.slice([0..b, total - s..total, 0..d])
    }

    /// Forward pass over packed rows: several documents per row, each attending only to itself,
    /// with positions restarting at every document.
    ///
    /// # Shapes
    /// - ids, segments (`0` = padding, `1, 2, …` = document), positions: `[batch, seq]`
    /// - returns logits `[batch, seq, vocab]`
    pub fn forward_packed(
        &self,
        ids: Tensor<B, 2, Int>,
        segments: &Tensor<B, 2, Int>,
        positions: Tensor<B, 2, Int>,
    ) -> Tensor<B, 3> {
        self.forward_packed_aux(ids, segments, positions).0
    }

    /// [`Llama::forward_packed`] and the load-balancing auxiliary loss of its routing (`None`
    /// unless the model adds it: a mixture of experts with `output_router_logits`). Real tokens
    /// are the non-padding ones, and prompt tuning's virtual tokens (peft's attention mask
    /// covers them).
    pub fn forward_packed_aux(
        &self,
        ids: Tensor<B, 2, Int>,
        segments: &Tensor<B, 2, Int>,
        positions: Tensor<B, 2, Int>,
    ) -> (Tensor<B, 3>, Option<Tensor<B, 1>>) {
        let [b, s] = ids.dims();
        let device = ids.device();
        let mut ctx = self.context(
            b,
            s,
            self.prefix_len(),
            Some(segments),
            Some(positions),
            &device,
        );
        let log = self.log_routing(&mut ctx, segments);
        let x = self.blocks(ids, &ctx);
        let aux = log.and_then(|log| log.take_aux_loss());
        (self.head.forward(x, &self.embed), aux)
    }

    /// Cache-free forward pass for training and scoring.
    ///
    /// # Shapes
    /// - ids: `[batch, seq]`, padding: `[batch, seq]` → logits `[batch, seq, vocab]`
    pub fn forward(
        &self,
        ids: Tensor<B, 2, Int>,
        padding: Option<&Tensor<B, 2, Int>>,
    ) -> Tensor<B, 3> {
        let x = self.forward_hidden(ids, padding);
        self.embed.gather_vocab(self.head.forward(x, &self.embed))
    }

    /// Decode step: runs `ids` after the positions already in `cache`, appending their keys and
    /// values to it.
    ///
    /// # Shapes
    /// - ids: `[batch, s_new]`
    /// - padding: `[batch, past + s_new]` (the mask of everything seen so far)
    /// - returns logits `[batch, s_new, vocab]`
    pub fn forward_cached(
        &self,
        ids: Tensor<B, 2, Int>,
        padding: Option<&Tensor<B, 2, Int>>,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 3> {
        let [b, s] = ids.dims();
        let device = ids.device();
        let mut x = self.embed.forward(ids);
        if let (Some(v), true) = (&self.virtual_tokens, cache.is_empty()) {
            // A fresh sequence starts behind the virtual tokens, which then stay in the cache.
            x = v.prepend(x);
            for (slot, kv) in cache.layers.iter_mut().zip(v.prefix_kv(b)) {
                *slot = Some(kv);
            }
        }
        let ctx = self.context(b, s, cache.len(), padding, None, &device);
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(x, &ctx, Some(slot));
        }
        let [_, total, d] = x.dims();
        // [batch, n + s_new, hidden] -> [batch, s_new, hidden]
        let x = x.slice([0..b, total - s..total, 0..d]);
        self.embed.gather_vocab(self.head.forward(x, &self.embed))
    }

    /// Rows of the embedding (the model's vocabulary size).
    pub fn vocab_size(&self) -> usize {
        self.embed.weight.lazy_shape().dims::<2>()[0]
    }
}

impl<B: Backend> Llama<B> {
    /// RoPE tables and mask of one kind of layer (its RoPE and window), for queries at
    /// `positions` over `s_k` key slots.
    ///
    /// # Shapes
    /// - positions: `[batch, s_q]`, segments: `[batch, s_k]`
    #[allow(clippy::too_many_arguments)]
    fn positional(
        &self,
        rope: &Rope,
        window: Option<usize>,
        positions: Tensor<B, 2, Int>,
        segments: &Option<Tensor<B, 2, Int>>,
        n_virtual: usize,
        s_k: usize,
        device: &B::Device,
    ) -> BlockContext<B> {
        let [batch, s_q] = positions.dims();
        let (cos, sin) = rope.cos_sin(positions);
        // A single unsegmented query sees every key: no mask needed.
        let needs_mask = segments.is_some() || s_q > 1 || window.is_some_and(|w| w < s_k);
        let attention = self.attention;
        let mask = needs_mask.then(|| {
            let m = AttnMask::new(batch, s_q, s_k, segments.clone(), window, n_virtual);
            match attention {
                AttentionKind::Naive => m.materialize(device),
                AttentionKind::Flash => m,
            }
        });
        BlockContext {
            cos,
            sin,
            interleaved: rope.interleaved,
            mask,
            attention,
            local: None,
            router: None,
        }
    }
}

impl<B: Backend> collie_core::lm::CausalLm<B> for Llama<B> {
    type Cache = KvCache<B>;

    fn vocab_shard(&self) -> Option<&collie_core::nn::VocabShard> {
        self.embed.shard.as_ref()
    }

    fn new_cache(&self) -> KvCache<B> {
        KvCache::new(self.layers.len())
    }

    fn cache_prefix(&self) -> usize {
        self.n_virtual()
    }

    fn logits(&self, ids: Tensor<B, 2, Int>, padding: Option<&Tensor<B, 2, Int>>) -> Tensor<B, 3> {
        self.forward(ids, padding)
    }

    fn logits_packed(
        &self,
        ids: Tensor<B, 2, Int>,
        segments: &Tensor<B, 2, Int>,
        positions: Tensor<B, 2, Int>,
    ) -> Tensor<B, 3> {
        self.forward_packed(ids, segments, positions)
    }

    fn router_aux_loss_coef(&self) -> Option<f64> {
        self.router_aux_loss_coef
    }

    fn logits_packed_aux(
        &self,
        ids: Tensor<B, 2, Int>,
        segments: &Tensor<B, 2, Int>,
        positions: Tensor<B, 2, Int>,
    ) -> (Tensor<B, 3>, Option<Tensor<B, 1>>) {
        self.forward_packed_aux(ids, segments, positions)
    }

    fn logits_tail(
        &self,
        ids: Tensor<B, 2, Int>,
        padding: Option<&Tensor<B, 2, Int>>,
        tail: usize,
    ) -> Tensor<B, 3> {
        let h = self.forward_hidden(ids, padding);
        let [b, s, d] = h.dims();
        // [batch, seq, hidden] -> [batch, tail, hidden]: the head runs only where it is read.
        let h = h.slice([0..b, s - tail.min(s)..s, 0..d]);
        self.embed.gather_vocab(self.head.forward(h, &self.embed))
    }

    fn logits_cached(
        &self,
        ids: Tensor<B, 2, Int>,
        padding: Option<&Tensor<B, 2, Int>>,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 3> {
        self.forward_cached(ids, padding, cache)
    }
}

impl<B: Backend> DecoderLayer<B> for Block<B> {
    type Context = BlockContext<B>;

    fn forward(
        &self,
        x: Tensor<B, 3>,
        ctx: &BlockContext<B>,
        cache: Option<&mut KvSlot<B>>,
    ) -> Tensor<B, 3> {
        Block::forward(self, x, ctx, cache)
    }
}

impl<B: Backend> LmHead<B> for Head<B> {
    fn forward(&self, x: Tensor<B, 3>, embed: &Embedding<B>) -> Tensor<B, 3> {
        Head::forward(self, x, embed)
    }

    fn is_tied(&self) -> bool {
        self.lm_head.is_none()
    }
}

impl<B: Backend> BlockModel<B> for Llama<B> {
    type Config = LlamaConfig;
    type Layer = Block<B>;
    type Head = Head<B>;
    type Context = BlockContext<B>;

    fn embed(&self) -> &Embedding<B> {
        &self.embed
    }

    fn embed_mut(&mut self) -> &mut Embedding<B> {
        &mut self.embed
    }

    fn layers(&self) -> &[Block<B>] {
        &self.layers
    }

    fn layers_mut(&mut self) -> &mut [Block<B>] {
        &mut self.layers
    }

    fn head(&self) -> &Head<B> {
        &self.head
    }

    fn head_mut(&mut self) -> &mut Head<B> {
        &mut self.head
    }

    /// `segments` excludes virtual tokens (prompt learning): they take positions `0..n` and
    /// shift the real ones by `n`, as HF peft's cache positions do; a call that starts a
    /// sequence under prompt tuning has `n` more queries, which come first. `positions` default
    /// to counting real tokens only, so left padding does not shift them; packed rows pass theirs.
    ///
    /// # Shapes
    /// - segments: `[batch, past + s_q − n]`
    /// - positions: `[batch, s_q]`
    fn context(
        &self,
        batch: usize,
        s_q: usize,
        past: usize,
        segments: Option<&Tensor<B, 2, Int>>,
        positions: Option<Tensor<B, 2, Int>>,
        device: &B::Device,
    ) -> BlockContext<B> {
        let n = self.n_virtual();
        let extra = self.virtual_queries(past);
        let s_q = s_q + extra;
        let s_k = past + s_q;
        // Virtual slots are real tokens of every document.
        let segments = segments.map(|seg| {
            if n == 0 {
                return seg.clone();
            }
            let ones = Tensor::<B, 2, Int>::ones([batch, n], device);
            Tensor::cat(vec![ones, seg.clone()], 1)
        });
        let positions = match (positions, &segments) {
            (Some(p), _) if n == 0 => p,
            (Some(p), _) => {
                let p = p.add_scalar(n as i64);
                if extra == 0 {
                    p
                } else {
                    let v = Tensor::<B, 1, Int>::arange(0..n as i64, device)
                        .reshape([1, n])
                        .expand([batch, n]);
                    Tensor::cat(vec![v, p], 1)
                }
            }
            // [batch, s_k] -> the last s_q columns
            (None, Some(p)) => positions_from_padding(p).slice([0..batch, past..s_k]),
            (None, None) => Tensor::<B, 1, Int>::arange(past as i64..s_k as i64, device)
                .reshape([1, s_q])
                .expand([batch, s_q]),
        };
        let local = self.local.as_ref().map(|(rope, window)| {
            let ctx = self.positional(
                rope,
                Some(*window),
                positions.clone(),
                &segments,
                n,
                s_k,
                device,
            );
            Box::new(ctx)
        });
        BlockContext {
            local,
            ..self.positional(
                &self.rope,
                self.window,
                positions,
                &segments,
                n,
                s_k,
                device,
            )
        }
    }

    fn log_routing(
        &self,
        ctx: &mut BlockContext<B>,
        segments: &Tensor<B, 2, Int>,
    ) -> Option<Arc<RouterLog<B>>> {
        self.router_aux_loss_coef?;
        let experts = self
            .layers
            .iter()
            .find_map(|l| l.moe.as_ref())?
            .experts
            .len();
        let [b, _] = segments.dims();
        // Prompt tuning's virtual tokens are real tokens too (peft's attention mask covers them).
        let mut mask = segments.clone().not_equal_elem(0).float();
        let n = self.virtual_queries(0);
        if n > 0 {
            mask = Tensor::cat(vec![Tensor::ones([b, n], &segments.device()), mask], 1);
        }
        let log = Arc::new(RouterLog::new(mask, experts));
        ctx.router = Some(log.clone());
        Some(log)
    }

    fn set_attention(&mut self, kind: AttentionKind) {
        self.attention = kind;
    }

    fn tp_divisible(&self) -> Vec<(&'static str, usize)> {
        let mut sizes = vec![("vocab_size", self.embed.weight.dims()[0])];
        if let Some(l) = self.layers.first() {
            sizes.push(("num_attention_heads", l.attn.n_heads));
            sizes.push(("num_key_value_heads", l.attn.n_kv_heads));
            if l.attn.qkv_groups > 0 {
                sizes.push(("qkv_proj's groups (mp_num)", l.attn.qkv_groups));
            }
            // Experts stay whole on every rank; dense MLPs split their intermediate width.
            if let Some(mlp) = self.layers.iter().find_map(|l| l.mlp.as_ref()) {
                sizes.push(("intermediate_size", mlp.down_proj.dims()[0]));
            }
        }
        sizes
    }

    fn scale_heads(&mut self, tp: usize, split: bool) {
        // Heads split by kv-head groups: rank r holds kv heads r·kv/tp.. and the query heads
        // that read them.
        for layer in &mut self.layers {
            let a = &mut layer.attn;
            if split {
                a.n_heads /= tp;
                a.n_kv_heads /= tp;
                a.qkv_groups /= tp;
            } else {
                a.n_heads *= tp;
                a.n_kv_heads *= tp;
                a.qkv_groups *= tp;
            }
        }
    }
}
