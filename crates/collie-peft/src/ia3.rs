//! IA3 (Liu et al. 2022): learned vectors that rescale the outputs of the attention's key and
//! value projections and the input of the feed-forward down projection (peft's LLaMA defaults),
//! initialized to ones so training starts at the base model.

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use collie_core::nn::{Adaptable, Adapter, Ia3Adapter};

use crate::config::{PeftConfig, TargetModules};
use crate::error::{PeftError, Result};
use crate::{is_target, select_targets};

/// Puts a ones-initialized IA3 vector into every target layer of `model`; layers that are also
/// `feedforward_modules` scale their input, the others their output.
pub fn inject<B: Backend, M: Adaptable<B>>(
    model: &mut M,
    config: &PeftConfig,
    device: &B::Device,
) -> Result<()> {
    let targets = config.targets();
    let feedforward = TargetModules::Names(config.feedforward());
    let output = model.output_layer_name();
    let chosen = select_targets(model, &targets)?;
    // peft: feed-forward modules must be a subset of the targets.
    if let TargetModules::Names(ff) = &feedforward {
        for f in ff {
            let one = TargetModules::Names(vec![f.clone()]);
            if !chosen.iter().any(|(n, _)| is_target(&one, n, output)) {
                return Err(PeftError::Config(format!(
                    "peft.feedforward_modules: `{f}` is not among the target modules"
                )));
            }
        }
    }
    for (name, linear) in chosen {
        let on_input = is_target(&feedforward, &name, output);
        let [d_in, d_out] = linear.dims();
        let n = if on_input { d_in } else { d_out };
        linear.adapter = Some(Adapter::Ia3(Ia3Adapter {
            scale: Param::from_tensor(Tensor::ones([n], device)),
            on_input,
            merged: false,
        }));
    }
    Ok(())
}
