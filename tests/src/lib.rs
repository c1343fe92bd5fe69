//! Cross-crate integration tests of collie-rs; the tests live in `tests/tests/*.rs` and the golden
//! fixtures they compare against in `tests/fixtures/` (generators in `scripts/fixtures/`). The
//! library holds what more than one runner needs: reading fixtures ([`golden`]), comparing
//! numbers so that a NaN or a length mismatch fails ([`compare`]), and the backend-generic parity
//! suite ([`suite`]) that the tests run on the CPU and wgpu and `collie-gpu-check` runs on CUDA.

pub mod compare;
pub mod golden;
pub mod suite;

use burn::tensor::backend::AutodiffBackend;
use collie_llama::Llama;
use collie_train::{RunOptions, TrainConfig, Trainer};

/// Runs `config` quietly to the end on `device` (resuming from `resume` when given) and returns
/// the trainer with the training losses of its `metrics.jsonl`.
pub fn train_run<B: AutodiffBackend>(
    config: TrainConfig,
    resume: Option<String>,
    device: &B::Device,
) -> (Trainer<B, Llama<B>>, Vec<f64>) {
    let options = RunOptions {
        quiet: true,
        resume,
        ..Default::default()
    };
    let out = config.output.dir.clone();
    let mut trainer = Trainer::<B, Llama<B>>::new(config, &options, device).unwrap();
    trainer.run(&options).unwrap();
    let losses = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64())
        .collect();
    (trainer, losses)
}
