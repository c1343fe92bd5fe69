//! Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), with the update of
//! the official PyTorch code (google/automl `lion_pytorch.py`, copied into CoLLiE as
//! `collie/optim/lion.py`):
//!
//! ```text
//! θ ← θ · (1 − lr·wd)                      (decoupled decay, first)
//! θ ← θ − lr · sign(β1·m + (1 − β1)·g)     (sign(0) = 0)
//! m ← β2·m + (1 − β2)·g                    (momentum updated after the step)
//! ```
//!
//! No bias correction, no ε; one state tensor per parameter.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use collie_core::fused::LionStep;
use serde::{Deserialize, Serialize};

use crate::state::{OptimizerState, Slots, StateError};
use crate::{DecayFilter, Optimizer};

/// Lion hyper-parameters (CoLLiE defaults: betas (0.9, 0.99), no weight decay; lr 1e-4 is set
/// by the config).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LionConfig {
    /// `(β1, β2)`: interpolation for the sign, and momentum decay.
    pub betas: (f64, f64),
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Which parameters decay.
    pub decay_filter: DecayFilter,
}

impl Default for LionConfig {
    fn default() -> Self {
        LionConfig {
            betas: (0.9, 0.99),
            weight_decay: 0.0,
            decay_filter: DecayFilter::All,
        }
    }
}

/// Lion with one momentum tensor per parameter.
pub struct Lion<B: Backend> {
    config: LionConfig,
    slots: Slots<B>,
}

const SLOTS: [&str; 1] = ["exp_avg"];

impl<B: Backend> Lion<B> {
    /// A fresh optimizer.
    pub fn new(config: LionConfig) -> Self {
        Lion {
            config,
            slots: Slots::default(),
        }
    }
}

impl<B: Backend> Optimizer<B> for Lion<B> {
    fn update<const D: usize>(
        &mut self,
        path: &str,
        param: Tensor<B, D>,
        grad: Tensor<B, D>,
        lr: f64,
    ) -> Tensor<B, D> {
        let wd = self.config.decay_filter.rate(D, self.config.weight_decay);
        let shape = param.shape();
        let n = shape.num_elements();
        let g = grad.reshape([n]);
        let m = match self.slots.tensors.remove(path) {
            Some(mut s) => s.pop().expect("exp_avg"),
            None => g.zeros_like(),
        };
        let all_f32 = [param.dtype(), g.dtype(), m.dtype()]
            .iter()
            .all(|&t| t == DType::F32);
        let s = LionStep::new(self.config.betas, lr, wd);
        let theta = param.reshape([n]);
        // One pass over the buffers where the backend has the kernel (collie_core::fused), the
        // same arithmetic as tensor operations otherwise.
        let (theta, m) = match collie_core::fused::kernels::<B>() {
            Some(k) if all_f32 => (k.lion)(theta, g, m, s),
            _ => lion_unfused(theta, g, m, s),
        };
        let step = self.slots.counters.get(path).copied().unwrap_or(0) + 1;
        self.slots.tensors.insert(path.to_string(), vec![m]);
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

/// One Lion step as tensor operations, in the order of the module docs: the reference of the
/// fused kernel (`collie_core::fused::FusedKernels::lion`) and the path of backends without it.
///
/// # Shapes
/// - theta, g, m: `[n]` → `(θ, m)`, each `[n]`
pub fn lion_unfused<B: Backend>(
    theta: Tensor<B, 1>,
    g: Tensor<B, 1>,
    m: Tensor<B, 1>,
    s: LionStep,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let theta = match s.decay {
        Some(decay) => theta.mul_scalar(decay),
        None => theta,
    };
    let c = m.clone().mul_scalar(s.b1) + g.clone().mul_scalar(s.one_minus_b1);
    let theta = theta - c.sign().mul_scalar(s.lr);
    let m = m.mul_scalar(s.b2) + g.mul_scalar(s.one_minus_b2);
    (theta, m)
}
