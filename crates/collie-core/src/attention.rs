//! Scaled dot-product attention with grouped-query heads, and the masks that drive it.
//!
//! Keys are addressed by *slot* (their index in the key sequence, cache included); the `s_q`
//! queries of a call occupy the last `s_q` slots. Each slot belongs to a *segment*: `0` is
//! padding, `1, 2, …` are documents (an HF attention mask is the special case of one document).
//! A key is hidden from a query when it lies in the query's future, is padding, or belongs to
//! another document (packed sequences). A padding query keeps its own slot visible, so no row of
//! the score matrix is fully masked (which would turn into NaN and leak through `0 · NaN` into
//! real positions).
//!
//! An [`AttnMask`] states these rules (segments, window, shared slots) without the
//! `[batch, s_q, s_k]` matrix; the naive path ([`AttentionKind::Naive`]) builds the matrix once
//! per call, the memory-efficient path ([`AttentionKind::Flash`], [`crate::flash`]) evaluates
//! the rules tile by tile.

use std::ops::Range;

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, DType, Int, Tensor};
use serde::{Deserialize, Serialize};

/// Which attention implementation a model runs (HF's `attn_implementation`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionKind {
    /// Scores and probabilities materialized (`[batch, heads, s_q, s_k]`), K/V repeated for
    /// GQA: the reference path, HF's `eager`.
    #[default]
    Naive,
    /// Memory-efficient attention ([`crate::flash`]): online softmax over key tiles, the
    /// backward recomputes the scores; memory linear in the sequence length.
    Flash,
}

impl std::str::FromStr for AttentionKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "naive" | "eager" => Ok(AttentionKind::Naive),
            "flash" => Ok(AttentionKind::Flash),
            other => Err(format!("attention `{other}`: expected naive or flash")),
        }
    }
}

/// The causal / padding / document / window rules of one attention call, and (for the naive
/// path) the mask matrix built from them.
#[derive(Debug, Clone)]
pub struct AttnMask<B: Backend> {
    /// Rows of the batch.
    pub batch: usize,
    /// Queries of the call (the last `s_q` key slots).
    pub s_q: usize,
    /// Key slots, cache and prefix included.
    pub s_k: usize,
    /// Every key slot's segment (`0` padding, `1, 2, …` documents); `None`: one document.
    ///
    /// `[batch, s_k]`
    pub segments: Option<Tensor<B, 2, Int>>,
    /// Mistral's sliding window.
    pub window: Option<usize>,
    /// Leading slots (virtual tokens) that belong to every document.
    pub shared: usize,
    /// `[batch, 1, s_q, s_k]`, `true` = hidden; built by [`AttnMask::materialize`].
    pub dense: Option<Tensor<B, 4, Bool>>,
}

impl<B: Backend> AttnMask<B> {
    /// The rules of a causal call; nothing is materialized yet.
    pub fn new(
        batch: usize,
        s_q: usize,
        s_k: usize,
        segments: Option<Tensor<B, 2, Int>>,
        window: Option<usize>,
        shared: usize,
    ) -> Self {
        AttnMask {
            batch,
            s_q,
            s_k,
            segments,
            window,
            shared,
            dense: None,
        }
    }

    /// Builds the whole mask matrix once (the naive path reuses it in every block).
    pub fn materialize(mut self, device: &B::Device) -> Self {
        self.dense = Some(self.rows(0..self.s_q, device));
        self
    }

