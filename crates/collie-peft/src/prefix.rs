//! Prefix tuning (Li & Liang 2021): learned keys and values in front of every attention layer's
//! own, through the attention's past-key/value input. The real tokens sit at positions `n..`.
//! With `prefix_projection` the prefix is produced by peft's MLP (`Linear → tanh → Linear`) from a
//! smaller table; a saved adapter holds the produced prefix. Under grouped-query attention the
//! prefix has the width of the key/value heads, as peft sizes it.

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use collie_core::nn::{Adaptable, EncoderActivation, VirtualTarget, VirtualTokens};

use crate::config::PeftConfig;
use crate::torch_linear;

/// Width of one layer's key (or value) for one virtual token: peft's `token_dim`.
pub fn token_dim<B: Backend, M: Adaptable<B>>(model: &M) -> usize {
    let d = model.dims();
    d.kv_heads * d.head_dim
}

/// Where the prefix goes in `model`.
pub fn target<B: Backend, M: Adaptable<B>>(model: &M) -> VirtualTarget {
    let d = model.dims();
    VirtualTarget::Prefix {
        layers: d.layers,
        kv_heads: d.kv_heads,
        head_dim: d.head_dim,
    }
}

/// A freshly initialized prefix (`nn.Embedding` normal table; `nn.Linear` projection layers).
pub fn build<B: Backend, M: Adaptable<B>>(
    model: &M,
    config: &PeftConfig,
    device: &B::Device,
) -> VirtualTokens<B> {
    let t = token_dim(model);
    let out = model.dims().layers * 2 * t;
    let n = config.num_virtual_tokens;
    let normal = Distribution::Normal(0.0, 1.0);
    let (table, mlp) = if config.prefix_projection {
        let e = config.encoder_hidden_size.unwrap_or(t);
        (
            Tensor::random([n, t], normal, device),
            vec![torch_linear(t, e, device), torch_linear(e, out, device)],
        )
    } else {
        (Tensor::random([n, out], normal, device), Vec::new())
    };
    VirtualTokens {
        embedding: Param::from_tensor(table),
        mlp,
        activation: EncoderActivation::Tanh,
        target: target(model),
    }
}
