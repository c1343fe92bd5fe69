//! GGUF export: llama.cpp's quantizers byte for byte (fixture: `scripts/fixtures/gguf_quant.py`,
//! made by ggml itself), and models written as GGUF read back by the project's GGUF reader:
//! names, q/k permutation, metadata and tokenizer, from a GGUF source and from an HF directory.

mod common;

use collie_io::family::ModelFiles;
use collie_io::gguf::GgufSource;
use collie_io::module::TensorSource;
use collie_io::quant::{dequantize, quantize, QuantType};
use collie_io::safetensors::SaveDtype;
use collie_io::tokenizer::TokenizerBundle;
use collie_llama::Llama;
use common::*;

#[test]
fn quantizers_write_llama_cpp_bytes() {
    let golden = read_golden(&fixture("gguf_quant/quant.safetensors"));
    let x = &golden["x"];
    let (rows, n) = (x.shape[0], x.shape[1]);
    assert!(rows >= 20, "fixture rows");
    for (ty, key) in [
        (QuantType::Q4K, "q4_k"),
        (QuantType::Q8_0, "q8_0"),
        (QuantType::F16, "f16"),
    ] {
        let expected = &golden[key];
        let width = expected.shape[1];
        assert_eq!(width, ty.bytes(n), "{key}: bytes per row");
        for r in 0..rows {
            let row: Vec<f32> = x.values[r * n..(r + 1) * n]
                .iter()
                .map(|v| *v as f32)
                .collect();
            let ours = quantize(&row, ty);
            let theirs: Vec<u8> = expected.values[r * width..(r + 1) * width]
                .iter()
                .map(|v| *v as u8)
                .collect();
            if let Some(i) = (0..width).find(|&i| ours[i] != theirs[i]) {
                panic!(
                    "{key} row {r}: byte {i} is {} (llama.cpp: {})",
                    ours[i], theirs[i]
                );
            }
        }
    }
}

fn tiny() -> std::path::PathBuf {
    fixture("gguf/tiny_llama.gguf")
}

fn ids() -> burn::tensor::Tensor<B, 2, burn::tensor::Int> {
    read_golden(&fixture("gguf/tiny_llama.safetensors"))["ids"].int2::<B>(&Default::default())
}

fn same_encodings(a: &TokenizerBundle, b: &TokenizerBundle, what: &str) {
    let texts = [
        "Hello world, this is a test.",
        "  leading spaces and\nnew lines\n\n",
        "numbers 12345 and symbols !?#",
        "<|im_start|>user\nhi<|im_end|>",
    ];
    for text in texts {
        assert_eq!(
            a.encode(text, true).unwrap(),
            b.encode(text, true).unwrap(),
            "{what}: ids of {text:?}"
        );
    }
    assert_eq!(a.chat_template, b.chat_template, "{what}: chat template");
}

#[test]
fn exported_gguf_reads_back_as_the_same_model() {
    let device = Default::default();
    let src = collie_llama::load::<B>(tiny().to_str().unwrap(), &device).unwrap();
    let logits = values(src.model.forward(ids(), None));
    let dir = tempfile::tempdir().unwrap();
    let keys = GgufSource::open(&tiny()).unwrap().tokenizer_keys();

    // F32: every weight exact, so the same logits bit for bit.
    let f32_path = dir.path().join("f32.gguf");
    src.model
        .save_gguf(&src.config, &keys, &f32_path, None)
        .unwrap();
    let back = collie_llama::load::<B>(f32_path.to_str().unwrap(), &device).unwrap();
    assert_eq!(
        values(back.model.forward(ids(), None)),
        logits,
        "F32 export must give identical logits"
    );
    assert_eq!(
        back.config.num_key_value_heads,
        src.config.num_key_value_heads
    );
    assert_eq!(back.config.rms_norm_eps, src.config.rms_norm_eps);
    same_encodings(
        src.tokenizer.as_ref().unwrap(),
        back.tokenizer.as_ref().unwrap(),
        "tokenizer keys copied",
    );

    // Quantized: matrices in the type (norms F32), each equal to the F32 export's tensor
    // encoded by the quantizer and decoded by the reader; logits near the source's.
    let exact = GgufSource::open(&f32_path).unwrap();
    for (ty, name, tol) in [
        (QuantType::F16, "F16", 4e-3),
        (QuantType::Q8_0, "Q8_0", 4e-2),
        (QuantType::Q4K, "Q4K", 0.5),
    ] {
        let path = dir.path().join(format!("{name}.gguf"));
        src.model
            .save_gguf(&src.config, &keys, &path, Some(ty))
            .unwrap();
        let file = GgufSource::open(&path).unwrap();
        assert_eq!(file.keys(), exact.keys(), "{name}: tensor names");
        for key in file.keys() {
            let shape = file.shape(&key).unwrap();
            let want = if shape.len() == 2 { name } else { "F32" };
            assert_eq!(file.tensor_type(&key).unwrap(), want, "{name}: {key}");
            let original = exact.read(&key).unwrap();
            let expected = match shape.len() {
                2 => {
                    let bytes = quantize(&original.data, ty);
                    dequantize(&bytes, ty, original.data.len()).unwrap()
                }
                _ => original.data.clone(),
            };
            assert_eq!(file.read(&key).unwrap().data, expected, "{name}: {key}");
        }
        let q = collie_llama::load::<B>(path.to_str().unwrap(), &device).unwrap();
        let diff = max_rel_diff(&values(q.model.forward(ids(), None)), &logits);
        // The whole model's quantization error (embedding and head included) on this fixture's
        // large random weights; names and permutation are checked exactly above.
        assert_within(
            &format!("{name} export: max |Δlogit| / max |logit| vs F32"),
            diff,
            tol,
        );
    }
}

