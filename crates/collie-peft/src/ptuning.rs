//! P-tuning (Liu et al. 2021) as peft implements it: prompt tuning whose virtual embeddings are
//! produced by an MLP prompt encoder (`Linear → ReLU → Linear → ReLU → Linear`) over a learned
//! table. A saved adapter holds the encoder's output, so inference needs no encoder.

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use collie_core::nn::{Adaptable, EncoderActivation, VirtualTarget, VirtualTokens};

use crate::config::PeftConfig;
use crate::torch_linear;

/// A freshly initialized encoder (`nn.Embedding` normal table, `nn.Linear` layers).
pub fn build<B: Backend, M: Adaptable<B>>(
    model: &M,
    config: &PeftConfig,
    device: &B::Device,
) -> VirtualTokens<B> {
    let h = model.dims().hidden;
    let e = config.encoder_hidden_size.unwrap_or(h);
    VirtualTokens {
        embedding: Param::from_tensor(Tensor::random(
            [config.num_virtual_tokens, h],
            Distribution::Normal(0.0, 1.0),
            device,
        )),
        mlp: vec![
            torch_linear(h, e, device),
            torch_linear(e, e, device),
            torch_linear(e, h, device),
        ],
        activation: EncoderActivation::Relu,
        target: VirtualTarget::Input,
    }
}
