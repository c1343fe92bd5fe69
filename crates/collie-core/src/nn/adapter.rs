//! Adapter types that sit in a [`Linear`](super::Linear)'s slot.
//!
//! Only the types and their forward math live here; where adapters go, how they are initialized,
//! merged, saved and loaded is `collie-peft`'s business.

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// A low-rank update `Δy = (x · A · B) · scaling` (LoRA, Hu et al. 2021).
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    /// Down projection, `[d_in, rank]` (PyTorch's `lora_A.weight` transposed).
    pub a: Param<Tensor<B, 2>>,
    /// Up projection, `[rank, d_out]` (PyTorch's `lora_B.weight` transposed).
    pub b: Param<Tensor<B, 2>>,
    /// `alpha / rank` (or `alpha / sqrt(rank)` with rsLoRA).
    pub scaling: f64,
    /// Dropout probability on the adapter's input during training (peft's `lora_dropout`).
    pub dropout: f64,
    /// Folded into the base weight (peft's `merge_adapter`): the forward pass skips it.
    pub merged: bool,
}

/// A learned rescaling vector (IA3, Liu et al. 2022).
#[derive(Module, Debug)]
pub struct Ia3Adapter<B: Backend> {
    /// The scale vector: `[d_in]` when `on_input`, else `[d_out]`.
    pub scale: Param<Tensor<B, 1>>,
    /// Scale the layer input (feed-forward down projections) instead of its output.
    pub on_input: bool,
    /// Folded into the base weight: the forward pass skips it.
    pub merged: bool,
}

/// What can sit in a [`Linear`](super::Linear)'s adapter slot.
#[derive(Module, Debug)]
pub enum Adapter<B: Backend> {
    /// A LoRA pair.
    Lora(LoraAdapter<B>),
    /// An IA3 vector.
    Ia3(Ia3Adapter<B>),
}

impl<B: Backend> Adapter<B> {
    /// Whether the adapter is folded into the base weight.
    pub fn is_merged(&self) -> bool {
        match self {
            Adapter::Lora(a) => a.merged,
            Adapter::Ia3(a) => a.merged,
        }
    }
}

impl<B: Backend> LoraAdapter<B> {
    /// The low-rank update for input `x`.
    ///
    /// # Shapes
    /// - x: `[..., d_in]` → `[..., d_out]`
    pub fn delta<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let x = super::dropout(x, self.dropout);
        let h = super::linear::matmul_2d(x, self.a.val());
        super::linear::matmul_2d(h, self.b.val()).mul_scalar(self.scaling)
    }
}

impl<B: Backend> Ia3Adapter<B> {
    /// Broadcasts the scale vector against `x` (`[..., n]`) and multiplies.
    pub fn rescale<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        x * self.scale.val().unsqueeze::<D>()
    }
}