#[test]
fn exported_gguf_from_an_hf_directory_carries_its_tokenizer() {
    let device = Default::default();
    let src = collie_llama::load::<B>(tiny().to_str().unwrap(), &device).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    src.model
        .save_hf_dir(&src.config, src.tokenizer.as_ref(), &hf, SaveDtype::F32)
        .unwrap();
    let from_hf = collie_llama::load::<B>(hf.to_str().unwrap(), &device).unwrap();
    let tok = from_hf.tokenizer.as_ref().unwrap();
    let keys = tok.gguf_metadata(None).unwrap();
    let path = dir.path().join("from_hf.gguf");
    from_hf
        .model
        .save_gguf(&from_hf.config, &keys, &path, None)
        .unwrap();
    let back = collie_llama::load::<B>(path.to_str().unwrap(), &device).unwrap();
    assert_eq!(
        values(back.model.forward(ids(), None)),
        values(src.model.forward(ids(), None)),
        "HF → GGUF must give identical logits"
    );
    same_encodings(
        tok,
        back.tokenizer.as_ref().unwrap(),
        "tokenizer.json → GGUF",
    );
    let file = GgufSource::open(&path).unwrap();
    let original = GgufSource::open(&tiny()).unwrap();
    for key in ["tokenizer.ggml.model", "tokenizer.ggml.pre"] {
        assert_eq!(file.get_str(key), original.get_str(key), "{key}");
    }
    for key in ["tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"] {
        assert_eq!(file.get_u64(key), original.get_u64(key), "{key}");
    }
}

#[test]
fn what_cannot_be_written_says_so() {
    let device = Default::default();
    let mut src = collie_llama::load::<B>(tiny().to_str().unwrap(), &device).unwrap();
    let dir = tempfile::tempdir().unwrap();
    src.config.model_type = "gemma3_text".into();
    let err = Llama::save_gguf(
        &src.model,
        &src.config,
        &[],
        &dir.path().join("x.gguf"),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("gemma3_text") && err.contains("cannot be written as GGUF"),
        "{err}"
    );
    assert!(!dir.path().join("x.gguf").exists(), "nothing half-written");
    // A tokenizer other than byte-level BPE names its kind.
    let wp = dir.path().join("wordpiece");
    std::fs::create_dir(&wp).unwrap();
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": {"[UNK]": 0, "a": 1, "##b": 2}},
    });
    std::fs::write(wp.join("tokenizer.json"), json.to_string()).unwrap();
    let wordpiece = TokenizerBundle::from_hf_dir(&wp).unwrap();
    let err = wordpiece.gguf_metadata(None).unwrap_err().to_string();
    assert!(err.contains("WordPiece"), "{err}");
}

#[test]
fn pre_tokenizer_names_are_llama_cpps() {
    // llama.cpp refuses unknown `pre` names (`gpt2` among them: its name is `gpt-2`).
    let dir = tempfile::tempdir().unwrap();
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
                                        "trim_offsets": true, "use_regex": true});
    let digits = serde_json::json!({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": true}, byte_level.clone()]});
    for (pre, name) in [(byte_level, "gpt-2"), (digits, "smollm")] {
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": pre, "post_processor": null, "decoder": null,
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]]},
        });
        std::fs::write(dir.path().join("tokenizer.json"), json.to_string()).unwrap();
        let tok = TokenizerBundle::from_hf_dir(dir.path()).unwrap();
        let keys = tok.gguf_metadata(None).unwrap();
        let get = |k: &str| {
            keys.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(
            get("tokenizer.ggml.pre").and_then(|v| v.as_str().map(str::to_string)),
            Some(name.to_string())
        );
        assert_eq!(
            get("tokenizer.ggml.merges").and_then(|v| v.as_array().map(|a| a.len())),
            Some(1)
        );
    }
}
