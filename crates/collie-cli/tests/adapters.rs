//! `collie merge` and `--adapter`: a peft LoRA adapter (tests/fixtures/peft/lora, written by HF
//! peft) folded into its base gives the same greedy continuation and perplexity as the adapter
//! applied at run time; prompt-learning adapters cannot be merged.

mod common;

use common::{fixtures, ok, run as collie};

#[test]
fn merged_model_equals_the_adapter_applied_at_run_time() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures().join("train/model");
    let adapter = fixtures().join("peft/lora");
    let merged = tmp.path().join("merged");
    let (base, adapter, merged) = (
        base.to_str().unwrap(),
        adapter.to_str().unwrap(),
        merged.to_str().unwrap(),
    );
    ok(&[
        "merge",
        "--model",
        base,
        "--adapter",
        adapter,
        "--output",
        merged,
    ]);
    let gen = |extra: &[&str]| {
        let mut a = vec![
            "generate",
            "--prompt",
            "Translate to French: cat",
            "--max-new-tokens",
            "8",
            "--json",
        ];
        a.extend_from_slice(extra);
        let line = ok(&a);
        let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        v["new_ids"].clone()
    };
    let with_adapter = gen(&["--model", base, "--adapter", adapter]);
    let from_merged = gen(&["--model", merged]);
    let plain = gen(&["--model", base]);
    assert_eq!(with_adapter, from_merged);
    assert_ne!(
        with_adapter, plain,
        "the adapter should change the continuation"
    );

    let data = fixtures().join("train/text.jsonl");
    let ppl = |extra: &[&str]| {
        let mut a = vec!["eval-ppl", "--data", data.to_str().unwrap(), "--json"];
        a.extend_from_slice(extra);
        let v: serde_json::Value = serde_json::from_str(ok(&a).trim()).unwrap();
        v["ppl"].as_f64().unwrap()
    };
    let (x, y) = (
        ppl(&["--model", base, "--adapter", adapter]),
        ppl(&["--model", merged]),
    );
    let rel = (x - y).abs() / x;
    // Worst achieved: 2.2e-7.
    println!("merged vs adapter at run time: ppl {x} vs {y} (rel {rel:.2e}, tolerance 2e-6)");
    assert!(rel < 2e-6, "ppl {x} vs {y}");
}

#[test]
fn prompt_learning_adapters_cannot_be_merged() {
    let tmp = tempfile::tempdir().unwrap();
    let out = collie(&[
        "merge",
        "--model",
        fixtures().join("train/model").to_str().unwrap(),
        "--adapter",
        fixtures().join("peft/prefix").to_str().unwrap(),
        "--output",
        tmp.path().join("m").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("PREFIX_TUNING") && stderr.contains("cannot be folded"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
