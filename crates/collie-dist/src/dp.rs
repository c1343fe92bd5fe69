//! Data parallelism: every replica computes gradients on its own share of the global batch, and
//! the sums are added up over the data-parallel group before clipping and the update.
//!
//! The trainer scales each micro-batch's NLL by `1 / (target tokens of the whole global batch)`
//! before its backward pass, so the summed gradients are exactly the single-process gradients of
//! the same global batch (the loss is "averaged by the global count of target tokens").

use std::collections::HashSet;

use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use collie_core::dist::{Collectives, Pending};
use collie_core::host::to_host;

/// Elements per all-reduce call: gradients travel in buckets of this size, as DDP's 25 MB.
pub const BUCKET_ELEMS: usize = 25 * 1024 * 1024 / 4;

/// Gradients gathered for one reduction: their ids and shapes, values one after another.
#[derive(Default)]
pub(crate) struct Bucket {
    pub(crate) entries: Vec<(ParamId, Vec<usize>)>,
    pub(crate) values: Vec<f32>,
}

/// One reduction in flight: the gradients it carries, and whether their sum comes back here
/// (every member for an all-reduce, the owner for ZeRO's reduce onto it).
struct Part {
    entries: Vec<(ParamId, Vec<usize>)>,
    pending: Pending,
    keep: bool,
}

/// Gradient sums in flight over a group, started by [`start_all_reduce_grads`] or
/// [`crate::zero::ZeroPlan::start_reduce_block`]: the buffers travel while the caller goes on
/// (the next block's backward pass), and [`Reduction::finish`] puts the sums back.
#[derive(Default)]
pub struct Reduction {
    parts: Vec<Part>,
}

impl std::fmt::Debug for Reduction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reduction({} parts)", self.parts.len())
    }
}

impl Reduction {
    /// Starts the sum of `bucket` over `group` (onto `root` only, if given); with `blocking`,
    /// completes it first. MPI's non-blocking reductions may hold a temporary buffer of the
    /// message's size on the ranks that forward partial sums, where the blocking ones pipeline
    /// small segments: a reduction that nothing can overlap is better blocking.
    pub(crate) fn start(
        &mut self,
        bucket: Bucket,
        group: &dyn Collectives,
        root: Option<usize>,
        blocking: bool,
    ) {
        if bucket.entries.is_empty() {
            return;
        }
        let mut values = bucket.values;
        let (pending, keep) = match (root, blocking) {
            (None, false) => (group.start_all_reduce_sum(values), true),
            (Some(r), false) => (group.start_reduce_sum(values, r), r == group.rank()),
            (None, true) => {
                group.all_reduce_sum(&mut values);
                (Pending::done(values), true)
            }
            (Some(r), true) => {
                group.reduce_sum(&mut values, r);
                (Pending::done(values), r == group.rank())
            }
        };
        self.parts.push(Part {
            entries: bucket.entries,
            pending,
            keep,
        });
    }

    /// Both reductions' parts, in the order they were started.
    pub fn merge(&mut self, other: Reduction) {
        self.parts.extend(other.parts);
    }

    /// Lets the reductions advance without blocking (MPI moves a non-blocking collective only
    /// inside MPI calls; calling this between blocks keeps them moving); true once all are
    /// complete, so [`Reduction::finish`] would not wait.
    pub fn progress(&mut self) -> bool {
        let mut done = true;
        for p in &mut self.parts {
            done &= p.pending.test();
        }
        done
    }

    /// Waits for every sum and registers the ones that come back here as gradients in `grads`.
    pub fn finish<B: AutodiffBackend>(self, grads: &mut GradientsParams, device: &B::Device) {
        for Part {
            entries,
            pending,
            keep,
        } in self.parts
        {
            let values = pending.wait();
            if !keep {
                continue;
            }
            if entries.len() == 1 {
                // One gradient (a large one, alone in its bucket): its buffer moves back, uncopied.
                let (id, shape) = entries.into_iter().next().expect("one entry");
                register::<B>(grads, id, TensorData::new(values, shape), device);
                continue;
            }
            let mut at = 0;
            for (id, shape) in entries {
                let n: usize = shape.iter().product();
                let data = TensorData::new(values[at..at + n].to_vec(), shape);
                register::<B>(grads, id, data, device);
                at += n;
            }
        }
    }
}

