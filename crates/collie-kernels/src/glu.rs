//! Gated linear units: `y = act(gate) · up`, SwiGLU (`act = silu`) and GeGLU (`act` = GELU with
//! the tanh approximation), forward and backward element by element.
//!
//! - silu: `a = g·σ(g)`, `a' = σ(g)·(1 + g·(1 − σ(g)))`;
//! - GELU-tanh: `a = ½·g·(1 + tanh(z))`, `z = √(2/π)·(g + 0.044715·g³)`, computed as
//!   `a = g·σ(2z)` (the same function: `1 + tanh(z) = 2σ(2z)`), which does not cancel where
//!   `tanh(z) ≈ −1`; `a' = σ(2z) + g·2σ(2z)(1 − σ(2z))·√(2/π)·(1 + 3·0.044715·g²)`.

use rayon::prelude::*;

use crate::simd;

/// The gate's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// `g · sigmoid(g)`.
    Silu,
    /// PyTorch's `gelu(approximate="tanh")`.
    GeluTanh,
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const CUBIC: f32 = 0.044_715;

/// `(σ(x), 1 − σ(x))`, both without cancellation: with `e = e⁻ˣ`, `σ = 1 / (1 + e)` and
/// `1 − σ = e·σ` (1 where `e` overflows).
#[inline(always)]
fn sigmoid_pair(x: f32) -> (f32, f32) {
    let e = simd::exp(-x);
    let s = 1.0 / (1.0 + e);
    let rest = if e == f32::INFINITY { 1.0 } else { e * s };
    (s, rest)
}

/// `(act(g), act'(g))`.
#[inline(always)]
fn act(gate: Gate, g: f32) -> (f32, f32) {
    match gate {
        Gate::Silu => {
            let (s, rest) = sigmoid_pair(g);
            (g * s, s * (1.0 + g * rest))
        }
        Gate::GeluTanh => {
            let (s, rest) = sigmoid_pair(2.0 * SQRT_2_OVER_PI * (g + CUBIC * (g * g * g)));
            let dz = SQRT_2_OVER_PI * (1.0 + 3.0 * CUBIC * (g * g));
            (g * s, s + g * (2.0 * s * rest) * dz)
        }
    }
}

/// Elements per parallel block (the kernels are element-wise: any split gives the same bits).
const BLOCK: usize = 4096;

/// `y = act(gate) · up`.
///
/// # Panics
/// If the lengths differ.
pub fn forward(kind: Gate, gate: &[f32], up: &[f32], y: &mut [f32]) {
    assert!(
        gate.len() == up.len() && gate.len() == y.len(),
        "glu: lengths"
    );
    y.par_chunks_mut(BLOCK).enumerate().for_each(|(t, block)| {
        simd::run(
            #[inline(always)]
            || {
                let r = t * BLOCK..t * BLOCK + block.len();
                for ((y, &g), &u) in block.iter_mut().zip(&gate[r.clone()]).zip(&up[r]) {
                    *y = act(kind, g).0 * u;
                }
            },
        )
    });
}

/// Gradients of `gate` and `up` from the output's gradient `dy`.
///
/// # Panics
/// If the lengths differ.
pub fn backward(
    kind: Gate,
    gate: &[f32],
    up: &[f32],
    dy: &[f32],
    dgate: &mut [f32],
    dup: &mut [f32],
) {
    let n = gate.len();
    assert!(
        up.len() == n && dy.len() == n && dgate.len() == n && dup.len() == n,
        "glu backward: lengths"
    );
    dgate
        .par_chunks_mut(BLOCK)
        .zip(dup.par_chunks_mut(BLOCK))
        .enumerate()
        .for_each(|(t, (dg, du))| {
            simd::run(
                #[inline(always)]
                || {
                    let r = t * BLOCK..t * BLOCK + dg.len();
                    let (g, u, d) = (&gate[r.clone()], &up[r.clone()], &dy[r]);
                    for ((((dg, du), &g), &u), &d) in
                        dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(d)
                    {
                        let (a, da) = act(kind, g);
                        *du = d * a;
                        *dg = d * u * da;
                    }
                },
            )
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{max_rel, same_at_every_level, values};

    fn reference(kind: Gate, g: f64) -> (f64, f64) {
        match kind {
            Gate::Silu => {
                let s = 1.0 / (1.0 + (-g).exp());
                (g * s, s * (1.0 + g * (1.0 - s)))
            }
            Gate::GeluTanh => {
                let k = (2.0 / std::f64::consts::PI).sqrt();
                let c = 0.044715;
                let t = (k * (g + c * g * g * g)).tanh();
                (
                    0.5 * g * (1.0 + t),
                    0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * k * (1.0 + 3.0 * c * g * g),
                )
            }
        }
    }

    #[test]
    fn both_gates_match_f64() {
        for kind in [Gate::Silu, Gate::GeluTanh] {
            for n in [1, 15, 4099, 3 * BLOCK + 5] {
                let mut g = values(n, 31, 12.0);
                if n > 3 {
                    g[0] = 100.0;
                    g[1] = -100.0;
                    g[2] = 0.0;
                }
                let u = values(n, 32, 2.0);
                let dy = values(n, 33, 1.0);
                let (y, dg, du) = same_at_every_level(|| {
                    let mut y = vec![0.0; n];
                    forward(kind, &g, &u, &mut y);
                    let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
                    backward(kind, &g, &u, &dy, &mut dg, &mut du);
                    (y, dg, du)
                });
                let want = |f: &dyn Fn(usize) -> f64| (0..n).map(f).collect::<Vec<f64>>();
                let wy = want(&|i| reference(kind, g[i] as f64).0 * u[i] as f64);
                let wdg = want(&|i| dy[i] as f64 * u[i] as f64 * reference(kind, g[i] as f64).1);
                let wdu = want(&|i| dy[i] as f64 * reference(kind, g[i] as f64).0);
                // relative to the largest element: near a zero of act' the f32 formula cancels
                for (name, got, want) in [("y", &y, &wy), ("dgate", &dg, &wdg), ("dup", &du, &wdu)]
                {
                    let err = max_rel(got, want, want.iter().fold(0.0f64, |m, x| m.max(x.abs())));
                    assert!(err < 2e-6, "{kind:?} {name} n={n}: relative error {err}");
                }
            }
        }
    }
}
