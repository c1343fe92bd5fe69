//! Optimizers, learning-rate schedules and gradient clipping.
//!
//! Optimizers update one named parameter at a time ([`Optimizer::update`]) on the inner
//! (non-autodiff) backend and keep their state by parameter *path*, so the state survives a
//! checkpoint whose weights are reloaded into a freshly built model. [`apply`] walks a model and
//! feeds each parameter with its gradient; [`clip::clip_global_norm`] scales all gradients first.
//!
//! - [`adamw`]: `torch.optim.AdamW`. - [`sgd`]: `torch.optim.SGD`. - [`lion`]: Lion.
//! - [`adan`]: Adan. - [`sophia`]: SophiaG (+ Hessian refresh input).
//! - [`lomo`], [`adalomo`]: the per-parameter arithmetic of the fused optimizers; the trainer runs
//!   them inside its block-wise backward pass.
//! - [`schedule`]: transformers' `get_{constant,linear,cosine}_schedule_with_warmup`.

pub mod adalomo;
pub mod adamw;
pub mod adan;
pub mod clip;
pub mod lion;
pub mod lomo;
pub mod schedule;
pub mod sgd;
pub mod sophia;
mod state;

use burn::module::{AutodiffModule, ModuleMapper, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;

pub use adalomo::{AdaLomo, AdaLomoConfig};
pub use adamw::{AdamW, AdamWConfig};
pub use adan::{Adan, AdanConfig};
pub use lion::{Lion, LionConfig};
pub use lomo::{FusedGrad, Lomo, LomoConfig};
pub use sgd::{Sgd, SgdConfig};
pub use sophia::{Sophia, SophiaConfig};
pub use state::{OptimizerState, StateError, StateSnapshot};

/// Which parameters weight decay applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecayFilter {
    /// Every parameter (PyTorch's default for one parameter group).
    #[default]
    All,
    /// Matrices only (rank ≥ 2): norms and biases do not decay.
    Matrices,
}

impl DecayFilter {
    /// The decay rate of a parameter of rank `rank`.
    pub fn rate(self, rank: usize, weight_decay: f64) -> f64 {
        match self {
            DecayFilter::Matrices if rank < 2 => 0.0,
            _ => weight_decay,
        }
    }
}

/// What an optimizer learns about a step before its updates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepInfo {
    /// Global norm of the (unscaled) gradients.
    pub grad_norm: f64,
    /// Global-norm clipping threshold (`0` = off).
    pub max_grad_norm: f64,
    /// Tokens of the step's batch (SophiaG's `bs`).
    pub batch_tokens: f64,
}

/// An optimizer over named parameters.
pub trait Optimizer<B: Backend> {
    /// Prepares this step's updates; returns the factor the caller multiplies every gradient by
    /// before [`Optimizer::update`] (PyTorch's clipping coefficient, `None` when not clipping).
    /// Optimizers that clip their own way (Adan's ε, the fused optimizers inside the backward
    /// pass) take the norm here and return `None`.
    fn prepare(&mut self, step: &StepInfo) -> Option<f64> {
        (step.max_grad_norm > 0.0).then(|| {
            clip::clip_coefficient(step.grad_norm, step.max_grad_norm, clip::TORCH_CLIP_EPS)
        })
    }

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

    /// [`Optimizer::state`] copied to the host one tensor at a time, as a writer asks.
    fn snapshot(&self) -> StateSnapshot<'_> {
        self.state().into()
    }

    /// Restores [`Optimizer::state`] onto `device`.
    fn load_state(&mut self, state: OptimizerState, device: &B::Device) -> Result<(), StateError>;
}

struct Apply<'a, B: AutodiffBackend, O> {
    optimizer: &'a mut O,
    grads: &'a mut GradientsParams,
    lr: f64,
    scale: Option<f64>,
    path: Vec<String>,
    prefix: &'a str,
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
        let mut path = self.prefix.to_string();
        for part in &self.path {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(part);
        }
        let updated = self.optimizer.update(&path, tensor.inner(), grad, self.lr);
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
    apply_at("", model, grads, optimizer, lr, grad_scale)
}

