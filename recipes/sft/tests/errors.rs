//! Bad training input: one `error:` line naming the cause, exit status non-zero, no panic.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/train")
}

/// A valid chat config over `data`, with `extra` appended (later keys win via --set).
fn write_config(dir: &Path, data: &Path) -> PathBuf {
    let text = format!(
        "[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\nformat = \"chat\"\nseq_len = 32\n[train]\nmax_steps = 2\nmicro_batch_size = 2\n[optim]\nlr = 1e-3\n[output]\ndir = \"{}\"\n",
        fixtures().join("model").display(),
        data.display(),
        dir.join("out").display()
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn fails(config: &Path, set: &[&str]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_recipe-sft"));
    cmd.arg("--config").arg(config).arg("--quiet");
    for s in set {
        cmd.arg("--set").arg(s);
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "should fail: {set:?}\n{stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line expected: {stderr}");
    let after: Vec<&str> = stderr
        .lines()
        .skip_while(|l| !l.starts_with("error:"))
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(
        after.is_empty(),
        "the error continues on more lines: {stderr}"
    );
    errors[0].to_string()
}

fn chat_data(dir: &Path, lines: &[&str]) -> PathBuf {
    let path = dir.join("data.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

const GOOD: &str = r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}"#;

fn check(set: &[&str], lines: &[&str], expect: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let data = chat_data(tmp.path(), lines);
    let line = fails(&write_config(tmp.path(), &data), set);
    for e in expect {
        assert!(line.contains(e), "`{line}` should mention `{e}`");
    }
}

#[test]
fn unknown_config_key() {
    check(
        &["optim.learning_rate=1e-3"],
        &[GOOD],
        &["optim", "learning_rate"],
    );
    check(&["trian.max_steps=3"], &[GOOD], &["trian"]);
}

#[test]
fn wrong_type() {
    check(&["optim.lr=\"fast\""], &[GOOD], &["optim.lr", "string"]);
    check(
        &["train.micro_batch_size=2.5"],
        &[GOOD],
        &["train.micro_batch_size"],
    );
}

#[test]
fn out_of_range_values() {
    check(
        &["data.seq_len=1"],
        &[GOOD],
        &["data.seq_len", "at least 2"],
    );
    check(&["train.max_steps=0"], &[GOOD], &["train.max_steps"]);
}

#[test]
fn missing_data_file() {
    check(
        &["data.train=\"/nonexistent/train.jsonl\""],
        &[GOOD],
        &["/nonexistent/train.jsonl", "No such file"],
    );
}

#[test]
fn empty_dataset() {
    check(&[], &["", "   "], &["data.jsonl", "empty"]);
}

#[test]
fn malformed_jsonl_line() {
    check(
        &[],
        &[GOOD, "{\"messages\": [", GOOD],
        &["data.jsonl:2", "invalid JSON"],
    );
}

#[test]
fn unknown_chat_role() {
    let bad = r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "robot", "content": "beep"}]}"#;
    check(&[], &[GOOD, GOOD, bad], &["data.jsonl:3", "robot"]);
}

#[test]
fn unknown_chat_template() {
    check(
        &["data.template=\"vicuna\""],
        &[GOOD],
        &["data.template", "vicuna", "chatml", "gemma"],
    );
}

#[test]
fn missing_config_file() {
    let line = fails(Path::new("/nonexistent/config.toml"), &[]);
    assert!(line.contains("/nonexistent/config.toml"), "{line}");
}

#[test]
fn bad_optimizer_settings() {
    check(
        &["optim.name=\"adamax\""],
        &[GOOD],
        &["optim.name", "adamax", "lion", "adalomo"],
    );
    check(&["optim.lr=-1e-3"], &[GOOD], &["optim.lr", "non-negative"]);
    check(
        &["optim.name=\"lion\"", "optim.betas=[0.9, 1.0]"],
        &[GOOD],
        &["optim.betas", "[0, 1)"],
    );
    check(
        &["optim.name=\"adan\"", "optim.betas=[0.9, 0.99]"],
        &[GOOD],
        &["optim.betas", "adan takes 3"],
    );
    check(
        &["optim.name=\"sophiag\"", "optim.rho=-1"],
        &[GOOD],
        &["optim.rho"],
    );
}

