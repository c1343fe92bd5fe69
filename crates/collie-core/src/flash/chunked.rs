//! [`Chunked`]: memory-efficient attention from Burn tensor ops on any backend. Query rows are
//! processed in blocks; a block's scores `[batch, kv_heads, n_rep · rows, s_k]` are the largest
//! tensor alive, so memory grows with `rows · s_k`, not `s_q · s_k`. Query heads are grouped
//! under their key/value head (`[batch, kv_heads, n_rep, …]`) so K and V are used as they are.
//! Scores, softmax and log-sum-exp are computed in f32 whatever the input dtype.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

use super::FlashKernels;
use crate::attention::AttnMask;

/// The portable kernels (CPU; the reference of the GPU kernels).
#[derive(Debug, Clone, Copy, Default)]
pub struct Chunked;

/// Score elements of one block (16 Mi f32 = 64 MiB): big enough for efficient matmuls,
/// small against a 4k × 4k × heads matrix.
const BLOCK_ELEMENTS: usize = 1 << 24;

/// Query rows per block for `batch · heads · s_k` scores per row.
fn block_rows(batch: usize, heads: usize, s_q: usize, s_k: usize) -> usize {
    (BLOCK_ELEMENTS / (batch * heads * s_k).max(1)).clamp(16, s_q.max(16))
}

/// Scaled, masked scores of query rows `rows` in f32.
///
/// # Shapes
/// - qg: `[batch, kv_heads, n_rep, s_q, d]`, k: `[batch, kv_heads, s_k, d]`
/// - returns `[batch, kv_heads, n_rep, rows, s_k]`
fn scores<I: Backend>(
    qg: &Tensor<I, 5>,
    k: &Tensor<I, 4>,
    rows: std::ops::Range<usize>,
    mask: Option<&AttnMask<I>>,
) -> Tensor<I, 5> {
    let [b, kvh, r, _, d] = qg.dims();
    let s_k = k.dims()[2];
    let n = rows.len();
    let scale = 1.0 / (d as f64).sqrt();
    // [batch, kv_heads, n_rep, rows, d] -> [batch, kv_heads, n_rep · rows, d]
    let qc = qg
        .clone()
        .slice([0..b, 0..kvh, 0..r, rows.clone(), 0..d])
        .reshape([b, kvh, r * n, d]);
    // [batch, kv_heads, n_rep · rows, s_k] -> [batch, kv_heads, n_rep, rows, s_k]
    let s = qc
        .matmul(k.clone().swap_dims(2, 3))
        .cast(DType::F32)
        .mul_scalar(scale)
        .reshape([b, kvh, r, n, s_k]);
    match mask {
        Some(m) => {
            // [batch, 1, rows, s_k] -> [batch, 1, 1, rows, s_k], broadcast over heads
            let hidden = m
                .rows(rows, &s.device())
                .unsqueeze_dim::<5>(1)
                .expand([b, kvh, r, n, s_k]);
            s.mask_fill(hidden, f32::NEG_INFINITY)
        }
        None => s,
    }
}

impl<I: Backend> FlashKernels<I> for Chunked {
    fn forward(
        q: Tensor<I, 4>,
        k: Tensor<I, 4>,
        v: Tensor<I, 4>,
        mask: Option<&AttnMask<I>>,
    ) -> (Tensor<I, 4>, Tensor<I, 3>) {
        let [b, h, s_q, _] = q.dims();
        let rows = block_rows(b, h, s_q, k.dims()[2]);
        forward_rows(q, k, v, mask, rows)
    }

    fn backward(
        q: Tensor<I, 4>,
        k: Tensor<I, 4>,
        v: Tensor<I, 4>,
        o: Tensor<I, 4>,
        lse: Tensor<I, 3>,
        d_o: Tensor<I, 4>,
        mask: Option<&AttnMask<I>>,
    ) -> (Tensor<I, 4>, Tensor<I, 4>, Tensor<I, 4>) {
        let [b, h, s_q, _] = q.dims();
        let rows = block_rows(b, h, s_q, k.dims()[2]);
        backward_rows(q, k, v, o, lse, d_o, mask, rows)
    }
}

/// [`FlashKernels::forward`] in blocks of `rows` query rows.
fn forward_rows<I: Backend>(
    q: Tensor<I, 4>,
    k: Tensor<I, 4>,
    v: Tensor<I, 4>,
    mask: Option<&AttnMask<I>>,
    rows: usize,
) -> (Tensor<I, 4>, Tensor<I, 3>) {
    let [b, h, s_q, d] = q.dims();
    let [_, kvh, s_k, _] = k.dims();
    let (r, dtype) = (h / kvh, q.dtype());
    // [batch, heads, s_q, d] -> [batch, kv_heads, n_rep, s_q, d]
    let qg = q.reshape([b, kvh, r, s_q, d]);
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    for start in (0..s_q).step_by(rows) {
        let end = (start + rows).min(s_q);
        let n = end - start;
        let s = scores(&qg, &k, start..end, mask);
        let max = s.clone().max_dim(4);
        let p = (s - max.clone()).exp();
        let sum = p.clone().sum_dim(4);
        // [batch, kv_heads, n_rep · rows, s_k] · [batch, kv_heads, s_k, d]
        let o = p
            .reshape([b, kvh, r * n, s_k])
            .cast(dtype)
            .matmul(v.clone())
            .cast(DType::F32)
            .reshape([b, kvh, r, n, d])
            / sum.clone();
        outs.push(o.cast(dtype));
        lses.push(max + sum.log());
    }
    // [batch, kv_heads, n_rep, s_q, ·] -> [batch, heads, s_q, ·]
    let o = Tensor::cat(outs, 3).reshape([b, h, s_q, d]);
    let lse = Tensor::cat(lses, 3).reshape([b, h, s_q]);
    (o, lse)
}

