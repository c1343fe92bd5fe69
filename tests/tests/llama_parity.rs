//! Logits of tiny random LLaMA-family models against HF transformers (f32), with right and left
//! padding, and the KV-cache decode path against the full forward (`collie_tests::suite::llama`,
//! on the CPU and wgpu). Fixtures: `scripts/fixtures/llama_hf.py`.

mod common;

use burn::tensor::{Int, Tensor};
use collie_llama::Llama;
use collie_tests::suite::{self, assert_all};
use common::*;

fn load(case: &str) -> Llama<B> {
    let dir = fixture(&format!("llama/{case}"));
    collie_llama::load::<B>(dir.to_str().unwrap(), &Default::default())
        .unwrap_or_else(|e| panic!("{case}: {e}"))
        .model
}

#[test]
fn logits_and_cached_decode_match_on_cpu() {
    assert_all("cpu", &suite::llama::logits::<B>(&Default::default()));
}

#[cfg(feature = "wgpu")]
#[test]
fn logits_and_cached_decode_match_on_wgpu() {
    let device = burn::backend::wgpu::WgpuDevice::DefaultDevice;
    assert_all(
        "wgpu",
        &suite::llama::logits::<collie_core::device::Wgpu>(&device),
    );
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
    // Achieved 3.9e-7: the shorter row's matmuls and reductions block differently; the bound is
    // about one f32 ulp at the logits' scale (|logit| < 8, ulp ≤ 9.5e-7).
    assert_within("left padding: max |Δlogit| vs the unpadded row", diff, 1e-6);
}

#[test]
fn internlm_with_bias_stored_as_f64_matches_transformers() {
    // InternLM's layout (`model_type = "internlm"`, `bias = true`: q/k/v/o biases, none in the
    // MLP), every tensor stored as F64 (`scripts/fixtures/internlm_hf.py`).
    let device = Default::default();
    let dir = fixture("internlm");
    let loaded = collie_llama::load::<B>(dir.to_str().unwrap(), &device).unwrap();
    assert_eq!(loaded.config.model_type, "internlm");
    let layer = &loaded.model.layers[0];
    assert!(layer.attn.q_proj.bias.is_some() && layer.attn.o_proj.bias.is_some());
    assert!(layer.mlp.down_proj.bias.is_none());
    let golden = read_golden(&dir.join("golden.safetensors"));
    for side in ["right", "left"] {
        let mask_g = &golden[&format!("mask_{side}")];
        let logits = values(loaded.model.forward(
            golden[&format!("ids_{side}")].int2::<B>(&device),
            Some(&mask_g.int2::<B>(&device)),
        ));
        let expected = &golden[&format!("logits_{side}")];
        let vocab = expected.shape[2];
        assert_within(
            &format!("internlm f64 ({side} padding): max |Δlogit| vs transformers"),
            max_abs_diff(&logits, &expected.values, |i| {
                mask_g.values[i / vocab] == 1.0
            }),
            1.5e-5,
        );
    }
}
