//! One normalization layer: RMSNorm as LLaMA defines it (and Gemma's `1 + w` variant), and
//! LayerNorm (BERT, CodeGen).

use burn::config::Config;
use burn::module::{Initializer, Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

/// Configuration of a [`Norm`].
#[derive(Config, Debug)]
pub struct NormConfig {
    /// Width of the normalized dimension.
    pub d_model: usize,
    /// Added to the mean square (the variance, when centered) before the square root
    /// (`rms_norm_eps`, `layer_norm_eps`).
    #[config(default = 1e-6)]
    pub eps: f64,
    /// Added to the stored weight before it scales: `0` for LLaMA, `1` for Gemma, whose
    /// checkpoints store `w` and scale by `1 + w` (the weight then starts at zeros).
    #[config(default = 0.0)]
    pub offset: f64,
    /// LayerNorm rather than RMSNorm: subtract the mean first, and add a bias after the scale.
    #[config(default = false)]
    pub layer_norm: bool,
}

/// The normalization layers of the models, over the last dimension:
/// - RMSNorm (Zhang & Sennrich 2019): `y = x / sqrt(mean(x²) + eps) · (offset + weight)`;
/// - LayerNorm (Ba et al. 2016; the biased variance, as `torch.nn.LayerNorm`), when it has a
///   bias: `y = (x − mean(x)) / sqrt(var(x) + eps) · weight + bias`.
///
/// The normalization runs in f32 whatever the input dtype. As in HF's LLaMA (and BERT) the
/// result is cast back before the weight multiplies it; with an offset (Gemma) the scale applies
/// in f32 and the product is cast back, as HF's Gemma does.
#[derive(Module, Debug)]
pub struct Norm<B: Backend> {
    /// `[d_model]`, initialized to `1 − offset` (a unit scale).
    pub weight: Param<Tensor<B, 1>>,
    /// `[d_model]`, initialized to zeros; present exactly in a LayerNorm (HF `bias`, formerly
    /// `beta`).
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// Epsilon.
    pub eps: f64,
    /// Added to `weight` before it scales.
    pub offset: f64,
}

impl NormConfig {
    /// Builds the layer.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Norm<B> {
        let weight = if self.offset == 0.0 {
            Initializer::Ones
        } else {
            Initializer::Constant {
                value: 1.0 - self.offset,
            }
        };
        Norm {
            weight: weight.init([self.d_model], device),
            bias: (self.layer_norm).then(|| Initializer::Zeros.init([self.d_model], device)),
            eps: self.eps,
            offset: self.offset,
        }
    }
}

impl<B: Backend> Norm<B> {
    /// The norm by the backend's fused kernel ([`crate::fused`]) when it has one and everything
    /// is f32, else by [`Norm::forward_unfused`].
    ///
    /// # Shapes
    /// - x: `[..., d_model]` → same
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let weight = self.weight.val();
        let bias = self.bias.as_ref().map(|b| b.val());
        let all_f32 = [
            Some(x.dtype()),
            Some(weight.dtype()),
            bias.as_ref().map(|b| b.dtype()),
        ]
        .into_iter()
        .flatten()
        .all(|t| t == DType::F32);
        match crate::fused::kernels::<B>() {
            Some(k) if all_f32 => {
                let dims = x.dims();
                let d = dims[D - 1];
                let spec = crate::fused::NormSpec {
                    eps: self.eps as f32,
                    offset: self.offset as f32,
                    center: bias.is_some(),
                };
                // [..., d_model] -> [rows, d_model] -> [..., d_model]
                let rows = x.shape().num_elements() / d.max(1);
                (k.norm)(x.reshape([rows, d]), weight, bias, spec).reshape(dims)
            }
            _ => self.forward_unfused(x),
        }
    }

    /// The norm as tensor operations: the reference arithmetic, and the path of backends
    /// without fused kernels and of reduced-precision inputs.
    ///
    /// # Shapes
    /// - x: `[..., d_model]` → same
    pub fn forward_unfused<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = x.dtype();
        let x = super::to_dtype(x, DType::F32);
        let x = match self.bias {
            Some(_) => x.clone() - x.mean_dim(D - 1),
            None => x,
        };
        let rms = x
            .clone()
            .square()
            .mean_dim(D - 1)
            .add_scalar(self.eps)
            .sqrt();
        let y = if self.offset == 0.0 {
            super::to_dtype(x / rms, dtype) * self.weight.val().unsqueeze::<D>()
        } else {
            let scale = super::to_dtype(self.weight.val(), DType::F32).add_scalar(self.offset);
            super::to_dtype(x / rms * scale.unsqueeze::<D>(), dtype)
        };
        match &self.bias {
            Some(bias) => y + bias.val().unsqueeze::<D>(),
            None => y,
        }
    }
}
