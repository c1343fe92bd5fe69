//! One pipeline-parallel training step: this rank's stage of the block contract (docs/architecture.md) run
//! over the step's micro-batches in the 1F1B order (`collie_dist::pp`), activations sent to the
//! next stage and their gradients back with point-to-point messages.
//!
//! Every stage holds the whole model but runs (and trains) only its blocks; the others are
//! brought up to date from their stages ([`sync_stages`]) before an evaluation or a checkpoint.

use std::ops::Range;
use std::time::Instant;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, ElementConversion, Int, Tensor, TensorData};
use collie_core::dist::Collectives;
use collie_core::loss::cross_entropy_sum_sharded;
use collie_core::model::{DecoderLayer, LmHead};
use collie_core::nn::to_dtype;
use collie_data::loader::Batch;
use collie_dist::pp::{one_f_one_b, Op};
use collie_io::family::TrainModel;

use crate::blockwise::in_dtype;
use crate::eval::int2;

/// This rank's stage.
#[derive(Debug, Clone)]
pub struct Stage {
    /// Stage index (the rank in the pipeline group).
    pub index: usize,
    /// Number of stages.
    pub count: usize,
    /// Decoder layers this stage runs.
    pub layers: Range<usize>,
}

impl Stage {
    /// Whether this stage runs the embedding.
    pub fn first(&self) -> bool {
        self.index == 0
    }

    /// Whether this stage runs the head and the loss.
    pub fn last(&self) -> bool {
        self.index + 1 == self.count
    }
}

/// What a stage keeps of a micro-batch between its forward and backward passes.
enum Saved<B: AutodiffBackend> {
    /// Input received from the previous stage (a leaf, `None` on the first stage) and output.
    Inner(Option<Tensor<B, 3>>, Tensor<B, 3>),
    /// Last stage: input leaf and the scaled loss.
    Loss(Option<Tensor<B, 3>>, Tensor<B, 1>),
}

/// `t` as host f32 values.
fn host<B: burn::tensor::backend::Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 after convert")
}

/// Runs this stage's part of one optimizer step on `batches` (the micro-batches, the same on every
/// stage). Each micro-batch's loss is its summed NLL times `scale`. Returns the summed NLL (last
/// stage; 0 elsewhere), the accumulated gradients of this stage's parameters, and the seconds
/// spent waiting for the neighbours.
pub fn step<B: AutodiffBackend, M: TrainModel<B>>(
    model: &M,
    stage: &Stage,
    batches: &[Batch],
    compute: DType,
    scale: f64,
    group: &dyn Collectives,
    device: &B::Device,
) -> (f64, GradientsParams, f64) {
    let d = model.embed().weight.dims()[1];
    let mut saved: Vec<Option<Saved<B>>> = (0..batches.len()).map(|_| None).collect();
    let mut acc = GradientsAccumulator::<M>::new();
    let (mut nll, mut waited) = (0.0f64, 0.0f64);
    for op in one_f_one_b(stage.index, stage.count, batches.len()) {
        match op {
            Op::Forward(i) => {
                let b = &batches[i];
                let (r, c) = (b.rows, b.cols);
                let segments = int2::<B>(&b.segments, r, c, device);
                let positions = int2::<B>(&b.positions, r, c, device);
                let ctx = model.context(r, c, 0, Some(&segments), Some(positions), device);
                let (leaf, mut x) = if stage.first() {
                    let ids = int2::<B>(&b.input_ids, r, c, device);
                    let embed = in_dtype(model.embed().clone(), compute);
                    (None, M::embed_tokens(&embed, ids))
                } else {
                    let mut buf = vec![0.0f32; r * c * d];
                    let t0 = Instant::now();
                    group.recv(&mut buf, stage.index - 1);
                    waited += t0.elapsed().as_secs_f64();
                    let leaf = Tensor::<B, 3>::from_data(TensorData::new(buf, [r, c, d]), device)
                        .require_grad();
                    (Some(leaf.clone()), to_dtype(leaf, compute))
                };
                for layer in &model.layers()[stage.layers.clone()] {
                    x = in_dtype(layer.clone(), compute).forward(x, &ctx, None);
                }
                saved[i] = Some(if stage.last() {
                    let logits = in_dtype(model.head().clone(), compute)
                        .forward(x, &in_dtype(model.embed().clone(), compute));
                    let v = logits.dims()[2];
                    // [r, c, v] -> [r·(c-1), v]: positions that predict a label
                    let logits = logits.slice([0..r, 0..c - 1]).reshape([r * (c - 1), v]);
                    let targets: Vec<i64> = b.shifted_labels().collect();
                    let n = targets.len();
                    let targets =
                        Tensor::<B, 1, Int>::from_data(TensorData::new(targets, [n]), device);
                    let (sum, _) =
                        cross_entropy_sum_sharded(logits, targets, model.embed().shard.as_ref());
                    nll += sum.clone().inner().into_scalar().elem::<f64>();
                    Saved::Loss(leaf, sum.mul_scalar(scale))
                } else {
                    group.send(
                        host(to_dtype(x.clone().detach(), DType::F32)),
                        stage.index + 1,
                    );
                    Saved::Inner(leaf, x)
                });
            }
            Op::Backward(i) => {
                let (leaf, grads) = match saved[i].take().expect("forward before backward") {
                    Saved::Loss(leaf, loss) => (leaf, loss.backward()),
                    Saved::Inner(leaf, out) => {
                        let dims = out.dims();
                        let mut buf = vec![0.0f32; dims.iter().product()];
                        let t0 = Instant::now();
                        group.recv(&mut buf, stage.index + 1);
                        waited += t0.elapsed().as_secs_f64();
                        let g = Tensor::<B, 3>::from_data(TensorData::new(buf, dims), device)
                            .cast(out.dtype());
                        // d(sum(out · g_out))/dθ is the chain rule through this stage.
                        (leaf, (out * g).sum().backward())
                    }
                };
                if let Some(leaf) = leaf {
                    let g = leaf.grad(&grads).expect("gradient of the stage input");
                    group.send(host(g), stage.index - 1);
                }
                acc.accumulate(model, GradientsParams::from_grads(grads, model));
            }
        }
    }
    group.flush();
    (nll, acc.grads(), waited)
}

