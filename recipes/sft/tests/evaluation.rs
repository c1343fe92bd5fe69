//! The recipe's evaluation sets: held-out questions for ROUGE-L and vader sentiment rows for
//! zero-shot accuracy, written where `eval.generation` / `eval.classification` say and scored by
//! the trainer; `train.eval_on_start = false` skips the evaluation before the first step.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn read_jsonl(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn held_out_questions_and_sentiment_rows_are_written_and_scored() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    std::fs::create_dir(&corpus).unwrap();
    let conversations: String = (0..8)
        .map(|i| format!("- - Question {i}?\n  - Answer {i}.\n  - Thanks {i}.\n"))
        .collect();
    std::fs::write(
        corpus.join("a.yml"),
        format!("categories:\n- test\nconversations:\n{conversations}"),
    )
    .unwrap();
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/train/model");
    let d = |f: &str| tmp.path().join(f).display().to_string();
    let config = format!(
        r#"[model]
path = "{}"
[data]
train = "{}"
eval = "{}"
format = "chat"
seq_len = 64
[train]
max_steps = 1
micro_batch_size = 2
eval_on_start = false
[optim]
lr = 1e-3
[eval]
classification = "{}"
generation = "{}"
chat = true
max_new_tokens = 4
[output]
dir = "{}"
[recipe]
corpus = "{}"
heldout_fraction = 0.5
generation_questions = 3
classification_tasks = ["movie2"]
classification_examples = 5
"#,
        model.display(),
        d("train.jsonl"),
        d("eval.jsonl"),
        d("sentiment.jsonl"),
        d("questions.jsonl"),
        d("out"),
        corpus.display()
    );
    std::fs::write(tmp.path().join("c.toml"), config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_recipe-sft"))
        .arg("--config")
        .arg(tmp.path().join("c.toml"))
        .arg("--quiet")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The first three held-out conversations' first question and its answer.
    let held_out = read_jsonl(&tmp.path().join("eval.jsonl"));
    let questions = read_jsonl(&tmp.path().join("questions.jsonl"));
    assert_eq!((held_out.len(), questions.len()), (4, 3));
    for (q, c) in questions.iter().zip(&held_out) {
        assert_eq!(q["input"], c["messages"][0]["content"]);
        assert_eq!(q["output"], c["messages"][1]["content"]);
        assert!(q["input"].as_str().unwrap().starts_with("Question"));
    }
    let rows = read_jsonl(&tmp.path().join("sentiment.jsonl"));
    assert_eq!(rows.len(), 5);
    for r in &rows {
        let input = r["input"].as_str().unwrap();
        assert!(input.starts_with("Sentiment of the sentence: ") && input.ends_with('\n'));
        assert_eq!(
            r["candidates"],
            serde_json::json!(["It was terrible .", "It was great ."])
        );
        assert!(r["label"] == 0 || r["label"] == 1);
    }
    let summary: Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("out/summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(summary["eval_first"], Value::Null, "eval_on_start = false");
    let last = &summary["eval_last"];
    let acc = last["eval_accuracy"].as_f64().unwrap();
    assert!((acc * 5.0 - (acc * 5.0).round()).abs() < 1e-9, "{acc}");
    assert!((0.0..=1.0).contains(&last["eval_rouge_l"].as_f64().unwrap()));
    // Full fine-tuning: every parameter of the fixture model (every tensor of its safetensors
    // file) is trainable.
    assert_eq!(summary["trainable_params"], stored_params(&model));
}

/// Elements of every tensor in `dir/model.safetensors`, from its JSON header.
fn stored_params(dir: &std::path::Path) -> u64 {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, Value> =
        serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    header
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(_, t)| {
            t["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .product::<u64>()
        })
        .sum()
}
