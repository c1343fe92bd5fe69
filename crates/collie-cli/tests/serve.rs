//! `collie serve` over real HTTP (ureq) on a free loopback port, with the tiny train fixture
//! model: answers equal `collie generate`'s, streams concatenate to the same text, bad requests
//! get OpenAI-style 4xx errors while the server keeps serving, concurrent clients all finish, a
//! client that leaves mid-stream frees its slot, and a full queue answers 503.

use std::io::{BufRead, BufReader, Read};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;

use common::{fixtures, health, ok as collie, open_stream, serve, Server};

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build()
}

/// POSTs `body` to `path`: (status, JSON answer).
fn post(server: &Server, path: &str, body: &[u8]) -> (u16, Value) {
    let answer = agent()
        .post(&format!("{}{path}", server.url))
        .set("Content-Type", "application/json")
        .send_bytes(body);
    let response = match answer {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("POST {path}: {e}"),
    };
    let status = response.status();
    let text = response.into_string().unwrap();
    let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    (status, value)
}

fn post_json(server: &Server, path: &str, body: &Value) -> (u16, Value) {
    post(server, path, body.to_string().as_bytes())
}

fn get(server: &Server, path: &str) -> Value {
    agent()
        .get(&format!("{}{path}", server.url))
        .call()
        .unwrap()
        .into_json()
        .unwrap()
}

/// `collie generate --json` with `extra` flags: its text and (prompt, new) token counts.
fn generate(prompt: &str, extra: &[&str]) -> (String, usize, usize) {
    let model = common::train_model();
    let mut args = vec!["generate", "--model", &model, "--prompt", prompt, "--json"];
    args.extend_from_slice(extra);
    let v: Value = serde_json::from_str(collie(&args).trim()).unwrap();
    (
        v["text"].as_str().unwrap().to_string(),
        v["prompt_ids"].as_array().unwrap().len(),
        v["new_ids"].as_array().unwrap().len(),
    )
}

fn chat_body(prompt: &str, max_tokens: usize) -> Value {
    json!({"model": "model", "messages": [{"role": "user", "content": prompt}],
           "temperature": 0, "max_tokens": max_tokens})
}

/// The `data:` payloads of a server-sent event stream, read to its end.
fn events(reader: impl Read) -> Vec<String> {
    BufReader::new(reader)
        .lines()
        .map(Result::unwrap)
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .collect()
}

#[test]
fn answers_equal_collie_generate_whole_and_streamed() {
    let server = serve(&[]);
    assert_eq!(get(&server, "/health")["status"], "ok");
    assert_eq!(get(&server, "/v1/models")["data"][0]["id"], "model");
    for prompt in ["Hello there", "What is the capital of France?"] {
        let (want, prompt_len, new_len) = generate(prompt, &["--chat", "--max-new-tokens", "14"]);
        let (status, v) = post_json(&server, "/v1/chat/completions", &chat_body(prompt, 14));
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(v["choices"][0]["message"]["content"], want.as_str());
        assert_eq!(v["usage"]["prompt_tokens"], prompt_len);
        assert_eq!(v["usage"]["completion_tokens"], new_len);
        assert_eq!(v["usage"]["total_tokens"], prompt_len + new_len);
        let finish = if new_len < 14 { "stop" } else { "length" };
        assert_eq!(v["choices"][0]["finish_reason"], finish);

        // Streamed: a role chunk, content chunks, the finish reason, usage, then [DONE].
        let mut body = chat_body(prompt, 14);
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let response = agent()
            .post(&format!("{}/v1/chat/completions", server.url))
            .send_string(&body.to_string())
            .unwrap();
        assert_eq!(response.content_type(), "text/event-stream");
        let data = events(response.into_reader());
        assert_eq!(data.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, want);
        let last = &chunks[chunks.len() - 2];
        assert_eq!(last["choices"][0]["finish_reason"], finish);
        assert_eq!(
            chunks.last().unwrap()["usage"]["completion_tokens"],
            new_len
        );
        assert!(chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk"));
    }
    // Plain completions: the prompt with the tokenizer's special tokens, as `generate` without
    // --chat.
    let (want, _, _) = generate("The quick brown", &["--max-new-tokens", "9"]);
    let (status, v) = post_json(
        &server,
        "/v1/completions",
        &json!({"prompt": "The quick brown", "temperature": 0, "max_tokens": 9}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], want.as_str());
}

#[test]
fn stop_strings_cut_the_text_and_seeds_fix_the_draw() {
    let server = serve(&[]);
    let (want, _, _) = generate("The quick brown", &["--max-new-tokens", "12"]);
    // A stop string from the middle of the greedy text: the answer ends just before it.
    let chars: Vec<char> = want.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let cut = &want[..want.find(&stop).unwrap()];
    let body = json!({"prompt": "The quick brown", "temperature": 0, "max_tokens": 12,
                      "stop": [stop]});
    let (status, v) = post_json(&server, "/v1/completions", &body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], cut, "stop {stop:?} in {want:?}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let response = agent()
        .post(&format!("{}/v1/completions", server.url))
        .send_string(&streamed.to_string())
        .unwrap();
    let data = events(response.into_reader());
    let text: String = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, cut);

    // Sampling: the same seed draws the same text as `generate --seed`.
    let (sampled, _, _) = generate(
        "The quick brown",
        &[
            "--max-new-tokens",
            "10",
            "--temperature",
            "1.5",
            "--seed",
            "4",
        ],
    );
    let body = json!({"prompt": "The quick brown", "temperature": 1.5, "max_tokens": 10,
                      "seed": 4});
    let (_, v) = post_json(&server, "/v1/completions", &body);
    assert_eq!(v["choices"][0]["text"], sampled.as_str());
}