/// Every parameter of `m` in visit order, as one host buffer.
fn flat<B: burn::tensor::backend::Backend, M: Module<B>>(m: &M) -> Vec<f32> {
    struct Flat(Vec<f32>);
    impl<B: burn::tensor::backend::Backend> ModuleVisitor<B> for Flat {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            self.0.extend(host(p.val()));
        }
    }
    let mut v = Flat(Vec::new());
    m.visit(&mut v);
    v.0
}

/// `m` with its parameters' values replaced from `buf` (visit order; ids and trainability kept).
fn load_flat<B: burn::tensor::backend::Backend, M: Module<B>>(m: M, buf: &[f32]) -> M {
    struct Load<'a>(&'a [f32], usize);
    impl<B: burn::tensor::backend::Backend> ModuleMapper<B> for Load<'_> {
        fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, t, mapper) = p.consume();
            let (shape, dtype, device) = (t.dims(), t.dtype(), t.device());
            let n: usize = shape.iter().product();
            let mut new = Tensor::<B, D>::from_data(
                TensorData::new(self.0[self.1..self.1 + n].to_vec(), shape),
                &device,
            )
            .cast(dtype);
            self.1 += n;
            if t.is_require_grad() {
                new = new.require_grad();
            }
            Param::from_mapped_value(id, new, mapper)
        }
    }
    m.map(&mut Load(buf, 0))
}

/// `m` as stage `root` of `group` has it (a broadcast of its values).
fn from_stage<B: burn::tensor::backend::Backend, M: Module<B>>(
    m: M,
    root: usize,
    group: &dyn Collectives,
) -> M {
    let mut buf = flat(&m);
    group.broadcast(&mut buf, root);
    load_flat(m, &buf)
}

/// Brings every block of `model` up to date from the stage that trains it (the embedding from the
/// first, each layer from its stage, the head from the last), on every stage.
pub fn sync_stages<B: AutodiffBackend, M: TrainModel<B>>(
    mut model: M,
    stages: &[Range<usize>],
    group: &dyn Collectives,
) -> M {
    let last = stages.len() - 1;
    *model.embed_mut() = from_stage(model.embed().clone(), 0, group);
    for (s, range) in stages.iter().enumerate() {
        for i in range.clone() {
            model.layers_mut()[i] = from_stage(model.layers()[i].clone(), s, group);
        }
    }
    *model.head_mut() = from_stage(model.head().clone(), last, group);
    model
}
