//! PEFT against HF peft 0.21 + transformers (fixtures: `scripts/fixtures/peft_ref.py`): logits of
//! a tiny GQA LLaMA under each method with non-trivial adapter weights, five AdamW steps on the
//! adapter parameters through the trainer, and adapters written by collie-rs against peft's files.
//! The logits run on the CPU and wgpu (`collie_tests::suite::peft`).

mod common;

use std::path::Path;

use collie_core::lm::CausalLm;
use collie_io::module::TensorSource;
use collie_io::safetensors::SafetensorsSource;
use collie_peft::adapter_io;
use common::*;
use serde_json::Value;

use collie_tests::suite::peft::CASES;
use collie_tests::suite::{self, assert_all};

/// Logits of `adapter` on the fixture batch vs peft's (CPU); returns max |Δ| over real positions.
fn logits_diff(adapter: &Path, case: &str) -> f64 {
    suite::peft::logits_diff::<B>(adapter, case, &Default::default())
}

#[test]
fn logits_match_peft_for_every_method_on_cpu() {
    assert_all("cpu", &suite::peft::logits::<B>(&Default::default()));
}

#[cfg(feature = "wgpu")]
#[test]
fn logits_match_peft_for_every_method_on_wgpu() {
    let device = burn::backend::wgpu::WgpuDevice::DefaultDevice;
    assert_all(
        "wgpu",
        &suite::peft::logits::<collie_core::device::Wgpu>(&device),
    );
}

#[test]
fn reparameterized_adapters_load_as_peft_saves_them() {
    // Without the encoder file, the saved prompt embeddings are used as a fixed table (peft's
    // inference mode): same logits.
    for case in ["prefix_projection", "ptuning"] {
        let tmp = tempfile::tempdir().unwrap();
        for f in [adapter_io::CONFIG_FILE, adapter_io::WEIGHTS_FILE] {
            std::fs::copy(fixture(&format!("peft/{case}/{f}")), tmp.path().join(f)).unwrap();
        }
        let d = logits_diff(tmp.path(), case);
        println!("{case} (saved embeddings only): logits max |Δ| = {d:.2e}");
        assert!(d < 1e-4, "{case}: {d:.3e}");
    }
}

