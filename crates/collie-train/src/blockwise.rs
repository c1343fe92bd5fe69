//! Block-wise backward over the block contract (docs/architecture.md): the forward pass detaches between
//! `embed`, each of `layers` and `head`; the backward pass walks them in reverse, back-propagating
//! `sum(out · g_out)` through one block at a time, so that block's parameter gradients exist on
//! their own and can be consumed — accumulated (activation checkpointing) or turned into an
//! update at once and dropped (LOMO, AdaLomo) — before the next block's backward runs.
//!
//! With `recompute`, only block inputs are kept and each block is run again in the reverse walk
//! (activation checkpointing); otherwise every block keeps its autodiff graph from the forward
//! pass, as a plain backward would.

use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, ElementConversion, Int, Tensor, TensorData};
use collie_core::dist::Collectives;
use collie_core::loss::cross_entropy_sum_sharded;
use collie_core::model::{BlockModel, DecoderLayer, LmHead};
use collie_core::nn::{to_dtype, Embedding, VirtualTokens};
use collie_data::loader::Batch;
use collie_dist::zero::ZeroPlan;
use collie_io::family::TrainModel;

use crate::eval::int2;

/// One block of the reverse walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockId {
    /// Final norm + LM head (first in the reverse walk).
    Head,
    /// Decoder layer `i`.
    Layer(usize),
    /// Token embedding (last).
    Embed,
}

impl BlockId {
    /// The module path of the block inside the model (`head`, `layers.3`, `embed`).
    pub fn path(self) -> String {
        match self {
            BlockId::Head => "head".into(),
            BlockId::Layer(i) => format!("layers.{i}"),
            BlockId::Embed => "embed".into(),
        }
    }
}

/// Called with each block's gradients between the backward pass that produced them and their use
/// (the place where a data-parallel run all-reduces them). A tied embedding weight's gradient
/// arrives once, with the embedding block, summed over its two uses.
pub type GradHook = Box<dyn FnMut(BlockId, &mut GradientsParams) + Send>;

/// Casts every float parameter (an autodiff op, so gradients flow back to the f32 masters).
pub(crate) struct CastParams(pub DType);

impl<B: Backend> ModuleMapper<B> for CastParams {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let dtype = self.0;
        param.map(|t| to_dtype(t, dtype))
    }
}

/// `module` in `dtype`: a cast copy whose gradients land on the f32 masters.
pub(crate) fn in_dtype<B: Backend, M: Module<B>>(module: M, dtype: DType) -> M {
    if dtype == DType::F32 {
        module
    } else {
        module.map(&mut CastParams(dtype))
    }
}

/// ZeRO-3's source of whole blocks: each block's parameters are brought from their owners just
/// before the block runs (forward, recomputation) and dropped after ([`ZeroPlan::gather`]).
#[derive(Debug, Clone, Copy)]
pub struct Gather<'a> {
    /// Who owns which parameter.
    pub plan: &'a ZeroPlan,
    /// The data-parallel group.
    pub group: &'a dyn Collectives,
}

/// `module` whole: gathered under ZeRO-3, as it is otherwise.
fn whole<B: Backend, M: Module<B>>(gather: Option<Gather>, module: M, device: &B::Device) -> M {
    match gather {
        Some(g) => g.plan.gather(module, g.group, device),
        None => module,
    }
}

/// How a block-wise pass runs.
#[derive(Debug, Clone, Copy)]
pub struct Walk<'a> {
    /// Compute dtype of the blocks (parameters stay f32).
    pub compute: DType,
    /// The backward pass sees `nll · scale`.
    pub scale: f64,
    /// Keep only block inputs and recompute each block in the reverse walk.
    pub recompute: bool,
    /// The backward pass also sees the load-balancing auxiliary loss times this weight, where
    /// the model adds one (a mixture of experts): each layer's term of it (`collie_core::router`)
    /// joins that layer's backward, with the expert counts of every layer from the forward walk.
    pub aux: Option<f64>,
    /// ZeRO-3: where the blocks' parameters come from (implies `recompute`: a block is gathered
    /// again for its backward, so the forward walk keeps no graph of it).
    pub gather: Option<Gather<'a>>,
    /// Logit elements per chunk of the head's loss (`train.head_chunk_mib`; 0 = one chunk).
    pub head_chunk: usize,
}

