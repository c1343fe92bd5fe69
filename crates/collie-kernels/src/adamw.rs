//! One AdamW step over a parameter's contiguous buffer, `torch.optim.AdamW`'s arithmetic in the
//! order `collie_optim::AdamW` spells it with tensor operations (so both give the same bits):
//!
//! ```text
//! m ← m + (g − m)·(1 − β1)              v ← v·β2 + (g·g)·(1 − β2)
//! θ ← θ·(1 − lr·wd)    (when wd ≠ 0)
//! θ ← θ − (m / (√v / √(1 − β2ᵗ) + ε)) · lr/(1 − β1ᵗ)
//! ```
//!
//! Every scalar is rounded to f32 once, as the tensor operations' scalar arguments are.

use rayon::prelude::*;

use crate::simd;

/// The step's scalars (computed in f64 by the caller, rounded here).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// `1 − β1`.
    pub one_minus_b1: f64,
    /// `β2`.
    pub b2: f64,
    /// `1 − β2`.
    pub one_minus_b2: f64,
    /// `√(1 − β2ᵗ)`.
    pub bias2_sqrt: f64,
    /// `ε`.
    pub eps: f64,
    /// `1 − lr·wd`, or `None` without decay.
    pub decay: Option<f64>,
    /// `lr / (1 − β1ᵗ)`.
    pub step_size: f64,
}

/// Elements per parallel block (element-wise: any split gives the same bits).
const BLOCK: usize = 1 << 14;

/// Updates `theta`, `m` and `v` in place from the gradient `g`.
///
/// # Panics
/// If the lengths differ.
pub fn step(theta: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], s: AdamWStep) {
    let n = g.len();
    assert!(
        theta.len() == n && m.len() == n && v.len() == n,
        "adamw: lengths"
    );
    let (omb1, b2, omb2) = (s.one_minus_b1 as f32, s.b2 as f32, s.one_minus_b2 as f32);
    let (bias2, eps, size) = (s.bias2_sqrt as f32, s.eps as f32, s.step_size as f32);
    let decay = s.decay.map(|d| d as f32);
    theta
        .par_chunks_mut(BLOCK)
        .zip(m.par_chunks_mut(BLOCK))
        .zip(v.par_chunks_mut(BLOCK))
        .zip(g.par_chunks(BLOCK))
        .for_each(|(((t, m), v), g)| {
            simd::run(
                #[inline(always)]
                || {
                    for (((t, m), v), &g) in t.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g)
                    {
                        *m += (g - *m) * omb1;
                        *v = *v * b2 + (g * g) * omb2;
                        let th = match decay {
                            Some(d) => *t * d,
                            None => *t,
                        };
                        *t = th - (*m / (v.sqrt() / bias2 + eps)) * size;
                    }
                },
            )
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{same_at_every_level, values};

    #[test]
    fn three_steps_match_f64_closely_and_every_level_exactly() {
        let n = 3 * BLOCK + 7;
        let (b1, b2, lr, wd, eps) = (0.9f64, 0.999f64, 1e-3f64, 0.01f64, 1e-8f64);
        let theta0 = values(n, 71, 1.0);
        let grads: Vec<Vec<f32>> = (0..3).map(|k| values(n, 72 + k, 0.1)).collect();
        let got = same_at_every_level(|| {
            let (mut t, mut m, mut v) = (theta0.clone(), vec![0.0; n], vec![0.0; n]);
            for (k, g) in grads.iter().enumerate() {
                let step_no = (k + 1) as i32;
                let s = AdamWStep {
                    one_minus_b1: 1.0 - b1,
                    b2,
                    one_minus_b2: 1.0 - b2,
                    bias2_sqrt: (1.0 - b2.powi(step_no)).sqrt(),
                    eps,
                    decay: Some(1.0 - lr * wd),
                    step_size: lr / (1.0 - b1.powi(step_no)),
                };
                step(&mut t, &mut m, &mut v, g, s);
            }
            t
        });
        // f64 AdamW
        let (mut t, mut m, mut v) = (
            theta0.iter().map(|&x| x as f64).collect::<Vec<_>>(),
            vec![0.0f64; n],
            vec![0.0f64; n],
        );
        for (k, g) in grads.iter().enumerate() {
            let step_no = (k + 1) as i32;
            for i in 0..n {
                let g = g[i] as f64;
                m[i] = b1 * m[i] + (1.0 - b1) * g;
                v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                t[i] *= 1.0 - lr * wd;
                let denom = v[i].sqrt() / (1.0 - b2.powi(step_no)).sqrt() + eps;
                t[i] -= lr / (1.0 - b1.powi(step_no)) * m[i] / denom;
            }
        }
        let worst = got
            .iter()
            .zip(&t)
            .map(|(&a, &b)| (a as f64 - b).abs())
            .fold(0.0f64, |m, d| if d.is_nan() || d > m { d } else { m });
        // each step moves θ by ≤ lr; its f32 rounding is ~6e-8 relative to |θ| ≤ 1
        assert!(worst < 3e-7, "max |Δθ| vs f64 {worst}");
    }
}
