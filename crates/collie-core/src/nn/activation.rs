//! The MLP activations of the supported families, by their HF `hidden_act` names.

use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// An MLP activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    /// `x · sigmoid(x)` (LLaMA's SwiGLU; HF `silu`).
    #[default]
    Silu,
    /// GELU with the tanh approximation (Gemma's GeGLU; HF `gelu_pytorch_tanh`, and `gelu_new`,
    /// the same formula).
    GeluTanh,
}

impl Activation {
    /// HF names this crate accepts, for error messages.
    pub const NAMES: &'static [&'static str] = &["silu", "gelu_pytorch_tanh", "gelu_new"];

    /// The activation HF calls `name`.
    pub fn from_hf(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Activation::Silu),
            "gelu_pytorch_tanh" | "gelu_new" => Some(Activation::GeluTanh),
            _ => None,
        }
    }

    /// # Shapes
    /// - x: any → same
    pub fn forward<const D: usize, B: Backend>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Activation::Silu => silu(x),
            Activation::GeluTanh => gelu_tanh(x),
        }
    }
}

/// `0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 · x³)))`, as PyTorch's
/// `gelu(approximate="tanh")`. The cube is two multiplications: a float power of a negative base
/// is undefined on some GPU backends.
pub fn gelu_tanh<const D: usize, B: Backend>(x: Tensor<B, D>) -> Tensor<B, D> {
    const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
    let cube = x.clone() * x.clone() * x.clone();
    let inner = (x.clone() + cube.mul_scalar(0.044715)).mul_scalar(SQRT_2_OVER_PI);
    (x * inner.tanh().add_scalar(1.0)).mul_scalar(0.5)
}