#[test]
fn five_adamw_steps_on_adapter_parameters_match_peft() {
    for case in CASES {
        let tmp = tempfile::tempdir().unwrap();
        let config = peft_steps_config(case, "", tmp.path());
        let (trainer, _) = train_run(config, None);
        assert!(trainer.peft_active());
        let lines: Vec<Value> = std::fs::read_to_string(tmp.path().join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|v| v.get("loss").is_some())
            .collect();
        let want: Vec<Value> = serde_json::from_str(
            &std::fs::read_to_string(fixture(&format!("peft/{case}/steps.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(lines.len(), want.len(), "{case}: steps");
        let mut worst = (0.0f64, 0.0f64);
        for (i, (got, want)) in lines.iter().zip(&want).enumerate() {
            assert_eq!(
                got["target_tokens"], want["target_tokens"],
                "{case} step {i}"
            );
            let rel = |k: &str| {
                let (a, b) = (got[k].as_f64().unwrap(), want[k].as_f64().unwrap());
                (a - b).abs() / b.abs().max(1e-12)
            };
            worst = (worst.0.max(rel("loss")), worst.1.max(rel("grad_norm")));
            assert!(
                rel("loss") < 1e-4,
                "{case} step {i}: loss {} vs peft {}",
                got["loss"],
                want["loss"]
            );
            assert!(
                rel("grad_norm") < 1e-4,
                "{case} step {i}: grad_norm {} vs peft {}",
                got["grad_norm"],
                want["grad_norm"]
            );
        }
        println!(
            "{case}: 5 steps, loss rel ≤ {:.1e}, grad_norm rel ≤ {:.1e}",
            worst.0, worst.1
        );
        // The checkpoint is an adapter, not a model.
        let ckpt = tmp.path().join("checkpoints/step-5");
        assert!(ckpt.join(adapter_io::CONFIG_FILE).is_file());
        assert!(!ckpt.join("model.safetensors").exists());
    }
}

#[test]
fn adapters_written_here_match_peft_files() {
    let device = Default::default();
    for case in CASES {
        let dir = fixture(&format!("peft/{case}"));
        let base = collie_llama::load::<B>(fixture("train/model").to_str().unwrap(), &device)
            .unwrap()
            .model;
        let (mut model, config) = adapter_io::load(base, &dir, &device).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        adapter_io::save(
            &mut model,
            &config,
            "tests/fixtures/train/model",
            tmp.path(),
        )
        .unwrap();
        // Same tensors under the same keys.
        let ours = SafetensorsSource::open(&tmp.path().join(adapter_io::WEIGHTS_FILE)).unwrap();
        let theirs = SafetensorsSource::open(&dir.join(adapter_io::WEIGHTS_FILE)).unwrap();
        let (mut a, mut b) = (ours.keys(), theirs.keys());
        a.sort();
        b.sort();
        assert_eq!(a, b, "{case}: keys");
        for key in &b {
            let (x, y) = (ours.read(key).unwrap(), theirs.read(key).unwrap());
            assert_eq!(x.shape, y.shape, "{case}: {key} shape");
            let y: Vec<f64> = y.data.into_iter().map(f64::from).collect();
            let d = max_abs_diff(&x.data, &y, |_| true);
            assert!(d < 1e-6, "{case}: {key} differs by {d:.2e}");
        }
        // The config fields peft reads to rebuild the adapter.
        let read = |p: &Path| -> Value {
            serde_json::from_str(&std::fs::read_to_string(p.join(adapter_io::CONFIG_FILE)).unwrap())
                .unwrap()
        };
        let (ours, theirs) = (read(tmp.path()), read(&dir));
        for key in [
            "peft_type",
            "task_type",
            "r",
            "lora_alpha",
            "use_rslora",
            "feedforward_modules",
            "num_virtual_tokens",
            "token_dim",
            "num_attention_heads",
            "num_layers",
            "num_transformer_submodules",
            "prefix_projection",
            "encoder_hidden_size",
            "encoder_reparameterization_type",
        ] {
            if let Some(want) = theirs.get(key).filter(|v| !v.is_null()) {
                let got = &ours[key];
                let same = match (got.as_f64(), want.as_f64()) {
                    (Some(x), Some(y)) => x == y,
                    _ => got == want,
                };
                assert!(same, "{case}: {key} = {got} vs peft {want}");
            }
        }
        let set = |v: &Value| -> Vec<String> {
            let mut s: Vec<String> = v
                .as_array()
                .map(|a| a.iter().map(|x| x.as_str().unwrap().to_string()).collect())
                .unwrap_or_default();
            s.sort();
            s
        };
        if theirs["target_modules"].is_array() {
            assert_eq!(
                set(&ours["target_modules"]),
                set(&theirs["target_modules"]),
                "{case}: target_modules"
            );
        }
    }
}

/// peft loads what collie-rs trains and saves, with collie-rs's logits. Needs Python with the
/// pinned peft: `COLLIE_REF_PYTHON=/path/to/python cargo test -p collie-tests --test peft_parity
/// -- --ignored`.
#[test]
#[ignore = "needs Python with peft (set COLLIE_REF_PYTHON)"]
fn peft_loads_adapters_trained_here() {
    let python = std::env::var("COLLIE_REF_PYTHON").expect("COLLIE_REF_PYTHON");
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/fixtures/check_peft_load.py");
    let device = Default::default();
    for case in CASES {
        let tmp = tempfile::tempdir().unwrap();
        train_run(peft_steps_config(case, "", tmp.path()), None);
        let adapter = tmp.path().join("checkpoints/step-5");
        let base = collie_llama::load::<B>(fixture("train/model").to_str().unwrap(), &device)
            .unwrap()
            .model;
        let (model, _) = adapter_io::load(base, &adapter, &device).unwrap();
        let g = read_golden(&fixture(&format!("peft/{case}/golden.safetensors")));
        let (ids, mask) = (
            g["input_ids"].int2::<B>(&device),
            g["attention_mask"].int2::<B>(&device),
        );
        let logits = model.logits(ids.clone(), Some(&mask));
        let host = |t: Vec<f32>, shape: &[usize]| collie_io::HostTensor::new(shape.to_vec(), t);
        let ours = tmp.path().join("ours.safetensors");
        let dims = logits.dims().to_vec();
        collie_io::safetensors::save_safetensors(
            &ours,
            &[
                (
                    "input_ids".into(),
                    host(values(ids.float()), &g["input_ids"].shape),
                ),
                (
                    "attention_mask".into(),
                    host(values(mask.float()), &g["attention_mask"].shape),
                ),
                ("logits".into(), host(values(logits), &dims)),
            ],
            collie_io::safetensors::SaveDtype::F32,
        )
        .unwrap();
        let status = std::process::Command::new(&python)
            .arg(&script)
            .arg(fixture("train/model"))
            .arg(&adapter)
            .arg(&ours)
            .arg("1e-4")
            .status()
            .unwrap();
        assert!(
            status.success(),
            "{case}: peft's logits differ by more than 1e-4"
        );
    }
}

#[test]
fn greedy_generation_matches_peft_and_survives_left_padding() {
    let device = Default::default();
    for case in CASES {
        let base = collie_llama::load::<B>(fixture("train/model").to_str().unwrap(), &device)
            .unwrap()
            .model;
        let (model, _) =
            adapter_io::load(base, &fixture(&format!("peft/{case}")), &device).unwrap();
        let want: Value = serde_json::from_str(
            &std::fs::read_to_string(fixture(&format!("peft/{case}/generate.json"))).unwrap(),
        )
        .unwrap();
        let ids = |v: &Value| -> Vec<u32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        };
        let (prompt, new) = (ids(&want["prompt"]), ids(&want["new_ids"]));
        let cfg = collie_train::generate::GenerationConfig {
            max_new_tokens: new.len(),
            eos_ids: Vec::new(),
            ..Default::default()
        };
        let gen = |prompts: &[Vec<u32>]| {
            collie_train::generate::generate(&model, prompts, &cfg, &device, |_, _| {}).unwrap()
        };
        assert_eq!(
            gen(std::slice::from_ref(&prompt))[0],
            new,
            "{case}: greedy tokens vs peft"
        );
        // In a batch with a longer prompt, this one is left-padded: same tokens.
        let longer: Vec<u32> = [prompt.clone(), vec![7, 8, 9]].concat();
        let both = gen(&[longer.clone(), prompt.clone()]);
        assert_eq!(both[1], new, "{case}: left-padded row");
        assert_eq!(both[0], gen(&[longer])[0], "{case}: unpadded row");
    }
}
