//! What the CLI's integration tests share: the fixture root and running the `collie` binary.
#![allow(dead_code)] // each test file uses its own subset

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};

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

/// A running `collie serve`, killed on drop.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// What the server logged up to its address line (included).
    pub startup: Vec<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM first: mpirun passes it on to its ranks (SIGKILL would orphan them).
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The tiny train fixture model (with a tokenizer and chat template).
pub fn train_model() -> String {
    fixtures().join("train/model").to_str().unwrap().to_string()
}

/// Starts `collie serve` on the train fixture model with `extra` flags, on a free loopback port,
/// and waits for its address line.
pub fn serve(extra: &[&str]) -> Server {
    serve_model(&train_model(), extra)
}

/// Starts `collie serve --model model` with `extra` flags on a free loopback port and waits for
/// its address line.
pub fn serve_model(model: &str, extra: &[&str]) -> Server {
    let mut command = Command::new(env!("CARGO_BIN_EXE_collie"));
    command
        .args(["serve", "--model", model, "--port", "0"])
        .args(extra);
    serve_with(command)
}

/// Starts `command` (a `collie serve` command line, perhaps under `mpirun`) and waits for the
/// address line.
pub fn serve_with(mut command: Command) -> Server {
    let mut child = command
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start collie serve");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut startup = Vec::new();
    let url = loop {
        let line = lines
            .next()
            .expect("collie serve exited before listening")
            .unwrap();
        let url = line
            .split_once(" on http://")
            .map(|(_, rest)| format!("http://{}", rest.split_whitespace().next().unwrap()));
        startup.push(line);
        if let Some(url) = url {
            break url;
        }
    };
    // Keep reading what the server logs so it never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Server {
        child,
        url,
        startup,
    }
}

/// `GET /health` of `server`.
pub fn health(server: &Server) -> serde_json::Value {
    ureq::get(&format!("{}/health", server.url))
        .call()
        .unwrap()
        .into_json()
        .unwrap()
}

/// Starts a streamed chat completion with `body` (`stream` set here) and reads its first event;
/// the reader holds the connection open.
pub fn open_stream(server: &Server, mut body: serde_json::Value) -> impl BufRead {
    body["stream"] = serde_json::json!(true);
    let response = ureq::post(&format!("{}/v1/chat/completions", server.url))
        .send_string(&body.to_string())
        .unwrap();
    let mut reader = BufReader::new(response.into_reader());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("data: "), "{line}");
    reader
}
