//! Helpers shared by the integration tests.
#![allow(dead_code, unused_imports)]

pub use collie_tests::compare::*;
pub use collie_tests::golden::*;

/// The test backend: Flex on CPU.
pub type B = collie_core::device::Cpu;

/// The trainer of the test backend's LLaMA.
pub type LlamaTrainer = collie_train::Trainer<
    burn::backend::Autodiff<B>,
    collie_llama::Llama<burn::backend::Autodiff<B>>,
>;

/// [`collie_tests::train_run`] on the test backend.
pub fn train_run(
    config: collie_train::TrainConfig,
    resume: Option<String>,
) -> (LlamaTrainer, Vec<f64>) {
    collie_tests::train_run(config, resume, &Default::default())
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

/// Copies the directory tree `from` to `to`.
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