/// [`apply`] to a sub-module found at `prefix` in the whole model (e.g. `layers.3`), so that
/// state keys are the parameters' full paths; the block-wise backward updates one block at a time.
pub fn apply_at<B: AutodiffBackend, M: AutodiffModule<B>, O: Optimizer<B::InnerBackend>>(
    prefix: &str,
    module: M,
    grads: &mut GradientsParams,
    optimizer: &mut O,
    lr: f64,
    grad_scale: Option<f64>,
) -> M {
    module.map(&mut Apply {
        optimizer,
        grads,
        lr,
        scale: grad_scale,
        path: Vec::new(),
        prefix,
        _b: std::marker::PhantomData,
    })
}

/// The optimizers a config can name (`[optim] name = ...`).
pub enum AnyOptimizer<B: Backend> {
    /// `adamw`.
    AdamW(AdamW<B>),
    /// `sgd`.
    Sgd(Sgd<B>),
    /// `lion`.
    Lion(Lion<B>),
    /// `adan`.
    Adan(Adan<B>),
    /// `sophiag`.
    Sophia(Sophia<B>),
    /// `lomo` (fused: runs inside the block-wise backward).
    Lomo(Lomo),
    /// `adalomo` (fused).
    AdaLomo(AdaLomo<B>),
}

macro_rules! each {
    ($self:expr, $o:ident => $e:expr) => {
        match $self {
            AnyOptimizer::AdamW($o) => $e,
            AnyOptimizer::Sgd($o) => $e,
            AnyOptimizer::Lion($o) => $e,
            AnyOptimizer::Adan($o) => $e,
            AnyOptimizer::Sophia($o) => $e,
            AnyOptimizer::Lomo($o) => $e,
            AnyOptimizer::AdaLomo($o) => $e,
        }
    };
}

impl<B: Backend> AnyOptimizer<B> {
    /// The unscale/clip settings of a fused optimizer (LOMO, AdaLomo); `None` for the others,
    /// which update after the whole backward pass.
    pub fn fused(&mut self) -> Option<&mut FusedGrad> {
        match self {
            AnyOptimizer::Lomo(o) => Some(&mut o.fused),
            AnyOptimizer::AdaLomo(o) => Some(&mut o.fused),
            _ => None,
        }
    }

    /// The loss scale an optimizer applies whatever the compute dtype (AdaLomo's static `S`; the
    /// trainer's f16 dynamic scale otherwise).
    pub fn static_loss_scale(&self) -> Option<f64> {
        match self {
            AnyOptimizer::AdaLomo(o) => Some(o.static_loss_scale()),
            _ => None,
        }
    }

    /// Whether this optimizer updates inside the backward pass.
    pub fn is_fused(&self) -> bool {
        matches!(self, AnyOptimizer::Lomo(_) | AnyOptimizer::AdaLomo(_))
    }
}

impl<B: Backend> Optimizer<B> for AnyOptimizer<B> {
    fn prepare(&mut self, step: &StepInfo) -> Option<f64> {
        each!(self, o => Optimizer::<B>::prepare(o, step))
    }

    fn update<const D: usize>(
        &mut self,
        path: &str,
        param: Tensor<B, D>,
        grad: Tensor<B, D>,
        lr: f64,
    ) -> Tensor<B, D> {
        each!(self, o => o.update(path, param, grad, lr))
    }

    fn state(&self) -> OptimizerState {
        each!(self, o => Optimizer::<B>::state(o))
    }

    fn snapshot(&self) -> StateSnapshot<'_> {
        each!(self, o => Optimizer::<B>::snapshot(o))
    }

    fn load_state(&mut self, state: OptimizerState, device: &B::Device) -> Result<(), StateError> {
        each!(self, o => Optimizer::<B>::load_state(o, state, device))
    }
}
