//! SophiaG (Liu et al. 2023, "Sophia: A Scalable Stochastic Second-order Optimizer"), with the
//! update of the official code (Liuhong99/Sophia `sophia.py`, packaged as `sophia-opt`, copied
//! into CoLLiE as `collie/optim/sophiag.py`):
//!
//! ```text
//! step:            θ ← θ·(1 − lr·wd)
//!                  m ← β1·m + (1 − β1)·g
//!                  θ ← θ − lr · sign(m) · min(1, |m| / (ρ·bs·h + 1e-15))
//! update_hessian:  h ← β2·h + (1 − β2)·ĝ²      (ĝ: gradient of the loss on labels sampled
//!                                              from the model, the Gauss-Newton-Bartlett estimator)
//! ```
//!
//! `bs` is the number of tokens behind the gradient (the paper's `B·ĝ²` estimator with the `B`
//! moved into the step, as the official code does). With `h = 0` (no refresh, as under CoLLiE's
//! trainer, which never calls `update_hessian`) the ratio saturates and the update is sign
//! momentum with decoupled decay. The trainer refreshes `h` every `hessian_interval` steps.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::state::{OptimizerState, Slots, StateError};
use crate::{DecayFilter, Optimizer};

/// SophiaG hyper-parameters (official defaults; lr 1e-4 is set by the config).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SophiaConfig {
    /// `(β1, β2)`: momentum and Hessian EMA decay.
    pub betas: (f64, f64),
    /// Clipping scale ρ.
    pub rho: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Which parameters decay.
    pub decay_filter: DecayFilter,
}

impl Default for SophiaConfig {
    fn default() -> Self {
        SophiaConfig {
            betas: (0.965, 0.99),
            rho: 0.04,
            weight_decay: 0.1,
            decay_filter: DecayFilter::All,
        }
    }
}

/// SophiaG with momentum and a diagonal Hessian estimate per parameter.
pub struct Sophia<B: Backend> {
    config: SophiaConfig,
    slots: Slots<B>,
    bs: f64,
    refreshing: bool,
}

const SLOTS: [&str; 2] = ["exp_avg", "hessian"];

impl<B: Backend> Sophia<B> {
    /// A fresh optimizer (`bs` = 5120, the official default, until [`Sophia::set_batch_tokens`]).
    pub fn new(config: SophiaConfig) -> Self {
        Sophia {
            config,
            slots: Slots::default(),
            bs: 5120.0,
            refreshing: false,
        }
    }

    /// The `bs` of the following steps: tokens behind one step's gradient.
    pub fn set_batch_tokens(&mut self, bs: f64) {
        self.bs = bs;
    }

    /// While on, [`Optimizer::update`] calls feed `update_hessian` (the gradient is the sampled-
    /// label gradient; the parameter is returned unchanged) instead of stepping.
    pub fn set_hessian_refresh(&mut self, on: bool) {
        self.refreshing = on;
    }

    fn slots_for(&mut self, path: &str, like: &Tensor<B, 1>) -> (Tensor<B, 1>, Tensor<B, 1>) {
        match self.slots.tensors.remove(path) {
            Some(mut s) => {
                let h = s.pop().expect("hessian");
                (s.pop().expect("exp_avg"), h)
            }
            None => (like.zeros_like(), like.zeros_like()),
        }
    }
}

impl<B: Backend> Optimizer<B> for Sophia<B> {
    /// SophiaG's clipping of the update depends on the batch's token count.
    fn prepare(&mut self, step: &crate::StepInfo) -> Option<f64> {
        self.bs = step.batch_tokens;
        (step.max_grad_norm > 0.0).then(|| {
            crate::clip::clip_coefficient(
                step.grad_norm,
                step.max_grad_norm,
                crate::clip::TORCH_CLIP_EPS,
            )
        })
    }

    fn update<const D: usize>(
        &mut self,
        path: &str,
        param: Tensor<B, D>,
        grad: Tensor<B, D>,
        lr: f64,
    ) -> Tensor<B, D> {
        let (b1, b2) = self.config.betas;
        let n = param.shape().num_elements();
        let g = grad.reshape([n]);
        let (m, h) = self.slots_for(path, &g);
        if self.refreshing {
            // update_hessian: h.mul_(β2).addcmul_(g, g, value = 1 − β2)
            let h = h.mul_scalar(b2) + (g.clone() * g).mul_scalar(1.0 - b2);
            self.slots.tensors.insert(path.to_string(), vec![m, h]);
            self.slots.counters.entry(path.to_string()).or_insert(0);
            return param;
        }
        let wd = self.config.decay_filter.rate(D, self.config.weight_decay);
        let shape = param.shape();
        let mut theta = param.reshape([n]);
        if wd != 0.0 {
            theta = theta.mul_scalar(1.0 - lr * wd);
        }
        let m = m.mul_scalar(b1) + g.mul_scalar(1.0 - b1);
        let ratio = (m.clone().abs()
            / h.clone()
                .mul_scalar(self.config.rho * self.bs)
                .add_scalar(1e-15))
        .clamp_max(1.0);
        let theta = theta - (m.clone().sign() * ratio).mul_scalar(lr);
        let step = self.slots.counters.get(path).copied().unwrap_or(0) + 1;
        self.slots.tensors.insert(path.to_string(), vec![m, h]);
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
