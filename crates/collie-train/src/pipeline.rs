//! One pipeline-parallel training step: this rank's stage of the block contract (docs/architecture.md) run
//! over the step's micro-batches in the 1F1B order (`collie_dist::pp`), activations sent to the
//! next stage and their gradients back with point-to-point messages.
//!
//! A stage holds only its blocks (a tied table lives on the last stage, which sends the first the
//! rows each step looks up; split over tensor-parallel ranks, the first stage owns it and the
//! last keeps a copy):
//! the others are empty placeholders from the moment the model is loaded ([`stage_owners`],
//! `collie_dist::zero::ZeroPlan::with_owners`). An evaluation gathers the whole model for its
//! duration; a checkpoint takes each block from the stage that holds it.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use burn::module::{AutodiffModule, Param, ParamId};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, ElementConversion, Int, Tensor, TensorData};
use collie_core::dist::Collectives;
use collie_core::host::to_host;
use collie_core::loss::cross_entropy_sum_sharded;
use collie_core::model::{BlockModel, DecoderLayer, LmHead};
use collie_core::nn::{to_dtype, Embedding};
use collie_core::router::{RouterLog, RoutingCounts};
use collie_data::loader::Batch;
use collie_dist::pp::{one_f_one_b, Op};
use collie_io::family::TrainModel;

use crate::blockwise::{add_rows, in_dtype};
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
    /// Width of the activations passed between stages.
    pub hidden: usize,
    /// Activation checkpointing: a stage other than the last keeps only each micro-batch's
    /// input between its forward and its backward, and runs its blocks again for the backward.
    pub recompute: bool,
    /// A tied embedding table (not split over tensor-parallel ranks) lives on the last stage
    /// alone, which trains it: each step it sends the first stage the rows the step's batches
    /// look up, and gets their gradient back ([`Rows`]). Otherwise the first stage owns the
    /// embedding and the last keeps a copy of a tied table, their gradients summed (Megatron's
    /// way).
    pub rows_from_last: bool,
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
    /// Input received from the previous stage (a leaf, `None` on the first stage), output, and
    /// the routing of the stage's MoE layers (whose auxiliary-loss terms need the counts of
    /// every stage, which come back with the output's gradient).
    Inner(
        Option<Tensor<B, 3>>,
        Tensor<B, 3>,
        Option<Arc<RouterLog<B>>>,
    ),
    /// Last stage: input leaf, the scaled loss, and every stage's expert counts (sent back with
    /// the input's gradient).
    Loss(Option<Tensor<B, 3>>, Tensor<B, 1>, Option<RoutingCounts>),
    /// Under activation checkpointing: the input received from the previous stage (`None` on
    /// the first stage), without any graph.
    Input(Option<Tensor<B::InnerBackend, 3>>),
}

/// Sends `values` to stage `to`, followed by `counts` where the step carries expert counts.
fn send_with_counts(
    group: &dyn Collectives,
    to: usize,
    mut values: Vec<f32>,
    counts: Option<&RoutingCounts>,
) {
    if let Some(counts) = counts {
        values.extend(counts.to_message());
    }
    group.send(values, to);
}

/// Receives `n` values from stage `from` and, where the step carries the counts of `experts`
/// experts, the counts after them; adds the seconds spent waiting to `waited`.
fn recv_with_counts(
    group: &dyn Collectives,
    from: usize,
    n: usize,
    experts: Option<usize>,
    waited: &mut f64,
) -> (Vec<f32>, Option<RoutingCounts>) {
    let mut buf = vec![0.0f32; n + experts.map_or(0, |e| e + 1)];
    let t0 = Instant::now();
    group.recv(&mut buf, from);
    *waited += t0.elapsed().as_secs_f64();
    let counts = experts.map(|_| RoutingCounts::from_message(&buf.split_off(n)));
    (buf, counts)
}

