//! RMSNorm as LLaMA defines it (and Gemma's `1 + w` variant), and LayerNorm.

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
    /// Added to the stored weight before it scales: `0` for LLaMA, `1` for Gemma, whose
    /// checkpoints store `w` and scale by `1 + w` (the weight then starts at zeros).
    #[config(default = 0.0)]
    pub offset: f64,
}

/// `y = x / sqrt(mean(x²) + eps) · (offset + weight)`, over the last dimension (Zhang & Sennrich
/// 2019).
///
/// The normalization runs in f32 whatever the input dtype. As in HF's LLaMA the result is cast
/// back before the weight multiplies it; with an offset (Gemma) the scale applies in f32 and the
/// product is cast back, as HF's Gemma does.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// `[d_model]`, initialized to `1 − offset` (a unit scale).
    pub weight: Param<Tensor<B, 1>>,
    /// Epsilon.
    pub eps: f64,
    /// Added to `weight` before it scales.
    pub offset: f64,
}

impl RmsNormConfig {
    /// Builds the layer.
    pub fn init<B: Backend>(&self, device: &B::Device) -> RmsNorm<B> {
        let weight = if self.offset == 0.0 {
            Initializer::Ones
        } else {
            Initializer::Constant {
                value: 1.0 - self.offset,
            }
        };
        RmsNorm {
            weight: weight.init([self.d_model], device),
            eps: self.eps,
            offset: self.offset,
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
        if self.offset == 0.0 {
            return super::to_dtype(x / rms, dtype) * self.weight.val().unsqueeze::<D>();
        }
        let scale = super::to_dtype(self.weight.val(), DType::F32).add_scalar(self.offset);
        super::to_dtype(x / rms * scale.unsqueeze::<D>(), dtype)
    }
}

/// Configuration of a [`LayerNorm`].
#[derive(Config, Debug)]
pub struct LayerNormConfig {
    /// Width of the normalized dimension.
    pub d_model: usize,
    /// Added to the variance before the square root (`layer_norm_eps`).
    #[config(default = 1e-12)]
    pub eps: f64,
}

/// `y = (x − mean(x)) / sqrt(var(x) + eps) · weight + bias` over the last dimension (Ba et al.
/// 2016; the biased variance, as `torch.nn.LayerNorm`), computed in f32 whatever the input dtype.
#[derive(Module, Debug)]
pub struct LayerNorm<B: Backend> {
    /// `[d_model]`, initialized to ones (HF `weight`, formerly `gamma`).
    pub weight: Param<Tensor<B, 1>>,
    /// `[d_model]`, initialized to zeros (HF `bias`, formerly `beta`).
    pub bias: Param<Tensor<B, 1>>,
    /// Epsilon.
    pub eps: f64,
}

impl LayerNormConfig {
    /// Builds the layer.
    pub fn init<B: Backend>(&self, device: &B::Device) -> LayerNorm<B> {
        LayerNorm {
            weight: Initializer::Ones.init([self.d_model], device),
            bias: Initializer::Zeros.init([self.d_model], device),
            eps: self.eps,
        }
    }
}

impl<B: Backend> LayerNorm<B> {
    /// # Shapes
    /// - x: `[..., d_model]` → same
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = x.dtype();
        let x = super::to_dtype(x, DType::F32);
        let centered = x.clone() - x.mean_dim(D - 1);
        let std = centered
            .clone()
            .square()
            .mean_dim(D - 1)
            .add_scalar(self.eps)
            .sqrt();
        let y = super::to_dtype(centered / std, dtype);
        y * self.weight.val().unsqueeze::<D>() + self.bias.val().unsqueeze::<D>()
    }
}
