//! Inverted dropout with a counter-based mask: element `i` is kept when a hash of `(seed, i)`
//! says so, and scaled by `1/(1 − p)`.
//!
//! The mask is a function of the seed and the index, not a stream: the forward and the
//! backward apply the same [`Mask`] without storing it (no `[n]` tensor of 0/1 kept for the
//! backward), any split over threads gives the same bits, and the hash is 32-bit integer
//! arithmetic, which vectorizes on every instruction set. The hash is two rounds of
//! Wellons' `lowbias32` (xor-shift-multiply), keyed by the seed's two halves.

use rayon::prelude::*;

use crate::simd;

/// Which elements a dropout keeps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mask {
    /// Probability of dropping an element, in `[0, 1)`.
    pub p: f32,
    /// Chooses the mask; draw it from the run's random stream.
    pub seed: u64,
}

/// A 32-bit integer hash with full avalanche.
#[inline(always)]
fn mix(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

/// Elements per parallel block (a divisor of 2³², so a block never straddles one).
const BLOCK: usize = 4096;

impl Mask {
    /// `p` as a threshold on 24 hash bits: kept when the bits are at least this.
    fn threshold(&self) -> u32 {
        (f64::from(self.p) * f64::from(1u32 << 24)).round() as u32
    }

    /// Whether element `i` is kept.
    pub fn keeps(&self, i: usize) -> bool {
        let (k1, k2) = self.keys((i / BLOCK) * BLOCK);
        (mix(mix(i as u32 ^ k1) ^ k2) >> 8) >= self.threshold()
    }

    /// The two keys of the block starting at `start` (the index's high half folded into the
    /// second, so tensors beyond 2³² elements do not repeat their mask).
    fn keys(&self, start: usize) -> (u32, u32) {
        let high = (start as u64 >> 32) as u32;
        (self.seed as u32, (self.seed >> 32) as u32 ^ mix(high))
    }

    /// The fraction of elements kept, scaled up: `1/(1 − p)`.
    fn scale(&self) -> f32 {
        (1.0 / (1.0 - f64::from(self.p))) as f32
    }
}

/// `x ← x·m/(1 − p)` in place, `m` the mask's 0/1 (a dropped element becomes `x·0`, so a NaN
/// stays NaN, as in PyTorch). The backward is the same call on the output's gradient.
///
/// # Panics
/// If `p` is outside `[0, 1)`.
pub fn apply(mask: Mask, x: &mut [f32]) {
    assert!(
        (0.0..1.0).contains(&mask.p),
        "dropout: p = {} outside [0, 1)",
        mask.p
    );
    let (threshold, scale) = (mask.threshold(), mask.scale());
    x.par_chunks_mut(BLOCK).enumerate().for_each(|(t, block)| {
        let start = t * BLOCK;
        let (k1, k2) = mask.keys(start);
        let first = start as u32;
        simd::run(
            #[inline(always)]
            || {
                for (j, v) in block.iter_mut().enumerate() {
                    let i = first.wrapping_add(j as u32);
                    let keep = (mix(mix(i ^ k1) ^ k2) >> 8) >= threshold;
                    *v *= if keep { scale } else { 0.0 };
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
    fn keeps_the_expected_fraction_and_scales() {
        for p in [0.1f32, 0.5, 0.9] {
            let n = 3 * BLOCK + 7;
            let x = values(n, 51, 3.0);
            let mask = Mask {
                p,
                seed: 0x1234_5678_9abc_def0,
            };
            let y = same_at_every_level(|| {
                let mut y = x.clone();
                apply(mask, &mut y);
                y
            });
            let scale = 1.0 / (1.0 - p);
            let mut kept = 0usize;
            for (i, (&x, &y)) in x.iter().zip(&y).enumerate() {
                if mask.keeps(i) {
                    kept += 1;
                    assert_eq!(y, x * scale, "element {i}");
                } else {
                    assert_eq!(y, 0.0, "element {i}");
                }
            }
            // binomial: within 5 standard deviations of n(1 − p)
            let (mean, sd) = (
                n as f64 * (1.0 - p as f64),
                (n as f64 * p as f64 * (1.0 - p as f64)).sqrt(),
            );
            assert!(
                (kept as f64 - mean).abs() < 5.0 * sd,
                "p={p}: kept {kept} of {n}"
            );
        }
    }

    #[test]
    fn seeds_give_unrelated_masks() {
        // Two seeds one apart, and the same seed shifted by one element, agree on about
        // p² + (1 − p)² of the elements (0.5 at p = 0.5), as independent masks do.
        let n = 1 << 16;
        let a = Mask { p: 0.5, seed: 7 };
        let b = Mask { p: 0.5, seed: 8 };
        let c = Mask {
            p: 0.5,
            seed: 7 << 32,
        };
        for (other, shift) in [(b, 0), (a, 1), (c, 0)] {
            let same = (0..n - 1)
                .filter(|&i| a.keeps(i) == other.keeps(i + shift))
                .count() as f64
                / (n - 1) as f64;
            assert!((same - 0.5).abs() < 0.02, "agreement {same}");
        }
    }

    #[test]
    fn zero_p_is_the_identity_and_nan_stays() {
        let mut x = vec![1.5f32, -2.0, f32::NAN];
        apply(Mask { p: 0.0, seed: 3 }, &mut x);
        assert_eq!(&x[..2], &[1.5, -2.0]);
        assert!(x[2].is_nan());
        let mut x = vec![f32::NAN; 64];
        apply(Mask { p: 0.9, seed: 3 }, &mut x);
        assert!(x.iter().all(|v| v.is_nan()), "a dropped NaN stays NaN");
    }
}
