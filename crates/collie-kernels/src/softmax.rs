//! Softmax of attention scores: `p = softmax(scale · s)` over each row of keys, hidden keys
//! excluded (probability 0), and its backward `ds = scale · p ∘ (dp − Σ dp ∘ p)`.
//!
//! One row is one query of one head; a mask row (`true`/nonzero = hidden) serves the rows of
//! every head of its batch row ([`RowMask`]).

use crate::{dot, par_rows, row_max, simd, sum};

/// Which mask row each score row reads.
///
/// Scores are `[batch, groups, rows, keys]`; the mask is `[batch, 1, mask_rows, keys]` with
/// `rows` a multiple of `mask_rows`: row `i` of a group reads mask row `i % mask_rows` (the
/// query heads of a key/value head stacked into the rows of one group, each a copy of the
/// queries; `mask_rows = 1` for a decoding step).
#[derive(Debug, Clone, Copy)]
pub struct RowMask<'a> {
    /// `[batch, mask_rows, keys]`, nonzero = hidden.
    pub hidden: &'a [u8],
    /// `groups · rows`: score rows per batch row.
    pub rows_per_batch: usize,
    /// Score rows per group.
    pub rows: usize,
    /// A divisor of `rows`.
    pub mask_rows: usize,
}

impl RowMask<'_> {
    /// The mask row of score row `r`, `keys` wide.
    #[inline(always)]
    fn row(&self, r: usize, keys: usize) -> &[u8] {
        let b = r / self.rows_per_batch;
        let i = (r % self.rows) % self.mask_rows;
        let start = (b * self.mask_rows + i) * keys;
        &self.hidden[start..start + keys]
    }
}

/// `out = softmax(scale · scores)` over rows of `keys`, hidden entries 0.
///
/// A row whose keys are all hidden comes out NaN (as `−∞ − (−∞)` does in the unfused
/// arithmetic); the attention masks never build one.
///
/// # Panics
/// If the slices' lengths are not whole rows, or the mask does not cover the rows.
pub fn forward(scores: &[f32], keys: usize, scale: f32, mask: Option<RowMask>, out: &mut [f32]) {
    assert_eq!(
        scores.len(),
        out.len(),
        "softmax: scores and output lengths"
    );
    assert!(
        keys > 0 && scores.len().is_multiple_of(keys),
        "softmax: rows of {keys} keys"
    );
    par_rows(
        out,
        keys,
        #[inline(always)]
        |first, block| {
            for (i, o) in block.chunks_exact_mut(keys).enumerate() {
                let r = first + i;
                let s = &scores[r * keys..(r + 1) * keys];
                match mask {
                    Some(m) => {
                        let hidden = m.row(r, keys);
                        for ((o, &s), &h) in o.iter_mut().zip(s).zip(hidden) {
                            *o = if h != 0 { f32::NEG_INFINITY } else { s * scale };
                        }
                    }
                    None => o.iter_mut().zip(s).for_each(|(o, &s)| *o = s * scale),
                }
                normalize(o);
            }
        },
    );
}

/// Turns scaled scores into probabilities in place.
#[inline(always)]
fn normalize(o: &mut [f32]) {
    let max = row_max(o);
    // A NaN score makes the whole row NaN, as in the unfused arithmetic.
    for x in o.iter_mut() {
        *x = simd::exp(*x - max);
    }
    let total = sum(o);
    for x in o.iter_mut() {
        *x /= total;
    }
}

