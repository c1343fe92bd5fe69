//! Cross-entropy of logit rows against target ids: `nll = log Σ_j e^{z_j} − z_t` per row (0 for
//! ignored rows), and its backward `dz = g · (softmax(z) − onehot(t))`.
//!
//! Per row: the maximum, `Σ e^{z − max}` with [`simd::LANES`] partial sums, `ln` of the sum, the
//! picked logit; the arithmetic is `log_softmax`'s (`(z_t − max) − ln Σ`), negated. The
//! backward recomputes `e^{z − lse}` from the saved `lse = max + ln Σ` and writes it over the
//! logits, so nothing of the size of the logits exists besides the logits themselves.

use rayon::prelude::*;

use crate::{par_rows, row_max, rows_per_task, simd};

/// Targets outside the vocabulary (other than the ignored id) are the caller's bug.
fn check(targets: &[i64], vocab: usize, ignore: i64) {
    if let Some((row, &t)) = targets
        .iter()
        .enumerate()
        .find(|(_, &t)| t != ignore && (t < 0 || t as usize >= vocab))
    {
        panic!("cross-entropy: target {t} of row {row} outside the vocabulary of {vocab}");
    }
}

/// `Σ e^{z − max}` with fixed-order partial sums.
#[inline(always)]
fn sum_exp(z: &[f32], max: f32) -> f32 {
    let mut acc = [0.0f32; simd::LANES];
    let mut chunks = z.chunks_exact(simd::LANES);
    for c in &mut chunks {
        for l in 0..simd::LANES {
            acc[l] += simd::exp(c[l] - max);
        }
    }
    for (l, &x) in chunks.remainder().iter().enumerate() {
        acc[l] += simd::exp(x - max);
    }
    simd::reduce(acc)
}

/// Per-row loss `nll` and log-sum-exp `lse` of `z` (`[rows, vocab]`) against `targets`; rows
/// whose target is `ignore` get `nll = 0`.
///
/// # Panics
/// If the lengths disagree or a target lies outside the vocabulary.
pub fn forward(
    z: &[f32],
    vocab: usize,
    targets: &[i64],
    ignore: i64,
    nll: &mut [f32],
    lse: &mut [f32],
) {
    let rows = targets.len();
    assert!(
        vocab > 0 && z.len() == rows * vocab,
        "cross-entropy: logits length"
    );
    assert!(
        nll.len() == rows && lse.len() == rows,
        "cross-entropy: output lengths"
    );
    check(targets, vocab, ignore);
    let per = rows_per_task(vocab);
    nll.par_chunks_mut(per)
        .zip(lse.par_chunks_mut(per))
        .enumerate()
        .for_each(|(t, (nb, lb))| {
            simd::run(
                #[inline(always)]
                || {
                    for (i, (n, l)) in nb.iter_mut().zip(lb.iter_mut()).enumerate() {
                        let r = t * per + i;
                        let row = &z[r * vocab..(r + 1) * vocab];
                        let max = row_max(row);
                        let log_sum = sum_exp(row, max).ln();
                        *l = max + log_sum;
                        let target = targets[r];
                        *n = if target == ignore {
                            0.0
                        } else {
                            -((row[target as usize] - max) - log_sum)
                        };
                    }
                },
            )
        });
}

/// `dz = g_row · (e^{z − lse} − onehot(target))` written over the logits `z` (each element is
/// read once, then replaced by its gradient), zero rows where the target is `ignore`: the head's
/// largest buffer serves as its own gradient, so no second `[rows, vocab]` buffer is allocated.
///
/// # Panics
/// If the lengths disagree.
pub fn backward_in_place(
    z: &mut [f32],
    vocab: usize,
    targets: &[i64],
    ignore: i64,
    lse: &[f32],
    g: &[f32],
) {
    let rows = targets.len();
    assert!(z.len() == rows * vocab, "cross-entropy backward: lengths");
    assert!(
        lse.len() == rows && g.len() == rows,
        "cross-entropy backward: row lengths"
    );
    par_rows(
        z,
        vocab,
        #[inline(always)]
        |first, block| {
            for (i, d) in block.chunks_exact_mut(vocab).enumerate() {
                let r = first + i;
                let target = targets[r];
                if target == ignore {
                    d.fill(0.0);
                    continue;
                }
                let (gr, l) = (g[r], lse[r]);
                for d in d.iter_mut() {
                    *d = gr * simd::exp(*d - l);
                }
                d[target as usize] -= gr;
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{max_rel, same_at_every_level, values};

    #[test]
    fn loss_and_gradient_match_f64() {
        let (rows, vocab) = (6, 1037);
        let z = values(rows * vocab, 61, 6.0);
        let targets: Vec<i64> = vec![0, 1036, -100, 517, 3, -100];
        let g = values(rows, 62, 1.0);
        let (nll, dz) = same_at_every_level(|| {
            let (mut nll, mut lse) = (vec![0.0; rows], vec![0.0; rows]);
            forward(&z, vocab, &targets, -100, &mut nll, &mut lse);
            let mut dz = z.clone();
            backward_in_place(&mut dz, vocab, &targets, -100, &lse, &g);
            (nll, dz)
        });
        let (mut wn, mut wd) = (Vec::new(), Vec::new());
        for r in 0..rows {
            let row: Vec<f64> = z[r * vocab..(r + 1) * vocab]
                .iter()
                .map(|&x| x as f64)
                .collect();
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            let t = targets[r];
            wn.push(if t < 0 { 0.0 } else { lse - row[t as usize] });
            for (j, x) in row.iter().enumerate() {
                wd.push(if t < 0 {
                    0.0
                } else {
                    g[r] as f64 * ((x - lse).exp() - (j as i64 == t) as i32 as f64)
                });
            }
        }
        let top = |v: &[f64]| v.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        assert!(max_rel(&nll, &wn, top(&wn)) < 1e-6, "loss");
        assert!(max_rel(&dz, &wd, top(&wd)) < 1e-6, "gradient");
        assert_eq!(nll[2], 0.0);
        assert!(dz[2 * vocab..3 * vocab].iter().all(|&d| d == 0.0));
    }

    #[test]
    #[should_panic(expected = "target 9 of row 1 outside the vocabulary of 9")]
    fn a_target_outside_the_vocabulary_is_named() {
        let (mut nll, mut lse) = (vec![0.0; 2], vec![0.0; 2]);
        forward(&[0.0; 18], 9, &[1, 9], -100, &mut nll, &mut lse);
    }
}