/// Forward + reverse block walk of one micro-batch. The backward pass sees `nll · scale`;
/// `on_block` receives every block's parameter gradients (keyed by the ids of `model`, the f32
/// masters), in the order head, layers from last to first, embed, each after `hook`. A tied
/// embedding weight gets gradient in the head and in the embedding; the head's share is held back and added to the
/// embedding block's, so the weight appears once, with the sum (as lomo-optim's hook fires once
/// on the accumulated gradient). Returns the summed NLL and the (unweighted) auxiliary loss, 0
/// without one.
///
/// `model` is taken by value and each block is dropped once its gradients are handed out, so a
/// caller that replaces blocks as it goes (LOMO) never holds old and new weights of the whole
/// model at once.
pub fn backward_blockwise<B: AutodiffBackend, M: TrainModel<B>>(
    model: M,
    batch: &Batch,
    walk: Walk<'_>,
    device: &B::Device,
    mut hook: Option<&mut GradHook>,
    mut on_block: impl FnMut(BlockId, GradientsParams),
) -> (f64, f64) {
    // `scale` and `head_chunk` are the head's (`head_backward` reads them from `walk`).
    let Walk {
        compute,
        recompute,
        aux: aux_weight,
        gather,
        ..
    } = walk;
    // A gathered block is dropped after its forward: its backward gathers and recomputes it.
    let recompute = recompute || gather.is_some();
    // Every block's gradients pass the hook (if any) before `on_block` sees them.
    let mut on_block = |block: BlockId, mut grads: GradientsParams| {
        if let Some(h) = hook.as_mut() {
            h(block, &mut grads);
        }
        on_block(block, grads)
    };
    // Every use of a module below takes a fresh compute-dtype copy, so each backward pass has its
    // own cast nodes to flow through to the f32 masters.
    let (r, c) = (batch.rows, batch.cols);
    let ids = int2::<B>(&batch.input_ids, r, c, device);
    let segments = int2::<B>(&batch.segments, r, c, device);
    let positions = int2::<B>(&batch.positions, r, c, device);
    let n_virtual = model.virtual_tokens().map_or(0, VirtualTokens::len);
    // The embedding stage: token embeddings, prompt tuning's virtual embeddings in front, and
    // prefix tuning's per-layer keys and values (inputs of every layer, like the hidden state).
    let stage = EmbedStage {
        embed: model.embed().clone(),
        virtual_tokens: model.virtual_tokens().cloned(),
    };
    // Kept whole until the head: it needs the vocabulary size (and a tied table).
    let stage = whole(gather, stage, device);
    let table = stage.embed.clone();
    // Under ZeRO-3 the lookup reads a compact table of the batch's distinct rows, so neither the
    // embedding's graph nor its backward holds a vocabulary-sized tensor: a replica drops the
    // gathered table after the head, and only the owner's reduction sees the whole gradient.
    let (stage, ids, rows) = match (gather, &table.shard) {
        (Some(_), None) => {
            let (rows, local) = distinct_rows(&batch.input_ids);
            let k = rows.len();
            let at = Tensor::<B::InnerBackend, 1, Int>::from_data(
                TensorData::new(rows.clone(), [k]),
                device,
            );
            let picked = Tensor::from_inner(table.weight.val().inner().select(0, at));
            let picked = match table.weight.is_require_grad() {
                true => picked.require_grad(),
                false => picked,
            };
            let compact = Embedding {
                weight: Param::initialized(ParamId::new(), picked),
                shard: None,
                scale: table.scale,
            };
            let local = int2::<B>(&local, r, c, device);
            let stage = EmbedStage {
                embed: compact,
                virtual_tokens: stage.virtual_tokens,
            };
            (stage, local, Some(rows))
        }
        _ => (stage, ids, None),
    };
    let (embedded, prefix) = in_dtype(stage.clone(), compute).forward(ids, M::embed_tokens);
    let past = if prefix.is_empty() { 0 } else { n_virtual };
    let mut ctx = model.context(r, c, past, Some(&segments), Some(positions), device);
    // The auxiliary loss needs every layer's expert counts before any layer's backward: the
    // forward walk records them (routing is discrete, so a recomputed layer routes the same).
    let log = aux_weight.and_then(|_| model.log_routing(&mut ctx, &segments));
    // Without recomputation: where each layer's records start in `log`.
    let mut starts = Vec::new();
    // inputs[i]: detached input of layer i (hidden state and prefix); outputs[i]: its output
    // with the graph kept (empty when recomputing, where the forward pass runs on the inner
    // backend and builds no graph at all).
    let mut inputs: Vec<LayerInput<B>> = Vec::with_capacity(model.layers().len() + 1);
    let mut outputs = Vec::with_capacity(model.layers().len());
    let mut x = embedded.clone().detach();
    let mut prefix_in = prefix
        .iter()
        .map(|(k, v)| (k.clone().detach(), v.clone().detach()));
    let counts = if recompute {
        let inner = model.valid();
        let inner_segments = segments.clone().inner();
        let mut ctx = inner.context(
            r,
            c,
            past,
            Some(&inner_segments),
            Some(int2::<B::InnerBackend>(&batch.positions, r, c, device)),
            device,
        );
        let inner_log = log
            .as_ref()
            .and_then(|_| inner.log_routing(&mut ctx, &inner_segments));
        let mut xi = x.inner();
        for layer in model.layers() {
            let kv = prefix_in.next();
            let mut slot = kv.clone().map(|(k, v)| (k.inner(), v.inner()));
            let cache = slot.is_some().then_some(&mut slot);
            inputs.push((Tensor::from_inner(xi.clone()), kv));
            let layer = whole(gather, layer.clone(), device);
            xi = in_dtype(M::inner_layer(&layer), compute).forward(xi, &ctx, cache);
        }
        x = Tensor::from_inner(xi);
        inner_log.map(|l| l.counts())
    } else {
        for layer in model.layers() {
            starts.push(log.as_ref().map_or(0, |l| l.len()));
            let x_in = x.require_grad();
            let kv = prefix_in
                .next()
                .map(|(k, v)| (k.require_grad(), v.require_grad()));
            let mut slot = kv.clone();
            let cache = slot.is_some().then_some(&mut slot);
            let out = in_dtype(layer.clone(), compute).forward(x_in.clone(), &ctx, cache);
            x = out.clone().detach();
            inputs.push((x_in, kv));
            outputs.push(out);
        }
        log.as_ref().map(|l| l.counts())
    };
    drop(prefix_in);
    let (layers, head) = (model.layers().to_vec(), model.head().clone());
    drop(model);
    // Prompt tuning's virtual positions predict nothing: the head sees the real tokens only.
    let [_, total, d] = x.dims();
    let x = x.slice([0..r, total - c..total, 0..d]);
    let HeadGrads {
        nll,
        mut g,
        params: head_grads,
        tied,
    } = head_backward::<B, M>(
        &whole(gather, head, device),
        &table,
        x,
        batch,
        &walk,
        device,
    );
    on_block(BlockId::Head, head_grads);
    // Under ZeRO-3 the head's share of a tied table goes to the table's owner now, so the other
    // replicas do not carry a vocabulary-sized gradient through the layers' walk; the owner adds
    // the sum to its own share, which the embedding block's reduction then completes.
    let tied = match (gather, tied) {
        (Some(g), Some(t)) => {
            let mut share = GradientsParams::new();
            share.register(table.weight.id, t);
            g.plan.reduce_block(&table, &mut share, g.group, device);
            share.remove::<B::InnerBackend, 2>(table.weight.id)
        }
        (_, t) => t,
    };
    let (table_id, table_shape) = (table.weight.id, table.weight.dims());
    drop(table);
    if total > c {
        // [r, c, d] -> [r, n + c, d]: zero gradient at the virtual positions' outputs.
        g = Tensor::cat(vec![g.zeros_like().slice([0..r, 0..total - c]), g], 1);
    }
    // Gradients of each layer's prefix keys and values, for the embedding stage's backward.
    let mut g_prefix = Vec::new();
    let mut aux = 0.0;
    for (i, layer) in layers.into_iter().enumerate().rev() {
        let (x_in, kv_in) = inputs.pop().expect("block input");
        // This layer's routing records: where the recomputation appends them, or where the
        // forward walk did (the later layers' are taken already).
        let from = match (&log, recompute) {
            (Some(log), true) => log.len(),
            _ => starts.get(i).copied().unwrap_or(0),
        };
        // Gradients are found by the tensors that ran: the gathered copy's under ZeRO-3.
        let layer = whole(gather, layer, device);
        let (x_in, kv_in, out) = if recompute {
            let x_in = x_in.require_grad();
            let kv_in = kv_in.map(|(k, v)| (k.require_grad(), v.require_grad()));
            let mut slot = kv_in.clone();
            let cache = slot.is_some().then_some(&mut slot);
            let out = in_dtype(layer.clone(), compute).forward(x_in.clone(), &ctx, cache);
            (x_in, kv_in, out)
        } else {
            (x_in, kv_in, outputs.pop().expect("block output"))
        };
        let g_out = to_dtype(Tensor::from_inner(g), out.dtype());
        let mut product = to_dtype(out * g_out, DType::F32).sum();
        if let (Some(log), Some(counts), Some(weight)) = (&log, &counts, aux_weight) {
            if let Some(term) = log.take_term(from, counts) {
                aux += term.clone().inner().into_scalar().elem::<f64>();
                product = product + term.mul_scalar(weight);
            }
        }
        let mut grads = product.backward();
        g = x_in.grad(&grads).expect("gradient of the block input");
        if let Some((k, v)) = kv_in {
            let gk = k.grad(&grads).expect("gradient of the key prefix");
            let gv = v.grad(&grads).expect("gradient of the value prefix");
            g_prefix.push((gk, gv));
        }
        let block = GradientsParams::from_module(&mut grads, &layer);
        drop((grads, layer));
        on_block(BlockId::Layer(i), block);
    }
    g_prefix.reverse();
    // The embedding stage: sum(out · g_out) over the embeddings and every layer's prefix.
    let g_out = to_dtype(Tensor::from_inner(g), embedded.dtype());
    let mut total_product = to_dtype(embedded * g_out, DType::F32).sum();
    for ((k, v), (gk, gv)) in prefix.into_iter().zip(g_prefix) {
        let gk = to_dtype(Tensor::from_inner(gk), k.dtype());
        let gv = to_dtype(Tensor::from_inner(gv), v.dtype());
        total_product =
            total_product + to_dtype(k * gk, DType::F32).sum() + to_dtype(v * gv, DType::F32).sum();
    }
    // A frozen embedding without virtual tokens (PEFT) has nothing to differentiate.
    let trainable = stage.embed.weight.is_require_grad() || stage.virtual_tokens.is_some();
    let mut block = if trainable {
        let mut grads = total_product.backward();
        GradientsParams::from_module(&mut grads, &stage)
    } else {
        GradientsParams::new()
    };
    if let Some(rows) = rows {
        // The compact table's rows go back to their places in the vocabulary (distinct rows:
        // each sum was formed once, in token order, as the whole table's backward forms it).
        if let Some(g) = block.remove::<B::InnerBackend, 2>(stage.embed.weight.id) {
            block.register(table_id, add_rows(None, table_shape, &rows, g, device));
        }
    }
    if let Some(t) = tied {
        let id = table_id;
        let sum = match block.remove::<B::InnerBackend, 2>(id) {
            Some(own) => own + t,
            None => t,
        };
        block.register(id, sum);
    }
    drop(stage);
    on_block(BlockId::Embed, block);
    (nll, aux)
}

