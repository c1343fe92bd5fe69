//! PEFT against HF peft 0.21 + transformers (`scripts/fixtures/peft_ref.py`): logits of a tiny
//! GQA LLaMA under each method with non-trivial adapter weights.

use burn::tensor::backend::Backend;
use collie_core::lm::CausalLm;
use collie_peft::adapter_io;

use super::Check;
use crate::compare::{max_abs_diff, values};
use crate::golden::{fixture, read_golden};

/// The fixture adapters (`tests/fixtures/peft/<case>`).
pub const CASES: &[&str] = &[
    "lora",
    "lora_rslora_all_linear",
    "ia3",
    "prefix",
    "prefix_projection",
    "prompt",
    "ptuning",
];

/// Logits of the adapter in `adapter` on the model in `base`, on the batch of `golden` (peft's
/// `input_ids`, `attention_mask`, `logits`) vs peft's: max |Δ| over real positions.
pub fn logits_diff<B: Backend>(
    base: &std::path::Path,
    adapter: &std::path::Path,
    golden: &std::path::Path,
    device: &B::Device,
) -> f64 {
    let base = collie_llama::load::<B>(base.to_str().unwrap(), device)
        .unwrap()
        .model;
    let (model, _) = adapter_io::load(base, adapter, device).unwrap();
    let g = read_golden(golden);
    let case = adapter.display();
    let ids = g["input_ids"].int2::<B>(device);
    let mask = g["attention_mask"].int2::<B>(device);
    let logits = values(model.logits(ids, Some(&mask)));
    let want = &g["logits"];
    let (rows, cols, vocab) = (want.shape[0], want.shape[1], want.shape[2]);
    let real = &g["attention_mask"].values;
    assert_eq!(logits.len(), rows * cols * vocab, "{case}: logits shape");
    max_abs_diff(&logits, &want.values, |i| real[i / vocab] == 1.0)
}

/// Largest |Δlogit| against peft (worst achieved, CPU and wgpu: 2.2e-6).
pub const LOGITS_TOL: f64 = 2e-5;

/// Every method's logits within [`LOGITS_TOL`] of peft's.
pub fn logits<B: Backend>(device: &B::Device) -> Vec<Check> {
    CASES
        .iter()
        .map(|case| {
            let dir = fixture(&format!("peft/{case}"));
            let golden = dir.join("golden.safetensors");
            let d = logits_diff::<B>(&fixture("train/model"), &dir, &golden, device);
            Check::new("peft", case, "max |Δlogit| vs peft", d, LOGITS_TOL)
        })
        .collect()
}
