//! Logits of tiny random LLaMA-family models against HF transformers (f32), with right and left
//! padding, and the KV-cache decode path against the full forward.
//! Fixtures: `scripts/fixtures/llama_hf.py`.

mod common;

use burn::tensor::{Int, Tensor};
use collie_llama::{KvCache, Llama};
use common::*;

const TOL: f64 = 1e-4;

fn load(case: &str) -> Llama<B> {
    let dir = fixture(&format!("llama/{case}"));
    collie_llama::load::<B>(dir.to_str().unwrap(), &Default::default())
        .unwrap_or_else(|e| panic!("{case}: {e}"))
        .model
}

#[test]
fn logits_match_transformers_with_right_and_left_padding() {
    let device = Default::default();
    for case in LLAMA_CASES {
        let model = load(case);
        let golden = read_golden(&fixture(&format!("llama/{case}/golden.safetensors")));
        for side in ["right", "left"] {
            let ids = golden[&format!("ids_{side}")].int2::<B>(&device);
            let mask_g = &golden[&format!("mask_{side}")];
            let mask = mask_g.int2::<B>(&device);
            let logits = values(model.forward(ids, Some(&mask)));
            let expected = &golden[&format!("logits_{side}")];
            let vocab = expected.shape[2];
            let diff = max_abs_diff(&logits, &expected.values, |i| {
                mask_g.values[i / vocab] == 1.0
            });
            println!("{case} {side}: max |Δlogit| = {diff:.2e}");
            assert!(
                diff < TOL,
                "{case} ({side} padding): max |Δlogit| = {diff:.3e} > {TOL}"
            );
        }
    }
}

#[test]
fn left_padding_does_not_change_a_sequence() {
    // Each left-padded row must give the logits its right-padded twin gives (same tokens).
    let device = Default::default();
    let model = load("gqa_tied_theta");
    let ids: Vec<i64> = vec![0, 0, 5, 6, 7, 8, 9, 10, 11, 12];
    let mask: Vec<i64> = vec![0, 0, 1, 1, 1, 1, 1, 1, 1, 1];
    let left = model.forward(
        Tensor::<B, 1, Int>::from_ints(ids.as_slice(), &device).reshape([1, 10]),
        Some(&Tensor::<B, 1, Int>::from_ints(mask.as_slice(), &device).reshape([1, 10])),
    );
    let alone = model.forward(
        Tensor::<B, 1, Int>::from_ints(&ids[2..], &device).reshape([1, 8]),
        None,
    );
    let left = values(left.slice([0..1, 2..10]));
    let alone: Vec<f64> = values(alone).into_iter().map(f64::from).collect();
    let diff = max_abs_diff(&left, &alone, |_| true);
    assert!(diff < 1e-5, "left padding changed the logits by {diff:.3e}");
}

#[test]
fn kv_cache_decode_equals_full_forward() {
    let device = Default::default();
    for case in LLAMA_CASES {
        let model = load(case);
        let golden = read_golden(&fixture(&format!("llama/{case}/golden.safetensors")));
        // Left padding is what batched generation uses.
        let ids = golden["ids_left"].int2::<B>(&device);
        let mask = golden["mask_left"].int2::<B>(&device);
        let [b, s] = ids.dims();
        let full = values(model.forward(ids.clone(), Some(&mask)));
        // Prompt of 6, then one token at a time.
        let mut cache = KvCache::new(model.layers.len());
        let mut steps = vec![model.forward_cached(
            ids.clone().slice([0..b, 0..6]),
            Some(&mask.clone().slice([0..b, 0..6])),
            &mut cache,
        )];
        for t in 6..s {
            steps.push(model.forward_cached(
                ids.clone().slice([0..b, t..t + 1]),
                Some(&mask.clone().slice([0..b, 0..t + 1])),
                &mut cache,
            ));
        }
        let cached = values(Tensor::cat(steps, 1));
        let full: Vec<f64> = full.into_iter().map(f64::from).collect();
        let vocab = model.vocab_size();
        let m = &golden["mask_left"].values;
        let diff = max_abs_diff(&cached, &full, |i| m[i / vocab] == 1.0);
        assert!(
            diff < 1e-5,
            "{case}: cached decode differs from the full forward by {diff:.3e}"
        );
    }
}
