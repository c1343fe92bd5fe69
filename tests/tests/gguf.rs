//! GGUF: dequantization of every supported tensor type against gguf-py, a tiny llama.cpp-style
//! model against transformers' GGUF loader, tokenizers rebuilt from metadata against transformers,
//! and GGUF → HF directory round trips. Fixtures: `scripts/fixtures/gguf_tiny.py`.

mod common;

use collie_data::chat::{render, ChatMessage, TemplateTokens};
use collie_io::gguf::GgufSource;
use collie_io::module::TensorSource;
use collie_io::safetensors::SaveDtype;
use collie_io::tokenizer::TokenizerBundle;
use common::*;
use serde_json::Value;

fn tiny() -> std::path::PathBuf {
    fixture("gguf/tiny_llama.gguf")
}

#[test]
fn every_tensor_type_dequantizes_like_gguf_py() {
    let src = GgufSource::open(&tiny()).unwrap();
    let golden = read_golden(&fixture("gguf/tiny_llama.safetensors"));
    let mut types = std::collections::BTreeSet::new();
    for key in src.keys() {
        types.insert(src.tensor_type(&key).unwrap());
        let t = src.read(&key).unwrap();
        let head = &golden[&format!("{key}:head")].values;
        let tail = &golden[&format!("{key}:tail")].values;
        let n = t.data.len();
        let d_head = max_abs_diff(&t.data[..head.len()], head, |_| true);
        let d_tail = max_abs_diff(&t.data[n - tail.len()..], tail, |_| true);
        assert!(
            d_head == 0.0 && d_tail == 0.0,
            "{key}: head Δ {d_head:e}, tail Δ {d_tail:e}"
        );
        let moments = &golden[&format!("{key}:moments")].values;
        let sum: f64 = t.data.iter().map(|v| *v as f64).sum();
        let sq: f64 = t.data.iter().map(|v| (*v as f64).powi(2)).sum();
        assert!(
            (sum - moments[0]).abs() <= 1e-9 * moments[1].max(1.0),
            "{key}: sum {sum} vs {}",
            moments[0]
        );
        assert!(
            (sq - moments[1]).abs() <= 1e-9 * moments[1],
            "{key}: sum of squares {sq} vs {}",
            moments[1]
        );
    }
    let expected: std::collections::BTreeSet<String> = [
        "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4K", "Q5K", "Q6K",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(types, expected, "the fixture should cover every type");
}

fn tiny_logits_diff(model: &collie_llama::Llama<B>) -> f64 {
    let device = Default::default();
    let golden = read_golden(&fixture("gguf/tiny_llama.safetensors"));
    let ids = golden["ids"].int2::<B>(&device);
    let mask = golden["mask"].int2::<B>(&device);
    let logits = values(model.forward(ids, Some(&mask)));
    let expected = &golden["logits"];
    let vocab = expected.shape[2];
    let m = &golden["mask"].values;
    max_abs_diff(&logits, &expected.values, |i| m[i / vocab] == 1.0)
}

#[test]
fn tiny_gguf_model_matches_transformers() {
    let loaded = collie_llama::load::<B>(tiny().to_str().unwrap(), &Default::default()).unwrap();
    assert_eq!(loaded.config.num_key_value_heads, Some(2));
    assert!(!loaded.config.tie_word_embeddings);
    let diff = tiny_logits_diff(&loaded.model);
    // Its random K-quant blocks make large weights and logits (|logit| up to ~60): 7.3e-5 achieved.
    assert_within(
        "gguf tiny mixed-type model: max |Δlogit| vs transformers",
        diff,
        5e-4,
    );
}

#[test]
fn whole_models_in_each_legacy_block_type_match_transformers() {
    // Files as llama.cpp's quantizer writes them: every matrix in the file's type
    // (`scripts/fixtures/gguf_types.py`).
    let device = Default::default();
    for (name, ty) in [
        ("q8_0", "Q8_0"),
        ("q5_0", "Q5_0"),
        ("q5_1", "Q5_1"),
        ("q4_0", "Q4_0"),
        ("q4_1", "Q4_1"),
    ] {
        let path = fixture(&format!("gguf_types/{name}.gguf"));
        let src = GgufSource::open(&path).unwrap();
        let matrices: Vec<String> = src
            .keys()
            .into_iter()
            .filter(|k| src.shape(k).is_some_and(|s| s.len() == 2))
            .collect();
        assert_eq!(matrices.len(), 16, "{name}: matrices");
        for k in &matrices {
            assert_eq!(src.tensor_type(k).unwrap(), ty, "{name}: {k}");
        }
        let loaded = collie_llama::load::<B>(path.to_str().unwrap(), &device).unwrap();
        let golden = read_golden(&fixture(&format!("gguf_types/{name}.safetensors")));
        let logits = values(loaded.model.forward(
            golden["ids"].int2::<B>(&device),
            Some(&golden["mask"].int2::<B>(&device)),
        ));
        let expected = &golden["logits"];
        let vocab = expected.shape[2];
        let m = &golden["mask"].values;
        assert_within(
            &format!("gguf {name} model: max |Δlogit| vs transformers"),
            max_abs_diff(&logits, &expected.values, |i| m[i / vocab] == 1.0),
            4.5e-5,
        );
    }
}

fn cases() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("gguf/tokenizer_cases.json")).unwrap())
        .unwrap()
}

