//! Number comparisons for the tests. Every helper fails on a non-finite value on either side and
//! on a length mismatch, naming the position: a NaN must never read as "no difference" (a fold
//! with `f64::max` drops NaN, so it cannot be the reduction anywhere a test compares numbers).

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// A value a comparison can read as f64.
pub trait Num: Copy + std::fmt::Debug {
    /// The value widened to f64.
    fn f64(self) -> f64;
}

impl Num for f32 {
    fn f64(self) -> f64 {
        self as f64
    }
}

impl Num for f64 {
    fn f64(self) -> f64 {
        self
    }
}

/// Panics unless every value is finite, naming `what` and the first bad position.
pub fn assert_finite<T: Num>(what: &str, xs: &[T]) {
    if let Some(i) = xs.iter().position(|x| !x.f64().is_finite()) {
        panic!("{what}: non-finite value {:?} at position {i}", xs[i]);
    }
}

/// The largest of `xs`, failing on a non-finite one (a NaN is never dropped). Empty: 0.
pub fn worst(xs: impl IntoIterator<Item = f64>) -> f64 {
    let mut m = 0.0f64;
    for (i, x) in xs.into_iter().enumerate() {
        assert!(x.is_finite(), "non-finite difference {x} at item {i}");
        m = m.max(x);
    }
    m
}

/// `max |a − b|` over positions where `keep(i)` holds. Panics on a length mismatch or a
/// non-finite value on either side at any position (kept or not: a NaN anywhere is a bug).
pub fn max_abs_diff<A: Num, B: Num>(a: &[A], b: &[B], keep: impl Fn(usize) -> bool) -> f64 {
    assert_eq!(
        a.len(),
        b.len(),
        "length mismatch: {} vs {}",
        a.len(),
        b.len()
    );
    let mut m = 0.0f64;
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let (x, y) = (x.f64(), y.f64());
        assert!(
            x.is_finite() && y.is_finite(),
            "non-finite value at position {i}: {x} vs {y}"
        );
        if keep(i) {
            m = m.max((x - y).abs());
        }
    }
    m
}

/// `max |a − b| / max |b|` (the scale floored at 1e-6), with [`max_abs_diff`]'s checks.
pub fn max_rel_diff<A: Num, B: Num>(a: &[A], b: &[B]) -> f64 {
    let diff = max_abs_diff(a, b, |_| true);
    let scale = worst(b.iter().map(|y| y.f64().abs()));
    diff / scale.max(1e-6)
}

/// `|a − b| / |b|` of two scalars (the scale floored at 1e-12); panics if either is not finite.
pub fn rel(a: f64, b: f64) -> f64 {
    assert!(
        a.is_finite() && b.is_finite(),
        "non-finite value: {a} vs {b}"
    );
    (a - b).abs() / b.abs().max(1e-12)
}

/// The largest [`rel`] of two equally long lists (panics on a length mismatch).
pub fn max_rel_list(a: &[f64], b: &[f64]) -> f64 {
    worst(zip_eq("max_rel_list", a, b).map(|(x, y)| rel(*x, *y)))
}

/// Pairs of two lists of the same length (panics naming `what` otherwise).
pub fn zip_eq<'a, T, U>(
    what: &str,
    a: &'a [T],
    b: &'a [U],
) -> impl Iterator<Item = (&'a T, &'a U)> {
    assert_eq!(
        a.len(),
        b.len(),
        "{what}: lists of different lengths ({} vs {})",
        a.len(),
        b.len()
    );
    a.iter().zip(b)
}

/// Flattened f32 values of a tensor.
pub fn values<Bk: Backend, const D: usize>(t: Tensor<Bk, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

/// [`max_rel_diff`] of two tensors of the same shape (read back to the host).
pub fn max_rel<Bk: Backend, const D: usize>(a: Tensor<Bk, D>, b: Tensor<Bk, D>) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    max_rel_diff(&values(a), &values(b))
}

