//! RMSNorm as LLaMA defines it.

use burn::config::Config;
use burn::module::{Initializer, Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

/// Configuration of an [`RmsNorm`].
#[derive(Config, Debug)]
pub struct RmsNormConfig {
    /// Width of the normalized dimension.
    pub d_model: usize,
    /// Added to the mean square before the square root (`rms_norm_eps`).
    #[config(default = 1e-6)]
    pub eps: f64,
}

/// `y = x / sqrt(mean(x²) + eps) · weight`, over the last dimension (Zhang & Sennrich 2019).
///
/// As in HF's LLaMA, the normalization runs in f32 whatever the input dtype, and the result is
/// cast back before the weight multiplies it.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// `[d_model]`, initialized to ones.
    pub weight: Param<Tensor<B, 1>>,
    /// Epsilon.
    pub eps: f64,
}

impl RmsNormConfig {
    /// Builds the layer.
    pub fn init<B: Backend>(&self, device: &B::Device) -> RmsNorm<B> {
        RmsNorm {
            weight: Initializer::Ones.init([self.d_model], device),
            eps: self.eps,
        }
    }
}

impl<B: Backend> RmsNorm<B> {
    /// # Shapes
    /// - x: `[..., d_model]` → same
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = x.dtype();
        let x = super::to_dtype(x, DType::F32);
        let rms = x
            .clone()
            .square()
            .mean_dim(D - 1)
            .add_scalar(self.eps)
            .sqrt();
        super::to_dtype(x / rms, dtype) * self.weight.val().unsqueeze::<D>()
    }
}
