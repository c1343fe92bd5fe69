//! Saving HF directories: what collie-rs writes is what transformers wrote (tensor for tensor),
//! loads back to identical logits, and (ignored test, needs Python) loads in transformers with the
//! golden logits. Fixtures: `scripts/fixtures/llama_hf.py`.

mod common;

use std::path::Path;

use collie_io::module::TensorSource;
use collie_io::safetensors::{SafetensorsSource, SaveDtype};
use common::*;
use serde_json::Value;

const CASES: &[&str] = &[
    "mha_untied",
    "gqa_tied_theta",
    "mqa_llama3",
    "llama_bias",
    "qwen2_bias",
    "mistral_window",
];

fn save(case: &str, out: &Path) -> collie_llama::LoadedModel<B> {
    let loaded = collie_llama::load::<B>(
        fixture(&format!("llama/{case}")).to_str().unwrap(),
        &Default::default(),
    )
    .unwrap();
    collie_llama::hf::save_hf_dir(&loaded.model, &loaded.config, None, out, SaveDtype::F32)
        .unwrap();
    loaded
}

#[test]
fn saved_tensors_equal_the_transformers_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    for case in CASES {
        let out = tmp.path().join(case);
        save(case, &out);
        let original =
            SafetensorsSource::open(&fixture(&format!("llama/{case}/model.safetensors"))).unwrap();
        let saved = SafetensorsSource::open(&out).unwrap();
        assert_eq!(saved.keys(), original.keys(), "{case}: tensor names");
        for key in original.keys() {
            assert_eq!(
                saved.read(&key).unwrap(),
                original.read(&key).unwrap(),
                "{case}: {key}"
            );
        }
        // The config keeps what transformers needs to rebuild the same model.
        let read = |p: &Path| -> Value {
            serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
        };
        let (a, b) = (
            read(&out.join("config.json")),
            read(&fixture(&format!("llama/{case}/config.json"))),
        );
        for key in [
            "model_type",
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "rms_norm_eps",
            "rope_parameters",
            "tie_word_embeddings",
            "attention_bias",
            "mlp_bias",
            "sliding_window",
            "architectures",
        ] {
            // `null` and an absent key mean the same to transformers.
            let get = |v: &Value| v.get(key).filter(|x| !x.is_null()).cloned();
            assert_eq!(get(&a), get(&b), "{case}: config key {key}");
        }
    }
}

#[test]
fn saved_directory_reloads_to_identical_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let device = Default::default();
    for case in CASES {
        let out = tmp.path().join(case);
        let loaded = save(case, &out);
        let back = collie_llama::load::<B>(out.to_str().unwrap(), &device).unwrap();
        let golden = read_golden(&fixture(&format!("llama/{case}/golden.safetensors")));
        let ids = golden["ids_left"].int2::<B>(&device);
        let mask = golden["mask_left"].int2::<B>(&device);
        let a = values(loaded.model.forward(ids.clone(), Some(&mask)));
        let b: Vec<f64> = values(back.model.forward(ids, Some(&mask)))
            .into_iter()
            .map(f64::from)
            .collect();
        assert_eq!(max_abs_diff(&a, &b, |_| true), 0.0, "{case}");
    }
}

#[test]
fn an_existing_directory_is_replaced_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("stale.bin"), b"old").unwrap();
    save("mha_untied", &out);
    assert!(!out.join("stale.bin").exists());
    assert!(out.join("model.safetensors").is_file());
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        1,
        "staging directories left behind: {leftovers:?}"
    );
}

/// Needs Python with the pinned transformers: `COLLIE_REF_PYTHON=/path/to/python cargo test -p
/// collie-tests --test hf_roundtrip -- --ignored`.
#[test]
#[ignore = "needs Python with transformers (set COLLIE_REF_PYTHON)"]
fn transformers_loads_what_collie_saves() {
    let python = std::env::var("COLLIE_REF_PYTHON").expect("COLLIE_REF_PYTHON");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/fixtures/check_hf_load.py");
    let tmp = tempfile::tempdir().unwrap();
    for case in CASES {
        let out = tmp.path().join(case);
        save(case, &out);
        let golden = fixture(&format!("llama/{case}/golden.safetensors"));
        let status = std::process::Command::new(&python)
            .arg(&script)
            .arg(&out)
            .arg(&golden)
            .arg("1e-5")
            .status()
            .unwrap();
        assert!(
            status.success(),
            "{case}: transformers' logits differ by more than 1e-5"
        );
    }
    // A GGUF converted to an HF directory loads in transformers with transformers' GGUF logits.
    let loaded = collie_llama::load::<B>(
        fixture("gguf/tiny_llama.gguf").to_str().unwrap(),
        &Default::default(),
    )
    .unwrap();
    let out = tmp.path().join("from_gguf");
    collie_llama::hf::save_hf_dir(
        &loaded.model,
        &loaded.config,
        loaded.tokenizer.as_ref(),
        &out,
        SaveDtype::F32,
    )
    .unwrap();
    let status = std::process::Command::new(&python)
        .arg(&script)
        .arg(&out)
        .arg(fixture("gguf/tiny_llama.safetensors"))
        .arg("1e-5")
        .status()
        .unwrap();
    assert!(
        status.success(),
        "converted GGUF: transformers' logits differ by more than 1e-5"
    );
}