fn check_tokenizer(tok: &TokenizerBundle, cases: &Value, file: &str) {
    for case in cases["encode"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids = tok.encode(text, true).unwrap();
        let expected: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(ids, expected, "{file}: ids of {text:?}");
        assert_eq!(
            tok.decode(&ids, true).unwrap(),
            case["decoded"].as_str().unwrap(),
            "{file}: decode of {text:?}"
        );
    }
    let template = tok.chat_template.as_deref().expect("chat template");
    let tokens = TemplateTokens {
        bos_token: tok.bos_token.clone(),
        eos_token: tok.eos_token.clone(),
    };
    for chat in cases["chat"].as_array().unwrap() {
        let messages: Vec<ChatMessage> = serde_json::from_value(chat["messages"].clone()).unwrap();
        let text = render(template, &messages, true, &tokens).unwrap();
        assert_eq!(
            text,
            chat["rendered"].as_str().unwrap(),
            "{file}: chat rendering"
        );
    }
}

#[test]
fn tokenizers_rebuilt_from_metadata_match_transformers() {
    let cases = cases();
    for (file, case) in cases.as_object().unwrap() {
        let src = GgufSource::open(&fixture(&format!("gguf/{file}"))).unwrap();
        let tok = TokenizerBundle::from_gguf(&src).unwrap();
        check_tokenizer(&tok, case, file);
    }
}

#[test]
fn gguf_to_hf_directory_round_trip() {
    let device = Default::default();
    let loaded = collie_llama::load::<B>(tiny().to_str().unwrap(), &device).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf");
    collie_llama::hf::save_hf_dir(
        &loaded.model,
        &loaded.config,
        loaded.tokenizer.as_ref(),
        &out,
        SaveDtype::F32,
    )
    .unwrap();
    let back = collie_llama::load::<B>(out.to_str().unwrap(), &device).unwrap();
    let a = values(loaded.model.forward(golden_ids(), None));
    let b: Vec<f64> = values(back.model.forward(golden_ids(), None))
        .into_iter()
        .map(f64::from)
        .collect();
    assert_eq!(
        max_abs_diff(&a, &b, |_| true),
        0.0,
        "HF copy must give identical logits"
    );
    assert_within(
        "gguf → HF directory: max |Δlogit| vs transformers",
        tiny_logits_diff(&back.model),
        5e-4,
    );
    // The saved tokenizer.json is the rebuilt one: same ids, same chat template.
    let cases = cases();
    check_tokenizer(
        back.tokenizer.as_ref().unwrap(),
        &cases["tiny_llama.gguf"],
        "saved tokenizer.json",
    );
}

fn golden_ids() -> burn::tensor::Tensor<B, 2, burn::tensor::Int> {
    read_golden(&fixture("gguf/tiny_llama.safetensors"))["ids"].int2::<B>(&Default::default())
}
