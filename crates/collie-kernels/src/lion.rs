//! One Lion step over a parameter's contiguous buffer, the official code's arithmetic in the
//! order `collie_optim::Lion` spells it with tensor operations (so both give the same bits):
//!
//! ```text
//! θ ← θ·(1 − lr·wd)                   (when wd ≠ 0)
//! θ ← θ − sign(m·β1 + g·(1 − β1))·lr   (sign(0) = 0, sign(NaN) = NaN)
//! m ← m·β2 + g·(1 − β2)
//! ```
//!
//! Every scalar is rounded to f32 once, as the tensor operations' scalar arguments are.

use rayon::prelude::*;

use crate::simd;

/// The step's scalars (computed in f64 by the caller, rounded here).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LionStep {
    /// `β1` (the sign is taken of `m·β1 + g·(1 − β1)`).
    pub b1: f64,
    /// `1 − β1`.
    pub one_minus_b1: f64,
    /// `β2` (the momentum's decay).
    pub b2: f64,
    /// `1 − β2`.
    pub one_minus_b2: f64,
    /// The learning rate.
    pub lr: f64,
    /// `1 − lr·wd`, or `None` without decay.
    pub decay: Option<f64>,
}

impl LionStep {
    /// The scalars of a step with moment decays `(β1, β2)`, learning rate `lr` and decoupled
    /// weight decay `wd` (0: none), each `1 − x` taken in f64.
    pub fn new((b1, b2): (f64, f64), lr: f64, wd: f64) -> Self {
        LionStep {
            b1,
            one_minus_b1: 1.0 - b1,
            b2,
            one_minus_b2: 1.0 - b2,
            lr,
            decay: (wd != 0.0).then_some(1.0 - lr * wd),
        }
    }
}

/// Elements per parallel block (element-wise: any split gives the same bits).
const BLOCK: usize = 1 << 14;

/// Burn's `sign`: ±1, 0 for ±0, NaN for NaN.
#[inline(always)]
fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else if x.is_nan() {
        x
    } else {
        0.0
    }
}

/// Updates `theta` and `m` in place from the gradient `g`.
///
/// # Panics
/// If the lengths differ.
pub fn step(theta: &mut [f32], m: &mut [f32], g: &[f32], s: LionStep) {
    let n = g.len();
    assert!(theta.len() == n && m.len() == n, "lion: lengths");
    let (b1, omb1, b2, omb2) = (
        s.b1 as f32,
        s.one_minus_b1 as f32,
        s.b2 as f32,
        s.one_minus_b2 as f32,
    );
    let lr = s.lr as f32;
    let decay = s.decay.map(|d| d as f32);
    theta
        .par_chunks_mut(BLOCK)
        .zip(m.par_chunks_mut(BLOCK))
        .zip(g.par_chunks(BLOCK))
        .for_each(|((t, m), g)| {
            simd::run(
                #[inline(always)]
                || {
                    for ((t, m), &g) in t.iter_mut().zip(m.iter_mut()).zip(g) {
                        let th = match decay {
                            Some(d) => *t * d,
                            None => *t,
                        };
                        *t = th - sign(*m * b1 + g * omb1) * lr;
                        *m = *m * b2 + g * omb2;
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
    fn three_steps_match_f64_and_every_level_exactly() {
        let n = 3 * BLOCK + 7;
        let (b1, b2, lr, wd) = (0.9f64, 0.99f64, 1e-4f64, 0.1f64);
        let theta0 = values(n, 91, 1.0);
        let grads: Vec<Vec<f32>> = (0..3).map(|k| values(n, 92 + k, 0.1)).collect();
        let got = same_at_every_level(|| {
            let (mut t, mut m) = (theta0.clone(), vec![0.0; n]);
            for g in &grads {
                step(&mut t, &mut m, g, LionStep::new((b1, b2), lr, wd));
            }
            t
        });
        let (mut t, mut m) = (
            theta0.iter().map(|&x| x as f64).collect::<Vec<_>>(),
            vec![0.0f64; n],
        );
        for g in &grads {
            for i in 0..n {
                let g = g[i] as f64;
                t[i] *= 1.0 - lr * wd;
                let c = b1 * m[i] + (1.0 - b1) * g;
                t[i] -= lr * if c == 0.0 { 0.0 } else { c.signum() };
                m[i] = b2 * m[i] + (1.0 - b2) * g;
            }
        }
        let worst = got
            .iter()
            .zip(&t)
            .map(|(&a, &b)| (a as f64 - b).abs())
            .fold(0.0f64, |m, d| if d.is_nan() || d > m { d } else { m });
        // each step moves θ by exactly lr or 0 (the signs agree): what differs is f32 rounding
        // of θ (~6e-8 relative to |θ| ≤ 1 per step)
        assert!(worst < 3e-7, "max |Δθ| vs f64 {worst}");
    }

    #[test]
    fn the_sign_is_zero_at_zero_and_nan_passes_through() {
        let (lr, wd) = (1e-2f64, 0.1f64);
        let s = LionStep::new((0.9, 0.99), lr, wd);
        let d = 1.0 - lr * wd;
        let (mut t, mut m) = (vec![0.5f32; 4], vec![0.0f32; 4]);
        step(&mut t, &mut m, &[0.0, 1.0, -1.0, f32::NAN], s);
        let (lr, d) = (lr as f32, d as f32);
        assert_eq!(t[..3], [0.5 * d, 0.5 * d - lr, 0.5 * d + lr]);
        assert!(t[3].is_nan() && m[3].is_nan());
        assert_eq!(m[..3], [0.0, 0.01, -0.01]);
    }
}
