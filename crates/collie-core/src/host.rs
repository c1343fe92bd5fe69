//! Tensors copied to the host.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// The values of `t` on the host as `f32` (converted from any float dtype), row-major.
pub fn to_host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 after convert")
}
