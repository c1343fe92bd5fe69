//! The trainer's side of parallelism:
//!
//! - optimizer state across tensor-parallel ranks: per-parameter state has its parameter's
//!   shape, so it is split exactly as the parameter is (`collie_core::tp`); checkpoints store
//!   each rank's piece with the layout that joins them, so a resume at any layout reads the
//!   whole state;
//! - where the parameters are spread (ZeRO-3's replicas, a pipeline's stages): the plans, the
//!   release of the others' share at load, and the whole or streamed model of forward-only
//!   passes;
//! - the reductions of the blocks' gradients inside the block-wise walk, overlapped with the
//!   backward of the next blocks ([`Overlap`]).

use std::collections::{BTreeMap, HashMap, VecDeque};

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use collie_core::model::LmHead;
use collie_dist::dp::{start_all_reduce_grads, Reduction};
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
/// ([`crate::pipeline::stage_owners`]); where the first stage owns a tied table, the last also
/// keeps it for the head.
pub(crate) fn stage_plan<B: AutodiffBackend, M: TrainModel<B>>(
    model: &M,
    stage: &crate::pipeline::Stage,
    stages: &[std::ops::Range<usize>],
    dist: &Dist,
) -> ZeroPlan {
    let owners = crate::pipeline::stage_owners(model, stages, stage.rows_from_last);
    let keep = match stage.last() && model.head().is_tied() && !stage.rows_from_last {
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

/// Blocks whose gradient sums may be in flight at once inside the backward walk
/// (`parallel.overlap`): block `i`'s reduction travels while the walk computes the next block's
/// backward, and is waited for when that block leaves the walk (or at the walk's end), unless it
/// has arrived before. Each block in flight costs its gradients' host buffer and MPI's temporary
/// of the same size on the ranks that forward partial sums: one keeps ZeRO-3's peak per rank
/// within a few percent of blocking reductions' (docs/parallelism.md, "Memory per rank").
const IN_FLIGHT_BLOCKS: usize = 1;

/// The gradient reductions of one backward walk over the data-parallel group: each block's sum
/// starts as the walk leaves the block, with a non-blocking collective (an all-reduce; onto the
/// owners under ZeRO), and is waited for [`IN_FLIGHT_BLOCKS`] block later.
pub(crate) struct Overlap<'a, B: AutodiffBackend> {
    dp: &'a dyn collie_core::dist::Collectives,
    zero: Option<&'a ZeroPlan>,
    device: &'a B::Device,
    /// Reductions left in flight after a push ([`IN_FLIGHT_BLOCKS`], 0 without overlap).
    depth: usize,
    /// Started reductions, oldest first, with the gradients they do not carry.
    queue: VecDeque<(BlockId, GradientsParams, Reduction)>,
}

impl<'a, B: AutodiffBackend> Overlap<'a, B> {
    /// Reductions over `dp`: all-reduces, or sums onto the owners of `zero`'s plan; with
    /// `overlap` false, each is waited for as soon as it starts.
    pub(crate) fn new(
        dp: &'a dyn collie_core::dist::Collectives,
        zero: Option<&'a ZeroPlan>,
        overlap: bool,
        device: &'a B::Device,
    ) -> Self {
        Self {
            dp,
            zero,
            device,
            depth: if overlap { IN_FLIGHT_BLOCKS } else { 0 },
            queue: VecDeque::new(),
        }
    }

    /// Starts the sum of `block`'s gradients (`model`'s block) and returns the blocks whose sums
    /// are due or have arrived, oldest first, each with its summed gradients.
    pub(crate) fn push<M: TrainModel<B>>(
        &mut self,
        model: &M,
        block: BlockId,
        mut grads: GradientsParams,
    ) -> Vec<(BlockId, GradientsParams)> {
        fn start<B: AutodiffBackend, T: AutodiffModule<B>>(
            module: &T,
            grads: &mut GradientsParams,
            (dp, zero, blocking): (&dyn collie_core::dist::Collectives, Option<&ZeroPlan>, bool),
        ) -> Reduction {
            match zero {
                Some(plan) => plan.start_reduce_block(module, grads, dp, blocking),
                None => start_all_reduce_grads(module, grads, dp, blocking),
            }
        }
        // The embedding is the walk's last block: nothing is left to overlap its sum with.
        let blocking = self.depth == 0 || block == BlockId::Embed;
        let how = (self.dp, self.zero, blocking);
        let started = match block {
            BlockId::Head => start(model.head(), &mut grads, how),
            BlockId::Layer(i) => start(&model.layers()[i], &mut grads, how),
            BlockId::Embed => {
                // Prompt learning's virtual tokens belong to the embedding block.
                let mut r = start(model.embed(), &mut grads, how);
                r.merge(start(&model.virtual_tokens().cloned(), &mut grads, how));
                r
            }
        };
        self.queue.push_back((block, grads, started));
        // The oldest beyond the depth are waited for; any other that has arrived is taken too,
        // which frees its buffers (and MPI's) at once.
        let due = self.queue.len().saturating_sub(self.depth);
        let mut done = Vec::new();
        let mut waiting = VecDeque::new();
        for (i, (block, mut grads, mut r)) in self.queue.drain(..).enumerate() {
            if i < due || r.progress() {
                r.finish::<B>(&mut grads, self.device);
                done.push((block, grads));
            } else {
                waiting.push_back((block, grads, r));
            }
        }
        self.queue = waiting;
        done
    }

    /// Waits for every reduction still in flight: the remaining blocks, oldest first.
    pub(crate) fn finish(self) -> Vec<(BlockId, GradientsParams)> {
        self.queue
            .into_iter()
            .map(|(block, mut grads, r)| {
                r.finish::<B>(&mut grads, self.device);
                (block, grads)
            })
            .collect()
    }
}

/// Adds the gradients in `from` of `model`'s `block` to that block's `grads`, taking them out
/// of `from` (the step's earlier micro-batches joining the last one's before its reduction).
pub(crate) fn add_block<B: AutodiffBackend, M: TrainModel<B>>(
    model: &M,
    block: BlockId,
    from: &mut GradientsParams,
    grads: &mut GradientsParams,
) {
    struct Add<'a> {
        from: &'a mut GradientsParams,
        grads: &'a mut GradientsParams,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Add<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let Some(earlier) = self.from.remove::<B::InnerBackend, D>(param.id) else {
                return;
            };
            let sum = match self.grads.remove::<B::InnerBackend, D>(param.id) {
                Some(g) => earlier + g,
                None => earlier,
            };
            self.grads.register(param.id, sum);
        }
    }
    let mut add = Add { from, grads };
    match block {
        BlockId::Head => model.head().visit(&mut add),
        BlockId::Layer(i) => model.layers()[i].visit(&mut add),
        BlockId::Embed => {
            model.embed().visit(&mut add);
            model.virtual_tokens().cloned().visit(&mut add);
        }
    }
}
