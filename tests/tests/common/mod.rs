//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

/// The tiny HF checkpoints of `tests/fixtures/llama/` (generator: `scripts/fixtures/llama_hf.py`).
pub const LLAMA_CASES: &[&str] = &[
    "mha_untied",
    "gqa_tied_theta",
    "mqa_llama3",
    "llama_bias",
    "qwen2_bias",
    "mistral_window",
];

/// The test backend: Flex on CPU.
pub type B = collie_core::device::Cpu;

/// `tests/fixtures/<rel>`.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

/// A tensor from a golden file: shape and values (ints widened to f64 exactly).
pub struct Golden {
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
}

/// Reads every tensor of a safetensors file (f32, f64 or i64).
pub fn read_golden(path: &std::path::Path) -> HashMap<String, Golden> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).expect("valid safetensors");
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = view.data();
            let values: Vec<f64> = match view.dtype() {
                Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                Dtype::F64 => data
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                Dtype::I64 => data
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                other => panic!("unexpected dtype {other:?} for {name}"),
            };
            (
                name,
                Golden {
                    shape: view.shape().to_vec(),
                    values,
                },
            )
        })
        .collect()
}

impl Golden {
    /// As an int tensor of rank 2.
    pub fn int2<Bk: Backend>(&self, device: &Bk::Device) -> Tensor<Bk, 2, Int> {
        let data: Vec<i64> = self.values.iter().map(|v| *v as i64).collect();
        Tensor::from_data(
            TensorData::new(data, [self.shape[0], self.shape[1]]),
            device,
        )
    }
}

/// Flattened f32 values of a tensor.
pub fn values<Bk: Backend, const D: usize>(t: Tensor<Bk, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

/// Max |a - b| over positions where `keep(i)` holds.
pub fn max_abs_diff(a: &[f32], b: &[f64], keep: impl Fn(usize) -> bool) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .enumerate()
        .filter(|(i, _)| keep(*i))
        .map(|(_, (x, y))| (*x as f64 - y).abs())
        .fold(0.0, f64::max)
}

/// Runs `config` quietly to the end (resuming from `resume` when given) and returns the trainer
/// with the training losses of its `metrics.jsonl`.
pub fn train_run(
    config: collie_train::TrainConfig,
    resume: Option<String>,
) -> (collie_train::Trainer<burn::backend::Autodiff<B>>, Vec<f64>) {
    let options = collie_train::RunOptions {
        quiet: true,
        resume,
        ..Default::default()
    };
    let out = config.output.dir.clone();
    let mut trainer = collie_train::Trainer::<burn::backend::Autodiff<B>>::new(
        config,
        &options,
        &Default::default(),
    )
    .unwrap();
    trainer.run(&options).unwrap();
    let losses = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64())
        .collect();
    (trainer, losses)
}

/// A trainer config running five AdamW steps (lr 5e-3, wd 0.01, clipping at 1.0, constant lr,
/// micro-batch 3) on `train/io.jsonl`, starting from the peft adapter `peft/{case}` (the run of
/// `scripts/fixtures/peft_ref.py`); `train_extra` lines go into `[train]`.
pub fn peft_steps_config(
    case: &str,
    train_extra: &str,
    out: &std::path::Path,
) -> collie_train::TrainConfig {
    let text = format!(
        r#"
[model]
path = "{model}"
[data]
train = "{data}"
format = "input_output"
seq_len = 48
shuffle = false
[train]
max_steps = 5
micro_batch_size = 3
max_grad_norm = 1.0
{train_extra}
[optim]
name = "adamw"
lr = 5e-3
weight_decay = 0.01
[sched]
kind = "constant"
[peft]
adapter = "{adapter}"
[output]
dir = "{out}"
"#,
        model = fixture("train/model").display(),
        data = fixture("train/io.jsonl").display(),
        adapter = fixture(&format!("peft/{case}")).display(),
        out = out.display(),
    );
    collie_train::TrainConfig::parse(&text, case, &[]).unwrap()
}
