//! RMSNorm and LayerNorm over rows, forward and backward in one pass per row:
//! `x̂ = (x − μ) / √(mean((x − μ)²) + ε)` (μ = 0 for RMSNorm), `y = x̂ · (w + offset) + b`.
//!
//! The arithmetic is the unfused layer's (`collie_core::nn::Norm`): a division by the root, then
//! a product with the scale. The backward recomputes `x̂` from `x` rather than storing it:
//! `g = dy · (w + offset)`, `dx = (g − mean(g) − x̂ · mean(g · x̂)) / σ` (no `mean(g)` term for
//! RMSNorm), `dw = Σ_rows dy · x̂`, `db = Σ_rows dy`.

use rayon::prelude::*;

use crate::{dot, rows_per_task, simd, sum};

/// What distinguishes the norms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormSpec {
    /// Added to the mean square before the root.
    pub eps: f32,
    /// Added to the weight before it scales (Gemma's `1 + w`).
    pub offset: f32,
    /// Subtract the row mean first (LayerNorm).
    pub center: bool,
}

/// `x − μ` into `xc` and the root `σ = √(mean(xc²) + ε)`.
#[inline(always)]
fn center_and_root(x: &[f32], spec: NormSpec, xc: &mut [f32]) -> f32 {
    let d = x.len() as f32;
    if spec.center {
        let mean = sum(x) / d;
        xc.iter_mut().zip(x).for_each(|(c, &v)| *c = v - mean);
    } else {
        xc.copy_from_slice(x);
    }
    (dot(xc, xc) / d + spec.eps).sqrt()
}

/// `y = x̂ · (w + offset) + b` over rows of `w.len()` features; `sigma` receives each row's `σ`.
///
/// # Panics
/// If the lengths do not agree.
pub fn forward(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    spec: NormSpec,
    y: &mut [f32],
    sigma: &mut [f32],
) {
    let d = w.len();
    assert!(
        d > 0 && x.len() == y.len() && x.len() == d * sigma.len(),
        "norm: lengths"
    );
    assert!(b.is_none_or(|b| b.len() == d), "norm: bias length");
    // Rows and their σ travel together so each task writes its own part of both.
    let per = rows_per_task(d);
    y.par_chunks_mut(per * d)
        .zip(sigma.par_chunks_mut(per))
        .enumerate()
        .for_each(|(t, (yb, sb))| {
            simd::run(
                #[inline(always)]
                || {
                    for (i, (yr, s)) in yb.chunks_exact_mut(d).zip(sb.iter_mut()).enumerate() {
                        let r = (t * per + i) * d;
                        let root = center_and_root(&x[r..r + d], spec, yr);
                        *s = root;
                        match b {
                            Some(b) => {
                                for ((y, &w), &b) in yr.iter_mut().zip(w).zip(b) {
                                    *y = *y / root * (w + spec.offset) + b;
                                }
                            }
                            None => {
                                for (y, &w) in yr.iter_mut().zip(w) {
                                    *y = *y / root * (w + spec.offset);
                                }
                            }
                        }
                    }
                },
            )
        });
}