/// Gradient of the scores from the probabilities `p` and their gradient `dp`:
/// `ds = scale · p ∘ (dp − Σ_k dp_k p_k)` per row (hidden entries have `p = 0`, so `ds = 0`).
///
/// # Panics
/// If the slices' lengths differ or are not whole rows.
pub fn backward(p: &[f32], dp: &[f32], keys: usize, scale: f32, ds: &mut [f32]) {
    assert!(
        p.len() == dp.len() && p.len() == ds.len(),
        "softmax backward: lengths"
    );
    assert!(
        keys > 0 && p.len().is_multiple_of(keys),
        "softmax backward: rows of {keys} keys"
    );
    par_rows(
        ds,
        keys,
        #[inline(always)]
        |first, block| {
            for (i, d) in block.chunks_exact_mut(keys).enumerate() {
                let r = (first + i) * keys;
                let (p, dp) = (&p[r..r + keys], &dp[r..r + keys]);
                let c = dot(p, dp);
                for ((d, &p), &g) in d.iter_mut().zip(p).zip(dp) {
                    *d = scale * (p * (g - c));
                }
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{max_rel, same_at_every_level, values};

    /// f64 softmax of one row, hidden entries 0.
    fn reference(s: &[f32], hidden: &[u8], scale: f32) -> Vec<f64> {
        let v: Vec<f64> = s.iter().map(|&x| (x * scale) as f64).collect();
        let max = v
            .iter()
            .zip(hidden)
            .filter(|(_, &h)| h == 0)
            .fold(f64::NEG_INFINITY, |m, (&x, _)| m.max(x));
        let e: Vec<f64> = v
            .iter()
            .zip(hidden)
            .map(|(&x, &h)| if h != 0 { 0.0 } else { (x - max).exp() })
            .collect();
        let t: f64 = e.iter().sum();
        e.iter().map(|x| x / t).collect()
    }

    #[test]
    fn masked_rows_match_f64_on_odd_shapes() {
        // batch 2, groups 3, rows 5, keys 37 (not a multiple of the lanes); causal + padding
        let (b, g, rows, keys) = (2, 3, 5, 37);
        let scores = values(b * g * rows * keys, 7, 8.0);
        let mut hidden = vec![0u8; b * rows * keys];
        for bi in 0..b {
            for i in 0..rows {
                for j in 0..keys {
                    let slot = keys - rows + i;
                    hidden[(bi * rows + i) * keys + j] = (j > slot || (bi == 1 && j < 4)) as u8;
                }
            }
        }
        let mask = RowMask {
            hidden: &hidden,
            rows_per_batch: g * rows,
            rows,
            mask_rows: rows,
        };
        let scale = 0.125;
        let got = same_at_every_level(|| {
            let mut out = vec![0.0; scores.len()];
            forward(&scores, keys, scale, Some(mask), &mut out);
            out
        });
        let mut want = Vec::new();
        for r in 0..b * g * rows {
            want.extend(reference(
                &scores[r * keys..(r + 1) * keys],
                mask.row(r, keys),
                scale,
            ));
        }
        let err = max_rel(&got, &want, 1e-30);
        assert!(err < 1e-6, "relative error {err}");
        // hidden entries are exactly 0
        for r in 0..b * g * rows {
            for (j, &h) in mask.row(r, keys).iter().enumerate() {
                if h != 0 {
                    assert_eq!(got[r * keys + j], 0.0);
                }
            }
        }
    }

    #[test]
    fn one_shared_mask_row_and_no_mask() {
        let keys = 19;
        let scores = values(4 * keys, 3, 5.0);
        let hidden: Vec<u8> = (0..keys).map(|j| (j % 5 == 0) as u8).collect();
        let mask = RowMask {
            hidden: &hidden,
            rows_per_batch: 4,
            rows: 4,
            mask_rows: 1,
        };
        let mut out = vec![0.0; scores.len()];
        forward(&scores, keys, 1.0, Some(mask), &mut out);
        let mut plain = vec![0.0; scores.len()];
        forward(&scores, keys, 1.0, None, &mut plain);
        let none = vec![0u8; keys];
        for r in 0..4 {
            let row = r * keys..(r + 1) * keys;
            let err = max_rel(
                &out[row.clone()],
                &reference(&scores[row.clone()], &hidden, 1.0),
                1e-30,
            );
            assert!(err < 1e-6, "masked row {r}: {err}");
            let err = max_rel(
                &plain[row.clone()],
                &reference(&scores[row], &none, 1.0),
                1e-30,
            );
            assert!(err < 1e-6, "plain row {r}: {err}");
        }
    }

    #[test]
    fn stacked_query_heads_read_their_query_mask_row() {
        // 3 heads of 4 queries stacked into 12 rows of one group; the mask has 4 rows
        let (b, rows, mask_rows, keys) = (2, 12, 4, 9);
        let scores = values(b * rows * keys, 5, 4.0);
        let hidden: Vec<u8> = (0..b * mask_rows * keys)
            .map(|i| ((i * 7) % 5 == 0) as u8)
            .collect();
        let mask = RowMask {
            hidden: &hidden,
            rows_per_batch: rows,
            rows,
            mask_rows,
        };
        let mut out = vec![0.0; scores.len()];
        forward(&scores, keys, 0.5, Some(mask), &mut out);
        for r in 0..b * rows {
            let m = (r / rows) * mask_rows + (r % rows) % mask_rows;
            let want = reference(
                &scores[r * keys..(r + 1) * keys],
                &hidden[m * keys..(m + 1) * keys],
                0.5,
            );
            let err = max_rel(&out[r * keys..(r + 1) * keys], &want, 1e-30);
            assert!(err < 1e-6, "row {r}: {err}");
        }
    }

    #[test]
    fn a_nan_score_poisons_its_row_only() {
        let keys = 5;
        let mut scores = values(2 * keys, 1, 1.0);
        scores[2] = f32::NAN;
        let mut out = vec![0.0; scores.len()];
        forward(&scores, keys, 1.0, None, &mut out);
        assert!(out[..keys].iter().all(|x| x.is_nan()));
        assert!(out[keys..].iter().all(|x| x.is_finite()));
    }

    #[test]
    fn backward_matches_f64() {
        let (rows, keys) = (7, 33);
        let s = values(rows * keys, 11, 3.0);
        let dp = values(rows * keys, 12, 1.0);
        let hidden: Vec<u8> = (0..rows * keys).map(|i| (i % 7 == 3) as u8).collect();
        let mask = RowMask {
            hidden: &hidden,
            rows_per_batch: rows,
            rows,
            mask_rows: rows,
        };
        let scale = 0.3;
        let mut p = vec![0.0; s.len()];
        forward(&s, keys, scale, Some(mask), &mut p);
        let ds = same_at_every_level(|| {
            let mut ds = vec![0.0; s.len()];
            backward(&p, &dp, keys, scale, &mut ds);
            ds
        });
        let mut want = Vec::new();
        for r in 0..rows {
            let pr = &p[r * keys..(r + 1) * keys];
            let gr = &dp[r * keys..(r + 1) * keys];
            let c: f64 = pr.iter().zip(gr).map(|(&a, &b)| a as f64 * b as f64).sum();
            want.extend(
                pr.iter()
                    .zip(gr)
                    .map(|(&a, &b)| scale as f64 * a as f64 * (b as f64 - c)),
            );
        }
        // relative to the largest gradient: entries where dp ≈ Σ dp·p cancel
        let err = max_rel(&ds, &want, want.iter().fold(0.0f64, |m, x| m.max(x.abs())));
        assert!(err < 1e-6, "relative error {err}");
    }
}
