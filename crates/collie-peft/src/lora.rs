//! LoRA (Hu et al. 2021) and rsLoRA: `y = x·W + (dropout(x)·A·B)·s` on the target layers, with
//! `s = alpha / r` (or `alpha / sqrt(r)`). Initialized as peft: `A` Kaiming-uniform with
//! `a = sqrt(5)` (uniform in `±1/sqrt(d_in)`), `B` zeros, so training starts at the base model.

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use collie_core::nn::{Adaptable, Adapter, Ia3Adapter, Linear, LoraAdapter};

use crate::config::PeftConfig;
use crate::error::{PeftError, Result};
use crate::select_targets;

/// Puts a freshly initialized LoRA pair into every target layer of `model`.
pub fn inject<B: Backend, M: Adaptable<B>>(
    model: &mut M,
    config: &PeftConfig,
    device: &B::Device,
) -> Result<()> {
    let r = config.r;
    if r == 0 {
        return Err(PeftError::Config(
            "peft.r: the LoRA rank must be at least 1 (got 0)".into(),
        ));
    }
    for (_, linear) in select_targets(model, &config.targets())? {
        let [d_in, d_out] = linear.dims();
        let bound = 1.0 / (d_in as f64).sqrt();
        linear.adapter = Some(Adapter::Lora(LoraAdapter {
            a: Param::from_tensor(Tensor::random(
                [d_in, r],
                Distribution::Uniform(-bound, bound),
                device,
            )),
            b: Param::from_tensor(Tensor::zeros([r, d_out], device)),
            scaling: config.lora_scaling(),
            dropout: config.dropout,
            merged: false,
        }));
    }
    Ok(())
}

/// The update an adapter makes to its layer's weight: `A·B·s` for LoRA; for IA3 the factor
/// the weight is multiplied by (`[1, d_out]` on outputs, `[d_in, 1]` on inputs).
fn weight_delta<B: Backend>(adapter: &Adapter<B>) -> Tensor<B, 2> {
    match adapter {
        Adapter::Lora(l) => l.a.val().matmul(l.b.val()).mul_scalar(l.scaling).detach(),
        Adapter::Ia3(Ia3Adapter {
            scale, on_input, ..
        }) => {
            let s = scale.val().detach();
            let n = s.dims()[0];
            if *on_input {
                s.reshape([n, 1])
            } else {
                s.reshape([1, n])
            }
        }
    }
}

/// Folds (`merge`) or unfolds one layer's adapter into its weight (LoRA adds `A·B·s`, IA3
/// multiplies by its vector).
fn fold<B: Backend>(linear: &mut Linear<B>, merge: bool) {
    let Some(adapter) = &linear.adapter else {
        return;
    };
    if adapter.is_merged() == merge {
        return;
    }
    if merge && linear.quant.is_some() {
        // A quantized base cannot absorb a float delta: the layer becomes float.
        linear.dequantize_weight();
    }
    let Some(adapter) = &linear.adapter else {
        return;
    };
    let delta = weight_delta(adapter);
    let is_lora = matches!(adapter, Adapter::Lora(_));
    let on_output = matches!(adapter, Adapter::Ia3(a) if !a.on_input);
    linear.weight = linear.weight.clone().map(|w| match (is_lora, merge) {
        (true, true) => w + delta.clone(),
        (true, false) => w - delta.clone(),
        (false, true) => w * delta.clone(),
        (false, false) => w / delta.clone(),
    });
    if on_output {
        // IA3 on outputs scales the bias too, as peft's merge does.
        let v = delta.clone().reshape([delta.dims()[1]]);
        linear.bias = linear
            .bias
            .take()
            .map(|b| b.map(|b| if merge { b * v.clone() } else { b / v.clone() }));
    }
    match linear.adapter.as_mut() {
        Some(Adapter::Lora(a)) => a.merged = merge,
        Some(Adapter::Ia3(a)) => a.merged = merge,
        None => {}
    }
}

/// Folds every LoRA / IA3 adapter of `model` into its base weight (peft's `merge_adapter`):
/// the forward pass then skips the adapters and costs what the base model costs.
pub fn merge<B: Backend, M: Adaptable<B>>(model: &mut M) {
    for (_, linear) in model.named_linears() {
        fold(linear, true);
    }
}

/// Undoes [`merge`] (peft's `unmerge_adapter`).
pub fn unmerge<B: Backend, M: Adaptable<B>>(model: &mut M) {
    for (_, linear) in model.named_linears() {
        fold(linear, false);
    }
}

/// Merges and removes every adapter (peft's `merge_and_unload`): a plain model with the adapted
/// weights.
pub fn merge_and_unload<B: Backend, M: Adaptable<B>>(model: &mut M) {
    for (_, linear) in model.named_linears() {
        fold(linear, true);
        linear.adapter = None;
    }
}