/// `dx` of [`forward`] from the output's gradient `dy`, and the weight's and bias's gradients
/// (`dw`, `db`, each `w.len()`; `db` is `Σ dy` whether or not the norm has a bias).
///
/// `dw` and `db` sum rows in f64 within fixed blocks, then the blocks in order: the same bits
/// on any number of threads, and no error growing with the number of rows.
///
/// # Panics
/// If the lengths do not agree.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    x: &[f32],
    w: &[f32],
    sigma: &[f32],
    dy: &[f32],
    spec: NormSpec,
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
) {
    let d = w.len();
    assert!(
        d > 0 && x.len() == dy.len() && x.len() == dx.len() && x.len() == d * sigma.len(),
        "norm backward: lengths"
    );
    assert!(
        dw.len() == d && db.len() == d,
        "norm backward: weight gradient lengths"
    );
    let per = rows_per_task(d);
    // Each block's partial (dw, db), in block order.
    let partials: Vec<Vec<f64>> = dx
        .par_chunks_mut(per * d)
        .enumerate()
        .map(|(t, xb)| {
            simd::run(
                #[inline(always)]
                || {
                    let mut part = vec![0.0f64; 2 * d];
                    let (pw, pb) = part.split_at_mut(d);
                    let mut g = vec![0.0f32; d];
                    for (i, dxr) in xb.chunks_exact_mut(d).enumerate() {
                        let row = t * per + i;
                        let r = row * d;
                        let (xr, dyr) = (&x[r..r + d], &dy[r..r + d]);
                        let root = sigma[row];
                        // x̂ as the forward computed it, into dx (overwritten below)
                        center_and_root(xr, spec, dxr);
                        dxr.iter_mut().for_each(|v| *v /= root);
                        for ((g, &dy), &w) in g.iter_mut().zip(dyr).zip(w) {
                            *g = dy * (w + spec.offset);
                        }
                        for (((pw, pb), &dy), &xh) in
                            pw.iter_mut().zip(pb.iter_mut()).zip(dyr).zip(dxr.iter())
                        {
                            *pw += (dy * xh) as f64;
                            *pb += dy as f64;
                        }
                        let n = d as f32;
                        let mg = if spec.center { sum(&g) / n } else { 0.0 };
                        let mgx = dot(&g, dxr) / n;
                        for (dx, &g) in dxr.iter_mut().zip(&g) {
                            *dx = (g - mg - *dx * mgx) / root;
                        }
                    }
                    part
                },
            )
        })
        .collect();
    let mut total = vec![0.0f64; 2 * d];
    for part in partials {
        total.iter_mut().zip(&part).for_each(|(a, b)| *a += b);
    }
    let (tw, tb) = total.split_at(d);
    dw.iter_mut().zip(tw).for_each(|(a, &b)| *a = b as f32);
    db.iter_mut().zip(tb).for_each(|(a, &b)| *a = b as f32);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{max_rel, same_at_every_level, values};

    /// f64 forward of one row: (y, x̂, σ).
    fn reference(
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        spec: NormSpec,
    ) -> (Vec<f64>, Vec<f64>, f64) {
        let d = x.len() as f64;
        let mean = if spec.center {
            x.iter().map(|&v| v as f64).sum::<f64>() / d
        } else {
            0.0
        };
        let xc: Vec<f64> = x.iter().map(|&v| v as f64 - mean).collect();
        let sigma = (xc.iter().map(|v| v * v).sum::<f64>() / d + spec.eps as f64).sqrt();
        let xh: Vec<f64> = xc.iter().map(|v| v / sigma).collect();
        let y = xh
            .iter()
            .enumerate()
            .map(|(j, v)| v * (w[j] as f64 + spec.offset as f64) + b.map_or(0.0, |b| b[j] as f64))
            .collect();
        (y, xh, sigma)
    }

    fn check(rows: usize, d: usize, spec: NormSpec, bias: bool) {
        let x = values(rows * d, 21, 3.0);
        let w = values(d, 22, 1.0);
        let b = bias.then(|| values(d, 23, 1.0));
        let dy = values(rows * d, 24, 1.0);
        let (y, sigma, dx, dw, db) = same_at_every_level(|| {
            let mut y = vec![0.0; rows * d];
            let mut sigma = vec![0.0; rows];
            forward(&x, &w, b.as_deref(), spec, &mut y, &mut sigma);
            let (mut dx, mut dw, mut db) = (vec![0.0; rows * d], vec![0.0; d], vec![0.0; d]);
            backward(&x, &w, &sigma, &dy, spec, &mut dx, &mut dw, &mut db);
            (y, sigma, dx, dw, db)
        });
        let (mut wy, mut wsig, mut wdx) = (Vec::new(), Vec::new(), Vec::new());
        let (mut wdw, mut wdb) = (vec![0.0f64; d], vec![0.0f64; d]);
        for r in 0..rows {
            let xr = &x[r * d..(r + 1) * d];
            let dyr = &dy[r * d..(r + 1) * d];
            let (yr, xh, s) = reference(xr, &w, b.as_deref(), spec);
            let g: Vec<f64> = dyr
                .iter()
                .zip(&w)
                .map(|(&a, &w)| a as f64 * (w as f64 + spec.offset as f64))
                .collect();
            let n = d as f64;
            let mg = if spec.center {
                g.iter().sum::<f64>() / n
            } else {
                0.0
            };
            let mgx = g.iter().zip(&xh).map(|(a, b)| a * b).sum::<f64>() / n;
            wdx.extend(g.iter().zip(&xh).map(|(g, xh)| (g - mg - xh * mgx) / s));
            for j in 0..d {
                wdw[j] += dyr[j] as f64 * xh[j];
                wdb[j] += dyr[j] as f64;
            }
            wy.extend(yr);
            wsig.push(s);
        }
        let scale = |v: &[f64]| v.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        for (name, got, want) in [
            ("y", &y, &wy),
            ("sigma", &sigma, &wsig),
            ("dx", &dx, &wdx),
            ("dw", &dw, &wdw),
            ("db", &db, &wdb),
        ] {
            let err = max_rel(got, want, scale(want));
            assert!(
                err < 1e-6,
                "{name} ({rows}x{d}, {spec:?}): relative error {err}"
            );
        }
    }

    #[test]
    fn rms_norm_matches_f64() {
        let spec = NormSpec {
            eps: 1e-6,
            offset: 0.0,
            center: false,
        };
        check(1, 64, spec, false);
        check(5, 37, spec, false);
        check(1500, 19, spec, false); // several rayon blocks
    }

    #[test]
    fn gemma_offset_and_layer_norm_match_f64() {
        check(
            9,
            33,
            NormSpec {
                eps: 1e-6,
                offset: 1.0,
                center: false,
            },
            false,
        );
        check(
            9,
            33,
            NormSpec {
                eps: 1e-12,
                offset: 0.0,
                center: true,
            },
            true,
        );
        check(
            3,
            1,
            NormSpec {
                eps: 1e-5,
                offset: 0.0,
                center: true,
            },
            true,
        );
    }
}