    /// The mask of query rows `rows` (`true` = hidden).
    ///
    /// # Shapes
    /// - returns `[batch, 1, rows.len(), s_k]`
    pub fn rows(&self, rows: Range<usize>, device: &B::Device) -> Tensor<B, 4, Bool> {
        let (batch, s_k, n) = (self.batch, self.s_k, rows.len());
        let past = (s_k - self.s_q) as i64;
        // Query i sits in slot past + i.
        let slots =
            Tensor::<B, 1, Int>::arange(past + rows.start as i64..past + rows.end as i64, device)
                .reshape([1, n, 1])
                .expand([batch, n, s_k]);
        let cols = Tensor::<B, 1, Int>::arange(0..s_k as i64, device)
            .reshape([1, 1, s_k])
            .expand([batch, n, s_k]);
        let mut hidden = cols.clone().greater(slots.clone());
        if let Some(w) = self.window {
            // slot j is out of the window of query slot i when j <= i - w
            let too_old = cols.clone().lower_equal(slots.clone().sub_scalar(w as i64));
            hidden = hidden.bool_or(too_old);
        }
        let mask = match &self.segments {
            Some(segments) => {
                // [batch, s_k] -> [batch, n, s_k] along keys, and the queries' own segments
                // along rows
                let seg_k = segments
                    .clone()
                    .reshape([batch, 1, s_k])
                    .expand([batch, n, s_k]);
                let first = past as usize + rows.start;
                // Reshape, then slice: Burn 0.21's fused wgpu backend read the wrong rows from
                // the reshape of a column slice (`[3, 9]` → `[.., 8..9]` → `[3, 1, 1]`).
                let seg_q = segments
                    .clone()
                    .reshape([batch, s_k, 1])
                    .slice([0..batch, first..first + n, 0..1])
                    .expand([batch, n, s_k]);
                let mut foreign = seg_k.clone().not_equal(seg_q).bool_or(seg_k.equal_elem(0));
                if self.shared > 0 {
                    foreign = foreign.bool_and(cols.clone().greater_equal_elem(self.shared as i64));
                }
                let own_slot = cols.equal(slots);
                hidden.bool_or(foreign.bool_and(own_slot.bool_not()))
            }
            None => hidden,
        };
        mask.unsqueeze_dim::<4>(1)
    }
}

/// Causal + padding + document mask, `true` where attention is forbidden.
///
/// `segments` gives every key slot's segment (an HF attention mask: `1` = token, `0` = padding;
/// packed rows: `1, 2, …` per document); `None` means one document without padding. With a
/// `window` (Mistral's sliding window), keys `window` or more slots behind the query are hidden
/// too. The first `shared` key slots (virtual tokens of prompt learning) belong to every
/// document: only causality hides them.
///
/// # Shapes
/// - segments: `[batch, s_k]`
/// - returns `[batch, 1, s_q, s_k]`
pub fn causal_mask<B: Backend>(
    batch: usize,
    s_q: usize,
    s_k: usize,
    segments: Option<&Tensor<B, 2, Int>>,
    window: Option<usize>,
    shared: usize,
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    AttnMask::new(batch, s_q, s_k, segments.cloned(), window, shared).rows(0..s_q, device)
}

/// Position ids from an HF attention mask (one document per row): the index of each token among
/// the real tokens of its row (`cumsum(mask) - 1`), so left-padded rows start at position 0 like
/// unpadded ones. Padding slots get position 1, as HF's `generate` does. Packed rows carry their
/// positions explicitly.
///
/// # Shapes
/// - padding: `[batch, s_k]` → `[batch, s_k]`
pub fn positions_from_padding<B: Backend>(padding: &Tensor<B, 2, Int>) -> Tensor<B, 2, Int> {
    let positions = padding.clone().cumsum(1).sub_scalar(1);
    positions.mask_fill(padding.clone().equal_elem(0), 1)
}

/// `softmax(q·kᵀ / sqrt(head_dim) + mask) · v` with GQA, by the implementation `kind`.
///
/// `mask` `None` lets every query see every key.
///
/// # Shapes
/// - q: `[batch, heads, s_q, head_dim]`
/// - k, v: `[batch, kv_heads, s_k, head_dim]`
/// - returns `[batch, heads, s_q, head_dim]`
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<&AttnMask<B>>,
    kind: AttentionKind,
) -> Tensor<B, 4> {
    match kind {
        AttentionKind::Naive => {
            let device = q.device();
            let dense = mask.map(|m| match &m.dense {
                Some(d) => d.clone(),
                None => m.rows(0..m.s_q, &device),
            });
            naive_attention(q, k, v, dense.as_ref())
        }
        AttentionKind::Flash => crate::flash::flash_attention(q, k, v, mask),
    }
}

