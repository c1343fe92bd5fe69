//! transformers and peft load what collie-rs writes: HF directories (after training, in bf16 and
//! f16, converted from GGUF, merged from an adapter) and peft adapters of every method (after
//! training). `scripts/fixtures/interop_ref.py` runs [`write_artifacts`] (the ignored test
//! `write_interop_artifacts`), loads each artifact with transformers / peft and records what they
//! read (a fingerprint of every tensor) and the logits they compute
//! (`tests/fixtures/interop/`). Here the same artifacts are written again with the same seeds:
//! each tensor must be the one transformers / peft read, and collie-rs must compute their logits
//! from it — so CI checks the round trip without Python.

mod common;

use std::path::Path;

use collie_core::lm::CausalLm;
use collie_io::safetensors::SaveDtype;
use collie_peft::adapter_io;
use collie_tests::suite::peft::CASES;
use collie_train::TrainConfig;
use common::*;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

/// Largest |Δlogit| between collie-rs and transformers / peft on an artifact (worst achieved:
/// 1.7e-6, the prefix-projection adapter).
const LOGITS_TOL: f64 = 1.5e-5;
/// The same for the model converted from the tiny GGUF, whose random K-quant blocks give logits
/// up to ~60 (achieved: 7.5e-5, as `gguf.rs` measures on the GGUF itself).
const GGUF_LOGITS_TOL: f64 = 5e-4;

/// What transformers / peft read: written by `scripts/fixtures/interop_ref.py`.
fn manifest() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("interop/manifest.json")).unwrap())
        .unwrap()
}

/// Every artifact, into `out`: `full` (3 AdamW steps of the train fixture model), `full_bf16` (the
/// fixture model stored as bf16), `gguf` (the tiny GGUF converted to an HF directory), `adapter_*`
/// (5 AdamW steps of each peft method) and `merged_f16` (the trained LoRA adapter merged into its
/// base, stored as f16).
fn write_artifacts(out: &Path) {
    std::fs::create_dir_all(out).unwrap();
    let device = Default::default();
    let runs = tempfile::tempdir().unwrap();
    let text = format!(
        r#"[model]
path = "{}"
[data]
train = "{}"
format = "input_output"
seq_len = 48
shuffle = false
[train]
max_steps = 3
micro_batch_size = 3
max_grad_norm = 1.0
[optim]
name = "adamw"
lr = 5e-3
weight_decay = 0.01
[output]
dir = "{}"
"#,
        fixture("train/model").display(),
        fixture("train/io.jsonl").display(),
        runs.path().join("full").display()
    );
    train_run(TrainConfig::parse(&text, "full", &[]).unwrap(), None);
    copy_dir(
        &runs.path().join("full/checkpoints/step-3"),
        &out.join("full"),
    );
    // The bf16 file is of the fixture model itself, not of the trained one: bf16 rounding turns
    // the trained weights' float-order noise (which differs between CPUs) into whole-ulp flips.
    let base = collie_llama::load::<B>(fixture("train/model").to_str().unwrap(), &device).unwrap();
    collie_llama::hf::save_hf_dir(
        &base.model,
        &base.config,
        base.tokenizer.as_ref(),
        &out.join("full_bf16"),
        SaveDtype::BF16,
    )
    .unwrap();
    let gguf = collie_llama::load::<B>(fixture("gguf/tiny_llama.gguf").to_str().unwrap(), &device)
        .unwrap();
    collie_llama::hf::save_hf_dir(
        &gguf.model,
        &gguf.config,
        gguf.tokenizer.as_ref(),
        &out.join("gguf"),
        SaveDtype::F32,
    )
    .unwrap();
    for case in CASES {
        let dir = runs.path().join(case);
        train_run(peft_steps_config(case, "", &dir), None);
        copy_dir(
            &dir.join("checkpoints/step-5"),
            &out.join(format!("adapter_{case}")),
        );
    }
    let base = collie_llama::load::<B>(fixture("train/model").to_str().unwrap(), &device).unwrap();
    let (mut merged, _) = adapter_io::load(base.model, &out.join("adapter_lora"), &device).unwrap();
    collie_peft::lora::merge_and_unload(&mut merged);
    collie_llama::hf::save_hf_dir(
        &merged,
        &base.config,
        base.tokenizer.as_ref(),
        &out.join("merged_f16"),
        SaveDtype::F16,
    )
    .unwrap();
}

/// The values of a stored tensor, widened to f64.
fn widen(dtype: Dtype, bytes: &[u8]) -> Vec<f64> {
    match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes(c.try_into().unwrap()).to_f64())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes(c.try_into().unwrap()).to_f64())
            .collect(),
        other => panic!("unexpected dtype {other:?}"),
    }
}

