//! LLaMA-family logits against HF transformers (f32) with right and left padding, and the
//! KV-cache decode path against the full forward (`scripts/fixtures/llama_hf.py`).

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use collie_llama::KvCache;

use super::Check;
use crate::compare::{max_abs_diff, values};
use crate::golden::{fixture, read_golden, LLAMA_CASES};

/// Largest |Δlogit| against transformers (worst achieved, CPU and wgpu: 2.9e-6).
pub const LOGITS_TOL: f64 = 2.5e-5;
/// Largest |Δlogit| of the cached decode against the full forward (CPU: 0, wgpu: 2.2e-6).
pub const DECODE_TOL: f64 = 2e-5;

/// Every fixture's logits (max |Δ| over real positions) and cached decode.
pub fn logits<B: Backend>(device: &B::Device) -> Vec<Check> {
    let mut out = Vec::new();
    for case in LLAMA_CASES {
        let dir = fixture(&format!("llama/{case}"));
        let model = collie_llama::load::<B>(dir.to_str().unwrap(), device)
            .unwrap_or_else(|e| panic!("{case}: {e}"))
            .model;
        let golden = read_golden(&dir.join("golden.safetensors"));
        for side in ["right", "left"] {
            let ids = golden[&format!("ids_{side}")].int2::<B>(device);
            let mask_g = &golden[&format!("mask_{side}")];
            let mask = mask_g.int2::<B>(device);
            let logits = values(model.forward(ids, Some(&mask)));
            let expected = &golden[&format!("logits_{side}")];
            let vocab = expected.shape[2];
            let diff = max_abs_diff(&logits, &expected.values, |i| {
                mask_g.values[i / vocab] == 1.0
            });
            out.push(Check::new(
                "llama",
                case,
                &format!("max |Δlogit| vs transformers ({side} padding)"),
                diff,
                LOGITS_TOL,
            ));
        }
        // Left padding is what batched generation uses: a prompt of 6, then one token at a time.
        let ids = golden["ids_left"].int2::<B>(device);
        let mask = golden["mask_left"].int2::<B>(device);
        let [b, s] = ids.dims();
        let full = values(model.forward(ids.clone(), Some(&mask)));
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
        out.push(Check::new(
            "llama",
            case,
            "KV-cache decode vs full forward",
            diff,
            DECODE_TOL,
        ));
    }
    out
}
