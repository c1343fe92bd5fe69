//! The chat page of `collie serve` in a real browser: headless Chromium (Debian's `chromium`
//! package), driven over the DevTools protocol on a pipe, opens the page, sends a message and
//! reads the streamed reply from the page; the Stop button ends a long answer and frees the
//! server's slot. Built with the `browser-test` feature (scripts/test.sh installs Chromium and
//! turns it on).
//!
//! `COLLIE_PAGE_MODEL=SPEC COLLIE_PAGE_SCREENSHOT=docs/serve.png cargo test -p collie-cli
//! --features browser-test --test serve_page -- --ignored` takes the screenshot in docs/serve.md
//! with another model.
#![cfg(feature = "browser-test")]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;

use common::{health, ok as collie, serve, train_model};

/// Headless Chromium with the DevTools protocol on its fds 3 (commands) and 4 (answers): the
/// shell maps them to this process's pipes. Killed on drop.
struct Browser {
    child: Child,
    commands: ChildStdin,
    answers: Receiver<Value>,
    next_id: u64,
    session: String,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn chromium() -> String {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if found {
            return name.to_string();
        }
    }
    panic!("the browser test needs Chromium (Debian: apt-get install chromium)");
}

impl Browser {
    /// Opens `url` in a new headless browser and attaches to its page.
    fn open(url: &str) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let script = "exec \"$0\" --headless=new --no-sandbox --disable-gpu --no-first-run \
                      --disable-dev-shm-usage --remote-debugging-pipe --window-size=1100,720 \
                      --user-data-dir=\"$1\" \"$2\" 3<&0 4>&1 0</dev/null 1>/dev/null 2>/dev/null";
        let mut child = Command::new("sh")
            .args(["-c", script, &chromium()])
            .arg(profile.path())
            .arg(url)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start chromium");
        let commands = child.stdin.take().unwrap();
        let mut pipe = BufReader::new(child.stdout.take().unwrap());
        let (tx, answers) = channel();
        // Messages are JSON texts each ended by a NUL byte.
        std::thread::spawn(move || loop {
            let mut message = Vec::new();
            match pipe.read_until(0, &mut message) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    message.pop();
                    if let Ok(v) = serde_json::from_slice::<Value>(&message) {
                        if tx.send(v).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let mut browser = Browser {
            child,
            commands,
            answers,
            next_id: 0,
            session: String::new(),
            _profile: profile,
        };
        let start = Instant::now();
        let target = loop {
            let targets = browser.call("Target.getTargets", json!({}));
            let page = targets["targetInfos"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["type"] == "page")
                .map(|t| t["targetId"].as_str().unwrap().to_string());
            if let Some(id) = page {
                break id;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "no page target");
            std::thread::sleep(Duration::from_millis(100));
        };
        let attached = browser.call(
            "Target.attachToTarget",
            json!({"targetId": target, "flatten": true}),
        );
        browser.session = attached["sessionId"].as_str().unwrap().to_string();
        browser
    }

    /// Sends a command (to the page once attached) and waits for its result.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            message["sessionId"] = json!(self.session);
        }
        self.commands
            .write_all(format!("{message}\0").as_bytes())
            .unwrap();
        self.commands.flush().unwrap();
        loop {
            let answer = self
                .answers
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|e| panic!("{method}: no answer from chromium ({e})"));
            if answer["id"] == id {
                assert!(answer.get("error").is_none(), "{method}: {answer}");
                return answer["result"].clone();
            }
        }
    }

    /// The value of a JavaScript expression in the page.
    fn eval(&mut self, expression: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        );
        assert!(r.get("exceptionDetails").is_none(), "{expression}: {r}");
        r["result"]["value"].clone()
    }

    /// Waits until `expression` is truthy.
    fn wait(&mut self, what: &str, expression: &str, limit: Duration) {
        let start = Instant::now();
        while !self.eval(&format!("!!({expression})")).as_bool().unwrap() {
            assert!(start.elapsed() < limit, "waited {limit:?} for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Types `text` into the message box with these settings and presses Send.
    fn send(&mut self, text: &str, temperature: f32, max_tokens: usize) {
        let script = format!(
            "document.getElementById('temperature').value = '{temperature}';\
             document.getElementById('max_tokens').value = '{max_tokens}';\
             document.getElementById('input').value = {text};\
             document.getElementById('form').requestSubmit();",
            text = json!(text)
        );
        self.eval(&script);
    }

    /// The PNG of the page as it is shown.
    fn screenshot(&mut self) -> Vec<u8> {
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"}));
        base64(shot["data"].as_str().unwrap())
    }
}

/// Standard base64 (the screenshot's encoding).
fn base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let digits: Vec<u8> = text.bytes().filter(|&c| c != b'=').map(value).collect();
    digits
        .chunks(4)
        .flat_map(|q| {
            let n = q.iter().fold(0u32, |acc, &d| (acc << 6) | d as u32) << (6 * (4 - q.len()));
            let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            bytes.into_iter().take(q.len().saturating_sub(1))
        })
        .collect()
}

/// True once the page has loaded and listed the served models.
const MODELS_LISTED: &str =
    "document.getElementById('model') && document.getElementById('model').options.length";

/// The reply text of the `n`-th assistant bubble (its first text node; the timing line follows).
const REPLY: &str = "(document.querySelectorAll('.msg.assistant')[{n}] || {}).firstChild";

fn reply(browser: &mut Browser, n: usize) -> String {
    let node = REPLY.replace("{n}", &n.to_string());
    let v = browser.eval(&format!("({node} || {{}}).nodeValue || ''"));
    v.as_str().unwrap().to_string()
}

fn done(n: usize) -> String {
    format!("document.querySelectorAll('.msg.assistant .meta').length > {n}")
}

#[test]
fn the_chat_page_streams_a_reply_and_stops_on_request() {
    let server = serve(&["--max-context", "200000"]);
    let mut browser = Browser::open(&format!("{}/", server.url));
    browser.wait("the model list", MODELS_LISTED, Duration::from_secs(30));
    assert_eq!(
        browser.eval("document.getElementById('model').value"),
        "model"
    );

    // A greedy reply equals `collie generate --chat` for the same message.
    let model = train_model();
    let want: Value = serde_json::from_str(
        collie(&[
            "generate",
            "--model",
            &model,
            "--prompt",
            "Hello there",
            "--chat",
            "--max-new-tokens",
            "12",
            "--json",
        ])
        .trim(),
    )
    .unwrap();
    browser.send("Hello there", 0.0, 12);
    browser.wait("the reply", &done(0), Duration::from_secs(60));
    assert_eq!(reply(&mut browser, 0), want["text"].as_str().unwrap());
    let meta = browser.eval("document.querySelector('.msg.assistant .meta').textContent");
    assert!(meta.as_str().unwrap().starts_with("12 tokens"), "{meta}");

    // A long answer: text appears while it streams, Stop ends it and frees the server's slot.
    // (Greedy: this prompt's answer repeats without reaching EOS on the tiny model.)
    browser.send("The quick brown fox", 0.0, 150_000);
    let node = REPLY.replace("{n}", "1");
    browser.wait(
        "streamed text",
        &format!("({node} || {{}}).nodeValue"),
        Duration::from_secs(60),
    );
    assert_eq!(health(&server)["running"], 1);
    browser.eval("document.getElementById('stop').click()");
    browser.wait("the stopped reply", &done(1), Duration::from_secs(30));
    let meta = browser.eval("document.querySelectorAll('.msg.assistant .meta')[1].textContent");
    assert!(meta.as_str().unwrap().ends_with("stopped"), "{meta}");
    let start = Instant::now();
    while health(&server)["running"] != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the slot was not freed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // New chat empties the conversation.
    browser.eval("document.getElementById('new').click()");
    assert_eq!(browser.eval("document.querySelectorAll('.msg').length"), 0);
    let png = browser.screenshot();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
}

/// The screenshot of docs/serve.md: a real model answering a question on the page.
#[test]
#[ignore = "run by hand with COLLIE_PAGE_MODEL and COLLIE_PAGE_SCREENSHOT"]
fn screenshot_for_the_docs() {
    let model = std::env::var("COLLIE_PAGE_MODEL").expect("COLLIE_PAGE_MODEL");
    let out = std::env::var("COLLIE_PAGE_SCREENSHOT").expect("COLLIE_PAGE_SCREENSHOT");
    let server = common::serve_model(&model, &["--served-name", "SmolLM2-135M-Instruct"]);
    let mut browser = Browser::open(&format!("{}/", server.url));
    browser.wait("the model list", MODELS_LISTED, Duration::from_secs(60));
    browser.send("What is the capital of France?", 0.0, 64);
    browser.wait("the reply", &done(0), Duration::from_secs(300));
    browser.send("And what is it famous for?", 0.0, 96);
    browser.wait("the second reply", &done(1), Duration::from_secs(300));
    std::fs::write(&out, browser.screenshot()).unwrap();
    let mut text = String::new();
    for n in 0..2 {
        text.push_str(&reply(&mut browser, n));
        text.push('\n');
    }
    eprintln!("{text}");
}
