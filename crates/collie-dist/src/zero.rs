//! ZeRO over the data-parallel group (Rajbhandari et al., 2020), at parameter granularity: the
//! trainable parameters, in module order, are cut into `dp` contiguous runs of about equal size,
//! and replica `r` owns run `r`. Only the owner keeps optimizer state for a parameter and updates
//! it; the updated parameters are then broadcast by their owners, a block at a time
//! ([`ZeroPlan::gather`]), so every replica holds the whole model.
//!
//! - Stage 1: gradients are all-reduced as in plain data parallelism; each replica keeps only its
//!   own parameters' gradients for the update.
//! - Stage 2: gradients are reduce-scattered: each replica receives only the sums of its own
//!   parameters' gradients.
//!
//! - Stage 3: every parameter, trainable or frozen, is stored by its owner only; the others hold
//!   an empty placeholder ([`ZeroPlan::release`]). The block-wise walk brings a block's
//!   parameters to every replica just before it runs ([`ZeroPlan::gather`]: one broadcast per
//!   owner) and drops them after; each block's gradients are summed onto their owners as the
//!   backward walk leaves the block ([`ZeroPlan::reduce_block`]). So a replica keeps 1/dp of the
//!   parameters, gradients and optimizer state, plus the blocks in flight.
//!
//! Cutting at parameter boundaries (DeepSpeed cuts one flat buffer anywhere) keeps every
//! optimizer's per-parameter state whole, so any optimizer works unchanged (AdaLomo's factored
//! moments included) and a checkpoint holds plain per-parameter state that loads at any dp.

use std::collections::{BTreeSet, HashMap, HashSet};

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use collie_core::dist::Collectives;
use collie_core::host::to_host;

use crate::dp::{Bucket, Reduction};

/// One trainable parameter in the flat order.
#[derive(Debug, Clone)]
struct Entry {
    path: String,
    id: ParamId,
    offset: usize,
    numel: usize,
    owner: usize,
    /// The parameter's shape (stage 3 restores it when gathering).
    shape: Vec<usize>,
    trainable: bool,
}

/// Which replica owns which parameter, and the collectives that follow from it.
#[derive(Debug, Clone)]
pub struct ZeroPlan {
    /// 1, 2 or 3.
    pub stage: u8,
    rank: usize,
    size: usize,
    entries: Vec<Entry>,
    by_id: HashMap<ParamId, usize>,
    /// `[start, end)` of each replica's run in the flat order.
    runs: Vec<(usize, usize)>,
    owned_paths: BTreeSet<String>,
    /// Parameters owned elsewhere that this member keeps too ([`ZeroPlan::with_owners`]).
    keep: HashSet<ParamId>,
}

/// A listed parameter: path, id, shape, trainable (known at listing for stages 1 and 2 only).
type Listed = (String, ParamId, Vec<usize>, bool);

/// `model`'s trainable parameters in module order, or with `all` every parameter without
/// reading any ([`ZeroPlan::release`] records which are trainable).
fn list_params<B: AutodiffBackend, M: AutodiffModule<B>>(model: &M, all: bool) -> Vec<Listed> {
    struct List(PathStack, Vec<Listed>, bool);
    impl<B: AutodiffBackend> ModuleVisitor<B> for List {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.0 .0.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.0 .0.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let trainable = !self.2 && param.val().is_require_grad();
            if trainable || self.2 {
                let shape = param.lazy_shape().dims::<D>().to_vec();
                self.1.push((self.0.join(), param.id, shape, trainable));
            }
        }
    }
    let mut list = List(PathStack::default(), Vec::new(), all);
    model.visit(&mut list);
    list.1
}

/// Dotted path of the parameter being visited (as `collie_optim` names optimizer state).
#[derive(Default)]
struct PathStack(Vec<String>);

impl PathStack {
    fn join(&self) -> String {
        self.0.join(".")
    }
}