/// `whole` (zeros if `None`; `[vocab, hidden]` = `shape`) plus `g` (`[k, hidden]`) at the
/// distinct `rows`, formed in one host buffer: Burn's `select_assign` (and the embedding
/// backward built on it) copies the whole table's gradient once more.
pub(crate) fn add_rows<B: Backend>(
    whole: Option<Tensor<B, 2>>,
    shape: [usize; 2],
    rows: &[i64],
    g: Tensor<B, 2>,
    device: &B::Device,
) -> Tensor<B, 2> {
    let d = shape[1];
    let mut buf = match whole {
        Some(t) => collie_core::host::to_host(t),
        None => vec![0.0; shape[0] * d],
    };
    let g = g.into_data().convert::<f32>();
    let g = g.as_slice::<f32>().expect("f32 after convert");
    for (&row, part) in rows.iter().zip(g.chunks_exact(d)) {
        let at = row as usize * d;
        for (a, b) in buf[at..at + d].iter_mut().zip(part) {
            *a += b;
        }
    }
    Tensor::from_data(TensorData::new(buf, shape), device)
}

/// The distinct values of `ids` in increasing order, and each id's index among them.
pub(crate) fn distinct_rows(ids: &[i64]) -> (Vec<i64>, Vec<i64>) {
    let mut rows = ids.to_vec();
    rows.sort_unstable();
    rows.dedup();
    let local = ids
        .iter()
        .map(|id| rows.binary_search(id).expect("a listed id") as i64)
        .collect();
    (rows, local)
}

