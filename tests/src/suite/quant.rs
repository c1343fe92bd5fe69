//! A frozen quantized base on the backend under test (`model.quantize = "keep"` on
//! `gguf/tiny_llama.gguf`, whose linears hold F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K
//! and Q6_K blocks, and on a whole-Q8_0 file): each kept weight decoded where the backend decodes it (wgpu, CUDA: the CubeCL
//! kernel, from the device's copy of the blocks) against the GGUF reader's host decoding, per
//! storage type, for the whole matrix and for a band that starts past row 0; the logits against
//! the same file dequantized to f32 on load; and, on `Autodiff`, the gradients that reach the
//! float parameters through the quantized products' input-gradient backward.

use std::collections::BTreeMap;

use burn::backend::Autodiff;
use burn::module::Module;
use collie_core::device::RegisterOps;
use collie_core::nn::Adaptable;
use collie_io::family::ModelFiles;
use collie_io::quant::Quantize;
use collie_llama::Llama;

use super::flash::GradCollector;
use super::{max_rel, Check};
use crate::compare::{max_rel_diff, values};
use crate::golden::{fixture, read_golden};

/// The GGUF fixtures: every block type but Q8_0 in the first one's linears
/// (`scripts/fixtures/gguf_tiny.py`), Q8_0 in the second (`scripts/fixtures/gguf_types.py`).
pub const FILES: &[&str] = &["gguf/tiny_llama.gguf", "gguf_types/q8_0.gguf"];
/// Decoded weights vs the host decoder, max |Δ| / max |w| per type (achieved: 0 on the CPU and
/// on wgpu; the bound leaves room for a device that contracts `d·q − m` into one fused
/// multiply-add, a couple of f32 ulps of the larger term).
pub const DECODE_TOL: f64 = 5e-7;
/// Logits of the kept blocks vs the file dequantized on load (worst achieved: 0 on the CPU,
/// 6.8e-7 on wgpu, where the band-wise products sum in another order).
pub const LOGITS_TOL: f64 = 1e-5;
/// Float parameters' gradients, kept blocks vs dequantized on load (worst achieved: 0 on the
/// CPU, 1.2e-6 on wgpu).
pub const GRAD_TOL: f64 = 1e-5;

/// The checks above on backend `I` (and `Autodiff<I>`).
pub fn checks<I: RegisterOps>(device: &I::Device) -> Vec<Check> {
    I::register_ops();
    let golden = read_golden(&fixture("gguf/tiny_llama.safetensors"));
    let mut out = Vec::new();
    let ids = golden["ids"].int2::<I>(device);
    for file in FILES {
        let path = fixture(file);
        let path = path.to_str().unwrap();
        let mut kept = Llama::<I>::load_quantized(path, device, Quantize::Keep)
            .unwrap()
            .model;
        let mut worst: BTreeMap<String, f64> = BTreeMap::new();
        for slot in kept.linears_mut() {
            let Some(w) = &slot.linear.quant else {
                continue;
            };
            let [rows, cols] = w.shape();
            let mut host = vec![0f32; rows * cols];
            w.blocks().dequantize_rows(0..rows, &mut host);
            let whole = values(w.dequantize::<I>(device));
            let tail = values(w.dequantize_band::<I>(1..rows, device));
            let d = max_rel_diff(&whole, &host).max(max_rel_diff(&tail, &host[cols..]));
            let e = worst.entry(w.type_name().to_string()).or_insert(0.0);
            *e = e.max(d);
        }
        assert!(!worst.is_empty(), "{file}: no kept blocks");
        for (ty, d) in worst {
            out.push(Check::new(
                "quant",
                &format!("{file} {ty}"),
                "decoded weight max rel Δ vs the host decoder",
                d,
                DECODE_TOL,
            ));
        }
        let reference = Llama::<I>::load_quantized(path, device, Quantize::None)
            .unwrap()
            .model;
        out.push(Check::new(
            "quant",
            file,
            "logits max rel Δ, kept blocks vs dequantized on load",
            max_rel(
                kept.forward(ids.clone(), None),
                reference.forward(ids.clone(), None),
            ),
            LOGITS_TOL,
        ));
    }

    // Gradients: the linear weights frozen in both models, so the same parameters train.
    let path = fixture(FILES[0]);
    let path = path.to_str().unwrap();
    let ids = golden["ids"].int2::<Autodiff<I>>(device);
    let mut runs = Vec::new();
    for q in [Quantize::Keep, Quantize::None] {
        let mut model = Llama::<Autodiff<I>>::load_quantized(path, device, q)
            .unwrap()
            .model;
        for slot in model.linears_mut() {
            slot.linear.weight = slot.linear.weight.clone().set_require_grad(false);
        }
        let logits = model.forward(ids.clone(), None);
        let grads = logits.powi_scalar(2).mean().backward();
        let mut g = Vec::new();
        model.visit(&mut GradCollector {
            grads: &grads,
            out: &mut g,
        });
        runs.push(g);
    }
    let (none, keep) = (runs.pop().unwrap(), runs.pop().unwrap());
    assert!(
        !keep.is_empty() && keep.len() == none.len(),
        "{} vs {} gradients",
        keep.len(),
        none.len()
    );
    let grad_rel = crate::compare::worst(keep.into_iter().zip(none).map(|(a, b)| max_rel(a, b)));
    out.push(Check::new(
        "quant",
        FILES[0],
        "float parameters' gradients max rel Δ, kept vs dequantized",
        grad_rel,
        GRAD_TOL,
    ));
    out
}
