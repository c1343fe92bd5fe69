//! A frozen quantized base (`model.quantize`): GGUF blocks kept as the file stores them and
//! weights encoded on load give the logits of the same blocks dequantized to f32, and LoRA trains
//! on top of them as on the dequantized base (QLoRA).

mod common;

use collie_io::family::ModelFiles;
use collie_io::quant::{QuantType, Quantize};
use collie_llama::Llama;
use common::*;

#[test]
fn quantized_suite_on_cpu() {
    let checks = collie_tests::suite::quant::checks::<B>(&Default::default());
    collie_tests::suite::assert_all("cpu", &checks);
}

/// The CubeCL decoder: every block type decoded on the device equals the host decoder, and the
/// model's logits and gradients through it equal the dequantized model's.
#[cfg(feature = "wgpu")]
#[test]
fn quantized_suite_on_wgpu() {
    use collie_core::device::{RegisterOps, Wgpu};
    Wgpu::register_ops();
    assert!(collie_core::nn::quant::decodes_on_device::<Wgpu>());
    let device = burn::backend::wgpu::WgpuDevice::DefaultDevice;
    collie_tests::suite::assert_all("wgpu", &collie_tests::suite::quant::checks::<Wgpu>(&device));
}

fn ids() -> burn::tensor::Tensor<B, 2, burn::tensor::Int> {
    read_golden(&fixture("gguf/tiny_llama.safetensors"))["ids"].int2::<B>(&Default::default())
}

fn logits(path: &str, q: Quantize) -> (Vec<f32>, Llama<B>) {
    let loaded = Llama::<B>::load_quantized(path, &Default::default(), q).unwrap();
    (values(loaded.model.forward(ids(), None)), loaded.model)
}

/// Linear layers holding quantized blocks, by type name.
fn quantized_types(model: &mut Llama<B>) -> std::collections::BTreeMap<String, usize> {
    use collie_core::nn::Adaptable;
    let mut types = std::collections::BTreeMap::new();
    for slot in model.linears_mut() {
        if let Some(q) = &slot.linear.quant {
            *types.entry(q.type_name().to_string()).or_default() += 1;
            assert_eq!(slot.linear.weight.lazy_shape().dims::<2>(), [0, 0]);
        }
    }
    types
}

#[test]
fn kept_gguf_blocks_give_the_dequantized_logits() {
    // tiny_llama.gguf mixes every type (Q4_K, Q5_K, Q6_K, Q8_0, the legacy ones, F16, BF16);
    // gguf_types/ holds whole files in Q8_0 and Q4_1.
    for file in [
        "gguf/tiny_llama.gguf",
        "gguf_types/q8_0.gguf",
        "gguf_types/q4_1.gguf",
    ] {
        let path = fixture(file);
        let path = path.to_str().unwrap();
        let (reference, _) = logits(path, Quantize::None);
        let (kept, mut model) = logits(path, Quantize::Keep);
        let types = quantized_types(&mut model);
        assert_eq!(
            types.values().sum::<usize>(),
            14,
            "{file}: every block linear kept ({types:?})"
        );
        assert_within(
            &format!("{file}: keep vs dequantized, max rel"),
            max_rel_diff(&kept, &reference),
            1e-5,
        );
    }
}

#[test]
fn weights_encoded_on_load_are_the_quantizers_blocks() {
    // Each layer holds `quantize` of its float rows (the bytes llama.cpp writes, checked in
    // gguf_export.rs), and the quantized forward gives the logits of the float model holding
    // those blocks decoded.
    let device = Default::default();
    let src = fixture("gguf/tiny_llama.gguf");
    let src = src.to_str().unwrap();
    let mut base = Llama::<B>::load(src, &device).unwrap().model;
    for ty in [QuantType::Q8_0, QuantType::Q4K] {
        let (encoded, mut model) = logits(src, Quantize::To(ty));
        let types = quantized_types(&mut model);
        assert_eq!(types.values().sum::<usize>(), 14, "{types:?}");
        {
            use collie_core::nn::Adaptable;
            let (mut a, mut b) = (model.linears_mut(), base.linears_mut());
            let (q, f) = (&mut a[0], &mut b[0]);
            let w = collie_io::HostTensor::from_tensor(f.linear.weight.val()).transpose();
            let want = collie_io::quant::fallback(ty, w.shape[1]);
            let bytes = collie_io::quant::quantize(&w.data, want);
            let decoded = collie_io::quant::dequantize(&bytes, want, w.data.len()).unwrap();
            let held = q.linear.quant.as_ref().unwrap().dequantize::<B>(&device);
            assert_eq!(values(held), decoded, "{}: {}", ty.name(), q.name);
        }
        let mut float = model.clone();
        {
            use collie_core::nn::Adaptable;
            for slot in float.linears_mut() {
                slot.linear.dequantize_weight();
            }
        }
        let reference = values(float.forward(ids(), None));
        assert_within(
            &format!(
                "{}: quantized forward vs its decoded weights, max rel",
                ty.name()
            ),
            max_rel_diff(&encoded, &reference),
            1e-5,
        );
    }
}

