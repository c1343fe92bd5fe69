//! What the CLI's integration tests share: the fixture root and running the `collie` binary.
#![allow(dead_code)] // each test file uses its own subset

use std::path::PathBuf;
use std::process::{Command, Output};

/// `tests/fixtures` of the workspace.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Runs `collie args` with `env` added to its environment.
pub fn run_with(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_collie"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run collie")
}

/// Runs `collie args`.
pub fn run(args: &[&str]) -> Output {
    run_with(args, &[])
}

/// The standard output of `collie args`, which must succeed.
pub fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "collie {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}
