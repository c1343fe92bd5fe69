//! LOMO (Lv et al. 2023, "Full Parameter Fine-tuning for Large Language Models with Limited
//! Resources"), with the update of the official `lomo-optim` package (`Lomo.fuse_update`):
//!
//! ```text
//! ĝ = g / S                                   (S: the loss scale, 1 without one)
//! ĝ ← clamp(ĝ, −v, v)                         (clip_grad_value v > 0)
//! ĝ ← c·ĝ,  c = min(1, clip / (‖ĝ‖ + 1e-6))   (clip_grad_norm, ‖ĝ‖ over all parameters,
//!                                              from a first backward pass that only measures)
//! θ ← θ·(1 − lr·wd) − lr·ĝ
//! ```
//!
//! LOMO keeps no state. What makes it LOMO is *when* this runs: inside the backward pass, as soon
//! as a parameter's gradient exists, which the trainer's block-wise backward provides
//! (`collie_train::blockwise`); this type is only the per-parameter arithmetic.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::state::{OptimizerState, StateError};
use crate::{DecayFilter, Optimizer};

/// LOMO hyper-parameters (lomo-optim defaults: no clipping, no decay; lr is set by the config).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct LomoConfig {
    /// Element-wise gradient bound (`0` = off).
    pub clip_grad_value: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Which parameters decay.
    pub decay_filter: DecayFilter,
}

/// What one fused step divides and scales gradients by: set before the updating backward pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FusedGrad {
    /// The loss was multiplied by this before backward; gradients are divided by it.
    pub loss_scale: f64,
    /// Element-wise bound (`0` = off), applied before `clip_coef`.
    pub clip_value: f64,
    /// Global-norm coefficient from the measuring pass, if clipping by norm.
    pub clip_coef: Option<f64>,
}

impl Default for FusedGrad {
    fn default() -> Self {
        FusedGrad {
            loss_scale: 1.0,
            clip_value: 0.0,
            clip_coef: None,
        }
    }
}

impl FusedGrad {
    /// The global-norm clipping coefficient of a step (`None` when not clipping by norm).
    pub fn coefficient(&self, step: &crate::StepInfo) -> Option<f64> {
        (step.max_grad_norm > 0.0).then(|| {
            crate::clip::clip_coefficient(
                step.grad_norm,
                step.max_grad_norm,
                crate::clip::TORCH_CLIP_EPS,
            )
        })
    }

    /// The gradient LOMO/AdaLomo update with: unscaled, value-clipped, norm-clipped, in that order.
    pub fn apply<B: Backend, const D: usize>(&self, g: Tensor<B, D>) -> Tensor<B, D> {
        let mut g = if self.loss_scale != 1.0 {
            g.div_scalar(self.loss_scale)
        } else {
            g
        };
        if self.clip_value > 0.0 {
            g = g.clamp(-self.clip_value, self.clip_value);
        }
        if let Some(c) = self.clip_coef {
            g = g.mul_scalar(c);
        }
        g
    }
}

/// LOMO: SGD applied during the backward pass.
pub struct Lomo {
    config: LomoConfig,
    /// How this step's gradients are unscaled and clipped.
    pub fused: FusedGrad,
}

impl Lomo {
    /// A fresh optimizer.
    pub fn new(config: LomoConfig) -> Self {
        Lomo {
            fused: FusedGrad {
                clip_value: config.clip_grad_value,
                ..FusedGrad::default()
            },
            config,
        }
    }
}

impl<B: Backend> Optimizer<B> for Lomo {
    /// LOMO clips inside the block-wise backward: the coefficient of the measuring pass's norm.
    fn prepare(&mut self, step: &crate::StepInfo) -> Option<f64> {
        self.fused.clip_coef = self.fused.coefficient(step);
        None
    }

    fn update<const D: usize>(
        &mut self,
        _path: &str,
        param: Tensor<B, D>,
        grad: Tensor<B, D>,
        lr: f64,
    ) -> Tensor<B, D> {
        let g = self.fused.apply(grad);
        let wd = self.config.decay_filter.rate(D, self.config.weight_decay);
        let theta = if wd > 0.0 {
            param.mul_scalar(1.0 - lr * wd)
        } else {
            param
        };
        theta - g.mul_scalar(lr)
    }

    fn state(&self) -> OptimizerState {
        OptimizerState::default()
    }

    fn load_state(&mut self, state: OptimizerState, _device: &B::Device) -> Result<(), StateError> {
        match state.tensors.keys().next() {
            Some(k) => Err(StateError(format!(
                "unexpected tensor `{k}` (LOMO keeps no state; another optimizer's checkpoint?)"
            ))),
            None => Ok(()),
        }
    }
}
