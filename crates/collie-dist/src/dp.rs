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
use collie_core::dist::Collectives;

/// Elements per all-reduce call: gradients travel in buckets of this size, as DDP's 25 MB.
pub const BUCKET_ELEMS: usize = 25 * 1024 * 1024 / 4;

/// Gradients gathered for one all-reduce call: their ids and shapes, values one after another.
struct Bucket {
    entries: Vec<(ParamId, Vec<usize>)>,
    values: Vec<f32>,
}

impl Bucket {
    /// Sums the bucket over `group` and puts each gradient back into `grads`.
    fn flush<B: AutodiffBackend>(
        &mut self,
        grads: &mut GradientsParams,
        group: &dyn Collectives,
        device: &B::Device,
    ) {
        if self.entries.is_empty() {
            return;
        }
        let mut values = std::mem::take(&mut self.values);
        group.all_reduce_sum(&mut values);
        let entries = std::mem::take(&mut self.entries);
        if entries.len() == 1 {
            // One gradient (a large one, alone in its bucket): its buffer moves back, uncopied.
            let (id, shape) = entries.into_iter().next().expect("one entry");
            register::<B>(grads, id, TensorData::new(values, shape), device);
            return;
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
    reduce::<B, M>(model, grads, None, group, device)
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
        reduce::<B, M>(model, grads, Some(only), group, device)
    }
}

/// Sums the gradients of `model` present in `grads` (those in `only`, if given) over `group`,
/// in the model's parameter order, one bucket of about [`BUCKET_ELEMS`] values at a time: each
/// gradient is taken out of `grads` as it joins a bucket and put back summed when the bucket is
/// flushed, so the reduction never holds a second copy of all the gradients (a parameter larger
/// than a bucket goes alone).
fn reduce<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &mut GradientsParams,
    only: Option<&HashSet<ParamId>>,
    group: &dyn Collectives,
    device: &B::Device,
) {
    if group.size() == 1 {
        return;
    }
    struct Reduce<'a, B: AutodiffBackend> {
        grads: &'a mut GradientsParams,
        only: Option<&'a HashSet<ParamId>>,
        group: &'a dyn Collectives,
        device: &'a B::Device,
        bucket: Bucket,
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
                self.bucket.flush::<B>(self.grads, self.group, self.device);
            }
            let values = g
                .into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .expect("f32 after convert");
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
        bucket: Bucket {
            entries: Vec::new(),
            values: Vec::new(),
        },
    };
    model.visit(&mut v);
    let Reduce {
        grads,
        group,
        device,
        mut bucket,
        ..
    } = v;
    bucket.flush::<B>(grads, group, device);
}

/// Sums scalars (losses, token counts) over `group`.
pub fn all_reduce_scalars(group: &dyn Collectives, values: &mut [f64]) {
    if group.size() > 1 {
        group.all_reduce_sum_f64(values);
    }
}
