//! ZeRO over the data-parallel group (Rajbhandari et al., 2020), at parameter granularity: the
//! trainable parameters, in module order, are cut into `dp` contiguous runs of about equal size,
//! and replica `r` owns run `r`. Only the owner keeps optimizer state for a parameter and updates
//! it; the updated parameters are then all-gathered so every replica holds the whole model.
//!
//! - Stage 1: gradients are all-reduced as in plain data parallelism; each replica keeps only its
//!   own parameters' gradients for the update.
//! - Stage 2: gradients are reduce-scattered: each replica receives only the sums of its own
//!   parameters' gradients.
//!
//! Cutting at parameter boundaries (DeepSpeed cuts one flat buffer anywhere) keeps every
//! optimizer's per-parameter state whole, so any optimizer works unchanged and a checkpoint holds
//! plain per-parameter state that loads at any dp.

use std::collections::{BTreeSet, HashMap};

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use collie_core::dist::Collectives;

/// One trainable parameter in the flat order.
#[derive(Debug, Clone)]
struct Entry {
    path: String,
    id: ParamId,
    offset: usize,
    numel: usize,
    owner: usize,
}

/// Which replica owns which parameter, and the collectives that follow from it.
#[derive(Debug, Clone)]
pub struct ZeroPlan {
    /// 1 or 2.
    pub stage: u8,
    rank: usize,
    size: usize,
    entries: Vec<Entry>,
    by_id: HashMap<ParamId, usize>,
    /// `[start, end)` of each replica's run in the flat order.
    runs: Vec<(usize, usize)>,
    owned_paths: BTreeSet<String>,
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
    /// The plan for `model`'s trainable parameters over `group` (the same on every replica).
    pub fn new<B: AutodiffBackend, M: AutodiffModule<B>>(
        model: &M,
        stage: u8,
        group: &dyn Collectives,
    ) -> Self {
        struct List(PathStack, Vec<(String, ParamId, usize)>);
        impl<B: AutodiffBackend> ModuleVisitor<B> for List {
            fn enter_module(&mut self, name: &str, _: &str) {
                self.0 .0.push(name.to_string());
            }
            fn exit_module(&mut self, _: &str, _: &str) {
                self.0 .0.pop();
            }
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
                if param.val().is_require_grad() {
                    let n = param.lazy_shape().num_elements();
                    self.1.push((self.0.join(), param.id, n));
                }
            }
        }
        let mut list = List(PathStack::default(), Vec::new());
        model.visit(&mut list);
        let (rank, size) = (group.rank(), group.size());
        let total: usize = list.1.iter().map(|(_, _, n)| n).sum();
        let mut entries = Vec::with_capacity(list.1.len());
        let mut offset = 0;
        for (path, id, numel) in list.1 {
            // The owner of a parameter is the run its midpoint falls in: contiguous, balanced.
            let mid = offset as f64 + numel as f64 / 2.0;
            let owner = ((mid * size as f64 / total.max(1) as f64) as usize).min(size - 1);
            entries.push(Entry {
                path,
                id,
                offset,
                numel,
                owner,
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
        }
    }

    /// Trainable elements owned by this replica.
    pub fn owned_elems(&self) -> usize {
        let (s, e) = self.runs[self.rank];
        e - s
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

    /// After each replica updated its own parameters: all-gathers them so every replica holds
    /// the whole updated model.
    pub fn gather_params<B: AutodiffBackend, M: AutodiffModule<B>>(
        &self,
        model: M,
        group: &dyn Collectives,
        device: &B::Device,
    ) -> M {
        let block = self.block();
        // This replica's run, padded.
        struct Own<'a> {
            plan: &'a ZeroPlan,
            buf: Vec<f32>,
        }
        impl<B: AutodiffBackend> ModuleVisitor<B> for Own<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
                let Some(&i) = self.plan.by_id.get(&param.id) else {
                    return;
                };
                let e = &self.plan.entries[i];
                if e.owner == self.plan.rank {
                    let at = e.offset - self.plan.runs[self.plan.rank].0;
                    let data = param.val().into_data().convert::<f32>();
                    self.buf[at..at + e.numel]
                        .copy_from_slice(data.as_slice::<f32>().expect("f32 after convert"));
                }
            }
        }
        let mut own = Own {
            plan: self,
            buf: vec![0.0; block],
        };
        model.visit(&mut own);
        let mut all = vec![0.0; block * self.size];
        group.all_gather(&own.buf, &mut all);
        struct Replace<'a, B: AutodiffBackend> {
            plan: &'a ZeroPlan,
            all: &'a [f32],
            device: &'a B::Device,
        }
        impl<B: AutodiffBackend> ModuleMapper<B> for Replace<'_, B> {
            fn map_float<const D: usize>(
                &mut self,
                param: Param<Tensor<B, D>>,
            ) -> Param<Tensor<B, D>> {
                let Some(&i) = self.plan.by_id.get(&param.id) else {
                    return param;
                };
                let e = &self.plan.entries[i];
                if e.owner == self.plan.rank {
                    return param;
                }
                let (id, tensor, mapper) = param.consume();
                let at = self.plan.padded_offset(e);
                let data = TensorData::new(self.all[at..at + e.numel].to_vec(), tensor.dims());
                let mut t = Tensor::<B, D>::from_data(data, self.device);
                if tensor.is_require_grad() {
                    t = t.require_grad();
                }
                Param::from_mapped_value(id, t, mapper)
            }
        }
        model.map(&mut Replace::<B> {
            plan: self,
            all: &all,
            device,
        })
    }
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