/// The number of experts whose counts travel with micro-batch `b`'s activations: `None` unless
/// the step adds the auxiliary loss of a model that logs its routing.
fn experts<B: AutodiffBackend, M: TrainModel<B>>(
    model: &M,
    b: &Batch,
    aux: Option<f64>,
    device: &B::Device,
) -> Option<usize> {
    aux?;
    let (r, c) = (b.rows, b.cols);
    let segments = int2::<B>(&b.segments, r, c, device);
    let mut ctx = model.context(r, c, 0, Some(&segments), None, device);
    model.log_routing(&mut ctx, &segments).map(|l| l.experts())
}

/// What one pipelined step of a stage produced.
pub struct StageStep {
    /// Summed NLL (last stage; 0 elsewhere).
    pub nll: f64,
    /// This stage's share of the (unweighted) auxiliary loss, summed over the micro-batches:
    /// the stages' shares add up to the loss.
    pub aux: f64,
    /// The accumulated gradients of this stage's parameters.
    pub grads: GradientsParams,
    /// Seconds spent waiting for the neighbours.
    pub waited: f64,
}

/// The rows of a tied table that the first stage reads in one step ([`Stage::rows_from_last`]).
struct Rows<B: AutodiffBackend> {
    /// The distinct ids of the step's batches, ascending.
    ids: Vec<i64>,
    /// First stage: those rows as a table of their own (trainable where the table is), and
    /// each batch's ids into it.
    compact: Option<(Embedding<B>, Vec<Vec<i64>>)>,
}

impl<B: AutodiffBackend> Rows<B> {
    /// The last stage sends the rows of the step's ids to the first, which makes them its
    /// lookup table. Other stages take no part.
    fn exchange<M: TrainModel<B>>(
        model: &M,
        stage: &Stage,
        batches: &[Batch],
        group: &dyn Collectives,
        device: &B::Device,
        waited: &mut f64,
    ) -> Option<Self> {
        if !stage.rows_from_last || !(stage.first() || stage.last()) {
            return None;
        }
        let all: Vec<i64> = batches
            .iter()
            .flat_map(|b| b.input_ids.iter().copied())
            .collect();
        let (distinct, local) = crate::blockwise::distinct_rows(&all);
        let k = distinct.len();
        let compact = if stage.first() {
            let table = &model.embed().weight;
            let d = stage.hidden;
            let (buf, _) = recv_with_counts(group, stage.count - 1, k * d, None, waited);
            let rows = Tensor::<B, 2>::from_data(TensorData::new(buf, [k, d]), device);
            let rows = match table.is_require_grad() {
                true => rows.require_grad(),
                false => rows,
            };
            let embed = Embedding {
                weight: Param::initialized(ParamId::new(), rows),
                shard: None,
                scale: model.embed().scale,
            };
            // Each batch's ids into the compact table, cut from the step's in batch order.
            let mut rest = local.as_slice();
            let ids = batches
                .iter()
                .map(|b| {
                    let (this, after) = rest.split_at(b.input_ids.len());
                    rest = after;
                    this.to_vec()
                })
                .collect();
            Some((embed, ids))
        } else {
            None
        };
        if stage.last() {
            let at = Tensor::<B::InnerBackend, 1, Int>::from_data(
                TensorData::new(distinct.clone(), [k]),
                device,
            );
            let picked = model.embed().weight.val().inner().select(0, at);
            group.send(to_host(picked), 0);
        }
        Some(Rows {
            ids: distinct,
            compact,
        })
    }
}