/// Repeats each key/value head `n_rep` times so GQA/MQA heads line up with the query heads.
///
/// # Shapes
/// - x: `[batch, kv_heads, seq, head_dim]` → `[batch, kv_heads · n_rep, seq, head_dim]`
pub fn repeat_kv<B: Backend>(x: Tensor<B, 4>, n_rep: usize) -> Tensor<B, 4> {
    if n_rep == 1 {
        return x;
    }
    let [b, kvh, s, d] = x.dims();
    // [batch, kv_heads, n_rep, seq, head_dim] -> [batch, heads, seq, head_dim]
    x.unsqueeze_dim::<5>(2)
        .expand([b, kvh, n_rep, s, d])
        .reshape([b, kvh * n_rep, s, d])
}

/// `a · b` per head: the backend's fused product for f32 where it has one
/// ([`crate::fused::FusedKernels::batched_matmul`]), else Burn's `matmul`.
///
/// # Shapes
/// - a: `[batch, heads, m, k]`, b: `[batch, heads, k, n]` → `[batch, heads, m, n]`
pub fn batched_matmul<B: Backend>(a: Tensor<B, 4>, b: Tensor<B, 4>) -> Tensor<B, 4> {
    batched_matmul_by(crate::fused::kernels::<B>(), a, b)
}

/// [`batched_matmul`] with the fused kernels `fused` (or none).
fn batched_matmul_by<B: Backend>(
    fused: Option<crate::fused::Fused<B>>,
    a: Tensor<B, 4>,
    b: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let same_batch = a.dims()[..2] == b.dims()[..2];
    match fused {
        Some(k) if same_batch && a.dtype() == DType::F32 && b.dtype() == DType::F32 => {
            (k.batched_matmul)(a, b)
        }
        _ => a.matmul(b),
    }
}

/// `x.swap_dims(1, 2)` written contiguous: `[batch, seq, heads, head_dim]` ↔
/// `[batch, heads, seq, head_dim]`, the heads split from a projection or merged back before the
/// output one. The backend's fused copy ([`crate::fused::FusedKernels::swap12`]) for f32 where
/// it has one: a row of features at a time, and the backward the same copy, so the projection's
/// gradient arrives contiguous too. Elsewhere Burn's `swap_dims`, a strided view (the reshape
/// after it, and its gradient's, copy it element by element on the CPU).
///
/// # Shapes
/// - x: `[batch, a, b, head_dim]` → `[batch, b, a, head_dim]`
pub fn swap_seq_heads<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    match crate::fused::kernels::<B>() {
        Some(k) if x.dtype() == DType::F32 => (k.swap12)(x),
        _ => x.swap_dims(1, 2),
    }
}

/// The naive path: the whole score matrix materialized (HF's eager attention).
///
/// Several queries per row run HF's layout: K/V repeated to every query head, one product per
/// head (the rounding the parity fixtures pin). One query per row — decoding — groups the query
/// heads of each key/value head into the rows of one product instead: the same dot products
/// without copying every layer's cache `n_rep` times per token, which dominated batched decoding.
///
/// # Shapes
/// - q: `[batch, heads, s_q, head_dim]`
/// - k, v: `[batch, kv_heads, s_k, head_dim]`
/// - mask: `[batch, 1, s_q, s_k]`, `true` = hidden
/// - returns `[batch, heads, s_q, head_dim]`
pub fn naive_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<&Tensor<B, 4, Bool>>,
) -> Tensor<B, 4> {
    let [b, h, s_q, d] = q.dims();
    let kvh = k.dims()[1];
    let n_rep = h / kvh;
    let fused = crate::fused::kernels::<B>();
    // The products run over [batch, groups, rows per group, …]: the query head j reads
    // key/value head j / n_rep (repeat_kv's order). Grouped — the query heads of a key/value
    // head stacked into the rows of one product, K/V used as they are — for a decoding step,
    // and always where the fused softmax (which maps each row to its mask row) runs; else HF's
    // layout with K/V repeated to every head.
    let (q, k, v) = if n_rep > 1 && (s_q == 1 || fused.is_some()) {
        // [batch, heads, s_q, head_dim] -> [batch, kv_heads, n_rep · s_q, head_dim]
        (q.reshape([b, kvh, n_rep * s_q, d]), k, v)
    } else {
        (q, repeat_kv(k, n_rep), repeat_kv(v, n_rep))
    };
    // Spelled out rather than Burn's fused attention op: that op's autotuned GPU kernels
    // returned wrong rows for some short key lengths on wgpu (one query over 9 keys, Burn 0.21),
    // and the reference path should be the same arithmetic on every backend. The softmax runs in
    // f32 (transformers' eager attention and autocast do too); the two matmuls stay in the
    // compute dtype.
    let dtype = q.dtype();
    let scores = batched_matmul_by(fused, q, k.swap_dims(2, 3)).cast(DType::F32);
    let scale = 1.0 / (d as f64).sqrt();
    // The kernels looked up once: the grouped layout above was chosen for them.
    let probs = softmax_by(fused, scores, mask, scale);
    // [batch, groups, rows, head_dim] -> [batch, heads, s_q, head_dim]
    batched_matmul_by(fused, probs.cast(dtype), v).reshape([b, h, s_q, d])
}