/// Prints `what: value (tolerance tol)` and panics if `value` is not finite or above `tol`.
pub fn assert_within(what: &str, value: f64, tol: f64) {
    println!("{what}: {value:.2e} (tolerance {tol:.1e})");
    assert!(
        value.is_finite() && value <= tol,
        "{what}: {value:.3e} > tolerance {tol:.1e}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "non-finite value at position 1")]
    fn a_nan_on_the_computed_side_fails() {
        max_abs_diff(&[1.0f32, f32::NAN, 3.0], &[1.0f64, 2.0, 3.0], |_| true);
    }

    #[test]
    #[should_panic(expected = "non-finite value at position 2")]
    fn a_nan_on_the_reference_side_fails_even_where_not_compared() {
        max_abs_diff(&[1.0f32, 2.0, 3.0], &[1.0f64, 2.0, f64::NAN], |i| i < 2);
    }

    #[test]
    #[should_panic(expected = "non-finite value at position 0")]
    fn an_infinity_fails() {
        max_rel_diff(&[f32::INFINITY], &[1.0f32]);
    }

    #[test]
    #[should_panic(expected = "length mismatch")]
    fn lengths_must_match() {
        max_abs_diff(&[1.0f32], &[1.0f64, 2.0], |_| true);
    }

    #[test]
    #[should_panic(expected = "non-finite difference")]
    fn worst_keeps_a_nan() {
        worst([0.0, f64::NAN, 1.0]);
    }

    #[test]
    #[should_panic(expected = "non-finite value")]
    fn scalar_rel_fails_on_nan() {
        rel(f64::NAN, 1.0);
    }

    #[test]
    #[should_panic(expected = "tolerance")]
    fn assert_within_fails_on_nan() {
        assert_within("x", f64::NAN, 1.0);
    }

    #[test]
    fn finite_values_compare() {
        assert_eq!(max_abs_diff(&[1.0f32, 2.5], &[1.0f64, 2.0], |_| true), 0.5);
        assert_eq!(
            max_abs_diff(&[1.0f32, 2.5], &[1.0f64, 2.0], |i| i == 0),
            0.0
        );
        assert_eq!(worst([0.1, 0.3, 0.2]), 0.3);
        assert!((rel(1.1, 1.0) - 0.1).abs() < 1e-12);
    }
}

/// The elements of a checkpoint's parameters whose gradient is zero in exact arithmetic, so that
/// AdamW's update of them (`m / (√v + ε)`, scale-free) is rounding noise grown to a full step,
/// different on each side of a comparison: GLM's key bias on the features RoPE leaves unrotated
/// adds the same `q · b` to every score of a query, which softmax cancels. Read from the
/// checkpoint's `config.json`; nothing for other models.
#[derive(Debug, Clone, Copy, Default)]
pub struct ZeroGradient {
    /// `(head_dim, rotary_dim)` of a GLM checkpoint.
    glm: Option<(usize, usize)>,
}

impl ZeroGradient {
    /// What the checkpoint directory `dir` (with its `config.json`) has of them.
    pub fn of(dir: &std::path::Path) -> Self {
        let Ok(text) = std::fs::read_to_string(dir.join("config.json")) else {
            return Self::default();
        };
        let config: serde_json::Value = serde_json::from_str(&text).expect("config.json");
        if config["model_type"] != "glm" {
            return Self::default();
        }
        let head_dim = config["head_dim"].as_u64().expect("GLM head_dim") as usize;
        let factor = config["rope_parameters"]["partial_rotary_factor"]
            .as_f64()
            .unwrap_or(0.5);
        ZeroGradient {
            glm: Some((head_dim, (head_dim as f64 * factor) as usize)),
        }
    }

    /// Whether element `i` of the parameter saved as `key` (HF's name) is one of them.
    pub fn contains(&self, key: &str, i: usize) -> bool {
        self.glm.is_some_and(|(head_dim, rotary)| {
            key.ends_with("self_attn.k_proj.bias") && i % head_dim >= rotary
        })
    }
}
