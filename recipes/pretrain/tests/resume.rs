//! Exact resume: a run killed with SIGKILL right after step 6's checkpoint, resumed with
//! `--resume latest`, logs the same losses for steps 7–10 (bit for bit) as an uninterrupted run;
//! a run that dies in the middle of writing a checkpoint leaves the previous one loadable.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/train")
}

fn config(dir: &Path) -> PathBuf {
    let text = format!(
        r#"
[model]
path = "{model}"
[data]
train = "{data}"
format = "input_output"
seq_len = 48
shuffle = true
[train]
max_steps = 10
micro_batch_size = 3
grad_accum_steps = 2
save_every = 2
seed = 7
[optim]
lr = 1e-3
weight_decay = 0.01
[sched]
kind = "cosine"
warmup_steps = 2
[output]
dir = "{out}"
[recipe]
sample_prompt = "2 + 2 ="
sample_tokens = 4
"#,
        model = fixtures().join("model").display(),
        data = fixtures().join("io.jsonl").display(),
        out = dir.display()
    );
    let path = dir.with_extension("toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn recipe(config: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_recipe-pretrain"));
    cmd.arg("--config").arg(config).arg("--quiet").args(extra);
    cmd
}

/// `step -> loss` from metrics.jsonl.
fn losses(dir: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter_map(|v| Some((v["step"].as_u64()?, v.get("loss")?.as_f64()?)))
        .collect()
}

#[test]
fn sigkill_after_a_checkpoint_then_resume_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let straight = tmp.path().join("straight");
    assert!(recipe(&config(&straight), &[]).status().unwrap().success());
    let expected = losses(&straight);
    assert_eq!(expected.len(), 10);

    let killed = tmp.path().join("killed");
    let cfg = config(&killed);
    let mut child = recipe(&cfg, &[])
        .env("COLLIE_TEST_PAUSE_AFTER_CHECKPOINT", "6")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let step6 = killed.join("checkpoints/step-6");
    let start = Instant::now();
    while !step6.is_dir() {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "step-6 checkpoint never appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!killed.join("checkpoints/step-8").exists());

    assert!(recipe(&cfg, &["--resume", "latest"])
        .status()
        .unwrap()
        .success());
    let resumed = losses(&killed);
    assert_eq!(resumed.len(), 10, "{resumed:?}");
    for (a, b) in resumed.iter().zip(&expected) {
        assert_eq!(a.0, b.0);
        assert_eq!(
            a.1.to_bits(),
            b.1.to_bits(),
            "step {}: {} after resume vs {} straight",
            a.0,
            a.1,
            b.1
        );
    }
}

#[test]
fn a_kill_while_writing_a_checkpoint_keeps_the_previous_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let cfg = config(&dir);
    let status = recipe(&cfg, &[])
        .env("COLLIE_TEST_ABORT_CHECKPOINT", "4")
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success());
    assert!(
        !dir.join("checkpoints/step-4").exists(),
        "half-written checkpoint was published"
    );
    let previous = dir.join("checkpoints/step-2");
    let loaded = collie_llama::load::<collie_core::device::Cpu>(
        previous.to_str().unwrap(),
        &Default::default(),
    );
    assert!(loaded.is_ok(), "step-2 is not loadable: {:?}", loaded.err());
    // And the run continues from it.
    assert!(recipe(&cfg, &["--resume", "latest"])
        .status()
        .unwrap()
        .success());
    assert!(dir.join("checkpoints/step-10").is_dir());
}