impl ZeroPlan {
    /// The plan for `model`'s trainable parameters (at stage 3, every parameter) over `group`
    /// (the same on every replica). Reads no lazy parameter at stage 3.
    pub fn new<B: AutodiffBackend, M: AutodiffModule<B>>(
        model: &M,
        stage: u8,
        group: &dyn Collectives,
    ) -> Self {
        let list = list_params(model, stage >= 3);
        let (rank, size) = (group.rank(), group.size());
        let total: usize = list.iter().map(|e| e.2.iter().product::<usize>()).sum();
        let mut offset = 0;
        let owners = list
            .iter()
            .map(|(_, _, shape, _)| {
                let numel: usize = shape.iter().product();
                // The owner of a parameter is the run its midpoint falls in: contiguous, balanced.
                let mid = offset as f64 + numel as f64 / 2.0;
                offset += numel;
                ((mid * size as f64 / total.max(1) as f64) as usize).min(size - 1)
            })
            .collect();
        Self::build(stage, rank, size, list, owners, HashSet::new())
    }

    /// A stage-3 plan with given owners: `owner` maps every parameter of `model` to a member
    /// of `group` (a pipeline stage's blocks to that stage: stage-local pipelines), and this
    /// member also keeps the parameters in `keep` that others own (the last stage's copy of a
    /// tied embedding). Reads no lazy parameter.
    pub fn with_owners<B: AutodiffBackend, M: AutodiffModule<B>>(
        model: &M,
        group: &dyn Collectives,
        owner: &HashMap<ParamId, usize>,
        keep: HashSet<ParamId>,
    ) -> Self {
        let list = list_params(model, true);
        let owners = list.iter().map(|(_, id, _, _)| owner[id]).collect();
        Self::build(3, group.rank(), group.size(), list, owners, keep)
    }

    fn build(
        stage: u8,
        rank: usize,
        size: usize,
        list: Vec<Listed>,
        owners: Vec<usize>,
        keep: HashSet<ParamId>,
    ) -> Self {
        let mut entries = Vec::with_capacity(list.len());
        let mut offset = 0;
        for ((path, id, shape, trainable), owner) in list.into_iter().zip(owners) {
            let numel = shape.iter().product();
            entries.push(Entry {
                path,
                id,
                offset,
                numel,
                owner,
                shape,
                trainable,
            });
            offset += numel;
        }
        let runs = (0..size)
            .map(|r| {
                let mine = entries.iter().filter(|e| e.owner == r);
                let start = mine.clone().map(|e| e.offset).min().unwrap_or(0);
                let end = mine.map(|e| e.offset + e.numel).max().unwrap_or(start);
                (start, end)
            })
            .collect();
        let by_id = entries.iter().enumerate().map(|(i, e)| (e.id, i)).collect();
        let owned_paths = entries
            .iter()
            .filter(|e| e.owner == rank)
            .map(|e| e.path.clone())
            .collect();
        ZeroPlan {
            stage,
            rank,
            size,
            entries,
            by_id,
            runs,
            owned_paths,
            keep,
        }
    }

    /// The shape of parameter `id`, if the plan lists it (a placeholder's real shape).
    pub fn shape_of(&self, id: &ParamId) -> Option<&[usize]> {
        self.by_id
            .get(id)
            .map(|&i| self.entries[i].shape.as_slice())
    }

    /// Trainable elements owned by this replica.
    pub fn owned_elems(&self) -> usize {
        let (s, e) = self.runs[self.rank];
        e - s
    }

    /// Whether this replica owns the parameter `id` (one the plan does not list is nobody's).
    pub fn owns_id(&self, id: &ParamId) -> bool {
        self.by_id
            .get(id)
            .is_some_and(|&i| self.entries[i].owner == self.rank)
    }

    /// Elements of every parameter the plan lists (at stage 3, the whole model).
    pub fn elems(&self) -> usize {
        self.entries.iter().map(|e| e.numel).sum()
    }

    /// Whether this replica owns the parameter at `path`.
    pub fn owns(&self, path: &str) -> bool {
        self.owned_paths.contains(path)
    }

    /// Longest run: the padded block size of the reduce-scatter and all-gather.
    fn block(&self) -> usize {
        self.runs.iter().map(|(s, e)| e - s).max().unwrap_or(0)
    }

