//! Rotary position embeddings on the head layout: `y = x·cos + rotate(x)·sin`, where `rotate`
//! pairs feature `i` with `i + r/2` (`rotate_half`: `(x₁, x₂) ↦ (−x₂, x₁)`) or, interleaved,
//! `2i` with `2i + 1`; features past the tables' width `r` pass through (partial rotary).
//!
//! The input is read through its strides, so the `[batch, seq, heads, d]` projection output
//! viewed as `[batch, heads, seq, d]` is rotated and laid out for attention in one pass. The
//! rotation's transpose is the rotation by `−sin`, so [`apply`] with `sign = −1` is the
//! backward.

use crate::{par_rows, View4};

/// The angles: `cos`, `sin` `[batch, seq, width]` (`width ≤ d`, even), and how features pair.
#[derive(Debug, Clone, Copy)]
pub struct Tables<'a> {
    /// `cos` of each position's angles.
    pub cos: &'a [f32],
    /// `sin` of the same angles.
    pub sin: &'a [f32],
    /// Rotated features per row.
    pub width: usize,
    /// Pairs `(2i, 2i + 1)` (GLM) rather than `(i, i + width/2)`.
    pub interleaved: bool,
}

/// Rotates `x` (read through `view`, logically `[batch, heads, seq, d]`) into `out`, contiguous
/// in `[batch, heads, seq, d]` order, or in `[batch, seq, heads, d]` order when `seq_major_out`
/// (the layout of the projection a backward returns its gradient to); `sign = 1` rotates
/// forward, `−1` applies the transpose (the backward).
///
/// # Panics
/// If the lengths do not agree with the shapes.
pub fn apply(x: &[f32], view: View4, t: Tables, sign: f32, seq_major_out: bool, out: &mut [f32]) {
    let [b, h, s, d] = view.shape;
    let r = t.width;
    assert!(
        r <= d && r.is_multiple_of(2),
        "rope: table width {r} vs head width {d}"
    );
    assert!(
        t.cos.len() == b * s * r && t.sin.len() == t.cos.len(),
        "rope: table lengths"
    );
    assert_eq!(out.len(), b * h * s * d, "rope: output length");
    let [sb, sh, ss, sd] = view.strides;
    let half = r / 2;
    par_rows(
        out,
        d,
        #[inline(always)]
        |first, block| {
            for (i, o) in block.chunks_exact_mut(d).enumerate() {
                let row = first + i;
                let (bi, hi, si) = if seq_major_out {
                    (row / (s * h), row % h, (row / h) % s)
                } else {
                    (row / (h * s), (row / s) % h, row % s)
                };
                let start = view.offset + bi * sb + hi * sh + si * ss;
                let k = (bi * s + si) * r;
                let (c, sn) = (&t.cos[k..k + r], &t.sin[k..k + r]);
                if sd == 1 {
                    rotate_row(&x[start..start + d], c, sn, half, t.interleaved, sign, o);
                } else {
                    let xs: Vec<f32> = (0..d).map(|j| x[start + j * sd]).collect();
                    rotate_row(&xs, c, sn, half, t.interleaved, sign, o);
                }
            }
        },
    );
}

