//! Training trajectories against PyTorch + transformers: per-step loss, lr and gradient norm, and
//! the weights after 10 steps; bf16 mixed precision against autocast. Fixtures:
//! `scripts/fixtures/train_hf.py`.

mod common;

use std::path::Path;

use collie_io::module::TensorSource;
use collie_io::safetensors::SafetensorsSource;
use collie_train::{RunOptions, TrainConfig, Trainer};
use common::*;
use serde_json::Value;

type A = burn::backend::Autodiff<B>;

fn run(case: &str, body: &str, out: &Path) -> Vec<Value> {
    let train = fixture("train");
    let text = format!(
        "[model]\npath = \"{}\"\n{body}\n[output]\ndir = \"{}\"\n",
        train.join("model").display(),
        out.display()
    );
    let config = TrainConfig::parse(&text, case, &[]).unwrap();
    let options = RunOptions {
        quiet: true,
        ..Default::default()
    };
    let mut trainer =
        Trainer::<A, collie_llama::Llama<A>>::new(config, &options, &Default::default()).unwrap();
    trainer.run(&options).unwrap();
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .collect()
}

fn compare(case: &str, lines: &[Value], out: &Path) {
    let expected: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(fixture(&format!("train/{case}.json"))).unwrap(),
    )
    .unwrap();
    for (i, (got, want)) in zip_eq(case, lines, &expected[..]).enumerate() {
        assert_eq!(
            got["target_tokens"], want["target_tokens"],
            "{case} step {i}: target tokens"
        );
        let (a, b) = (got["lr"].as_f64().unwrap(), want["lr"].as_f64().unwrap());
        assert!(
            (a - b).abs() <= 1e-12 * b.abs().max(1.0),
            "{case} step {i}: lr {a} vs {b}"
        );
    }
    let series =
        |v: &[Value], k: &str| -> Vec<f64> { v.iter().map(|x| x[k].as_f64().unwrap()).collect() };
    // Worst achieved (adamw, sgd): loss 2.2e-7, gradient norm 4.2e-7.
    for (k, tol) in [("loss", 2e-6), ("grad_norm", 4e-6)] {
        assert_within(
            &format!("train {case}: 10 steps, {k} max rel Δ vs PyTorch"),
            max_rel_list(&series(lines, k), &series(&expected, k)),
            tol,
        );
    }
    let final_dir = out.join("checkpoints").join("step-10");
    let ours = SafetensorsSource::open(&final_dir).unwrap();
    let theirs =
        SafetensorsSource::open(&fixture(&format!("train/{case}_final.safetensors"))).unwrap();
    assert_eq!(ours.keys().len(), theirs.keys().len(), "{case}: tensors");
    let worst = worst(theirs.keys().iter().map(|key| {
        let (a, b) = (ours.read(key).unwrap(), theirs.read(key).unwrap());
        assert_eq!(a.shape, b.shape, "{case}: {key}");
        max_abs_diff(&a.data, &b.data, |_| true)
    }));
    assert_within(
        &format!("train {case}: final weights max |Δ| vs PyTorch"),
        worst,
        1e-6,
    );
}

#[test]
fn adamw_clipping_accumulation_cosine_warmup_on_input_output_data() {
    let tmp = tempfile::tempdir().unwrap();
    let body = format!(
        r#"
[data]
train = "{}"
format = "input_output"
seq_len = 48
shuffle = false
[train]
max_steps = 10
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
"#,
        fixture("train/io.jsonl").display()
    );
    let lines = run("adamw", &body, tmp.path());
    compare("adamw", &lines, tmp.path());
}

#[test]
fn sgd_momentum_linear_schedule_on_text_data() {
    let tmp = tempfile::tempdir().unwrap();
    let body = format!(
        r#"
[data]
train = "{}"
format = "text"
seq_len = 48
shuffle = false
[train]
max_steps = 10
micro_batch_size = 4
max_grad_norm = 0.0
[optim]
name = "sgd"
lr = 0.05
momentum = 0.9
[sched]
kind = "linear"
"#,
        fixture("train/text.jsonl").display()
    );
    let lines = run("sgd", &body, tmp.path());
    compare("sgd", &lines, tmp.path());
}

/// bf16 mixed precision (`[model] dtype = "bf16"`) against transformers under
/// `torch.autocast(bfloat16)`: 20 steps, loss within 1e-2 relative (`collie_tests::suite::bf16`).
#[test]
fn bf16_mixed_precision_tracks_torch_autocast() {
    let reference = collie_tests::suite::bf16::reference_losses();
    for attention in ["naive", "flash"] {
        let checks =
            collie_tests::suite::bf16::trajectory::<B>(&Default::default(), &reference, attention);
        collie_tests::suite::assert_all("cpu", &checks);
    }
}