/// Checks every tensor of `file` against the fingerprint transformers / peft read: same names,
/// shapes and storage dtype; same values (sums and leading values within float noise).
fn assert_same_tensors(name: &str, file: &Path, want: &Value) {
    let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut ours: Vec<String> = st.names().into_iter().map(String::from).collect();
    ours.sort();
    let mut theirs: Vec<String> = want.as_object().unwrap().keys().cloned().collect();
    theirs.sort();
    assert_eq!(ours, theirs, "{name}: tensor names");
    for key in &theirs {
        let view = st.tensor(key).unwrap();
        let w = &want[key];
        let shape: Vec<usize> = serde_json::from_value(w["shape"].clone()).unwrap();
        assert_eq!(view.shape(), shape, "{name} {key}: shape");
        assert_eq!(
            format!("{:?}", view.dtype()),
            w["dtype"].as_str().unwrap(),
            "{name} {key}: dtype"
        );
        let v = widen(view.dtype(), view.data());
        assert_finite(&format!("{name} {key}"), &v);
        // The same values up to float noise (a retrained artifact on another machine may round
        // differently in the last bits): sums within 1e-5 of the tensor's scale, leading values
        // within 1e-5 of its root mean square. A layout error (a transposition, a wrong name, a
        // scale) moves them by the order of the values themselves.
        let n = v.len() as f64;
        let sum: f64 = v.iter().sum();
        let sumsq: f64 = v.iter().map(|x| x * x).sum();
        let (ws, wq) = (w["sum"].as_f64().unwrap(), w["sumsq"].as_f64().unwrap());
        let rms = (wq / n).sqrt().max(1e-12);
        assert!(
            (sum - ws).abs() <= 1e-5 * rms * n,
            "{name} {key}: sum {sum} vs {ws}"
        );
        assert!(
            (sumsq - wq).abs() <= 1e-5 * wq.max(1e-24),
            "{name} {key}: sum of squares {sumsq} vs {wq}"
        );
        let head: Vec<f64> = serde_json::from_value(w["head"].clone()).unwrap();
        assert!(!head.is_empty() && head.len() <= v.len());
        let gap = max_abs_diff(&v[..head.len()], &head, |_| true);
        assert!(
            gap <= 1e-5 * rms,
            "{name} {key}: leading values differ by {gap:e}"
        );
    }
}

#[test]
#[ignore = "run by scripts/fixtures/interop_ref.py (COLLIE_INTEROP_OUT names the directory)"]
fn write_interop_artifacts() {
    let out = std::env::var("COLLIE_INTEROP_OUT").expect("COLLIE_INTEROP_OUT");
    write_artifacts(Path::new(&out));
}

#[test]
fn transformers_and_peft_load_what_collie_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path();
    write_artifacts(out);
    let manifest = manifest();
    let device = Default::default();
    let artifacts = manifest["artifacts"].as_object().unwrap();
    assert_eq!(
        artifacts.len(),
        4 + CASES.len(),
        "artifacts in the manifest"
    );
    for (name, a) in artifacts {
        let dir = out.join(name);
        for (file, tensors) in a["files"].as_object().unwrap() {
            assert_same_tensors(name, &dir.join(file), tensors);
        }
        if let Some(cfg) = a.get("config") {
            // What transformers built the model from.
            let ours: Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                    .unwrap();
            for (k, v) in cfg.as_object().unwrap() {
                let got = ours.get(k).filter(|x| !x.is_null());
                assert_eq!(got, Some(v).filter(|x| !x.is_null()), "{name}: config {k}");
            }
        }
        let golden = read_golden(&fixture(&format!("interop/{name}.safetensors")));
        let (ids, mask) = (
            golden["input_ids"].int2::<B>(&device),
            golden["attention_mask"].int2::<B>(&device),
        );
        let logits = match a["kind"].as_str().unwrap() {
            "model" => {
                let m = collie_llama::load::<B>(dir.to_str().unwrap(), &device).unwrap();
                values(m.model.logits(ids, Some(&mask)))
            }
            _ => {
                let base =
                    collie_llama::load::<B>(fixture("train/model").to_str().unwrap(), &device)
                        .unwrap()
                        .model;
                let (m, _) = adapter_io::load(base, &dir, &device).unwrap();
                values(m.logits(ids, Some(&mask)))
            }
        };
        let want = &golden["logits"];
        let vocab = want.shape[2];
        let real = &golden["attention_mask"].values;
        let d = max_abs_diff(&logits, &want.values, |i| real[i / vocab] == 1.0);
        assert_within(
            &format!(
                "interop {name}: logits max |Δ| vs {}",
                a["reader"].as_str().unwrap()
            ),
            d,
            if name == "gguf" {
                GGUF_LOGITS_TOL
            } else {
                LOGITS_TOL
            },
        );
    }
}