/// Runs this stage's part of one optimizer step on `batches` (the micro-batches, the same on every
/// stage). Each micro-batch's loss is its summed NLL times `scale`, plus, where the model adds a
/// load-balancing auxiliary loss, that loss times `aux`: the expert counts of the stages so far
/// travel with the activations, and the counts of all of them come back with the gradients, so
/// each stage adds its layers' terms of the loss (`collie_core::router`) to its backward.
#[allow(clippy::too_many_arguments)]
pub fn step<B: AutodiffBackend, M: TrainModel<B>>(
    model: &M,
    stage: &Stage,
    batches: &[Batch],
    compute: DType,
    scale: f64,
    aux: Option<f64>,
    group: &dyn Collectives,
    device: &B::Device,
) -> StageStep {
    let d = stage.hidden;
    // The expert counts that travel with the activations (the same for every micro-batch).
    let experts = batches.first().and_then(|b| experts(model, b, aux, device));
    let mut saved: Vec<Option<Saved<B>>> = (0..batches.len()).map(|_| None).collect();
    let mut acc = GradientsAccumulator::<M>::new();
    let (mut nll, mut aux_sum, mut waited) = (0.0f64, 0.0f64, 0.0f64);
    // A term's value (for the metrics) and its weighted tensor (for the backward).
    let mut add_term = |log: &RouterLog<B>, counts: &RoutingCounts| {
        let term = log.take_term(0, counts)?;
        aux_sum += term.clone().inner().into_scalar().elem::<f64>();
        Some(term.mul_scalar(aux.expect("an auxiliary-loss weight")))
    };
    let rows = Rows::exchange(model, stage, batches, group, device, &mut waited);
    let compact = rows.as_ref().and_then(|r| r.compact.as_ref());
    // The first stage's lookup of micro-batch `i` in the compact table.
    let lookup = |i: usize| compact.map(|(embed, ids)| (embed, ids[i].as_slice()));
    // The gradient of the compact table, summed over the micro-batches.
    let mut rows_grad: Option<Tensor<B::InnerBackend, 2>> = None;
    for op in one_f_one_b(stage.index, stage.count, batches.len()) {
        match op {
            Op::Forward(i) => {
                let b = &batches[i];
                let (r, c) = (b.rows, b.cols);
                let (input, mut counts) = if stage.first() {
                    (None, None)
                } else {
                    let (buf, counts) =
                        recv_with_counts(group, stage.index - 1, r * c * d, experts, &mut waited);
                    let t = Tensor::<B::InnerBackend, 3>::from_data(
                        TensorData::new(buf, [r, c, d]),
                        device,
                    );
                    (Some(t), counts)
                };
                if stage.recompute && !stage.last() {
                    // Forward without a graph: only the input is kept for the backward.
                    let (x, local) = blocks_inner(
                        model,
                        stage,
                        b,
                        input.clone(),
                        lookup(i),
                        compute,
                        aux,
                        device,
                    );
                    let counts = merge_counts(counts, local.as_ref());
                    let values = to_host(to_dtype(x, DType::F32));
                    send_with_counts(group, stage.index + 1, values, counts.as_ref());
                    saved[i] = Some(Saved::Input(input));
                    continue;
                }
                let (leaf, x, log) =
                    blocks(model, stage, b, input, lookup(i), compute, aux, device);
                if let (Some(counts), Some(log)) = (counts.as_mut(), &log) {
                    counts.add(&log.counts());
                }
                if stage.first() {
                    counts = log.as_ref().map(|l| l.counts());
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
                    let mut loss = sum.mul_scalar(scale);
                    // The last stage has every stage's counts now.
                    if let (Some(log), Some(counts)) = (&log, &counts) {
                        if let Some(term) = add_term(log, counts) {
                            loss = loss + term;
                        }
                    }
                    Saved::Loss(leaf, loss, counts)
                } else {
                    let values = to_host(to_dtype(x.clone().detach(), DType::F32));
                    send_with_counts(group, stage.index + 1, values, counts.as_ref());
                    Saved::Inner(leaf, x, log)
                });
            }
            Op::Backward(i) => {
                let mut entry = saved[i].take().expect("forward before backward");
                if let Saved::Input(input) = entry {
                    // Activation checkpointing: the forward again, with its graph.
                    let (leaf, x, log) = blocks(
                        model,
                        stage,
                        &batches[i],
                        input,
                        lookup(i),
                        compute,
                        aux,
                        device,
                    );
                    entry = Saved::Inner(leaf, x, log);
                }
                let (leaf, mut grads, counts) = match entry {
                    Saved::Input(_) => unreachable!("recomputed above"),
                    Saved::Loss(leaf, loss, counts) => (leaf, loss.backward(), counts),
                    Saved::Inner(leaf, out, log) => {
                        let dims = out.dims();
                        let (buf, counts) = recv_with_counts(
                            group,
                            stage.index + 1,
                            dims.iter().product(),
                            log.as_ref().map(|l| l.experts()),
                            &mut waited,
                        );
                        let g = Tensor::<B, 3>::from_data(TensorData::new(buf, dims), device)
                            .cast(out.dtype());
                        // d(sum(out · g_out))/dθ is the chain rule through this stage, plus
                        // the stage's terms of the auxiliary loss.
                        let mut product = to_dtype(out * g, DType::F32).sum();
                        if let (Some(log), Some(counts)) = (&log, &counts) {
                            if let Some(term) = add_term(log, counts) {
                                product = product + term;
                            }
                        }
                        (leaf, product.backward(), counts)
                    }
                };
                if let Some(leaf) = leaf {
                    let g = to_host(leaf.grad(&grads).expect("gradient of the stage input"));
                    send_with_counts(group, stage.index - 1, g, counts.as_ref());
                }
                if let Some(g) = compact.and_then(|(e, _)| e.weight.grad_remove(&mut grads)) {
                    rows_grad = Some(match rows_grad.take() {
                        Some(sum) => sum + g,
                        None => g,
                    });
                }
                acc.accumulate(model, GradientsParams::from_grads(grads, model));
            }
        }
    }
    let mut grads = acc.grads();
    // The lookups' share of a tied table's gradient goes back to the last stage, which adds it
    // at the rows it sent (the head's share is there already).
    if let Some(g) = rows_grad {
        group.send(to_host(g), stage.count - 1);
    }
    if let Some(rows) = rows.filter(|_| stage.last() && model.embed().weight.is_require_grad()) {
        let k = rows.ids.len();
        let (buf, _) = recv_with_counts(group, 0, k * d, None, &mut waited);
        let g = Tensor::<B::InnerBackend, 2>::from_data(TensorData::new(buf, [k, d]), device);
        let id = model.embed().weight.id;
        let whole = grads.remove::<B::InnerBackend, 2>(id);
        let shape = model.embed().weight.dims();
        grads.register(id, add_rows(whole, shape, &rows.ids, g, device));
    }
    group.flush();
    StageStep {
        nll,
        aux: aux_sum,
        grads,
        waited,
    }
}

