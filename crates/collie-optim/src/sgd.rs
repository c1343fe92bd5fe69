//! SGD with `torch.optim.SGD`'s semantics: L2 weight decay added to the gradient, then
//! momentum with dampening (the first step stores the gradient as the buffer), optional Nesterov.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::state::{OptimizerState, Slots, StateError};
use crate::Optimizer;

/// SGD hyper-parameters (PyTorch defaults: all zero / off).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct SgdConfig {
    /// Momentum factor (0 = plain SGD).
    pub momentum: f64,
    /// Dampening of the momentum.
    pub dampening: f64,
    /// L2 penalty added to the gradient.
    pub weight_decay: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// Which parameters decay.
    pub decay_filter: crate::DecayFilter,
}

/// SGD with an optional momentum buffer per parameter.
pub struct Sgd<B: Backend> {
    config: SgdConfig,
    slots: Slots<B>,
}

impl<B: Backend> Sgd<B> {
    /// A fresh optimizer.
    pub fn new(config: SgdConfig) -> Self {
        Sgd {
            config,
            slots: Slots::default(),
        }
    }

    fn slot_names(&self) -> &'static [&'static str] {
        if self.config.momentum != 0.0 {
            &["momentum_buffer"]
        } else {
            &[]
        }
    }
}

impl<B: Backend> Optimizer<B> for Sgd<B> {
    fn update<const D: usize>(
        &mut self,
        path: &str,
        param: Tensor<B, D>,
        grad: Tensor<B, D>,
        lr: f64,
    ) -> Tensor<B, D> {
        let SgdConfig {
            momentum,
            dampening,
            weight_decay,
            nesterov,
            decay_filter,
        } = self.config;
        let weight_decay = decay_filter.rate(D, weight_decay);
        let shape = param.shape();
        let n = shape.num_elements();
        let theta = param.reshape([n]);
        let mut g = grad.reshape([n]);
        if weight_decay != 0.0 {
            g = g + theta.clone().mul_scalar(weight_decay);
        }
        if momentum != 0.0 {
            let buf = match self.slots.tensors.remove(path).and_then(|mut s| s.pop()) {
                Some(b) => b.mul_scalar(momentum) + g.clone().mul_scalar(1.0 - dampening),
                None => g.clone(),
            };
            g = if nesterov {
                g + buf.clone().mul_scalar(momentum)
            } else {
                buf.clone()
            };
            self.slots.tensors.insert(path.to_string(), vec![buf]);
        }
        let step = self.slots.counters.get(path).copied().unwrap_or(0) + 1;
        self.slots.counters.insert(path.to_string(), step);
        (theta - g.mul_scalar(lr)).reshape(shape)
    }

    fn state(&self) -> OptimizerState {
        self.slots.export(self.slot_names())
    }

    fn snapshot(&self) -> crate::StateSnapshot<'_> {
        self.slots.snapshot(self.slot_names())
    }

    fn load_state(&mut self, state: OptimizerState, device: &B::Device) -> Result<(), StateError> {
        self.slots = Slots::import(state, self.slot_names(), device)?;
        Ok(())
    }
}
