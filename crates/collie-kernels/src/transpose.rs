//! Axes 1 and 2 of a strided 4-d view swapped into contiguous memory: attention's
//! `[batch, seq, heads, d]` ↔ `[batch, heads, seq, d]`, one row of `d` features copied at a
//! time (a `memcpy` where the features are contiguous), where a generic strided copy walks the
//! view one index at a time.

use crate::{par_rows, View4};

/// `out[i, k, j, :] = x[i, j, k, :]` for the view `[a, b, c, d]` of `x`; `out` is
/// `[a, c, b, d]`, contiguous. Its own inverse (on the output, viewed contiguously).
///
/// # Panics
/// If `out` is not `a·b·c·d` long or the view reaches past `x`.
pub fn swap12(x: &[f32], view: View4, out: &mut [f32]) {
    let [a, b, c, d] = view.shape;
    let [sa, sb, sc, sd] = view.strides;
    assert_eq!(out.len(), a * b * c * d, "swap12: output length");
    if out.is_empty() {
        return;
    }
    let last = view.offset + (a - 1) * sa + (b - 1) * sb + (c - 1) * sc + (d - 1) * sd;
    assert!(last < x.len(), "swap12: the view reaches past the buffer");
    par_rows(out, d, |first, rows| {
        for (r, row) in rows.chunks_exact_mut(d).enumerate() {
            // output row (i, k, j), j fastest
            let r = first + r;
            let (j, k, i) = (r % b, (r / b) % c, r / (b * c));
            let src = view.offset + i * sa + j * sb + k * sc;
            if sd == 1 {
                row.copy_from_slice(&x[src..src + d]);
            } else {
                for (t, v) in row.iter_mut().enumerate() {
                    *v = x[src + t * sd];
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::values;

    #[test]
    fn swaps_and_undoes() {
        // odd sizes, one-element axes, rows over several parallel tasks
        for shape in [[1, 1, 1, 1], [2, 3, 5, 7], [1, 9, 4, 1], [2, 40, 6, 64]] {
            let [a, b, c, d] = shape;
            let x = values(a * b * c * d, 61, 1.0);
            let mut y = vec![0.0; x.len()];
            swap12(&x, View4::contiguous(shape), &mut y);
            for i in 0..a {
                for j in 0..b {
                    for k in 0..c {
                        for t in 0..d {
                            assert_eq!(
                                y[((i * c + k) * b + j) * d + t],
                                x[((i * b + j) * c + k) * d + t]
                            );
                        }
                    }
                }
            }
            let mut back = vec![0.0; x.len()];
            swap12(&y, View4::contiguous([a, c, b, d]), &mut back);
            assert_eq!(back, x, "{shape:?}");
        }
    }

    #[test]
    fn reads_through_strides() {
        // [2, 3, 4, 5] stored as [2, 4, 3, 5] with an offset, and features two apart
        let (a, b, c, d) = (2, 3, 4, 5);
        let x = values(1 + a * b * c * d * 2, 62, 1.0);
        let view = View4 {
            shape: [a, b, c, d],
            strides: [c * b * d * 2, d * 2, b * d * 2, 2],
            offset: 1,
        };
        let mut y = vec![0.0; a * b * c * d];
        swap12(&x, view, &mut y);
        for i in 0..a {
            for j in 0..b {
                for k in 0..c {
                    for t in 0..d {
                        let src = 1 + i * c * b * d * 2 + j * d * 2 + k * b * d * 2 + t * 2;
                        assert_eq!(y[((i * c + k) * b + j) * d + t], x[src]);
                    }
                }
            }
        }
    }
}