/// This stage's blocks over micro-batch `b` with the autodiff graph: the embedding on the first
/// stage, else `input` (the previous stage's output) as a leaf; then the stage's layers. Returns
/// the leaf, the output and the routing log of the stage's layers (where the model adds an
/// auxiliary loss).
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
fn blocks<B: AutodiffBackend, M: TrainModel<B>>(
    model: &M,
    stage: &Stage,
    b: &Batch,
    input: Option<Tensor<B::InnerBackend, 3>>,
    lookup: Option<(&Embedding<B>, &[i64])>,
    compute: DType,
    aux: Option<f64>,
    device: &B::Device,
) -> (
    Option<Tensor<B, 3>>,
    Tensor<B, 3>,
    Option<Arc<RouterLog<B>>>,
) {
    let (r, c) = (b.rows, b.cols);
    let segments = int2::<B>(&b.segments, r, c, device);
    let positions = int2::<B>(&b.positions, r, c, device);
    let mut ctx = model.context(r, c, 0, Some(&segments), Some(positions), device);
    let log = aux.and_then(|_| model.log_routing(&mut ctx, &segments));
    let (leaf, mut x) = match input {
        None => {
            let (table, ids) = match lookup {
                Some((rows, ids)) => (rows, ids),
                None => (model.embed(), b.input_ids.as_slice()),
            };
            let ids = int2::<B>(ids, r, c, device);
            let embed = in_dtype(table.clone(), compute);
            (None, M::embed_tokens(&embed, ids))
        }
        Some(t) => {
            let leaf = Tensor::<B, 3>::from_inner(t).require_grad();
            (Some(leaf.clone()), to_dtype(leaf, compute))
        }
    };
    for layer in &model.layers()[stage.layers.clone()] {
        x = in_dtype(layer.clone(), compute).forward(x, &ctx, None);
    }
    (leaf, x, log)
}

