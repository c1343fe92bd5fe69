//! PEFT against HF peft 0.21 + transformers (fixtures: `scripts/fixtures/peft_ref.py`): logits of
//! a tiny GQA LLaMA under each method with non-trivial adapter weights, five AdamW steps on the
//! adapter parameters through the trainer, and adapters written by collie-rs against peft's files.
//! The logits run on the CPU and wgpu (`collie_tests::suite::peft`).

mod common;

use std::path::Path;

use collie_io::module::TensorSource;
use collie_io::safetensors::SafetensorsSource;
use collie_peft::adapter_io;
use common::*;
use serde_json::Value;

use collie_tests::suite::peft::CASES;
use collie_tests::suite::{self, assert_all};

/// Logits of `adapter` on the fixture batch vs peft's (CPU); returns max |Δ| over real positions.
fn logits_diff(adapter: &Path, case: &str) -> f64 {
    let golden = fixture(&format!("peft/{case}/golden.safetensors"));
    suite::peft::logits_diff::<B>(
        &fixture("train/model"),
        adapter,
        &golden,
        &Default::default(),
    )
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
        assert_within(
            &format!("{case} (saved embeddings only): logits max |Δ| vs peft"),
            d,
            1.5e-5,
        );
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
        for (i, (got, want)) in zip_eq(case, &lines[..], &want[..]).enumerate() {
            assert_eq!(
                got["target_tokens"], want["target_tokens"],
                "{case} step {i}"
            );
        }
        let series = |v: &[Value], k: &str| -> Vec<f64> {
            v.iter().map(|x| x[k].as_f64().unwrap()).collect()
        };
        // Worst achieved: loss 1.0e-7, gradient norm 6.0e-7.
        for (k, tol) in [("loss", 9e-7), ("grad_norm", 5e-6)] {
            assert_within(
                &format!("peft {case}: 5 AdamW steps, {k} max rel Δ vs peft"),
                max_rel_list(&series(&lines, k), &series(&want, k)),
                tol,
            );
        }
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
            let d = max_abs_diff(&x.data, &y.data, |_| true);
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
