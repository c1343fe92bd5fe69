//! Matrix products of strided views into a fresh contiguous buffer (written once, by gemm), through the `gemm` crate
//! (the kernels Burn's CPU backend runs, so the products are the same bits).
//!
//! Here rather than through the backend's op because the backend allocates each product's
//! output twice (a zeroed buffer copied into an aligned one): on the CPU that copy, and the
//! page faults of the second buffer, were ~7 % of a retriever training step. Transposed operands
//! are read through their strides, never copied.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::View4;

/// Per-matrix multiply-adds from which gemm splits one product over the threads.
const PARALLEL_OPS: usize = 192 * 192 * 192;
/// Total multiply-adds from which a batch of small products runs one product per thread.
const BATCH_PARALLEL_OPS: usize = 128 * 128 * 128;

/// The highest element offset a view reaches (its buffer must be longer).
fn reach(v: &View4) -> usize {
    v.offset
        + v.shape
            .iter()
            .zip(&v.strides)
            .map(|(&n, &s)| n.saturating_sub(1) * s)
            .sum::<usize>()
}

/// `a[p, q] · b[p, q]` for every batch index `(p, q)`: `a` is `[P, Q, m, k]`, `b`
/// `[P, Q, k, n]` (any strides; a 2-d product is `P = Q = 1`); the result is `[P, Q, m, n]`,
/// contiguous, in a buffer gemm writes once (not zeroed first).
///
/// # Panics
/// If the shapes do not chain or a view reaches past its buffer.
pub fn matmul(a: &[f32], av: View4, b: &[f32], bv: View4) -> Vec<f32> {
    let [p, q, m, k] = av.shape;
    let n = bv.shape[3];
    assert!(
        bv.shape[..3] == [p, q, k],
        "matmul: {:?} · {:?}",
        av.shape,
        bv.shape
    );
    let len = p * q * m * n;
    if len == 0 || k == 0 {
        return vec![0.0; len];
    }
    assert!(
        reach(&av) < a.len(),
        "matmul: the left view reaches past its buffer"
    );
    assert!(
        reach(&bv) < b.len(),
        "matmul: the right view reaches past its buffer"
    );
    let batch = p * q;
    let per = m * n * k;
    let one = |i: usize, dst: &mut [MaybeUninit<f32>], threads: gemm::Parallelism| {
        let (pi, qi) = (i / q, i % q);
        let ao = av.offset + pi * av.strides[0] + qi * av.strides[1];
        let bo = bv.offset + pi * bv.strides[0] + qi * bv.strides[1];
        // SAFETY: every element the product reads lies in `a` and `b` (checked above: the
        // furthest is `reach`), and it writes the `m · n` contiguous elements of `dst` without
        // reading them (`read_dst = false`).
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr().cast::<f32>(),
                1,
                n as isize,
                false,
                a.as_ptr().add(ao),
                av.strides[3] as isize,
                av.strides[2] as isize,
                b.as_ptr().add(bo),
                bv.strides[3] as isize,
                bv.strides[2] as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                threads,
            );
        }
    };
    let mut out = Vec::<f32>::with_capacity(len);
    let dst = &mut out.spare_capacity_mut()[..len];
    let total = batch.saturating_mul(per);
    let by_batch = batch >= 4 && total >= BATCH_PARALLEL_OPS;
    if per >= PARALLEL_OPS && !by_batch {
        for (i, d) in dst.chunks_exact_mut(m * n).enumerate() {
            one(i, d, gemm::Parallelism::Rayon(0));
        }
    } else if batch > 1 && total >= BATCH_PARALLEL_OPS {
        dst.par_chunks_exact_mut(m * n)
            .enumerate()
            .for_each(|(i, d)| one(i, d, gemm::Parallelism::None));
    } else {
        for (i, d) in dst.chunks_exact_mut(m * n).enumerate() {
            one(i, d, gemm::Parallelism::None);
        }
    }
    // SAFETY: gemm wrote all `len` elements (every product's `m · n`, k > 0).
    unsafe { out.set_len(len) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::values;

    /// The product in f64, element by element through the views.
    fn reference(a: &[f32], av: View4, b: &[f32], bv: View4) -> Vec<f64> {
        let [p, q, m, k] = av.shape;
        let n = bv.shape[3];
        let at = |v: &View4, i: [usize; 4]| {
            v.offset + (0..4).map(|d| i[d] * v.strides[d]).sum::<usize>()
        };
        let mut out = Vec::new();
        for pi in 0..p {
            for qi in 0..q {
                for r in 0..m {
                    for c in 0..n {
                        out.push(
                            (0..k)
                                .map(|t| {
                                    a[at(&av, [pi, qi, r, t])] as f64
                                        * b[at(&bv, [pi, qi, t, c])] as f64
                                })
                                .sum(),
                        );
                    }
                }
            }
        }
        out
    }

    #[test]
    fn products_of_contiguous_and_transposed_views() {
        // 2-d, one row, a batch of small products, one large enough to split over threads,
        // and a transposed right side read through its strides (k · vᵀ as attention does)
        for (p, q, m, k, n, transposed) in [
            (1, 1, 1, 1, 1, false),
            (1, 1, 1, 37, 5, false),
            (2, 3, 17, 9, 33, true),
            (1, 1, 200, 190, 210, true),
            (3, 4, 64, 64, 64, false),
        ] {
            let a = values(p * q * m * k, 71, 1.0);
            let b = values(p * q * k * n, 72, 1.0);
            let av = View4::contiguous([p, q, m, k]);
            // b stored as [p, q, n, k] and read transposed
            let bv = if transposed {
                View4 {
                    shape: [p, q, k, n],
                    strides: [q * n * k, n * k, 1, k],
                    offset: 0,
                }
            } else {
                View4::contiguous([p, q, k, n])
            };
            let out = matmul(&a, av, &b, bv);
            let want = reference(&a, av, &b, bv);
            let worst = want.iter().fold(0.0f64, |w, x| w.max(x.abs()));
            let err = crate::testing::max_rel(&out, &want, worst);
            assert!(
                err < 1e-6,
                "[{p}, {q}, {m}, {k}] · n={n}: relative error {err}"
            );
        }
    }

    #[test]
    fn an_empty_inner_dimension_gives_zeros() {
        let out = matmul(
            &[],
            View4::contiguous([1, 1, 2, 0]),
            &[],
            View4::contiguous([1, 1, 0, 3]),
        );
        assert_eq!(out, vec![0.0; 6]);
    }
}