/// [`blocks`] without a graph (activation checkpointing's forward): the output and the expert
/// counts of the stage's layers.
#[allow(clippy::too_many_arguments)]
fn blocks_inner<B: AutodiffBackend, M: TrainModel<B>>(
    model: &M,
    stage: &Stage,
    b: &Batch,
    input: Option<Tensor<B::InnerBackend, 3>>,
    lookup: Option<(&Embedding<B>, &[i64])>,
    compute: DType,
    aux: Option<f64>,
    device: &B::Device,
) -> (Tensor<B::InnerBackend, 3>, Option<RoutingCounts>) {
    let (r, c) = (b.rows, b.cols);
    let inner = model.valid();
    let segments = int2::<B::InnerBackend>(&b.segments, r, c, device);
    let positions = int2::<B::InnerBackend>(&b.positions, r, c, device);
    let mut ctx = inner.context(r, c, 0, Some(&segments), Some(positions), device);
    let log = aux.and_then(|_| inner.log_routing(&mut ctx, &segments));
    let mut x = match input {
        None => {
            let (table, ids) = match lookup {
                Some((rows, ids)) => (rows.valid(), ids),
                None => (inner.embed().clone(), b.input_ids.as_slice()),
            };
            let ids = int2::<B::InnerBackend>(ids, r, c, device);
            let embed = in_dtype(table, compute);
            <M::Inner as BlockModel<B::InnerBackend>>::embed_tokens(&embed, ids)
        }
        Some(t) => to_dtype(t, compute),
    };
    for layer in &model.layers()[stage.layers.clone()] {
        x = in_dtype(M::inner_layer(layer), compute).forward(x, &ctx, None);
    }
    (x, log.map(|l| l.counts()))
}

/// The expert counts to send on: those received (`None` on the first stage) plus this stage's.
fn merge_counts(
    received: Option<RoutingCounts>,
    local: Option<&RoutingCounts>,
) -> Option<RoutingCounts> {
    match (received, local) {
        (Some(mut r), Some(l)) => {
            r.add(l);
            Some(r)
        }
        (None, Some(l)) => Some(l.clone()),
        (r, None) => r,
    }
}

/// Which stage owns (trains, holds and writes) each parameter of `model`: the embedding the
/// first (the last with `table_on_last`, [`Stage::rows_from_last`]), each layer its stage, the
/// head the last, anything else the first.
pub fn stage_owners<B: AutodiffBackend, M: TrainModel<B>>(
    model: &M,
    stages: &[Range<usize>],
    table_on_last: bool,
) -> HashMap<ParamId, usize> {
    use crate::checkpoint::param_ids;
    let mut owner: HashMap<ParamId, usize> =
        param_ids(model).into_iter().map(|id| (id, 0)).collect();
    owner.extend(
        param_ids(model.head())
            .into_iter()
            .map(|id| (id, stages.len() - 1)),
    );
    for (s, range) in stages.iter().enumerate() {
        for i in range.clone() {
            owner.extend(param_ids(&model.layers()[i]).into_iter().map(|id| (id, s)));
        }
    }
    let table = if table_on_last { stages.len() - 1 } else { 0 };
    owner.extend(param_ids(model.embed()).into_iter().map(|id| (id, table)));
    owner
}
