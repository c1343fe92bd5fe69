//! `collie-gpu-check [--bf16-reference torch.json] [--only SUITE,...]`: the backend-generic
//! parity suite (`collie_tests::suite`) on CUDA device 0, one JSON line per check, then a summary;
//! exits non-zero if a check fails or a suite panics. Fixtures come from `COLLIE_FIXTURES`
//! (`scripts/gpu-check.sh` points it at the working tree's `tests/fixtures`).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::ExitCode;

use collie_core::device::{Cuda, RegisterOps};
use collie_tests::suite::{self, Check};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let only: Option<Vec<String>> =
        value("--only").map(|s| s.split(',').map(str::to_string).collect());
    // The same-run PyTorch trajectory (torch_gpu.py --parity), else the committed CPU fixture.
    let reference: Vec<f64> = match value("--bf16-reference") {
        Some(path) => {
            let text =
                std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
            let line = text.lines().last().unwrap_or_default();
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{path}: {e}"));
            v["losses"]
                .as_array()
                .unwrap_or_else(|| panic!("{path}: no `losses`"))
                .iter()
                .map(|s| s["loss"].as_f64().expect("loss"))
                .collect()
        }
        None => suite::bf16::reference_losses(),
    };
    Cuda::register_ops();
    let device = burn::backend::cuda::CudaDevice::new(0);
    let suites: Vec<(&str, Box<dyn Fn() -> Vec<Check>>)> = vec![
        ("llama", Box::new(|| suite::llama::logits::<Cuda>(&device))),
        (
            "flash",
            Box::new(|| {
                let mut c = suite::flash::op::<Cuda>(&device);
                c.extend(suite::flash::llama::<Cuda>(&device));
                c
            }),
        ),
        (
            "optim",
            Box::new(|| suite::optim::reference::<Cuda>(&device)),
        ),
        ("peft", Box::new(|| suite::peft::logits::<Cuda>(&device))),
        ("quant", Box::new(|| suite::quant::checks::<Cuda>(&device))),
        (
            "bf16",
            Box::new(|| {
                let mut c = suite::bf16::trajectory::<Cuda>(&device, &reference, "naive");
                c.extend(suite::bf16::trajectory::<Cuda>(
                    &device, &reference, "flash",
                ));
                c
            }),
        ),
    ];
    let (mut passed, mut failed) = (0usize, Vec::new());
    for (name, run) in suites {
        if only.as_ref().is_some_and(|o| !o.iter().any(|s| s == name)) {
            continue;
        }
        let start = std::time::Instant::now();
        match catch_unwind(AssertUnwindSafe(run)) {
            Ok(checks) => {
                for c in checks {
                    println!(
                        "{}",
                        serde_json::to_string(&serde_json::json!({"check": c, "pass": c.pass()}))
                            .unwrap()
                    );
                    if c.pass() {
                        passed += 1;
                    } else {
                        failed.push(format!("{} {} {}", c.suite, c.case, c.what));
                    }
                }
            }
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                println!("{}", serde_json::json!({"suite": name, "panicked": msg}));
                failed.push(format!("{name}: panicked: {msg}"));
            }
        }
        eprintln!(
            "collie-gpu-check: {name} done in {:.1} s",
            start.elapsed().as_secs_f64()
        );
    }
    println!(
        "{}",
        serde_json::json!({"summary": {"passed": passed, "failed": failed}})
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