/// Registers `data` as the gradient of `id` (its rank is the data's).
pub(crate) fn register<B: AutodiffBackend>(
    grads: &mut GradientsParams,
    id: ParamId,
    data: TensorData,
    device: &B::Device,
) {
    type Inner<B> = <B as AutodiffBackend>::InnerBackend;
    match data.shape.len() {
        1 => grads.register(id, Tensor::<Inner<B>, 1>::from_data(data, device)),
        2 => grads.register(id, Tensor::<Inner<B>, 2>::from_data(data, device)),
        3 => grads.register(id, Tensor::<Inner<B>, 3>::from_data(data, device)),
        4 => grads.register(id, Tensor::<Inner<B>, 4>::from_data(data, device)),
        d => panic!("a {d}-dimensional parameter"),
    }
}

/// Sums `grads` (the gradients of `model`'s parameters) over `group`, in place, in buckets of
/// [`BUCKET_ELEMS`] f32 values. Every member must hold gradients for the same parameters.
pub fn all_reduce_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &mut GradientsParams,
    group: &dyn Collectives,
    device: &B::Device,
) {
    reduce::<B, M>(model, grads, None, group, Some(device), true);
}

/// [`all_reduce_grads`] restricted to the parameters in `only` (e.g. the whole parameters of a
/// tensor-parallel region, whose gradients are partial sums over the tp group).
pub fn all_reduce_grads_of<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &mut GradientsParams,
    only: &HashSet<ParamId>,
    group: &dyn Collectives,
    device: &B::Device,
) {
    if !only.is_empty() {
        reduce::<B, M>(model, grads, Some(only), group, Some(device), true);
    }
}

/// [`all_reduce_grads`] started without waiting (with `blocking`, completed at once): `model`'s
/// gradients leave `grads` and come back summed with [`Reduction::finish`].
pub fn start_all_reduce_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &mut GradientsParams,
    group: &dyn Collectives,
    blocking: bool,
) -> Reduction {
    reduce::<B, M>(model, grads, None, group, None, blocking)
}

/// Sums the gradients of `model` present in `grads` (those in `only`, if given) over `group`,
/// in the model's parameter order, one bucket of about [`BUCKET_ELEMS`] values at a time: each
/// gradient is taken out of `grads` as it joins a bucket. With a `device`, each bucket is waited
/// for and put back before the next one fills, so the reduction never holds a second copy of
/// all the gradients (a parameter larger than a bucket goes alone); without one, every bucket is
/// started (completed first with `blocking`) and the reduction returned.
fn reduce<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &mut GradientsParams,
    only: Option<&HashSet<ParamId>>,
    group: &dyn Collectives,
    device: Option<&B::Device>,
    blocking: bool,
) -> Reduction {
    if group.size() == 1 {
        return Reduction::default();
    }
    struct Reduce<'a, B: AutodiffBackend> {
        grads: &'a mut GradientsParams,
        only: Option<&'a HashSet<ParamId>>,
        group: &'a dyn Collectives,
        device: Option<&'a B::Device>,
        blocking: bool,
        bucket: Bucket,
        started: Reduction,
    }
    impl<B: AutodiffBackend> Reduce<'_, B> {
        fn flush(&mut self) {
            let bucket = std::mem::take(&mut self.bucket);
            self.started.start(bucket, self.group, None, self.blocking);
            if let Some(device) = self.device {
                std::mem::take(&mut self.started).finish::<B>(self.grads, device);
            }
        }
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Reduce<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if self.only.is_some_and(|o| !o.contains(&param.id)) {
                return;
            }
            let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) else {
                return;
            };
            let shape = g.dims().to_vec();
            let n: usize = shape.iter().product();
            if !self.bucket.entries.is_empty() && self.bucket.values.len() + n > BUCKET_ELEMS {
                self.flush();
            }
            let values = to_host(g);
            if self.bucket.entries.is_empty() {
                self.bucket.values = values;
            } else {
                self.bucket.values.extend_from_slice(&values);
            }
            self.bucket.entries.push((param.id, shape));
        }
    }
    let mut v = Reduce::<B> {
        grads,
        only,
        group,
        device,
        blocking,
        bucket: Bucket::default(),
        started: Reduction::default(),
    };
    model.visit(&mut v);
    v.flush();
    v.started
}

/// Sums scalars (losses, token counts) over `group`.
pub fn all_reduce_scalars(group: &dyn Collectives, values: &mut [f64]) {
    if group.size() > 1 {
        group.all_reduce_sum_f64(values);
    }
}
