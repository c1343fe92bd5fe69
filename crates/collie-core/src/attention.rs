//! Scaled dot-product attention with grouped-query heads, and the masks that drive it.
//!
//! Keys are addressed by *slot* (their index in the key sequence, cache included); the `s_q`
//! queries of a call occupy the last `s_q` slots. Each slot belongs to a *segment*: `0` is
//! padding, `1, 2, …` are documents (an HF attention mask is the special case of one document).
//! A key is hidden from a query when it lies in the query's future, is padding, or belongs to
//! another document (packed sequences). A padding query keeps its own slot visible, so no row of
//! the score matrix is fully masked (which would turn into NaN and leak through `0 · NaN` into
//! real positions).

use burn::tensor::backend::Backend;
use burn::tensor::module::attention as sdpa;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Int, Tensor};

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
    let past = (s_k - s_q) as i64;
    // Query i sits in slot past + i.
    let rows = Tensor::<B, 1, Int>::arange(past..past + s_q as i64, device)
        .reshape([1, s_q, 1])
        .expand([batch, s_q, s_k]);
    let cols = Tensor::<B, 1, Int>::arange(0..s_k as i64, device)
        .reshape([1, 1, s_k])
        .expand([batch, s_q, s_k]);
    let mut hidden = cols.clone().greater(rows.clone());
    if let Some(w) = window {
        // slot j is out of the window of query slot i when j <= i - w
        let too_old = cols.clone().lower_equal(rows.clone().sub_scalar(w as i64));
        hidden = hidden.bool_or(too_old);
    }
    let mask = match segments {
        Some(segments) => {
            // [batch, s_k] -> [batch, s_q, s_k] along keys, and the queries' own segments along rows
            let seg_k = segments
                .clone()
                .reshape([batch, 1, s_k])
                .expand([batch, s_q, s_k]);
            let seg_q = segments
                .clone()
                .slice([0..batch, s_k - s_q..s_k])
                .reshape([batch, s_q, 1])
                .expand([batch, s_q, s_k]);
            let mut foreign = seg_k.clone().not_equal(seg_q).bool_or(seg_k.equal_elem(0));
            if shared > 0 {
                foreign = foreign.bool_and(cols.clone().greater_equal_elem(shared as i64));
            }
            let own_slot = cols.equal(rows);
            hidden.bool_or(foreign.bool_and(own_slot.bool_not()))
        }
        None => hidden,
    };
    mask.unsqueeze_dim::<4>(1)
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

/// `softmax(q·kᵀ / sqrt(head_dim) + mask) · v` with GQA.
///
/// # Shapes
/// - q: `[batch, heads, s_q, head_dim]`
/// - k, v: `[batch, kv_heads, s_k, head_dim]`
/// - mask: `[batch, 1, s_q, s_k]`, `true` = hidden
/// - returns `[batch, heads, s_q, head_dim]`
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<&Tensor<B, 4, Bool>>,
) -> Tensor<B, 4> {
    let [b, h, s_q, _] = q.dims();
    let [_, kvh, s_k, _] = k.dims();
    let n_rep = h / kvh;
    let k = repeat_kv(k, n_rep);
    let v = repeat_kv(v, n_rep);
    // [batch, 1, s_q, s_k] -> [batch, heads, s_q, s_k]
    let mask = mask.map(|m| m.clone().expand([b, h, s_q, s_k]));
    sdpa(q, k, v, mask, None, AttentionModuleOptions::default())
}
