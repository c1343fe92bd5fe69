//! Block-wise backward over the block contract (DESIGN.md): the forward pass detaches between
//! `embed`, each of `layers` and `head`; the backward pass walks them in reverse, back-propagating
//! `sum(out · g_out)` through one block at a time, so that block's parameter gradients exist on
//! their own and can be consumed — accumulated (activation checkpointing) or turned into an
//! update at once and dropped (LOMO, AdaLomo) — before the next block's backward runs.
//!
//! With `recompute`, only block inputs are kept and each block is run again in the reverse walk
//! (activation checkpointing); otherwise every block keeps its autodiff graph from the forward
//! pass, as a plain backward would.

use burn::module::{AutodiffModule, Module, ModuleMapper, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, ElementConversion, Int, Tensor, TensorData};
use collie_core::loss::cross_entropy_sum;
use collie_core::nn::to_dtype;
use collie_data::loader::Batch;
use collie_llama::Head;

use crate::eval::int2;
use collie_llama::Llama;

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

/// How a block-wise pass runs.
#[derive(Debug, Clone, Copy)]
pub struct Walk {
    /// Compute dtype of the blocks (parameters stay f32).
    pub compute: DType,
    /// The backward pass sees `nll · scale`.
    pub scale: f64,
    /// Keep only block inputs and recompute each block in the reverse walk.
    pub recompute: bool,
}

/// Forward + reverse block walk of one micro-batch. The backward pass sees `nll · scale`;
/// `on_block` receives every block's parameter gradients (keyed by the ids of `model`, the f32
/// masters), in the order head, layers from last to first, embed, each after `hook`. A tied
/// embedding weight gets gradient in the head and in the embedding; the head's share is held back and added to the
/// embedding block's, so the weight appears once, with the sum (as lomo-optim's hook fires once
/// on the accumulated gradient). Returns the summed NLL.
///
/// `model` is taken by value and each block is dropped once its gradients are handed out, so a
/// caller that replaces blocks as it goes (LOMO) never holds old and new weights of the whole
/// model at once.
pub fn backward_blockwise<B: AutodiffBackend>(
    model: Llama<B>,
    batch: &Batch,
    walk: Walk,
    device: &B::Device,
    mut hook: Option<&mut GradHook>,
    mut on_block: impl FnMut(BlockId, GradientsParams),
) -> f64 {
    let Walk {
        compute,
        scale,
        recompute,
    } = walk;
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
    let ctx = model.context(r, c, 0, Some(&segments), Some(positions), device);
    let embedded = in_dtype(model.embed.clone(), compute).forward(ids);
    // inputs[i]: detached input of layer i; outputs[i]: its output with the graph kept (empty when
    // recomputing, where the forward pass runs on the inner backend and builds no graph at all).
    let mut inputs = Vec::with_capacity(model.layers.len() + 1);
    let mut outputs = Vec::with_capacity(model.layers.len());
    let mut x = embedded.clone().detach();
    if recompute {
        let ctx = model.valid().context(
            r,
            c,
            0,
            Some(&segments.clone().inner()),
            Some(int2::<B::InnerBackend>(&batch.positions, r, c, device)),
            device,
        );
        let mut xi = x.inner();
        for layer in &model.layers {
            inputs.push(Tensor::from_inner(xi.clone()));
            xi = in_dtype(layer.valid(), compute).forward(xi, &ctx, None);
        }
        x = Tensor::from_inner(xi);
    } else {
        for layer in &model.layers {
            let x_in = x.require_grad();
            let out = in_dtype(layer.clone(), compute).forward(x_in.clone(), &ctx, None);
            x = out.clone().detach();
            inputs.push(x_in);
            outputs.push(out);
        }
    }
    let Llama {
        embed,
        layers,
        head,
        ..
    } = model;
    let HeadGrads {
        nll,
        mut g,
        params: head_grads,
        tied,
    } = head_backward(&head, &embed, x, batch, compute, scale, device);
    drop(head);
    on_block(BlockId::Head, head_grads);
    for (i, layer) in layers.into_iter().enumerate().rev() {
        let x_in = inputs.pop().expect("block input");
        let (x_in, out) = if recompute {
            let x_in = x_in.require_grad();
            let out = in_dtype(layer.clone(), compute).forward(x_in.clone(), &ctx, None);
            (x_in, out)
        } else {
            (x_in, outputs.pop().expect("block output"))
        };
        let g_out = to_dtype(Tensor::from_inner(g), out.dtype());
        let mut grads = to_dtype(out * g_out, DType::F32).sum().backward();
        g = x_in.grad(&grads).expect("gradient of the block input");
        let block = GradientsParams::from_module(&mut grads, &layer);
        drop((grads, layer));
        on_block(BlockId::Layer(i), block);
    }
    let g_out = to_dtype(Tensor::from_inner(g), embedded.dtype());
    let mut grads = to_dtype(embedded * g_out, DType::F32).sum().backward();
    let mut block = GradientsParams::from_module(&mut grads, &embed);
    if let Some(t) = tied {
        let id = embed.weight.id;
        let sum = match block.remove::<B::InnerBackend, 2>(id) {
            Some(own) => own + t,
            None => t,
        };
        block.register(id, sum);
    }
    drop((grads, embed));
    on_block(BlockId::Embed, block);
    nll
}

/// Logit elements per chunk of the head's backward (64 MiB of f32 per copy). Smaller chunks make
/// the LM-head matmuls skinny: on the 30M bench preset (seq 512) LOMO ran 152 tokens/s with 4 Mi
/// elements, 206 with 16 Mi and 253 unchunked, at 21.4 / 21.9 / 26.6 bytes per parameter.
const HEAD_CHUNK_ELEMENTS: usize = 1 << 24;

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
/// vocabularies). The chunks' parameter gradients are summed. Returns the summed NLL, the
/// gradient of the head input `h` (`[r, c, d]`, zero at the last position), the head's parameter
/// gradients and a tied embedding weight's share.
fn head_backward<B: AutodiffBackend>(
    head: &Head<B>,
    embed: &collie_core::nn::Embedding<B>,
    h: Tensor<B, 3>,
    batch: &Batch,
    compute: DType,
    scale: f64,
    device: &B::Device,
) -> HeadGrads<B> {
    let [r, c, d] = h.dims();
    let vocab = embed.weight.dims()[0];
    let rows = r * (c - 1);
    let chunk = (HEAD_CHUNK_ELEMENTS / vocab).max(1);
    // [r, c, d] -> [r·(c-1), d]: row p = (sequence, position) predicting labels[:, 1:]
    let h = h.inner().slice([0..r, 0..c - 1]).reshape([rows, d]);
    let targets: Vec<i64> = batch.shifted_labels().collect();
    let mut nll = 0.0;
    let mut g_parts = Vec::new();
    let mut acc = burn::optim::GradientsAccumulator::<Head<B>>::new();
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
        let (sum, _) = cross_entropy_sum(logits, t);
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