/// One row: `o = x·c + rotate(x)·(sign·s)` over the first `2·half` features, then a copy.
#[inline(always)]
fn rotate_row(
    x: &[f32],
    c: &[f32],
    s: &[f32],
    half: usize,
    interleaved: bool,
    sign: f32,
    o: &mut [f32],
) {
    let r = 2 * half;
    if interleaved {
        for i in 0..half {
            let (a, b) = (x[2 * i], x[2 * i + 1]);
            o[2 * i] = a * c[2 * i] + (-b) * (sign * s[2 * i]);
            o[2 * i + 1] = b * c[2 * i + 1] + a * (sign * s[2 * i + 1]);
        }
    } else {
        let (x1, x2) = x[..r].split_at(half);
        let (c1, c2) = c.split_at(half);
        let (s1, s2) = s.split_at(half);
        let (o1, o2) = o[..r].split_at_mut(half);
        for i in 0..half {
            o1[i] = x1[i] * c1[i] + (-x2[i]) * (sign * s1[i]);
            o2[i] = x2[i] * c2[i] + x1[i] * (sign * s2[i]);
        }
    }
    o[r..].copy_from_slice(&x[r..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{same_at_every_level, values};

    /// f64 rotation of a contiguous `[b, h, s, d]` tensor.
    fn reference(
        x: &[f32],
        shape: [usize; 4],
        cos: &[f32],
        sin: &[f32],
        r: usize,
        inter: bool,
        sign: f64,
    ) -> Vec<f64> {
        let [b, h, s, d] = shape;
        let mut out = vec![0.0; x.len()];
        for bi in 0..b {
            for hi in 0..h {
                for si in 0..s {
                    let row = ((bi * h + hi) * s + si) * d;
                    let t = (bi * s + si) * r;
                    for j in 0..d {
                        let xj = x[row + j] as f64;
                        out[row + j] = if j >= r {
                            xj
                        } else {
                            let (partner, neg) = if inter {
                                if j % 2 == 0 {
                                    (j + 1, true)
                                } else {
                                    (j - 1, false)
                                }
                            } else if j < r / 2 {
                                (j + r / 2, true)
                            } else {
                                (j - r / 2, false)
                            };
                            let p = x[row + partner] as f64 * if neg { -1.0 } else { 1.0 };
                            xj * cos[t + j] as f64 + p * sign * sin[t + j] as f64
                        };
                    }
                }
            }
        }
        out
    }

    #[test]
    fn rotation_and_its_transpose_match_f64() {
        for (shape, r, inter) in [
            ([2, 3, 5, 8], 8, false),
            ([1, 2, 7, 10], 6, false),
            ([2, 1, 3, 8], 8, true),
            ([1, 1, 1, 2], 2, false),
        ] {
            let [b, h, s, d] = shape;
            let x = values(b * h * s * d, 41, 2.0);
            let cos = values(b * s * r, 42, 1.0);
            let sin = values(b * s * r, 43, 1.0);
            let view = View4 {
                shape,
                strides: [h * s * d, s * d, d, 1],
                offset: 0,
            };
            for sign in [1.0f32, -1.0] {
                let got = same_at_every_level(|| {
                    let mut out = vec![0.0; x.len()];
                    apply(
                        &x,
                        view,
                        Tables {
                            cos: &cos,
                            sin: &sin,
                            width: r,
                            interleaved: inter,
                        },
                        sign,
                        false,
                        &mut out,
                    );
                    out
                });
                let want = reference(&x, shape, &cos, &sin, r, inter, sign as f64);
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (*g as f64 - w).abs() <= 1e-6 * w.abs().max(1.0),
                        "{shape:?} r={r}: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn reads_the_seq_major_layout() {
        // x stored [b, s, h, d], viewed [b, h, s, d]
        let (b, h, s, d) = (2, 3, 4, 6);
        let stored = values(b * s * h * d, 51, 1.0);
        let cos = values(b * s * d, 52, 1.0);
        let sin = values(b * s * d, 53, 1.0);
        let view = View4 {
            shape: [b, h, s, d],
            strides: [s * h * d, d, h * d, 1],
            offset: 0,
        };
        let mut got = vec![0.0; stored.len()];
        let t = Tables {
            cos: &cos,
            sin: &sin,
            width: d,
            interleaved: false,
        };
        apply(&stored, view, t, 1.0, false, &mut got);
        // the same values transposed by hand, contiguous
        let mut x = vec![0.0; stored.len()];
        for bi in 0..b {
            for hi in 0..h {
                for si in 0..s {
                    for j in 0..d {
                        x[((bi * h + hi) * s + si) * d + j] =
                            stored[((bi * s + si) * h + hi) * d + j];
                    }
                }
            }
        }
        let contiguous = View4 {
            shape: [b, h, s, d],
            strides: [h * s * d, s * d, d, 1],
            offset: 0,
        };
        let mut want = vec![0.0; x.len()];
        apply(&x, contiguous, t, 1.0, false, &mut want);
        assert_eq!(got, want);
        // and written back in the stored order: the transpose of the head-major result
        let mut back = vec![0.0; x.len()];
        apply(&stored, view, t, 1.0, true, &mut back);
        for bi in 0..b {
            for hi in 0..h {
                for si in 0..s {
                    for j in 0..d {
                        assert_eq!(
                            back[((bi * s + si) * h + hi) * d + j],
                            want[((bi * h + hi) * s + si) * d + j]
                        );
                    }
                }
            }
        }
    }
}
