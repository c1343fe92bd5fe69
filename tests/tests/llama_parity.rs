//! Logits of tiny random LLaMA-family models against HF transformers (f32), with right and left
//! padding, and the KV-cache decode path against the full forward (`collie_tests::suite::llama`,
//! on the CPU and wgpu). Fixtures: `scripts/fixtures/llama_hf.py`.

mod common;

use std::path::Path;

use burn::tensor::{Int, Tensor};
use collie_io::module::TensorSource;
use collie_io::safetensors::SafetensorsSource;
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
    assert!(layer.attn.q_proj.as_ref().unwrap().bias.is_some() && layer.attn.o_proj.bias.is_some());
    assert!(layer.mlp.as_ref().unwrap().down_proj.bias.is_none());
    assert_logits_like_golden("internlm f64", &loaded.model, &dir, 1.5e-5);
}

/// Right- and left-padded logits of `model` against `dir/golden.safetensors`, on real tokens.
fn assert_logits_like_golden(name: &str, model: &collie_llama::Llama<B>, dir: &Path, bound: f64) {
    let device = Default::default();
    let golden = read_golden(&dir.join("golden.safetensors"));
    for side in ["right", "left"] {
        let mask_g = &golden[&format!("mask_{side}")];
        let logits = values(model.forward(
            golden[&format!("ids_{side}")].int2::<B>(&device),
            Some(&mask_g.int2::<B>(&device)),
        ));
        let expected = &golden[&format!("logits_{side}")];
        let vocab = expected.shape[2];
        assert_within(
            &format!("{name} ({side} padding): max |Δlogit| vs transformers"),
            max_abs_diff(&logits, &expected.values, |i| {
                mask_g.values[i / vocab] == 1.0
            }),
            bound,
        );
    }
}

#[test]
fn internlm2_layout_and_dynamic_ntk_match_transformers_llama() {
    // `scripts/fixtures/internlm2_hf.py`: a LLaMA with dynamic-NTK RoPE (factor 2, 6 positions,
    // sequences of 10) in transformers, and the same weights in InternLM2's layout (fused
    // grouped `wqkv`, `wo`, `w1/w3/w2`, `rope_scaling {"type": "dynamic"}`).
    let device = Default::default();
    let root = fixture("internlm2");
    let load = |d: &str| collie_llama::load::<B>(root.join(d).to_str().unwrap(), &device).unwrap();
    let (internlm2, llama) = (load("internlm2"), load("llama"));
    assert_eq!(internlm2.config.model_type, "internlm2");
    // The layout: the same parameters as the LLaMA they were written from, exactly.
    let a = collie_llama::hf::hf_state_dict(&internlm2.model);
    let b = collie_llama::hf::hf_state_dict(&llama.model);
    assert_eq!(a.len(), b.len());
    for ((ka, ta), (kb, tb)) in a.iter().zip(&b) {
        assert_eq!((ka, &ta.shape), (kb, &tb.shape));
        assert_eq!(ta.data, tb.data, "{ka}");
    }
    // Dynamic NTK (the base grows with the longest position of the call), from both layouts.
    // Same bound as the other LLaMA-family cases.
    assert_logits_like_golden("internlm2", &internlm2.model, &root, 2.5e-5);
    assert_logits_like_golden("llama dynamic", &llama.model, &root, 2.5e-5);
    // Saved in its own layout: the fixture's tensors, byte for byte, under the fixture's names.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("saved");
    collie_llama::hf::save_hf_dir(
        &internlm2.model,
        &internlm2.config,
        None,
        &out,
        collie_io::safetensors::SaveDtype::F32,
    )
    .unwrap();
    let (want, got) = (
        SafetensorsSource::open(&root.join("internlm2")).unwrap(),
        SafetensorsSource::open(&out).unwrap(),
    );
    let mut keys = want.keys();
    keys.sort();
    let mut saved = got.keys();
    saved.sort();
    assert_eq!(keys, saved);
    for k in keys {
        assert_eq!(
            want.read(&k).unwrap().data,
            got.read(&k).unwrap().data,
            "{k}"
        );
    }
}