#[test]
fn lomo_with_gradient_accumulation_warns_and_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = chat_data(tmp.path(), &[GOOD, GOOD]);
    let config = write_config(tmp.path(), &data);
    let out = Command::new(env!("CARGO_BIN_EXE_recipe-sft"))
        .arg("--config")
        .arg(&config)
        .args([
            "--set",
            "optim.name=\"lomo\"",
            "--set",
            "train.grad_accum_steps=4",
            "--set",
            "optim.betas=[0.9, 0.95]",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: lomo") && stderr.contains("grad_accum_steps = 4 forced to 1"),
        "{stderr}"
    );
    assert!(
        stderr.contains("warning: lomo takes no betas; optim.betas is ignored"),
        "{stderr}"
    );
    let resolved =
        std::fs::read_to_string(tmp.path().join("out").join("config.resolved.toml")).unwrap();
    assert!(resolved.contains("grad_accum_steps = 1"), "{resolved}");
}

#[test]
fn bad_peft_settings() {
    check(
        &[
            "peft.kind=\"lora\"",
            "peft.target_modules=[\"query\", \"value\"]",
        ],
        &[GOOD],
        &["peft.target_modules", "matches no linear layer", "q_proj"],
    );
    check(
        &["peft.kind=\"lora\"", "peft.r=0"],
        &[GOOD],
        &["peft.r", "at least 1"],
    );
    check(&["peft.kind=\"loha\""], &[GOOD], &["peft", "loha"]);
    let peft = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/peft");
    // An adapter made for another base model (shapes differ).
    let tmp = tempfile::tempdir().unwrap();
    let data = chat_data(tmp.path(), &[GOOD]);
    let config = write_config(tmp.path(), &data);
    let other = fixtures().join("../llama/mha_untied");
    let line = fails(
        &config,
        &[
            &format!("model.path=\"{}\"", other.display()),
            &format!("peft.adapter=\"{}\"", peft.join("lora").display()),
        ],
    );
    assert!(line.contains("another base model"), "{line}");
    // An adapter of a kind we do not read.
    let adapter = tmp.path().join("loha");
    std::fs::create_dir(&adapter).unwrap();
    std::fs::write(
        adapter.join("adapter_config.json"),
        r#"{"peft_type": "LOHA", "task_type": "CAUSAL_LM"}"#,
    )
    .unwrap();
    let line = fails(
        &config,
        &[&format!("peft.adapter=\"{}\"", adapter.display())],
    );
    assert!(
        line.contains("adapter_config.json")
            && line.contains("LOHA")
            && line.contains("not supported"),
        "{line}"
    );
}

#[test]
fn the_lora_config_is_valid() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs/lora.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let config = collie_train::TrainConfig::parse(&text, "lora.toml", &[]).unwrap();
    assert_eq!(config.peft.kind, collie_peft::PeftKind::Lora);
}

#[test]
fn study_evaluation_settings() {
    check(
        &["recipe.generation_questions=3"],
        &[GOOD],
        &["recipe.generation_questions", "recipe.corpus"],
    );
    check(
        &["recipe.classification_tasks=[\"movie2\"]"],
        &[GOOD],
        &["eval.classification"],
    );
    let cls = "eval.classification=cls.jsonl";
    check(
        &[cls, "recipe.classification_tasks=[\"chatqa\"]"],
        &[GOOD],
        &["chatqa", "not a classification task"],
    );
    check(
        &[cls, "recipe.classification_tasks=[\"sst2\"]"],
        &[GOOD],
        &["unknown task `sst2`", "movie2"],
    );
}