#[test]
fn bad_requests_get_4xx_and_the_server_keeps_serving() {
    let server = serve(&["--max-context", "64"]);
    let long = "word ".repeat(80);
    let oversized = vec![b' '; api_body_limit() + 1024];
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "malformed JSON",
            b"{\"messages\": [".to_vec(),
            400,
            "not valid JSON",
        ),
        ("not an object", b"[1, 2]".to_vec(), 400, "JSON object"),
        (
            "missing messages",
            b"{\"temperature\": 0}".to_vec(),
            400,
            "messages",
        ),
        (
            "no messages",
            br#"{"messages": []}"#.to_vec(),
            400,
            "at least one",
        ),
        (
            "unknown role",
            br#"{"messages": [{"role": "tool", "content": "x"}]}"#.to_vec(),
            400,
            "role",
        ),
        (
            "unknown model",
            br#"{"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}"#.to_vec(),
            404,
            "gpt-9",
        ),
        (
            "negative max_tokens",
            br#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}"#.to_vec(),
            400,
            "max_tokens",
        ),
        (
            "huge max_tokens",
            br#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1000000}"#.to_vec(),
            400,
            "max_tokens",
        ),
        (
            "prompt longer than the context",
            json!({"messages": [{"role": "user", "content": long}]})
                .to_string()
                .into_bytes(),
            400,
            "context",
        ),
        (
            "invalid UTF-8",
            b"{\"messages\": [{\"role\": \"user\", \"content\": \"\xff\xfe\"}]}".to_vec(),
            400,
            "not valid JSON",
        ),
        (
            "temperature out of range",
            br#"{"messages": [{"role": "user", "content": "x"}], "temperature": 7}"#.to_vec(),
            400,
            "temperature",
        ),
        (
            "n > 1",
            br#"{"messages": [{"role": "user", "content": "x"}], "n": 3}"#.to_vec(),
            400,
            "n",
        ),
        ("body over the limit", oversized, 413, "limit"),
    ];
    for (what, body, status, needle) in cases {
        let (got, v) = post(&server, "/v1/chat/completions", &body);
        assert_eq!(got, status, "{what}: {v}");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{what}: {message}");
        assert!(v["error"]["type"].is_string(), "{what}: {v}");
    }
    let (status, v) = post(&server, "/v1/nothing", b"{}");
    assert_eq!(status, 404, "{v}");
    let (status, v) = post_json(&server, "/v1/chat/completions", &chat_body("Hello", 4));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 4);
}

/// The server's body limit (kept in step with `serve::api::BODY_LIMIT`).
fn api_body_limit() -> usize {
    4 << 20
}