/// [`FlashKernels::backward`] in blocks of `rows` query rows.
#[allow(clippy::too_many_arguments)]
fn backward_rows<I: Backend>(
    q: Tensor<I, 4>,
    k: Tensor<I, 4>,
    v: Tensor<I, 4>,
    o: Tensor<I, 4>,
    lse: Tensor<I, 3>,
    d_o: Tensor<I, 4>,
    mask: Option<&AttnMask<I>>,
    rows: usize,
) -> (Tensor<I, 4>, Tensor<I, 4>, Tensor<I, 4>) {
    let [b, h, s_q, d] = q.dims();
    let [_, kvh, s_k, _] = k.dims();
    let (r, dtype) = (h / kvh, q.dtype());
    let scale = 1.0 / (d as f64).sqrt();
    // D_i = Σ_d dO_i · O_i: [batch, kv_heads, n_rep, s_q, 1]
    let delta = (d_o.clone().cast(DType::F32) * o.cast(DType::F32))
        .sum_dim(3)
        .reshape([b, kvh, r, s_q, 1]);
    let lse = lse.cast(DType::F32).reshape([b, kvh, r, s_q, 1]);
    let qg = q.reshape([b, kvh, r, s_q, d]);
    let dog = d_o.reshape([b, kvh, r, s_q, d]);
    let mut dk = Tensor::<I, 4>::zeros([b, kvh, s_k, d], &k.device()).cast(DType::F32);
    let mut dv = dk.clone();
    let mut dqs = Vec::new();
    for start in (0..s_q).step_by(rows) {
        let end = (start + rows).min(s_q);
        let n = end - start;
        let block =
            |t: &Tensor<I, 5>, w: usize| t.clone().slice([0..b, 0..kvh, 0..r, start..end, 0..w]);
        // P = exp(S − lse): hidden scores are −∞, so their P is 0.
        let p = (scores(&qg, &k, start..end, mask) - block(&lse, 1)).exp();
        // [batch, kv_heads, n_rep · rows, ·]
        let p2 = p.clone().reshape([b, kvh, r * n, s_k]);
        let doc = block(&dog, d).reshape([b, kvh, r * n, d]);
        let qc = block(&qg, d).reshape([b, kvh, r * n, d]);
        // dV += Pᵀ · dO: [batch, kv_heads, s_k, d]
        dv = dv
            + p2.cast(dtype)
                .swap_dims(2, 3)
                .matmul(doc.clone())
                .cast(DType::F32);
        // dP = dO · Vᵀ: [batch, kv_heads, n_rep, rows, s_k]
        let dp = doc
            .matmul(v.clone().swap_dims(2, 3))
            .cast(DType::F32)
            .reshape([b, kvh, r, n, s_k]);
        let ds = (p * (dp - block(&delta, 1)))
            .reshape([b, kvh, r * n, s_k])
            .mul_scalar(scale)
            .cast(dtype);
        // dQ = dS · K, dK += dSᵀ · Q
        dqs.push(ds.clone().matmul(k.clone()).reshape([b, kvh, r, n, d]));
        dk = dk + ds.swap_dims(2, 3).matmul(qc).cast(DType::F32);
    }
    let dq = Tensor::cat(dqs, 3).reshape([b, h, s_q, d]);
    (dq, dk.cast(dtype), dv.cast(dtype))
}

#[cfg(all(test, feature = "cpu"))]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, Int};

    type B = crate::device::Cpu;

    /// Blocks of 3 rows give the single-block result (GQA, padding, documents, cache).
    #[test]
    fn block_size_does_not_change_the_result() {
        let device = Default::default();
        let (b, h, kvh, s_q, s_k, d) = (2, 4, 2, 7, 9, 8);
        let n = Distribution::Normal(0.0, 1.0);
        let q = Tensor::<B, 4>::random([b, h, s_q, d], n, &device);
        let k = Tensor::<B, 4>::random([b, kvh, s_k, d], n, &device);
        let v = Tensor::<B, 4>::random([b, kvh, s_k, d], n, &device);
        let d_o = Tensor::<B, 4>::random([b, h, s_q, d], n, &device);
        let seg = Tensor::<B, 1, Int>::from_ints(
            [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3],
            &device,
        )
        .reshape([b, s_k]);
        let mask = AttnMask::new(b, s_q, s_k, Some(seg), Some(4), 0);
        let (o1, l1) = forward_rows(q.clone(), k.clone(), v.clone(), Some(&mask), s_q);
        let (o3, l3) = forward_rows(q.clone(), k.clone(), v.clone(), Some(&mask), 3);
        let g1 = backward_rows(
            q.clone(),
            k.clone(),
            v.clone(),
            o1.clone(),
            l1.clone(),
            d_o.clone(),
            Some(&mask),
            s_q,
        );
        let g3 = backward_rows(q, k, v, o1.clone(), l1.clone(), d_o, Some(&mask), 3);
        let diff = |a: Tensor<B, 4>, b: Tensor<B, 4>| (a - b).abs().max().into_scalar();
        assert!(diff(o1, o3) < 1e-6);
        assert!((l1 - l3).abs().max().into_scalar() < 1e-6);
        assert!(diff(g1.0, g3.0) < 1e-5);
        assert!(diff(g1.1, g3.1) < 1e-5);
        assert!(diff(g1.2, g3.2) < 1e-5);
    }
}