    /// Every trainable gradient in the flat order, each replica's run padded to [`Self::block`]
    /// (missing gradients are zeros).
    fn padded_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
        &self,
        model: &M,
        grads: &GradientsParams,
    ) -> Vec<f32> {
        struct Gather<'a> {
            plan: &'a ZeroPlan,
            grads: &'a GradientsParams,
            buf: Vec<f32>,
        }
        impl<B: AutodiffBackend> ModuleVisitor<B> for Gather<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
                let Some(&i) = self.plan.by_id.get(&param.id) else {
                    return;
                };
                let e = &self.plan.entries[i];
                if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
                    let at = self.plan.padded_offset(e);
                    let data = g.into_data().convert::<f32>();
                    self.buf[at..at + e.numel]
                        .copy_from_slice(data.as_slice::<f32>().expect("f32 after convert"));
                }
            }
        }
        let mut v = Gather {
            plan: self,
            grads,
            buf: vec![0.0; self.block() * self.size],
        };
        model.visit(&mut v);
        v.buf
    }

    /// Where `e` sits in the padded layout (its owner's block, then its place within the run).
    fn padded_offset(&self, e: &Entry) -> usize {
        e.owner * self.block() + (e.offset - self.runs[e.owner].0)
    }

    /// Turns this replica's local gradient sums into the summed gradients of the parameters it
    /// owns (stage 1: all-reduce; stage 2: reduce-scatter) and drops every other trainable
    /// gradient, so the optimizer updates (and keeps state for) owned parameters only.
    pub fn reduce_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
        &self,
        model: &M,
        grads: &mut GradientsParams,
        group: &dyn Collectives,
        device: &B::Device,
    ) {
        let block = self.block();
        let mut padded = self.padded_grads::<B, M>(model, grads);
        // Only this replica's block matters afterwards.
        let mine: Vec<f32> = if self.stage >= 2 {
            let mut recv = vec![0.0; block];
            group.reduce_scatter_sum(&padded, &mut recv);
            recv
        } else {
            for chunk in padded.chunks_mut(crate::dp::BUCKET_ELEMS) {
                group.all_reduce_sum(chunk);
            }
            padded[self.rank * block..(self.rank + 1) * block].to_vec()
        };
        struct Scatter<'a, B: AutodiffBackend> {
            plan: &'a ZeroPlan,
            grads: &'a mut GradientsParams,
            mine: &'a [f32],
            device: &'a B::Device,
        }
        impl<B: AutodiffBackend> ModuleVisitor<B> for Scatter<'_, B> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
                let Some(&i) = self.plan.by_id.get(&param.id) else {
                    return;
                };
                let e = &self.plan.entries[i];
                let had = self.grads.remove::<B::InnerBackend, D>(param.id);
                if e.owner != self.plan.rank || had.is_none() {
                    return;
                }
                let at = e.offset - self.plan.runs[self.plan.rank].0;
                let shape = param.lazy_shape();
                let data = TensorData::new(self.mine[at..at + e.numel].to_vec(), shape);
                let t = Tensor::<B::InnerBackend, D>::from_data(data, self.device);
                self.grads.register(param.id, t);
            }
        }
        model.visit(&mut Scatter::<B> {
            plan: self,
            grads,
            mine: &mine,
            device,
        });
    }

    /// `module` with the parameters in `received` replaced by those values (in the plan's
    /// shapes, trainable where the owner's parameter is); ids and mappers kept.
    fn fill<B: Backend, M: Module<B>>(
        &self,
        module: M,
        received: HashMap<ParamId, Vec<f32>>,
        device: &B::Device,
    ) -> M {
        struct Fill<'a, B: Backend> {
            plan: &'a ZeroPlan,
            received: HashMap<ParamId, Vec<f32>>,
            device: &'a B::Device,
        }
        impl<B: Backend> ModuleMapper<B> for Fill<'_, B> {
            fn map_float<const D: usize>(
                &mut self,
                param: Param<Tensor<B, D>>,
            ) -> Param<Tensor<B, D>> {
                let Some(data) = self.received.remove(&param.id) else {
                    return param;
                };
                let e = &self.plan.entries[self.plan.by_id[&param.id]];
                let (id, _old, mapper) = param.consume();
                let t =
                    Tensor::<B, D>::from_data(TensorData::new(data, e.shape.clone()), self.device);
                let t = if e.trainable { t.require_grad() } else { t };
                Param::from_mapped_value(id, t, mapper)
            }
        }
        module.map(&mut Fill {
            plan: self,
            received,
            device,
        })
    }
}

