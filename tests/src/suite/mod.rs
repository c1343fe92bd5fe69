//! The backend-generic parity suite: each check runs on whichever backend it is given and
//! returns what it measured against its tolerance. `tests/tests/*.rs` run it on the CPU and
//! (`--features collie-tests/wgpu`) on wgpu; `collie-gpu-check` runs it on CUDA
//! (`scripts/gpu-check.sh`).

pub mod bf16;
pub mod flash;
pub mod llama;
pub mod optim;
pub mod peft;
pub mod quant;

/// One measured quantity against its tolerance.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    /// The suite (`llama`, `flash`, `optim`, `peft`, `bf16`, `quant`).
    pub suite: &'static str,
    /// The fixture or configuration.
    pub case: String,
    /// What was compared.
    pub what: String,
    /// The measured difference.
    pub value: f64,
    /// The largest difference that passes.
    pub tol: f64,
}

impl Check {
    /// A check of `value` against `tol`.
    pub fn new(suite: &'static str, case: &str, what: &str, value: f64, tol: f64) -> Check {
        Check {
            suite,
            case: case.to_string(),
            what: what.to_string(),
            value,
            tol,
        }
    }

    /// Within tolerance (a NaN or an infinity fails).
    pub fn pass(&self) -> bool {
        self.value.is_finite() && self.value <= self.tol
    }
}

/// Prints every check and panics naming the ones that fail (for `#[test]`s).
pub fn assert_all(backend: &str, checks: &[Check]) {
    for c in checks {
        println!(
            "{backend} {} {} {}: {:.2e} (tolerance {:.1e})",
            c.suite, c.case, c.what, c.value, c.tol
        );
    }
    let failed: Vec<String> = checks
        .iter()
        .filter(|c| !c.pass())
        .map(|c| {
            format!(
                "{} {} {}: {:.3e} > {:.1e}",
                c.suite, c.case, c.what, c.value, c.tol
            )
        })
        .collect();
    assert!(!checks.is_empty(), "{backend}: no checks ran");
    assert!(failed.is_empty(), "{backend}: {}", failed.join("; "));
}

pub use crate::compare::max_rel;
