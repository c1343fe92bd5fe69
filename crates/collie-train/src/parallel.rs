//! The trainer's side of parallelism:
//!
//! - optimizer state across tensor-parallel ranks: per-parameter state has its parameter's
//!   shape, so it is split exactly as the parameter is (`collie_core::tp`); checkpoints store
//!   each rank's piece with the layout that joins them, so a resume at any layout reads the
//!   whole state;
//! - where the parameters are spread (ZeRO-3's replicas, a pipeline's stages): the plans, the
//!   release of the others' share at load, and the whole or streamed model of forward-only
//!   passes;
//! - the reduction of one block's gradients inside the block-wise walk.

use std::collections::{BTreeMap, HashMap};

use burn::module::{AutodiffModule, Module, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use collie_core::model::LmHead;
use collie_dist::dp::all_reduce_grads;
use collie_dist::zero::ZeroPlan;
use collie_dist::Dist;
use collie_io::family::TrainModel;
use collie_io::HostTensor;
use collie_optim::OptimizerState;

use crate::blockwise::{BlockId, Gather};
use crate::config::TrainConfig;
use crate::error::TrainError;
use crate::streamed::Streamed;
use crate::trainer::Trainer;

/// How a parameter is split across tensor-parallel ranks: the dimension, and the number of
/// parts of it that are split each on its own (`collie_core::tp::Split`).
pub type SplitDim = (usize, usize);

/// Path (as optimizer state names it) → (split, this rank's shape) of every split parameter of
/// `model`.
pub fn split_paths<B: Backend, M: Module<B>>(
    model: &M,
    split: &HashMap<ParamId, SplitDim>,
) -> HashMap<String, (SplitDim, Vec<usize>)> {
    crate::checkpoint::params_by_path(model)
        .into_iter()
        .filter_map(|(path, p)| split.get(&p.id).map(|&dim| (path, (dim, p.shape))))
        .collect()
}

/// The parameter path of a state key `"{path}.{slot}"` that `paths` knows.
fn param_of<'a, T>(key: &'a str, paths: &'a HashMap<String, T>) -> Option<&'a T> {
    let (path, _slot) = key.rsplit_once('.')?;
    paths.get(path)
}

/// The whole state (as a checkpoint holds it) → this tp rank's part.
pub fn split_state(
    state: OptimizerState,
    paths: &HashMap<String, (SplitDim, Vec<usize>)>,
    rank: usize,
    tp: usize,
) -> Result<OptimizerState, TrainError> {
    let mut tensors = BTreeMap::new();
    for (key, t) in state.tensors {
        let Some((dim, local)) = param_of(&key, paths) else {
            tensors.insert(key, t);
            continue;
        };
        let n: usize = local.iter().product();
        if t.data.len() != n * tp {
            return Err(TrainError::Resume(format!(
                "optimizer state `{key}` has {} values; the parameter has {}",
                t.data.len(),
                n * tp
            )));
        }
        let part = collie_core::dist::split_block(&t.data, local, *dim, rank, tp);
        tensors.insert(key, HostTensor::new(vec![n], part));
    }
    Ok(OptimizerState {
        tensors,
        counters: state.counters,
    })
}

impl<B: AutodiffBackend, M: TrainModel<B>> Trainer<B, M> {
    /// The ZeRO-3 plan, when parameters are partitioned over the replicas.
    pub(crate) fn zero3(&self) -> Option<&ZeroPlan> {
        self.zero.as_ref().filter(|p| p.stage >= 3)
    }

    /// Where the block-wise walk gets whole blocks from under ZeRO-3.
    pub(crate) fn gather(&self) -> Option<Gather<'_>> {
        self.zero3().map(|plan| Gather {
            plan,
            group: &*self.dist.dp,
        })
    }

    /// The whole model for a forward-only use (evaluation, sampling, export): under ZeRO-3
    /// every parameter gathered from its owner, under pipeline parallelism every block from
    /// its stage (a collective over the data-parallel or the pipeline group: every member
    /// calls it); otherwise the model as it is. [`Trainer::model`] itself holds only this
    /// rank's share there.
    pub fn whole_model(&self) -> M {
        match self.spread() {
            Some(g) => g.plan.gather(self.model.clone(), g.group, &self.device),
            None => self.model.clone(),
        }
    }

    /// Where the parameters are spread over a group — ZeRO-3's replicas, a pipeline's stages —
    /// the plan and the group a block is gathered from; `None` where this rank holds them all.
    pub(crate) fn spread(&self) -> Option<Gather<'_>> {
        match (self.zero3(), &self.stage_plan) {
            (Some(plan), _) => Some(Gather {
                plan,
                group: &*self.dist.dp,
            }),
            (None, Some(plan)) => Some(Gather {
                plan,
                group: &*self.dist.pp,
            }),
            (None, None) => None,
        }
    }

    /// The forward-only model of evaluation and sampling where the parameters are spread: each
    /// block gathered as the pass reaches it ([`Streamed`]). `None` where this rank holds them
    /// all, or where the model carries virtual tokens, which [`Streamed`] does not run (then
    /// [`Trainer::whole_model`] gathers the model whole).
    pub(crate) fn streamed(&self) -> Option<Streamed<'_, B::InnerBackend, M::Inner>> {
        if self.model.virtual_tokens().is_some() {
            return None;
        }
        self.spread()
            .map(|g| Streamed::new(self.model.valid(), g, self.device.clone()))
    }
}