/// `softmax(scale · scores)` over keys with the hidden ones at `−∞`: the backend's fused kernel
/// ([`crate::fused::FusedKernels::softmax`]) for f32 scores where it has one, else
/// [`masked_softmax_unfused`].
///
/// # Shapes
/// - as [`masked_softmax_unfused`]
pub fn masked_softmax<B: Backend>(
    scores: Tensor<B, 4>,
    mask: Option<&Tensor<B, 4, Bool>>,
    scale: f64,
) -> Tensor<B, 4> {
    softmax_by(crate::fused::kernels::<B>(), scores, mask, scale)
}

/// [`masked_softmax`] with the fused kernels `fused` (or none).
fn softmax_by<B: Backend>(
    fused: Option<crate::fused::Fused<B>>,
    scores: Tensor<B, 4>,
    mask: Option<&Tensor<B, 4, Bool>>,
    scale: f64,
) -> Tensor<B, 4> {
    match fused {
        Some(k) if scores.dtype() == DType::F32 => (k.softmax)(scores, mask.cloned(), scale as f32),
        _ => masked_softmax_unfused(scores, mask, scale),
    }
}

/// `softmax(scale · scores)` over keys with the hidden ones at `−∞`, as tensor operations: the
/// reference of the fused kernel ([`crate::fused::FusedKernels::softmax`]).
///
/// # Shapes
/// - scores: `[batch, groups, rows, s_k]` (f32)
/// - mask: `[batch, 1, rows or 1, s_k]`, `true` = hidden (a decoding step's one mask row serves
///   every head of a group)
/// - returns `[batch, groups, rows, s_k]`
pub fn masked_softmax_unfused<B: Backend>(
    scores: Tensor<B, 4>,
    mask: Option<&Tensor<B, 4, Bool>>,
    scale: f64,
) -> Tensor<B, 4> {
    let dims = scores.dims();
    let scores = scores.mul_scalar(scale);
    let scores = match mask {
        Some(m) => scores.mask_fill(m.clone().expand(dims), f32::NEG_INFINITY),
        None => scores,
    };
    softmax_spelled(scores, 3)
}

/// `exp(x − max) / Σ exp(x − max)` along `dim`, as tensor ops. Burn's `softmax` is a backend op:
/// the CPU backend runs a fused kernel while burn-autodiff decomposes it into these operations,
/// and the two differ by up to 4e-7 — enough to flip bf16 roundings, so a recomputed block
/// (activation checkpointing, on the inner backend) would not reproduce the training forward.
/// Spelled out, training, recomputation and inference run the same arithmetic.
fn softmax_spelled<B: Backend, const D: usize>(x: Tensor<B, D>, dim: usize) -> Tensor<B, D> {
    let max = x.clone().detach().max_dim(dim);
    let e = (x - max).exp();
    let sum = e.clone().sum_dim(dim);
    e / sum
}
