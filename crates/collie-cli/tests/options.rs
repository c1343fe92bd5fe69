//! `collie generate`'s template, system and sampling options, and `convert` / `merge --dtype`.
//! Template references: `scripts/fixtures/cli_ref.py` (Meta's Llama-2-chat template through
//! transformers' `apply_chat_template`, Stanford Alpaca's prompt format).

use std::path::Path;
use std::process::Command;

use serde_json::Value;

mod common;

use common::{fixtures, ok as collie};

/// `generate --json` on the train fixture model: (prompt ids, new ids).
fn generate(extra: &[&str]) -> (Value, Vec<u64>) {
    let model = fixtures().join("train/model");
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--max-new-tokens",
        "12",
        "--json",
    ];
    args.extend_from_slice(extra);
    let v: Value = serde_json::from_str(collie(&args).trim()).unwrap();
    let new = v["new_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    (v["prompt_ids"].clone(), new)
}

#[test]
fn builtin_templates_render_their_published_formats() {
    let want: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("cli/templates.json")).unwrap(),
    )
    .unwrap();
    let prompt = want["prompt"].as_str().unwrap();
    for name in ["llama2", "alpaca"] {
        let system = want[name]["system"].as_str().unwrap();
        let (ids, _) = generate(&[
            "--prompt",
            prompt,
            "--chat",
            "--template",
            name,
            "--system",
            system,
        ]);
        assert_eq!(ids, want[name]["ids"], "{name}: {:?}", want[name]["text"]);
    }
    // Without --system the system block is absent: a shorter prompt that ends the same way.
    let (with, _) = generate(&["--prompt", prompt, "--chat", "--template", "alpaca"]);
    let full = want["alpaca"]["ids"].as_array().unwrap();
    let without = with.as_array().unwrap();
    assert!(without.len() < full.len());
    assert_eq!(without[..], full[full.len() - without.len()..]);
}

#[test]
fn sampling_options_behave_as_documented() {
    let p = ["--prompt", "The quick brown fox"];
    let (_, greedy) = generate(&p);
    assert_eq!(greedy.len(), 12);
    let sample = |extra: &[&str]| generate(&[&p[..], extra].concat()).1;
    // Top-k 1 and a tiny nucleus keep only the most likely token: greedy at any temperature.
    assert_eq!(sample(&["--temperature", "1.5", "--top-k", "1"]), greedy);
    assert_eq!(sample(&["--temperature", "1.5", "--top-p", "1e-6"]), greedy);
    // A seed fixes the draw; other seeds draw other continuations.
    let hot = ["--temperature", "2.0"];
    let a = sample(&[&hot[..], &["--seed", "1"]].concat());
    assert_eq!(a, sample(&[&hot[..], &["--seed", "1"]].concat()));
    let others: Vec<Vec<u64>> = (2..6)
        .map(|s| sample(&[&hot[..], &["--seed", &s.to_string()]].concat()))
        .collect();
    assert!(others.iter().any(|o| *o != a), "every seed drew {a:?}");
    assert!(
        others.iter().chain([&a]).any(|o| *o != greedy),
        "sampling at temperature 2 always gave the greedy tokens"
    );
}

/// `(names, dtype, values widened to f32)` of every tensor of `dir/model.safetensors`, sorted.
fn tensors(dir: &Path) -> Vec<(String, String, Vec<f32>)> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut out = Vec::new();
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let dtype = info["dtype"].as_str().unwrap().to_string();
        let o = info["data_offsets"].as_array().unwrap();
        let data = &bytes
            [8 + n + o[0].as_u64().unwrap() as usize..8 + n + o[1].as_u64().unwrap() as usize];
        let values: Vec<f32> = match dtype.as_str() {
            "F32" => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            // f16 and bf16 widened exactly.
            "F16" => data
                .chunks_exact(2)
                .map(|c| f16_to_f32(u16::from_le_bytes(c.try_into().unwrap())))
                .collect(),
            "BF16" => data
                .chunks_exact(2)
                .map(|c| f32::from_bits((u16::from_le_bytes(c.try_into().unwrap()) as u32) << 16))
                .collect(),
            other => panic!("{name}: dtype {other}"),
        };
        out.push((name, dtype, values));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// IEEE half → f32 (exact).
fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as i32;
    let frac = (h & 0x3ff) as f32;
    match exp {
        0 => sign * frac * 2f32.powi(-24),
        31 => {
            if frac == 0.0 {
                sign * f32::INFINITY
            } else {
                f32::NAN
            }
        }
        e => sign * (1.0 + frac / 1024.0) * 2f32.powi(e - 15),
    }
}

/// Round-to-nearest-even of an f32 to bf16, back in f32.
fn bf16_round(x: f32) -> f32 {
    let b = x.to_bits();
    let rounded = (b + 0x7fff + ((b >> 16) & 1)) >> 16;
    f32::from_bits(rounded << 16)
}

/// Asserts `low` holds `full`'s tensors in `dtype`, each value `full`'s rounded (within half a
/// unit in the last place of the narrow type).
fn assert_stored_as(full: &Path, low: &Path, dtype: &str, torch_name: &str) {
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(low.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], torch_name, "{}", low.display());
    let (a, b) = (tensors(full), tensors(low));
    assert_eq!(a.len(), b.len());
    for ((name, d32, x), (name2, d, y)) in a.iter().zip(&b) {
        assert_eq!(name, name2);
        assert_eq!(d32, "F32", "{name}");
        assert_eq!(d, dtype, "{name}");
        assert_eq!(x.len(), y.len(), "{name}");
        for (i, (x, y)) in x.iter().zip(y).enumerate() {
            let ok = match dtype {
                // bf16: exactly the round-to-nearest-even of the f32 value.
                "BF16" => bf16_round(*x) == *y,
                // f16 (10 fraction bits): within half an ulp, 2^-11 relative, or the subnormal step.
                _ => (x - y).abs() <= x.abs() * 2f32.powi(-11) + 2f32.powi(-25),
            };
            assert!(ok, "{name}[{i}]: {x} stored as {y} ({dtype})");
        }
    }
}

#[test]
fn convert_and_merge_store_the_requested_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = fixtures().join("gguf/tiny_llama.gguf");
    let out = |n: &str| tmp.path().join(n);
    for (name, dtype) in [("f32", "f32"), ("bf16", "bf16"), ("f16", "f16")] {
        collie(&[
            "convert",
            "--input",
            gguf.to_str().unwrap(),
            "--output",
            out(&format!("convert-{name}")).to_str().unwrap(),
            "--dtype",
            dtype,
        ]);
    }
    assert_stored_as(
        &out("convert-f32"),
        &out("convert-bf16"),
        "BF16",
        "bfloat16",
    );
    assert_stored_as(&out("convert-f32"), &out("convert-f16"), "F16", "float16");
    let (base, adapter) = (fixtures().join("train/model"), fixtures().join("peft/lora"));
    for dtype in ["f32", "f16", "bf16"] {
        collie(&[
            "merge",
            "--model",
            base.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--output",
            out(&format!("merge-{dtype}")).to_str().unwrap(),
            "--dtype",
            dtype,
        ]);
    }
    assert_stored_as(&out("merge-f32"), &out("merge-bf16"), "BF16", "bfloat16");
    assert_stored_as(&out("merge-f32"), &out("merge-f16"), "F16", "float16");
    // An unknown dtype is one clear error.
    let bad = Command::new(env!("CARGO_BIN_EXE_collie"))
        .args(["convert", "--input", gguf.to_str().unwrap(), "--output"])
        .arg(out("x"))
        .args(["--dtype", "f8"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        stderr.contains("f8") && !stderr.contains("panicked"),
        "{stderr}"
    );
}
