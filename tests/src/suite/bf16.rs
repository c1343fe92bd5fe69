//! bf16 mixed precision against PyTorch autocast: the trainer with `[model] dtype = "bf16"` (bf16
//! compute, f32 master weights, optimizer state, norms, softmax and loss) on the `adamw` training
//! case for 20 steps, against transformers under `torch.autocast(bfloat16)` with f32 masters
//! (`scripts/fixtures/train_hf.py`'s `adamw_bf16`; on a GPU, `scripts/bench/torch_gpu.py
//! --parity` in the same run). Per-step loss within [`TOL`] relative.

use burn::backend::Autodiff;
use collie_core::device::RegisterOps;
use collie_train::TrainConfig;
use serde_json::Value;

use super::Check;
use crate::compare::{max_rel_list, rel};
use crate::golden::fixture;

/// Largest relative loss difference from autocast over 20 steps (worst achieved on the CPU: 8.8e-4,
/// naive and flash; both sides round matmul inputs to bf16, 2^-9 = 2e-3 relative per rounding,
/// in different places and orders).
pub const TOL: f64 = 8e-3;

/// The training config of the `adamw_bf16` case, writing into `out`.
pub fn config(out: &std::path::Path, attention: &str) -> TrainConfig {
    let train = fixture("train");
    let text = format!(
        r#"[model]
path = "{model}"
dtype = "bf16"
attention = "{attention}"
[data]
train = "{data}"
format = "input_output"
seq_len = 48
shuffle = false
[train]
max_steps = 20
micro_batch_size = 3
grad_accum_steps = 2
max_grad_norm = 1.0
[optim]
name = "adamw"
lr = 1e-3
weight_decay = 0.01
[sched]
kind = "cosine"
warmup_steps = 3
[output]
dir = "{out}"
"#,
        model = train.join("model").display(),
        data = train.join("io.jsonl").display(),
        out = out.display()
    );
    TrainConfig::parse(&text, "adamw_bf16", &[]).unwrap()
}

/// The reference losses: `train/adamw_bf16.json`, or those given (a same-run PyTorch trajectory).
pub fn reference_losses() -> Vec<f64> {
    let v: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(fixture("train/adamw_bf16.json")).unwrap())
            .unwrap();
    v.iter().map(|s| s["loss"].as_f64().unwrap()).collect()
}

/// Trains 20 bf16 steps on `device` and compares every step's loss with `reference`.
pub fn trajectory<I: RegisterOps>(
    device: &I::Device,
    reference: &[f64],
    attention: &str,
) -> Vec<Check> {
    I::register_ops();
    let tmp = tempfile::tempdir().unwrap();
    let (_, losses) = crate::train_run::<Autodiff<I>>(config(tmp.path(), attention), None, device);
    let worst = max_rel_list(&losses, reference);
    let last = rel(losses[losses.len() - 1], reference[reference.len() - 1]);
    vec![
        Check::new(
            "bf16",
            attention,
            "loss max rel Δ over 20 steps vs autocast",
            worst,
            TOL,
        ),
        Check::new("bf16", attention, "final loss rel Δ vs autocast", last, TOL),
    ]
}
