//! Optimizers, learning-rate schedules and gradient clipping.
//!
//! Optimizers update one named parameter at a time ([`Optimizer::update`]) on the inner
//! (non-autodiff) backend and keep their state by parameter *path*, so the state survives a
//! checkpoint whose weights are reloaded into a freshly built model. [`apply`] walks a model and
//! feeds each parameter with its gradient; [`clip::clip_global_norm`] scales all gradients first.
//!
//! - [`adamw`]: `torch.optim.AdamW`. - [`sgd`]: `torch.optim.SGD`.
//! - [`schedule`]: transformers' `get_{constant,linear,cosine}_schedule_with_warmup`.

pub mod adamw;
pub mod clip;
pub mod schedule;
pub mod sgd;
mod state;

use burn::module::{AutodiffModule, ModuleMapper, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;

pub use adamw::{AdamW, AdamWConfig};
pub use sgd::{Sgd, SgdConfig};
pub use state::{OptimizerState, StateError};

/// An optimizer over named parameters.
pub trait Optimizer<B: Backend> {
    /// Returns the updated parameter. `path` identifies it (e.g. `layers.0.attn.q_proj.weight`);
    /// `lr` is this step's learning rate.
    fn update<const D: usize>(
        &mut self,
        path: &str,
        param: Tensor<B, D>,
        grad: Tensor<B, D>,
        lr: f64,
    ) -> Tensor<B, D>;

    /// Everything needed to continue exactly: per-parameter tensors and counters.
    fn state(&self) -> OptimizerState;

    /// Restores [`Optimizer::state`] onto `device`.
    fn load_state(&mut self, state: OptimizerState, device: &B::Device) -> Result<(), StateError>;
}

struct Apply<'a, B: AutodiffBackend, O> {
    optimizer: &'a mut O,
    grads: &'a mut GradientsParams,
    lr: f64,
    scale: Option<f64>,
    path: Vec<String>,
    _b: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend, O: Optimizer<B::InnerBackend>> ModuleMapper<B> for Apply<'_, B, O> {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<B::InnerBackend, D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let grad = match self.scale {
            Some(s) => grad.mul_scalar(s),
            None => grad,
        };
        let require_grad = tensor.is_require_grad();
        let updated = self
            .optimizer
            .update(&self.path.join("."), tensor.inner(), grad, self.lr);
        let mut tensor = Tensor::from_inner(updated);
        if require_grad {
            tensor = tensor.require_grad();
        }
        Param::from_mapped_value(id, tensor, mapper)
    }
}

/// One optimizer step: every parameter of `model` that has a gradient in `grads` is updated
/// (gradients first multiplied by `grad_scale` when given, e.g. the clipping coefficient).
pub fn apply<B: AutodiffBackend, M: AutodiffModule<B>, O: Optimizer<B::InnerBackend>>(
    model: M,
    grads: &mut GradientsParams,
    optimizer: &mut O,
    lr: f64,
    grad_scale: Option<f64>,
) -> M {
    model.map(&mut Apply {
        optimizer,
        grads,
        lr,
        scale: grad_scale,
        path: Vec::new(),
        _b: std::marker::PhantomData,
    })
}

/// The optimizers a config can name (`[optim] name = ...`).
pub enum AnyOptimizer<B: Backend> {
    /// `adamw`.
    AdamW(AdamW<B>),
    /// `sgd`.
    Sgd(Sgd<B>),
}

impl<B: Backend> Optimizer<B> for AnyOptimizer<B> {
    fn update<const D: usize>(
        &mut self,
        path: &str,
        param: Tensor<B, D>,
        grad: Tensor<B, D>,
        lr: f64,
    ) -> Tensor<B, D> {
        match self {
            AnyOptimizer::AdamW(o) => o.update(path, param, grad, lr),
            AnyOptimizer::Sgd(o) => o.update(path, param, grad, lr),
        }
    }

    fn state(&self) -> OptimizerState {
        match self {
            AnyOptimizer::AdamW(o) => o.state(),
            AnyOptimizer::Sgd(o) => o.state(),
        }
    }

    fn load_state(&mut self, state: OptimizerState, device: &B::Device) -> Result<(), StateError> {
        match self {
            AnyOptimizer::AdamW(o) => o.load_state(state, device),
            AnyOptimizer::Sgd(o) => o.load_state(state, device),
        }
    }
}
