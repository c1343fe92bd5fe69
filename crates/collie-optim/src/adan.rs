//! Adan (Xie et al. 2022, "Adaptive Nesterov Momentum Algorithm"), with the update of the official
//! code (sail-sg/Adan, copied into CoLLiE as `collie/optim/adan.py`; the PyPI `adan-pytorch`
//! package uses another parameterization):
//!
//! ```text
//! g ← clip·g                                      (clip from the optional max_grad_norm)
//! Δ = g − g_prev                                  (zero at the first step: g_prev := g)
//! m ← β1·m + (1 − β1)·g        d ← β2·d + (1 − β2)·Δ
//! u = g + β2·Δ                 n ← β3·n + (1 − β3)·u²
//! den = sqrt(n)/sqrt(1 − β3ᵗ) + ε
//! θ ← θ − lr/(1 − β1ᵗ)·m/den − lr·β2/(1 − β2ᵗ)·d/den
//! θ ← θ / (1 + lr·wd)                             (proximal decay, default)
//!   or θ ← θ·(1 − lr·wd) before the step           (`no_prox`)
//! ```
//!
//! Burn 0.21 ships an Adan (`burn::optim::Adan`), but it is not used here: its hyper-parameters
//! are `f32` (β powers and step sizes are then rounded differently from the reference's double
//! arithmetic), it has no `max_grad_norm`, and its state is keyed by `ParamId`, while collie's
//! checkpoints key optimizer state by parameter path so it survives a reload of the weights.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::state::{OptimizerState, Slots, StateError};
use crate::{DecayFilter, Optimizer};

/// Adan hyper-parameters (reference defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdanConfig {
    /// `(β1, β2, β3)`.
    pub betas: (f64, f64, f64),
    /// Added to the denominator.
    pub eps: f64,
    /// Weight decay (proximal unless `no_prox`).
    pub weight_decay: f64,
    /// Decoupled (multiplicative) decay instead of the proximal division.
    pub no_prox: bool,
    /// Global gradient-norm bound, applied by Adan itself (`0` = off); see [`Adan::clip_coefficient`].
    pub max_grad_norm: f64,
    /// Which parameters decay.
    pub decay_filter: DecayFilter,
}

impl Default for AdanConfig {
    fn default() -> Self {
        AdanConfig {
            betas: (0.98, 0.92, 0.99),
            eps: 1e-8,
            weight_decay: 0.0,
            no_prox: false,
            max_grad_norm: 0.0,
            decay_filter: DecayFilter::All,
        }
    }
}

/// Adan with three moments and the previous gradient per parameter.
pub struct Adan<B: Backend> {
    config: AdanConfig,
    slots: Slots<B>,
    clip: f64,
}

const SLOTS: [&str; 4] = ["exp_avg", "exp_avg_sq", "exp_avg_diff", "neg_pre_grad"];

impl<B: Backend> Adan<B> {
    /// A fresh optimizer.
    pub fn new(config: AdanConfig) -> Self {
        Adan {
            config,
            slots: Slots::default(),
            clip: 1.0,
        }
    }

    /// The reference's clipping factor for a step whose gradients have global norm `norm`:
    /// `min(1, max_grad_norm / (norm + ε))`, or 1 when `max_grad_norm` is 0.
    pub fn clip_coefficient(&self, norm: f64) -> f64 {
        if self.config.max_grad_norm > 0.0 {
            crate::clip::clip_coefficient(norm, self.config.max_grad_norm, self.config.eps)
        } else {
            1.0
        }
    }

    /// Sets the clipping factor used by the following updates (one step).
    pub fn set_clip(&mut self, clip: f64) {
        self.clip = clip;
    }
}

impl<B: Backend> Optimizer<B> for Adan<B> {
    /// Adan clips inside its update with its own coefficient (ε instead of 1e-6), as the
    /// reference does.
    fn prepare(&mut self, step: &crate::StepInfo) -> Option<f64> {
        self.clip = self.clip_coefficient(step.grad_norm);
        None
    }

    fn update<const D: usize>(
        &mut self,
        path: &str,
        param: Tensor<B, D>,
        grad: Tensor<B, D>,
        lr: f64,
    ) -> Tensor<B, D> {
        let AdanConfig {
            betas: (b1, b2, b3),
            eps,
            no_prox,
            ..
        } = self.config;
        let wd = self.config.decay_filter.rate(D, self.config.weight_decay);
        let shape = param.shape();
        let n = shape.num_elements();
        let raw = grad.reshape([n]);
        let step = self.slots.counters.get(path).copied().unwrap_or(0) + 1;
        let (m, v, d, neg_prev) = match self.slots.tensors.remove(path) {
            Some(mut s) if step > 1 => {
                let neg_prev = s.pop().expect("neg_pre_grad");
                let d = s.pop().expect("exp_avg_diff");
                let v = s.pop().expect("exp_avg_sq");
                (s.pop().expect("exp_avg"), v, d, neg_prev)
            }
            // First step: the previous gradient is this one, so the difference is zero.
            _ => (
                raw.zeros_like(),
                raw.zeros_like(),
                raw.zeros_like(),
                raw.clone().mul_scalar(-self.clip),
            ),
        };
        let g = raw.mul_scalar(self.clip);
        let diff = neg_prev + g.clone();
        let m = m.mul_scalar(b1) + g.clone().mul_scalar(1.0 - b1);
        let d = d.mul_scalar(b2) + diff.clone().mul_scalar(1.0 - b2);
        let u = diff.mul_scalar(b2) + g.clone();
        let v = v.mul_scalar(b3) + (u.clone() * u).mul_scalar(1.0 - b3);
        let bc1 = 1.0 - b1.powi(step as i32);
        let bc2 = 1.0 - b2.powi(step as i32);
        let bc3_sqrt = (1.0 - b3.powi(step as i32)).sqrt();
        let den = v.clone().sqrt().div_scalar(bc3_sqrt).add_scalar(eps);
        let mut theta = param.reshape([n]);
        if no_prox && wd != 0.0 {
            theta = theta.mul_scalar(1.0 - lr * wd);
        }
        theta = theta - (m.clone() / den.clone()).mul_scalar(lr / bc1);
        theta = theta - (d.clone() / den).mul_scalar(lr * b2 / bc2);
        if !no_prox && wd != 0.0 {
            theta = theta.div_scalar(1.0 + lr * wd);
        }
        self.slots
            .tensors
            .insert(path.to_string(), vec![m, v, d, g.neg()]);
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
