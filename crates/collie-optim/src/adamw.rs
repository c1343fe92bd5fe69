//! AdamW (Loshchilov & Hutter 2019) with `torch.optim.AdamW`'s exact update:
//!
//! ```text
//! θ ← θ · (1 − lr·wd)                      (decoupled decay)
//! m ← m + (g − m)·(1 − β1)                 v ← β2·v + (1 − β2)·g²
//! θ ← θ − lr/(1 − β1ᵗ) · m / (sqrt(v)/sqrt(1 − β2ᵗ) + ε)
//! ```

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use collie_core::fused::AdamWStep;
use serde::{Deserialize, Serialize};

use crate::state::{OptimizerState, Slots, StateError};
use crate::Optimizer;

/// AdamW hyper-parameters (PyTorch defaults except `weight_decay`, which transformers sets to 0).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// `(β1, β2)`.
    pub betas: (f64, f64),
    /// Added to the denominator, outside the square root.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Which parameters decay.
    pub decay_filter: crate::DecayFilter,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            decay_filter: crate::DecayFilter::All,
        }
    }
}

/// AdamW with per-parameter first and second moments.
pub struct AdamW<B: Backend> {
    config: AdamWConfig,
    slots: Slots<B>,
}

const SLOTS: [&str; 2] = ["exp_avg", "exp_avg_sq"];

impl<B: Backend> AdamW<B> {
    /// A fresh optimizer.
    pub fn new(config: AdamWConfig) -> Self {
        AdamW {
            config,
            slots: Slots::default(),
        }
    }
}

impl<B: Backend> Optimizer<B> for AdamW<B> {
    fn update<const D: usize>(
        &mut self,
        path: &str,
        param: Tensor<B, D>,
        grad: Tensor<B, D>,
        lr: f64,
    ) -> Tensor<B, D> {
        let AdamWConfig {
            betas: (b1, b2),
            eps,
            weight_decay,
            decay_filter,
        } = self.config;
        let weight_decay = decay_filter.rate(D, weight_decay);
        let shape = param.shape();
        let n = shape.num_elements();
        let g = grad.reshape([n]);
        let (m, v) = match self.slots.tensors.remove(path) {
            Some(mut s) => {
                let v = s.pop().expect("exp_avg_sq");
                (s.pop().expect("exp_avg"), v)
            }
            None => (g.zeros_like(), g.zeros_like()),
        };
        let step = self.slots.counters.get(path).copied().unwrap_or(0) + 1;
        let bias1 = 1.0 - b1.powi(step as i32);
        let bias2_sqrt = (1.0 - b2.powi(step as i32)).sqrt();
        let all_f32 = [param.dtype(), g.dtype(), m.dtype(), v.dtype()]
            .iter()
            .all(|&t| t == DType::F32);
        let s = AdamWStep {
            one_minus_b1: 1.0 - b1,
            b2,
            one_minus_b2: 1.0 - b2,
            bias2_sqrt,
            eps,
            decay: (weight_decay != 0.0).then_some(1.0 - lr * weight_decay),
            step_size: lr / bias1,
        };
        let theta = param.reshape([n]);
        // One pass over the buffers where the backend has the kernel (collie_core::fused), the
        // same arithmetic as tensor operations otherwise.
        let (theta, m, v) = match collie_core::fused::kernels::<B>() {
            Some(k) if all_f32 => (k.adamw)(theta, g, m, v, s),
            _ => adamw_unfused(theta, g, m, v, s),
        };
        self.slots.tensors.insert(path.to_string(), vec![m, v]);
        self.slots.counters.insert(path.to_string(), step);
        theta.reshape(shape)
    }

    fn state(&self) -> OptimizerState {
        self.slots.export(&SLOTS)
    }

    fn snapshot(&self) -> crate::StateSnapshot<'_> {
        self.slots.snapshot(&SLOTS)
    }

    fn load_state(&mut self, state: OptimizerState, device: &B::Device) -> Result<(), StateError> {
        self.slots = Slots::import(state, &SLOTS, device)?;
        Ok(())
    }
}

/// One AdamW step as tensor operations, in the order of the module docs: the reference of the
/// fused kernel (`collie_core::fused::FusedKernels::adamw`) and the path of backends without it.
///
/// # Shapes
/// - theta, g, m, v: `[n]` → `(θ, m, v)`, each `[n]`
pub fn adamw_unfused<B: Backend>(
    theta: Tensor<B, 1>,
    g: Tensor<B, 1>,
    m: Tensor<B, 1>,
    v: Tensor<B, 1>,
    s: AdamWStep,
) -> (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>) {
    // exp_avg.lerp_(grad, 1 - β1)
    let m = m.clone() + (g.clone() - m).mul_scalar(s.one_minus_b1);
    // exp_avg_sq.mul_(β2).addcmul_(grad, grad, value = 1 - β2)
    let v = v.mul_scalar(s.b2) + (g.clone() * g).mul_scalar(s.one_minus_b2);
    let denom = v.clone().sqrt().div_scalar(s.bias2_sqrt).add_scalar(s.eps);
    let theta = match s.decay {
        Some(decay) => theta.mul_scalar(decay),
        None => theta,
    };
    let theta = theta - (m.clone() / denom).mul_scalar(s.step_size);
    (theta, m, v)
}