/// Stage-local storage of a pipeline: each parameter owned by the stage that trains it
/// ([`crate::pipeline::stage_owners`]); the last stage also keeps the table a tied head reads.
pub(crate) fn stage_plan<B: AutodiffBackend, M: TrainModel<B>>(
    model: &M,
    stage: &crate::pipeline::Stage,
    stages: &[std::ops::Range<usize>],
    dist: &Dist,
) -> ZeroPlan {
    let owners = crate::pipeline::stage_owners(model, stages);
    let keep = match stage.last() && model.head().is_tied() {
        true => crate::checkpoint::param_ids(model.embed()),
        false => Default::default(),
    };
    ZeroPlan::with_owners(model, &*dist.pp, &owners, keep)
}

/// `model` holding only this rank's share where ZeRO-3 or a pipeline spreads the parameters
/// ([`ZeroPlan::release`]); as it is otherwise.
pub(crate) fn release_spread<B: AutodiffBackend, M: TrainModel<B>>(
    zero: &mut Option<ZeroPlan>,
    stage_plan: &mut Option<ZeroPlan>,
    model: M,
) -> M {
    match (zero.as_mut().filter(|p| p.stage >= 3), stage_plan.as_mut()) {
        (Some(plan), _) | (None, Some(plan)) => plan.release(model),
        (None, None) => model,
    }
}

/// The ZeRO plan of `parallel.zero` (none at stage 0 or with one replica; the combinations it
/// cannot serve are refused when the config is validated).
pub(crate) fn zero_plan<B: AutodiffBackend, M: TrainModel<B>>(
    config: &TrainConfig,
    model: &M,
    dist: &Dist,
) -> Option<ZeroPlan> {
    match config.parallel.zero {
        0 => None,
        _ if dist.dims.dp == 1 => None,
        stage => Some(ZeroPlan::new(model, stage, &*dist.dp)),
    }
}

/// Sums one block's gradients over the data-parallel group inside the block-wise walk (LOMO's
/// fused update, activation checkpointing): all-reduced, or under ZeRO-3 reduced onto their
/// owners ([`ZeroPlan::reduce_block`]).
pub(crate) fn reduce_block<B: AutodiffBackend, M: TrainModel<B>>(
    model: &M,
    block: BlockId,
    grads: &mut GradientsParams,
    dp: &dyn collie_core::dist::Collectives,
    zero3: Option<&ZeroPlan>,
    device: &B::Device,
) {
    fn reduce<B: AutodiffBackend, T: AutodiffModule<B>>(
        module: &T,
        grads: &mut GradientsParams,
        dp: &dyn collie_core::dist::Collectives,
        zero3: Option<&ZeroPlan>,
        device: &B::Device,
    ) {
        match zero3 {
            Some(plan) => plan.reduce_block(module, grads, dp, device),
            None => all_reduce_grads(module, grads, dp, device),
        }
    }
    match block {
        BlockId::Head => reduce(model.head(), grads, dp, zero3, device),
        BlockId::Layer(i) => reduce(&model.layers()[i], grads, dp, zero3, device),
        BlockId::Embed => {
            reduce(model.embed(), grads, dp, zero3, device);
            reduce(&model.virtual_tokens().cloned(), grads, dp, zero3, device);
        }
    }
}