/// A stage-3 placeholder: what a replica holds for a parameter another replica owns.
fn placeholder<B: Backend, const D: usize>(device: &B::Device) -> Tensor<B, D> {
    Tensor::empty([0; D], device)
}

impl ZeroPlan {
    /// Stage 3: `model` keeping only the parameters this replica owns (and those it is told to
    /// keep); every other one becomes an empty placeholder. Parameters are read (or drawn, for a fresh model) one at a time in
    /// module order and the ones owned by another replica dropped at once, so loading never
    /// holds more than the owned share plus one tensor. Records which parameters are trainable
    /// (a gathered copy gets the owner's flag).
    pub fn release<B: Backend, M: Module<B>>(&mut self, model: M) -> M {
        struct Release<'a> {
            plan: &'a mut ZeroPlan,
        }
        impl<B: Backend> ModuleMapper<B> for Release<'_> {
            fn map_float<const D: usize>(
                &mut self,
                param: Param<Tensor<B, D>>,
            ) -> Param<Tensor<B, D>> {
                let Some(&i) = self.plan.by_id.get(&param.id) else {
                    return param;
                };
                let (id, device) = (param.id, param.lazy_device());
                let value = param.val();
                let entry = &mut self.plan.entries[i];
                entry.trainable = value.is_require_grad();
                if entry.owner == self.plan.rank || self.plan.keep.contains(&id) {
                    return param;
                }
                drop((value, param));
                // Trainable as the parameter is, so every member sees the same flags.
                let held = placeholder::<B, D>(&device);
                let held = if entry.trainable {
                    held.require_grad()
                } else {
                    held
                };
                Param::initialized(id, held)
            }
        }
        model.map(&mut Release { plan: self })
    }

    /// Stage 3: `module` (the whole model or one block of it) with every parameter it has
    /// brought to this replica from its owner: one broadcast per owner, in owner order. Owned
    /// parameters stay the tensors they are, so gradients of the result land on this replica's
    /// masters; gathered ones are fresh leaves, trainable where the owner's parameter is.
    /// Collective over the data-parallel group.
    pub fn gather<B: Backend, M: Module<B>>(
        &self,
        module: M,
        group: &dyn Collectives,
        device: &B::Device,
    ) -> M {
        // This module's planned parameters, in module order, with this replica's owned values.
        struct List<'a, B: Backend> {
            plan: &'a ZeroPlan,
            entries: Vec<usize>,
            owned: HashMap<ParamId, Tensor<B, 1>>,
        }
        impl<B: Backend> ModuleVisitor<B> for List<'_, B> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
                if let Some(&i) = self.plan.by_id.get(&param.id) {
                    self.entries.push(i);
                    if self.plan.entries[i].owner == self.plan.rank {
                        let n = self.plan.entries[i].numel;
                        self.owned.insert(param.id, param.val().reshape([n]));
                    }
                }
            }
        }
        let mut list = List {
            plan: self,
            entries: Vec::new(),
            owned: HashMap::new(),
        };
        module.visit(&mut list);
        let List { entries, owned, .. } = list;
        let mut received: HashMap<ParamId, Vec<f32>> = HashMap::new();
        let mut owners: Vec<usize> = entries.iter().map(|&i| self.entries[i].owner).collect();
        owners.sort_unstable();
        owners.dedup();
        for owner in owners {
            let mine: Vec<&Entry> = entries
                .iter()
                .map(|&i| &self.entries[i])
                .filter(|e| e.owner == owner)
                .collect();
            let mut buf = if owner == self.rank {
                concat(mine.iter().map(|e| to_host(owned[&e.id].clone())))
            } else {
                vec![0.0; mine.iter().map(|e| e.numel).sum()]
            };
            group.broadcast(&mut buf, owner);
            if owner != self.rank {
                let sizes: Vec<usize> = mine.iter().map(|e| e.numel).collect();
                received.extend(mine.iter().map(|e| e.id).zip(split(buf, &sizes)));
            }
        }
        self.fill(module, received, device)
    }

    /// Sums the gradients of `module`'s trainable parameters over the replicas onto each
    /// parameter's owner (one reduce per owner) and drops every gradient this replica does not
    /// own, as the backward walk leaves the block (stage 3; stages 1 and 2 inside the walk of a
    /// step's last micro-batch). A replica without a gradient for a parameter contributes zeros.
    /// Collective over the data-parallel group.
    pub fn reduce_block<B: AutodiffBackend, M: AutodiffModule<B>>(
        &self,
        module: &M,
        grads: &mut GradientsParams,
        group: &dyn Collectives,
        device: &B::Device,
    ) {
        self.start_reduce_block(module, grads, group, true)
            .finish::<B>(grads, device);
    }

    /// [`ZeroPlan::reduce_block`] started without waiting (with `blocking`, completed at once):
    /// the sums reach their owners with [`Reduction::finish`].
    pub fn start_reduce_block<B: AutodiffBackend, M: AutodiffModule<B>>(
        &self,
        module: &M,
        grads: &mut GradientsParams,
        group: &dyn Collectives,
        blocking: bool,
    ) -> Reduction {
        struct Take<'a, B: AutodiffBackend> {
            plan: &'a ZeroPlan,
            grads: &'a mut GradientsParams,
            /// Per entry (module order): the gradient, if this replica has one.
            taken: Vec<(usize, Option<Vec<f32>>)>,
            _b: std::marker::PhantomData<B>,
        }
        impl<B: AutodiffBackend> ModuleVisitor<B> for Take<'_, B> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
                let Some(&i) = self.plan.by_id.get(&param.id) else {
                    return;
                };
                if !self.plan.entries[i].trainable {
                    return;
                }
                let g = self.grads.remove::<B::InnerBackend, D>(param.id);
                self.taken.push((i, g.map(to_host)));
            }
        }
        let mut take = Take::<B> {
            plan: self,
            grads,
            taken: Vec::new(),
            _b: std::marker::PhantomData,
        };
        module.visit(&mut take);
        let mut taken = take.taken;
        let mut owners: Vec<usize> = taken.iter().map(|(i, _)| self.entries[*i].owner).collect();
        owners.sort_unstable();
        owners.dedup();
        let mut started = Reduction::default();
        for owner in owners {
            // This owner's entries, their gradients moved out (a replica without one sends zeros).
            let mut entries = Vec::new();
            let mut parts = Vec::new();
            for (i, g) in taken
                .iter_mut()
                .filter(|(i, _)| self.entries[*i].owner == owner)
            {
                let e = &self.entries[*i];
                entries.push((e.id, e.shape.clone()));
                parts.push(g.take().unwrap_or_else(|| vec![0.0; e.numel]));
            }
            let bucket = Bucket {
                entries,
                values: concat(parts.into_iter()),
            };
            started.start(bucket, group, Some(owner), blocking);
        }
        started
    }
}