/// A layer's detached inputs: hidden state and, under prefix tuning, its key/value prefix.
type LayerInput<B> = (Tensor<B, 3>, Option<(Tensor<B, 4>, Tensor<B, 4>)>);

/// The first block of the walk: token embedding plus the virtual tokens of prompt learning.
#[derive(Module, Debug)]
struct EmbedStage<B: Backend> {
    embed: Embedding<B>,
    virtual_tokens: Option<VirtualTokens<B>>,
}

impl<B: Backend> EmbedStage<B> {
    /// Input embeddings (virtual ones first under prompt tuning) and each layer's key/value
    /// prefix under prefix tuning (empty otherwise).
    ///
    /// # Shapes
    /// - ids: `[batch, seq]` → `[batch, n + seq, hidden]` or `[batch, seq, hidden]`
    #[allow(clippy::type_complexity)]
    fn forward(
        &self,
        ids: Tensor<B, 2, Int>,
        embed_tokens: fn(&Embedding<B>, Tensor<B, 2, Int>) -> Tensor<B, 3>,
    ) -> (Tensor<B, 3>, Vec<(Tensor<B, 4>, Tensor<B, 4>)>) {
        let b = ids.dims()[0];
        let x = embed_tokens(&self.embed, ids);
        match &self.virtual_tokens {
            Some(v) => (v.prepend(x), v.prefix_kv(b)),
            None => (x, Vec::new()),
        }
    }
}

