//! The MLP activations of the supported families, by their HF `hidden_act` names.

use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

use crate::fused::Gate;

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

    /// The gated unit `act(gate) · up` (SwiGLU, GeGLU): the backend's fused kernel
    /// ([`crate::fused`]) when it has one and both are f32, else [`Activation::glu_unfused`].
    ///
    /// # Shapes
    /// - gate, up: `[..., d_ff]` → same
    pub fn glu<const D: usize, B: Backend>(
        &self,
        gate: Tensor<B, D>,
        up: Tensor<B, D>,
    ) -> Tensor<B, D> {
        let f32s = gate.dtype() == DType::F32 && up.dtype() == DType::F32;
        match crate::fused::kernels::<B>() {
            Some(k) if f32s && gate.dims() == up.dims() => {
                let dims = gate.dims();
                let d = dims[D - 1];
                let kind = match self {
                    Activation::Silu => Gate::Silu,
                    Activation::GeluTanh => Gate::GeluTanh,
                };
                // [..., d_ff] -> [rows, d_ff] -> [..., d_ff]
                let rows = gate.shape().num_elements() / d.max(1);
                (k.glu)(kind, gate.reshape([rows, d]), up.reshape([rows, d])).reshape(dims)
            }
            _ => self.glu_unfused(gate, up),
        }
    }

    /// `act(gate) · up` as tensor operations (the reference arithmetic).
    pub fn glu_unfused<const D: usize, B: Backend>(
        &self,
        gate: Tensor<B, D>,
        up: Tensor<B, D>,
    ) -> Tensor<B, D> {
        self.forward(gate) * up
    }
}

/// The exact GELU `x·Φ(x)` (PyTorch's `gelu`, HF `gelu`): the backend's fused kernel
/// ([`crate::fused`]) when it has one and `x` is f32, else Burn's `gelu`.
///
/// # Shapes
/// - x: any → same
pub fn gelu<const D: usize, B: Backend>(x: Tensor<B, D>) -> Tensor<B, D> {
    match crate::fused::kernels::<B>() {
        Some(k) if x.dtype() == DType::F32 => {
            let dims = x.dims();
            // [...] -> [n] -> [...]
            let n = x.shape().num_elements();
            (k.gelu)(x.reshape([n])).reshape(dims)
        }
        _ => burn::tensor::activation::gelu(x),
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
