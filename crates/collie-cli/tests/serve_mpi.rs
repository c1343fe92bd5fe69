//! `collie serve --tp 2` under `mpirun -np 2` (feature `mpi`): each rank holds half of every split
//! weight, rank 0 serves HTTP and both decode in lockstep. Greedy answers equal one process's
//! `collie generate`, concurrent requests all finish, and a client that leaves mid-stream is
//! cancelled on both ranks (the server keeps answering). A layout that does not fit the ranks is
//! one error.
#![cfg(feature = "mpi")]

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;

use common::{health, ok as collie, open_stream, serve_with, train_model, Server};

/// `mpirun -np N` as root in a container, with `collie` and `args` after it.
fn mpirun(np: usize, args: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "-np",
        &np.to_string(),
    ])
    .arg(env!("CARGO_BIN_EXE_collie"))
    .args(args)
    .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    c
}

fn post(server: &Server, body: &Value) -> Value {
    ureq::post(&format!("{}/v1/chat/completions", server.url))
        .send_string(&body.to_string())
        .unwrap()
        .into_json()
        .unwrap()
}

fn chat(prompt: &str, max_tokens: usize) -> Value {
    json!({"messages": [{"role": "user", "content": prompt}], "temperature": 0,
           "max_tokens": max_tokens})
}

#[test]
fn tensor_parallel_serving_answers_as_one_process_does() {
    let model = train_model();
    let server = serve_with(mpirun(
        2,
        &[
            "serve",
            "--model",
            &model,
            "--tp",
            "2",
            "--port",
            "0",
            "--max-context",
            "100000",
        ],
    ));
    let prompts = [
        "Hello there",
        "What is the capital of France?",
        "Name three colours",
    ];
    let want: Vec<String> = prompts
        .iter()
        .map(|p| {
            let out = collie(&[
                "generate",
                "--model",
                &model,
                "--prompt",
                p,
                "--chat",
                "--max-new-tokens",
                "12",
                "--json",
            ]);
            let v: Value = serde_json::from_str(out.trim()).unwrap();
            v["text"].as_str().unwrap().to_string()
        })
        .collect();
    for (p, w) in prompts.iter().zip(&want) {
        let v = post(&server, &chat(p, 12));
        assert_eq!(v["choices"][0]["message"]["content"], w.as_str(), "{p}");
    }
    // Concurrent clients join one batch on both ranks.
    let answers: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|i| {
                let server = &server;
                let prompt = prompts[i % 3];
                s.spawn(move || post(server, &chat(prompt, 12)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, v) in answers.iter().enumerate() {
        assert_eq!(
            v["choices"][0]["message"]["content"],
            want[i % 3].as_str(),
            "client {i}"
        );
    }
    // A client that leaves mid-stream: rank 0 cancels it on both ranks, and the next request
    // is answered (a rank still holding the row would desynchronize the batch).
    let reader = open_stream(&server, chat("Tell me a long story", 90_000));
    drop(reader);
    let start = Instant::now();
    while health(&server)["running"] != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the stream was not cancelled"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let v = post(&server, &chat(prompts[0], 12));
    assert_eq!(v["choices"][0]["message"]["content"], want[0].as_str());
}

#[test]
fn a_layout_that_does_not_fit_is_one_error() {
    let model = train_model();
    let out = mpirun(2, &["serve", "--model", &model, "--tp", "3", "--port", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains("tp (3)"), "{stderr}");
}
