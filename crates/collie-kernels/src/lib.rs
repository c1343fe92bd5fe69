//! Fused CPU kernels over contiguous `f32` rows: the element-wise half of a training step done
//! in one pass per row instead of a chain of tensor operations, each with its backward.
//!
//! - [`softmax`]: scaled, masked softmax over attention scores;
//! - [`norm`]: RMSNorm and LayerNorm;
//! - [`glu`]: SwiGLU's `silu(gate) · up` and GeGLU;
//! - [`gelu`]: the exact (erf) GELU of BERT-family MLPs;
//! - [`dropout`]: inverted dropout with a counter-based mask (nothing stored for the backward);
//! - [`embedding`]: the lookup and its row-wise gradient;
//! - [`rope`]: rotary position embeddings, read through strides;
//! - [`transpose`]: a strided view's axes 1 and 2 swapped into contiguous memory (attention's
//!   heads split from and merged into the sequence);
//! - [`xent`]: cross-entropy of the LM head's logits against target ids;
//! - [`adamw`]: one AdamW update over a parameter's buffer;
//! - [`matmul`]: products of strided views through `gemm`, into one fresh buffer;
//! - [`alloc`]: the binaries' global allocator, large freed blocks kept mapped for reuse.
//!
//! Every kernel splits its rows over rayon's threads (fixed row blocks, so results never
//! depend on the thread count) and runs each block through [`simd::run`], which compiles the
//! loops for the best instruction set the CPU has (pulp's run-time dispatch: AVX-512, AVX2+FMA,
//! NEON, or the portable baseline). The loops are plain scalar code that the compiler
//! vectorizes; sums keep [`simd::LANES`] partial accumulators in a fixed order, and no
//! multiply-add is contracted, so every instruction set returns the same bits
//! ([`simd::set_level`] forces the fallbacks; the tests compare them).
//!
//! The crate has no Burn dependency: `collie_core::fused` adapts these kernels to Burn's CPU
//! backend and to autodiff. Kept apart so the test profile can build it optimized.

pub mod adamw;
pub mod alloc;
pub mod dropout;
pub mod embedding;
pub mod gelu;
pub mod glu;
pub mod lion;
pub mod matmul;
pub mod norm;
pub mod rope;
pub mod simd;
pub mod softmax;
pub mod transpose;
pub mod xent;

use rayon::prelude::*;

/// A strided 4-d view of a buffer: shape, element strides and the offset of element 0
/// (`[batch, heads, seq, d]` for attention's tensors).
#[derive(Debug, Clone, Copy)]
pub struct View4 {
    /// The view's shape.
    pub shape: [usize; 4],
    /// Strides in elements (non-negative).
    pub strides: [usize; 4],
    /// Offset of `[0, 0, 0, 0]`.
    pub offset: usize,
}

impl View4 {
    /// The row-major view of a whole buffer of `shape`.
    pub fn contiguous(shape: [usize; 4]) -> Self {
        let [_, b, c, d] = shape;
        View4 {
            shape,
            strides: [b * c * d, c * d, d, 1],
            offset: 0,
        }
    }
}

/// Elements a rayon task handles at least: below this, splitting costs more than it saves.
const TASK_ELEMENTS: usize = 1 << 14;

/// Rows of `width` elements per task (at least one).
fn rows_per_task(width: usize) -> usize {
    (TASK_ELEMENTS / width.max(1)).max(1)
}

/// Runs `f(first_row, out_rows)` over blocks of `out`'s rows (`width` elements each) in
/// parallel, each block under [`simd::run`].
fn par_rows<F>(out: &mut [f32], width: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    if width == 0 || out.is_empty() {
        return;
    }
    let per = rows_per_task(width);
    out.par_chunks_mut(per * width)
        .enumerate()
        .for_each(|(i, block)| {
            simd::run(
                #[inline(always)]
                || f(i * per, block),
            )
        });
}

/// Largest element of `x` (exact in any order; a NaN is skipped, as `f32::max` does).
#[inline(always)]
fn row_max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; simd::LANES];
    let mut chunks = x.chunks_exact(simd::LANES);
    for c in &mut chunks {
        for l in 0..simd::LANES {
            lanes[l] = lanes[l].max(c[l]);
        }
    }
    let mut max = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for l in lanes {
        max = max.max(l);
    }
    max
}

/// Sum of `x · y` with [`simd::LANES`] accumulators (the order every level shares).
#[inline(always)]
fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0.0f32; simd::LANES];
    let mut xc = x.chunks_exact(simd::LANES);
    let mut yc = y.chunks_exact(simd::LANES);
    for (a, b) in (&mut xc).zip(&mut yc) {
        for l in 0..simd::LANES {
            acc[l] += a[l] * b[l];
        }
    }
    for (l, (a, b)) in xc.remainder().iter().zip(yc.remainder()).enumerate() {
        acc[l] += a * b;
    }
    simd::reduce(acc)
}

/// Sum of `x` with [`simd::LANES`] accumulators.
#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; simd::LANES];
    let mut xc = x.chunks_exact(simd::LANES);
    for a in &mut xc {
        for l in 0..simd::LANES {
            acc[l] += a[l];
        }
    }
    for (l, a) in xc.remainder().iter().enumerate() {
        acc[l] += a;
    }
    simd::reduce(acc)
}

#[cfg(test)]
pub(crate) mod testing {
    //! Helpers of the kernel tests: deterministic inputs and the levels to compare.

    use crate::simd::{self, Level};

    /// `n` values in `[-scale, scale)` from a fixed linear congruential sequence.
    pub fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    /// Runs `f` at every level and asserts that all return the same bits.
    pub fn same_at_every_level<T: PartialEq + std::fmt::Debug>(f: impl Fn() -> T) -> T {
        let _guard = simd::LEVEL_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for level in [Level::Portable, Level::Avx2, Level::Best] {
            simd::set_level(level);
            out.push((level, f()));
        }
        simd::set_level(Level::Best);
        let (_, best) = out.pop().unwrap();
        for (level, v) in out {
            assert!(v == best, "{level:?} differs from the best level");
        }
        best
    }

    /// Largest `|a − b| / max(|b|, floor)`; NaN if either side has a NaN where the other has not.
    pub fn max_rel(a: &[f32], b: &[f64], floor: f64) -> f64 {
        assert_eq!(a.len(), b.len());
        let mut worst = 0.0f64;
        for (&x, &y) in a.iter().zip(b) {
            if x.is_nan() != y.is_nan() {
                return f64::NAN;
            }
            if x.is_nan() || (x as f64) == y {
                continue;
            }
            let r = (x as f64 - y).abs() / y.abs().max(floor);
            if r.is_nan() || r > worst {
                worst = r;
            }
        }
        worst
    }
}
