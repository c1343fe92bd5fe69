//! Run-time choice of the instruction set, and the vectorizable `exp` every kernel uses.
//!
//! [`run`] calls a closure inside pulp's dispatch: on x86-64 a function compiled with AVX-512
//! (x86-64-v4) or AVX2+FMA (v3) enabled, on AArch64 with NEON, else the portable baseline. The
//! closure's loops are inlined there and vectorized for that width. `COLLIE_SIMD=portable` or
//! `avx2` (read once) or [`set_level`] caps the level, for tests and for measuring the fallback.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

use pulp::{Arch, Simd, WithSimd};

/// Partial accumulators of every sum (one AVX-512 register of f32): the order of additions
/// is the same on every instruction set, so results are too.
pub const LANES: usize = 16;

/// The most capable instruction set the kernels may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Whatever the CPU has.
    Best,
    /// At most AVX2+FMA on x86-64 (elsewhere the same as `Best`).
    Avx2,
    /// The target's baseline (SSE2 on x86-64): no run-time features.
    Portable,
}

/// 0: not read yet; otherwise `1 + Level as u8`.
static LEVEL: AtomicU8 = AtomicU8::new(0);

/// Serializes tests that change the level.
#[doc(hidden)]
pub static LEVEL_LOCK: Mutex<()> = Mutex::new(());

/// Caps the instruction set of every kernel (process-wide).
pub fn set_level(level: Level) {
    LEVEL.store(1 + level as u8, Ordering::Relaxed);
}

/// The current cap: [`set_level`]'s, else `COLLIE_SIMD` (`portable`, `avx2`), else `Best`.
pub fn level() -> Level {
    match LEVEL.load(Ordering::Relaxed) {
        1 => Level::Best,
        2 => Level::Avx2,
        3 => Level::Portable,
        _ => {
            let level = match std::env::var("COLLIE_SIMD").as_deref() {
                Ok("portable") => Level::Portable,
                Ok("avx2") => Level::Avx2,
                _ => Level::Best,
            };
            set_level(level);
            level
        }
    }
}

fn arch() -> Arch {
    match level() {
        Level::Best => Arch::new(),
        Level::Portable => Arch::Scalar,
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => pulp::x86::V3::try_new().map_or(Arch::Scalar, Arch::V3),
        #[cfg(not(target_arch = "x86_64"))]
        Level::Avx2 => Arch::new(),
    }
}

/// Adapts a closure to pulp's dispatch.
struct Run<F>(F);

impl<R, F: FnOnce() -> R> WithSimd for Run<F> {
    type Output = R;

    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) -> R {
        (self.0)()
    }
}

/// Runs `f` compiled for the current [`level`]. `f` must be marked `#[inline(always)]` (and so
/// must every closure it calls): only code inlined into pulp's dispatch is compiled for the
/// wider instruction set.
#[inline(always)]
pub fn run<R>(f: impl FnOnce() -> R) -> R {
    arch().dispatch(Run(f))
}

/// Sum of the lanes, pairwise in a fixed order.
#[inline(always)]
pub fn reduce(mut acc: [f32; LANES]) -> f32 {
    let mut w = LANES / 2;
    while w > 0 {
        for l in 0..w {
            acc[l] += acc[l + w];
        }
        w /= 2;
    }
    acc[0]
}

/// `eˣ` within 2 ulp over the whole f32 range, branch-free so loops over it vectorize:
/// `eˣ = 2ⁿ · eʳ` with `n = round(x / ln 2)` and `r = x − n · ln 2` (two-constant Cody–Waite
/// reduction), `eʳ` by Cephes' degree-7 polynomial on `|r| ≤ ln 2 / 2`, and `2ⁿ` built from
/// exponent bits in two halves so `n` may reach 128. Results below `f32::MIN_POSITIVE` flush to
/// 0 (`exp(−∞) = 0`), above `f32::MAX` give `∞`; NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LO: f32 = -87.336_55; // ln(f32::MIN_POSITIVE)
    const HI: f32 = 88.722_83; // ln(f32::MAX)
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 · 2²³ rounds to the nearest integer without a rounding
    // instruction (|x / ln 2| < 2²²).
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(LO, HI);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    // n as an integer, from t's low mantissa bits (no float-to-int conversion, which would
    // keep the loop from vectorizing)
    let ni = t.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.987_569_2e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * (r * r) + r + 1.0;
    let half = ni >> 1;
    let a = f32::from_bits(((half + 127) as u32) << 23);
    let b = f32::from_bits(((ni - half + 127) as u32) << 23);
    let y = er * a * b;
    let y = if x < LO { 0.0 } else { y };
    if x > HI {
        f32::INFINITY
    } else {
        y
    }
}

/// `1 / (1 + e⁻ˣ)` from [`exp`].
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::same_at_every_level;

    fn exp_all(xs: &[f32]) -> Vec<f32> {
        run(|| xs.iter().map(|&x| exp(x)).collect())
    }

    #[test]
    fn exp_is_within_two_ulp_of_f64_over_the_range() {
        // every 997th f32 bit pattern in [-104, 89], plus the edges
        let mut xs: Vec<f32> = (0..u32::MAX / 997)
            .map(|i| f32::from_bits(i * 997))
            .filter(|x| x.is_finite() && *x > -104.0 && *x < 89.0)
            .flat_map(|x| [x, -x])
            .collect();
        xs.extend([
            0.0, -0.0, 1.0, -1.0, -87.336_55, 88.722_83, 88.7, -87.3, 1e-30, -1e-30,
        ]);
        let got = same_at_every_level(|| exp_all(&xs));
        let mut worst = 0.0f64;
        for (&x, &y) in xs.iter().zip(&got) {
            let want = (x as f64).exp();
            if want < f32::MIN_POSITIVE as f64 {
                assert!(
                    y == 0.0 || (y as f64 - want).abs() <= f32::MIN_POSITIVE as f64,
                    "exp({x}) = {y}"
                );
                continue;
            }
            if want > f32::MAX as f64 {
                assert_eq!(y, f32::INFINITY, "exp({x})");
                continue;
            }
            let ulp = (want as f32).to_bits().abs_diff(y.to_bits());
            worst = worst.max(ulp as f64);
            assert!(ulp <= 2, "exp({x}) = {y}, want {want} ({ulp} ulp)");
        }
        assert!(worst >= 1.0, "the comparison saw no rounding at all");
    }

    #[test]
    fn exp_special_values() {
        let got = exp_all(&[f32::NEG_INFINITY, f32::INFINITY, f32::NAN, -200.0, 200.0]);
        assert_eq!(got[0], 0.0);
        assert_eq!(got[1], f32::INFINITY);
        assert!(got[2].is_nan());
        assert_eq!(got[3], 0.0);
        assert_eq!(got[4], f32::INFINITY);
    }

    #[test]
    fn reduce_adds_every_lane() {
        let acc: [f32; LANES] = std::array::from_fn(|i| (i + 1) as f32);
        assert_eq!(reduce(acc), (LANES * (LANES + 1) / 2) as f32);
    }
}
