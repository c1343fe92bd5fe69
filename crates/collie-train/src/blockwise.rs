//! Block-wise backward over the block contract (DESIGN.md): the forward pass detaches between
//! `embed`, each of `layers` and `head`; the backward pass walks them in reverse, back-propagating
//! `sum(out · g_out)` through one block at a time, so that block's parameter gradients exist on
//! their own and can be consumed — accumulated (activation checkpointing) or turned into an
//! update at once and dropped (LOMO, AdaLomo) — before the next block's backward runs.
//!
//! With `recompute`, only block inputs are kept and each block is run again in the reverse walk
//! (activation checkpointing); otherwise every block keeps its autodiff graph from the forward
//! pass, as a plain backward would.

use burn::module::{Module, ModuleMapper, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, ElementConversion, Int, Tensor, TensorData};
use collie_core::loss::cross_entropy_sum;
use collie_core::nn::to_dtype;
use collie_data::loader::Batch;
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
/// (the place where a data-parallel run all-reduces them). The gradients of a tied head include
/// the embedding's share.
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
pub(crate) fn in_dtype<B: AutodiffBackend, M: Module<B>>(module: M, dtype: DType) -> M {
    if dtype == DType::F32 {
        module
    } else {
        module.map(&mut CastParams(dtype))
    }
}

pub(crate) fn tensor2<B: Backend>(
    v: &[i64],
    rows: usize,
    cols: usize,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    Tensor::from_data(TensorData::new(v.to_vec(), [rows, cols]), device)
}

/// Forward + reverse block walk of one micro-batch. The backward pass sees `nll · scale`;
/// `on_block` receives every block's parameter gradients (keyed by the ids of `model`, the f32
/// masters), in the order head, layers from last to first, embed. Returns the summed NLL.
pub fn backward_blockwise<B: AutodiffBackend>(
    model: &Llama<B>,
    compute: DType,
    batch: &Batch,
    scale: f64,
    recompute: bool,
    device: &B::Device,
    mut on_block: impl FnMut(BlockId, GradientsParams),
) -> f64 {
    // Every use of a module below takes a fresh compute-dtype copy, so each backward pass has its
    // own cast nodes to flow through to the f32 masters.
    let (r, c) = (batch.rows, batch.cols);
    let ids = tensor2::<B>(&batch.input_ids, r, c, device);
    let segments = tensor2::<B>(&batch.segments, r, c, device);
    let positions = tensor2::<B>(&batch.positions, r, c, device);
    let ctx = model.context(r, c, 0, Some(&segments), Some(positions), device);
    let embedded = in_dtype(model.embed.clone(), compute).forward(ids);
    // inputs[i]: detached input of layer i (require_grad unless recomputing); outputs[i]: its
    // output with the graph kept (empty when recomputing).
    let mut inputs = Vec::with_capacity(model.layers.len() + 1);
    let mut outputs = Vec::with_capacity(model.layers.len());
    let mut x = embedded.clone().detach();
    for layer in &model.layers {
        let x_in = if recompute { x } else { x.require_grad() };
        let out = in_dtype(layer.clone(), compute).forward(x_in.clone(), &ctx, None);
        x = out.clone().detach();
        inputs.push(x_in);
        if !recompute {
            outputs.push(out);
        }
    }
    let h = x.require_grad();
    let logits = in_dtype(model.head.clone(), compute)
        .forward(h.clone(), &in_dtype(model.embed.clone(), compute));
    let vocab = logits.dims()[2];
    // [r, c, vocab] -> [r·(c-1), vocab] against labels[:, 1:]
    let logits = logits.slice([0..r, 0..c - 1]).reshape([r * (c - 1), vocab]);
    let targets: Vec<i64> = (0..r)
        .flat_map(|row| batch.labels[row * c + 1..(row + 1) * c].iter().copied())
        .collect();
    let targets = Tensor::<B, 1, Int>::from_data(TensorData::new(targets, [r * (c - 1)]), device);
    let (sum, _) = cross_entropy_sum(logits, targets);
    let nll = sum.clone().inner().into_scalar().elem::<f64>();
    let grads = sum.mul_scalar(scale).backward();
    let mut g = h.grad(&grads).expect("gradient of the head input");
    on_block(BlockId::Head, GradientsParams::from_grads(grads, model));
    for (i, layer) in model.layers.iter().enumerate().rev() {
        let x_in = inputs.pop().expect("block input");
        let (x_in, out) = if recompute {
            let x_in = x_in.require_grad();
            let out = in_dtype(layer.clone(), compute).forward(x_in.clone(), &ctx, None);
            (x_in, out)
        } else {
            (x_in, outputs.pop().expect("block output"))
        };
        let g_out = to_dtype(Tensor::from_inner(g), out.dtype());
        let grads = to_dtype(out * g_out, DType::F32).sum().backward();
        g = x_in.grad(&grads).expect("gradient of the block input");
        on_block(BlockId::Layer(i), GradientsParams::from_grads(grads, model));
    }
    let g_out = to_dtype(Tensor::from_inner(g), embedded.dtype());
    let grads = to_dtype(embedded * g_out, DType::F32).sum().backward();
    on_block(BlockId::Embed, GradientsParams::from_grads(grads, model));
    nll
}