#[test]
fn concurrent_clients_all_finish_with_their_own_answers() {
    let server = serve(&["--max-batch", "16"]);
    let prompts: Vec<String> = (0..16).map(|i| format!("Question {i}: why {i}?")).collect();
    let alone: Vec<Value> = prompts[..3]
        .iter()
        .map(|p| post_json(&server, "/v1/chat/completions", &chat_body(p, 10)).1)
        .collect();
    let start = Instant::now();
    let answers: Vec<(u16, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| {
                let server = &server;
                s.spawn(move || post_json(server, "/v1/chat/completions", &chat_body(p, 10)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(start.elapsed() < Duration::from_secs(120));
    for (i, (status, v)) in answers.iter().enumerate() {
        assert_eq!(*status, 200, "client {i}: {v}");
        assert!(v["usage"]["completion_tokens"].as_u64().unwrap() >= 1);
        if i < alone.len() {
            assert_eq!(
                v["choices"][0]["message"]["content"], alone[i]["choices"][0]["message"]["content"],
                "client {i}: batched vs alone"
            );
        }
    }
}

#[test]
fn a_client_that_leaves_frees_its_slot_and_a_full_queue_answers_503() {
    let server = serve(&[
        "--max-batch",
        "1",
        "--queue",
        "1",
        "--max-context",
        "200000",
    ]);
    let reader = open_stream(&server, chat_body("Tell me a long story", 150_000));
    let wait_for = |what: &str, f: &dyn Fn(&Value) -> bool| {
        let start = Instant::now();
        loop {
            let h = health(&server);
            if f(&h) {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "{what}: {h}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for("the stream is running", &|h| h["running"] == 1);
    // The batch (1) is full: one request waits in the queue (1), the next is refused.
    let queued = std::thread::spawn({
        let url = server.url.clone();
        move || {
            agent()
                .post(&format!("{url}/v1/chat/completions"))
                .send_string(&chat_body("Hi", 3).to_string())
                .map(|r| r.into_json::<Value>().unwrap())
                .map_err(|e| e.to_string())
        }
    });
    wait_for("one request queued", &|h| h["waiting"] == 1);
    let (status, v) = post_json(&server, "/v1/chat/completions", &chat_body("Hi", 3));
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"]["code"], "queue_full");
    // Leaving mid-stream frees the slot: the queued request runs and completes.
    drop(reader);
    let answer = queued.join().unwrap().expect("the queued request");
    assert_eq!(answer["usage"]["completion_tokens"], 3);
    wait_for("nothing left running", &|h| {
        h["running"] == 0 && h["waiting"] == 0
    });
}

#[test]
fn the_model_field_selects_a_served_adapter() {
    let lora = fixtures().join("peft/lora");
    let ia3 = fixtures().join("peft/ia3");
    let server = serve(&[
        "--adapter",
        &format!("lora={}", lora.display()),
        "--adapter",
        &format!("ia3={}", ia3.display()),
    ]);
    let ids: Vec<Value> = get(&server, "/v1/models")["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(ids, [json!("model"), json!("lora"), json!("ia3")]);
    let prompt = "Name three colours";
    for (name, adapter) in [("model", None), ("lora", Some(&lora)), ("ia3", Some(&ia3))] {
        let mut extra = vec!["--chat", "--max-new-tokens", "12"];
        let dir = adapter.map(|a| a.display().to_string());
        if let Some(dir) = &dir {
            extra.extend(["--adapter", dir]);
        }
        let (want, _, _) = generate(prompt, &extra);
        let mut body = chat_body(prompt, 12);
        body["model"] = json!(name);
        let (status, v) = post_json(&server, "/v1/chat/completions", &body);
        assert_eq!(status, 200, "{name}: {v}");
        assert_eq!(v["model"], name);
        assert_eq!(
            v["choices"][0]["message"]["content"],
            want.as_str(),
            "{name}"
        );
    }
}

/// `--quantize q8_0`: the server holds the linear weights as Q8_0 blocks and answers what
/// `collie generate --quantize q8_0` generates from the same blocks.
#[test]
fn a_quantized_model_serves_what_generate_gives() {
    let server = serve(&["--quantize", "q8_0"]);
    assert!(
        server
            .startup
            .iter()
            .any(|l| l.contains("linear weights in q8_0 blocks")),
        "{:?}",
        server.startup
    );
    let prompt = "What is the capital of France?";
    let (want, _, new_len) = generate(
        prompt,
        &["--chat", "--max-new-tokens", "12", "--quantize", "q8_0"],
    );
    let (status, v) = post_json(&server, "/v1/chat/completions", &chat_body(prompt, 12));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], want.as_str());
    assert_eq!(v["usage"]["completion_tokens"], new_len);
}
