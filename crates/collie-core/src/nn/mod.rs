//! Layers every collie-rs model is built from.
//!
//! Models use these instead of `burn::nn` equivalents because PEFT and tensor parallelism transform
//! them from outside: a [`Linear`] carries an optional [`Adapter`] (LoRA pair or IA3 vector) and a
//! [`ParallelMode`], so `collie_peft::apply` and `collie_dist::parallelize` never touch model code.

mod adapter;
mod embedding;
mod linear;
mod norm;

pub use adapter::{Adapter, Ia3Adapter, LoraAdapter};
pub use embedding::{Embedding, EmbeddingConfig};
pub use linear::{matmul_2d, Linear, LinearConfig, ParallelMode};
pub use norm::{RmsNorm, RmsNormConfig};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

/// `x` in `dtype`; no operation (and no autodiff node) when it already is.
pub fn to_dtype<B: Backend, const D: usize>(x: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if x.dtype() == dtype {
        x
    } else {
        x.cast(dtype)
    }
}
