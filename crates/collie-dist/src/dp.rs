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

/// Where each parameter's gradient sits in a flat buffer: `(id, offset, shape)`.
type Spans = Vec<(ParamId, usize, Vec<usize>)>;

/// Copies every gradient of `model` present in `grads` into one flat buffer, in the model's
/// parameter order. Returns the buffer and each parameter's `(id, offset, shape)`.
fn flatten<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &GradientsParams,
    only: Option<&HashSet<ParamId>>,
) -> (Vec<f32>, Spans) {
    struct Flatten<'a> {
        grads: &'a GradientsParams,
        only: Option<&'a HashSet<ParamId>>,
        buf: Vec<f32>,
        spans: Spans,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Flatten<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if self.only.is_some_and(|o| !o.contains(&param.id)) {
                return;
            }
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
                let shape = g.dims().to_vec();
                let data = g.into_data().convert::<f32>();
                let offset = self.buf.len();
                self.buf
                    .extend_from_slice(data.as_slice::<f32>().expect("f32 after convert"));
                self.spans.push((param.id, offset, shape));
            }
        }
    }
    let mut v = Flatten {
        grads,
        only,
        buf: Vec::new(),
        spans: Vec::new(),
    };
    model.visit(&mut v);
    (v.buf, v.spans)
}

/// Writes the flat buffer back into `grads` (the inverse of [`flatten`]).
fn unflatten<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &mut GradientsParams,
    buf: &[f32],
    spans: &Spans,
    device: &B::Device,
) {
    struct Unflatten<'a, B: AutodiffBackend> {
        grads: &'a mut GradientsParams,
        buf: &'a [f32],
        spans: std::collections::HashMap<ParamId, (usize, Vec<usize>)>,
        device: &'a B::Device,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Unflatten<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some((offset, shape)) = self.spans.remove(&param.id) {
                let n: usize = shape.iter().product();
                let data = TensorData::new(self.buf[offset..offset + n].to_vec(), shape);
                let t = Tensor::<B::InnerBackend, D>::from_data(data, self.device);
                self.grads.register(param.id, t);
            }
        }
    }
    let mut v = Unflatten::<B> {
        grads,
        buf,
        spans: spans
            .iter()
            .map(|(id, o, s)| (*id, (*o, s.clone())))
            .collect(),
        device,
    };
    model.visit(&mut v);
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
    let (mut buf, spans) = flatten::<B, M>(model, grads, only);
    for bucket in buf.chunks_mut(BUCKET_ELEMS) {
        group.all_reduce_sum(bucket);
    }
    unflatten::<B, M>(model, grads, &buf, &spans, device);
}

/// Sums scalars (losses, token counts) over `group`.
pub fn all_reduce_scalars(group: &dyn Collectives, values: &mut [f64]) {
    if group.size() > 1 {
        group.all_reduce_sum_f64(values);
    }
}