fn lora_config(quantize: &str, out: &std::path::Path) -> collie_train::TrainConfig {
    lora_config_set(quantize, out, &[])
}

/// [`lora_config`] with `--set` overrides (`optim.name=lomo`, …).
fn lora_config_set(
    quantize: &str,
    out: &std::path::Path,
    sets: &[&str],
) -> collie_train::TrainConfig {
    let text = format!(
        r#"
[model]
path = "{model}"
quantize = "{quantize}"
[data]
train = "{data}"
format = "input_output"
seq_len = 48
shuffle = false
[train]
max_steps = 5
micro_batch_size = 3
max_grad_norm = 1.0
seed = 3
[optim]
name = "adamw"
lr = 5e-3
[sched]
kind = "constant"
[peft]
kind = "lora"
r = 8
alpha = 16
target_modules = "all-linear"
[output]
dir = "{out}"
"#,
        model = fixture("gguf/tiny_llama.gguf").display(),
        data = fixture("train/io.jsonl").display(),
        out = out.display(),
    );
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    collie_train::TrainConfig::parse(&text, "qlora", &sets).unwrap()
}

#[test]
fn lora_on_a_kept_base_trains_as_on_the_dequantized_base() {
    // The backend's custom ops, as `collie` registers them before a run; registered here too so
    // that the suite test of this binary, which registers them, cannot switch them on between
    // the two runs compared below.
    <B as collie_core::device::RegisterOps>::register_ops();
    let dir = tempfile::tempdir().unwrap();
    let (_, float) = train_run(lora_config("none", &dir.path().join("float")), None);
    let (_, kept) = train_run(lora_config("keep", &dir.path().join("keep")), None);
    assert_eq!(float.len(), 5);
    // Forward and input gradients are the same products as the float base's.
    assert_eq!(
        max_rel_diff(&kept, &float),
        0.0,
        "QLoRA (keep) vs LoRA on the dequantized base"
    );
    // Activation checkpointing recomputes each block on the inner backend: the same op there.
    let config = lora_config_set(
        "keep",
        &dir.path().join("ckpt"),
        &["train.activation_checkpointing=true"],
    );
    let (_, ckpt) = train_run(config, None);
    assert_eq!(
        max_rel_diff(&ckpt, &float),
        0.0,
        "QLoRA with activation checkpointing"
    );
    assert!(float[4] < float[0], "training lowers the loss: {float:?}");
    // LOMO and AdaLomo update the adapter inside the block-wise backward walk: the same losses
    // on a kept base as on the dequantized one.
    for (optim, lr) in [("lomo", "optim.lr=0.01"), ("adalomo", "optim.lr=0.005")] {
        let name = format!("optim.name={optim}");
        let run = |quantize: &str| {
            let out = dir.path().join(format!("{optim}-{quantize}"));
            train_run(lora_config_set(quantize, &out, &[&name, lr]), None).1
        };
        let (float, kept) = (run("none"), run("keep"));
        assert_eq!(float.len(), 5);
        assert_eq!(max_rel_diff(&kept, &float), 0.0, "{optim} on a kept base");
    }
}

#[test]
fn a_quantized_base_without_peft_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = lora_config("q4_k", dir.path());
    config.peft = Default::default();
    let err = config.validate().unwrap_err().to_string();
    assert!(
        err.contains("model.quantize") && err.contains("[peft]"),
        "{err}"
    );
    let err = "q3_k".parse::<Quantize>().unwrap_err();
    assert!(err.contains("q3_k") && err.contains("keep"), "{err}");
    // `keep` on something that is not a GGUF file.
    let err = Llama::<B>::load_quantized(
        fixture("train/model").to_str().unwrap(),
        &Default::default(),
        Quantize::Keep,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("not a GGUF file"), "{err}");
}