/// The parts one after another; a single part is moved, not copied (the embedding table is the
/// largest buffer a gather or a reduction handles).
fn concat(parts: impl Iterator<Item = Vec<f32>>) -> Vec<f32> {
    let mut parts = parts.peekable();
    let mut buf = parts.next().unwrap_or_default();
    for part in parts {
        buf.extend_from_slice(&part);
    }
    buf
}

/// `buf` cut into consecutive parts of `sizes`; a single part is `buf` itself.
fn split(buf: Vec<f32>, sizes: &[usize]) -> Vec<Vec<f32>> {
    if sizes.len() == 1 {
        return vec![buf];
    }
    let mut at = 0;
    sizes
        .iter()
        .map(|&n| {
            let part = buf[at..at + n].to_vec();
            at += n;
            part
        })
        .collect()
}

/// The part of a whole optimizer state (as a checkpoint holds it) that `plan`'s replica owns:
/// state keys are `"{param path}.{slot}"`, counters are keyed by parameter path.
pub fn shard_state(
    plan: &ZeroPlan,
    state: collie_optim::OptimizerState,
) -> collie_optim::OptimizerState {
    let owns_key = |key: &str| {
        plan.owns(key)
            || key
                .rsplit_once('.')
                .is_some_and(|(path, _slot)| plan.owns(path))
    };
    collie_optim::OptimizerState {
        tensors: state
            .tensors
            .into_iter()
            .filter(|(k, _)| owns_key(k))
            .collect(),
        counters: state
            .counters
            .into_iter()
            .filter(|(k, _)| plan.owns(k))
            .collect(),
    }
}