/// What the head's backward produces.
struct HeadGrads<B: AutodiffBackend> {
    /// Summed NLL.
    nll: f64,
    /// Gradient of the head input, `[r, c, d]`.
    g: Tensor<B::InnerBackend, 3>,
    /// The head's parameter gradients.
    params: GradientsParams,
    /// A tied embedding weight's share.
    tied: Option<Tensor<B::InnerBackend, 2>>,
}

/// The head block: final norm, LM head and loss over the positions that predict `labels[:, 1:]`,
/// run in chunks of positions so that the `[positions, vocab]` logits and their softmax
/// gradients exist for one chunk at a time (they dominate activation memory for large
/// vocabularies; [`Walk::head_chunk`] logit elements at most). The chunks' parameter
/// gradients are summed. Returns the summed NLL, the
/// gradient of the head input `h` (`[r, c, d]`, zero at the last position), the head's parameter
/// gradients and a tied embedding weight's share.
fn head_backward<B: AutodiffBackend, M: TrainModel<B>>(
    head: &M::Head,
    embed: &Embedding<B>,
    h: Tensor<B, 3>,
    batch: &Batch,
    walk: &Walk<'_>,
    device: &B::Device,
) -> HeadGrads<B> {
    let (compute, scale) = (walk.compute, walk.scale);
    let [r, c, d] = h.dims();
    let vocab = embed.weight.dims()[0];
    let rows = r * (c - 1);
    let chunk = match walk.head_chunk {
        0 => rows.max(1),
        n => (n / vocab).max(1),
    };
    // [r, c, d] -> [r·(c-1), d]: row p = (sequence, position) predicting labels[:, 1:]
    let h = h.inner().slice([0..r, 0..c - 1]).reshape([rows, d]);
    let targets: Vec<i64> = batch.shifted_labels().collect();
    let mut nll = 0.0;
    let mut g_parts = Vec::new();
    let mut acc = burn::optim::GradientsAccumulator::<M::Head>::new();
    let mut tied: Option<Tensor<B::InnerBackend, 2>> = None;
    for start in (0..rows).step_by(chunk) {
        let end = (start + chunk).min(rows);
        let k = end - start;
        // [k, d] -> [1, k, d]
        let hk = Tensor::<B, 3>::from_inner(h.clone().slice([start..end, 0..d]).reshape([1, k, d]))
            .require_grad();
        let logits = in_dtype(head.clone(), compute)
            .forward(hk.clone(), &in_dtype(embed.clone(), compute))
            .reshape([k, vocab]);
        let t = Tensor::<B, 1, Int>::from_data(
            TensorData::new(targets[start..end].to_vec(), [k]),
            device,
        );
        let (sum, _) = cross_entropy_sum_sharded(logits, t, embed.shard.as_ref());
        nll += sum.clone().inner().into_scalar().elem::<f64>();
        let mut grads = sum.mul_scalar(scale).backward();
        g_parts.push(
            hk.grad(&grads)
                .expect("gradient of the head input")
                .reshape([k, d]),
        );
        acc.accumulate(head, GradientsParams::from_module(&mut grads, head));
        if let Some(t) = embed.weight.grad_remove(&mut grads) {
            tied = Some(match tied.take() {
                Some(s) => s + t,
                None => t,
            });
        }
    }
    // [r·(c-1), d] -> [r, c-1, d], then a zero gradient for the last position of each sequence.
    let g = Tensor::cat(g_parts, 0).reshape([r, c - 1, d]);
    let g = Tensor::cat(vec![g.clone(), g.zeros_like().slice([0..r, 0..1])], 1);
    HeadGrads {
        nll,
        g,
        params: acc.grads(),
        tied,
    }
}
