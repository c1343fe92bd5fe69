//! The update half of a training step, shared by every training loop here (the language-model
//! [`crate::Trainer`] and the UDR retriever): the optimizer `[optim]` names, the learning-rate
//! schedule `[sched]`, and global-norm clipping through the optimizer's own preparation
//! ([`collie_optim::Optimizer::prepare`]: PyTorch's coefficient, Adan's ε, SophiaG's batch size).

use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use collie_optim::schedule::Schedule;
use collie_optim::{AnyOptimizer, Optimizer, OptimizerState, StepInfo};

use crate::config::{OptimSection, SchedSection};
use crate::error::TrainError;
use crate::optimizer::build_optimizer;

/// Optimizer, schedule and clipping of a training run.
pub struct Update<B: Backend> {
    /// The optimizer with its state.
    pub optimizer: AnyOptimizer<B>,
    /// Learning rate of each step.
    pub schedule: Schedule,
    /// Peak learning rate (`optim.lr`).
    pub peak_lr: f64,
    /// Global-norm clipping threshold (0 = off).
    pub max_grad_norm: f64,
    /// SophiaG's `bs` when configured; otherwise each step's target count.
    pub batch_tokens: Option<f64>,
}

impl<B: Backend> Update<B> {
    /// The optimizer `optim` names with its reference defaults, `sched` over `total_steps`.
    pub fn new(
        optim: &OptimSection,
        sched: &SchedSection,
        max_grad_norm: f64,
        total_steps: u64,
    ) -> Self {
        Update {
            optimizer: build_optimizer(optim, max_grad_norm),
            schedule: Schedule {
                kind: sched.kind,
                warmup_steps: sched.warmup_steps,
                total_steps,
            },
            peak_lr: optim.lr,
            max_grad_norm,
            batch_tokens: optim.bs,
        }
    }

    /// Learning rate of optimizer step `step` (counted from 0).
    pub fn lr(&self, step: u64) -> f64 {
        self.schedule.lr(self.peak_lr, step)
    }

    /// What the optimizer learns before a step's updates: the unscaled gradient norm, the
    /// clipping threshold and the batch's size in targets (SophiaG's `bs`, unless configured).
    pub fn info(&self, grad_norm: f64, targets: usize) -> StepInfo {
        StepInfo {
            grad_norm,
            max_grad_norm: self.max_grad_norm,
            batch_tokens: self.batch_tokens.unwrap_or(targets as f64),
        }
    }

    /// One update of `model` from `grads` (which carry the loss multiplied by `loss_scale`):
    /// the optimizer's preparation gives the clipping coefficient, every gradient is multiplied
    /// by `coefficient / loss_scale` and the optimizer steps at learning rate `lr`.
    /// `grad_norm` is the unscaled gradient norm of the whole model.
    pub fn apply<AD, M>(
        &mut self,
        model: M,
        grads: &mut GradientsParams,
        grad_norm: f64,
        loss_scale: f64,
        targets: usize,
        lr: f64,
    ) -> M
    where
        AD: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AD>,
    {
        let clip = self.optimizer.prepare(&self.info(grad_norm, targets));
        let factor = match clip {
            None if loss_scale == 1.0 => None,
            c => Some(c.unwrap_or(1.0) / loss_scale),
        };
        collie_optim::apply(model, grads, &mut self.optimizer, lr, factor)
    }

    /// The optimizer's tensors and counters, for a checkpoint.
    pub fn state(&self) -> OptimizerState {
        self.optimizer.state()
    }

    /// [`Update::state`] copied to the host one tensor at a time (checkpoint writers).
    pub fn snapshot(&self) -> collie_optim::StateSnapshot<'_> {
        self.optimizer.snapshot()
    }

    /// Restores what [`Update::state`] saved.
    pub fn load_state(
        &mut self,
        state: OptimizerState,
        device: &B::Device,
    ) -> Result<(), TrainError> {
        self.optimizer.load_state(state, device)?;
        Ok(())
    }
}
