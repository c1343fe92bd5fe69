//! Tensor parallelism as a transform of any [`BlockModel`]: [`shard`] (a whole model → this
//! rank's shard) and [`gather`] (shards → the whole model again, e.g. to save an HF checkpoint),
//! driven by the model's linear-layer table ([`Adaptable::linears_mut`]).
//!
//! Megatron's layout: layers marked `Column` split their output features (q/k/v and gate/up: each
//! rank holds whole attention heads and a slice of the MLP), `Row` layers their input features
//! (o and down: outputs summed); the embedding and an untied LM head are split by vocabulary (the
//! loss is vocabulary-parallel, logits are never gathered in training). Norms stay whole on every
//! rank. LoRA and IA3 adapters split with their base layer.

use burn::module::{Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::dist::{gather_along, Group};
use crate::model::BlockModel;
use crate::nn::{Adapter, Linear, ParallelMode, VocabShard};
use crate::{CoreError, Result};

/// What a [`shard`] did to the parameters.
#[derive(Debug, Clone, Default)]
pub struct Split {
    /// Parameters split across the group, with the dimension each was split along.
    pub split: Vec<(ParamId, usize)>,
    /// Whole parameters inside the tensor-parallel region (LoRA's A of a column layer, B of a
    /// row layer, IA3 on a column layer's input): every rank's gradient is a partial sum, to be
    /// all-reduced over the group. The remaining parameters get identical gradients everywhere.
    pub partial: Vec<ParamId>,
}

/// Rows (dim 0) or columns (dim 1) `rank`/`tp` of `t`.
fn split<B: Backend, const D: usize>(
    t: Tensor<B, D>,
    dim: usize,
    rank: usize,
    tp: usize,
) -> Tensor<B, D> {
    let n = t.dims()[dim] / tp;
    t.narrow(dim, rank * n, n)
}

/// `p` replaced by its part (same id, same trainability).
fn shard_param<B: Backend, const D: usize>(
    p: Param<Tensor<B, D>>,
    dim: usize,
    rank: usize,
    tp: usize,
    sharded: &mut Split,
) -> Param<Tensor<B, D>> {
    let (id, t, mapper) = p.consume();
    let trainable = t.is_require_grad();
    // A fresh leaf (the slice of a detached tensor is still an op output).
    let mut part = split(t.detach(), dim, rank, tp).detach();
    if trainable {
        part = part.require_grad();
    }
    sharded.split.push((id, dim));
    Param::from_mapped_value(id, part, mapper)
}

/// `p` whole again (same id, same trainability).
fn join_param<B: Backend, const D: usize>(
    p: Param<Tensor<B, D>>,
    dim: usize,
    group: &Group,
) -> Param<Tensor<B, D>> {
    let (id, t, mapper) = p.consume();
    let trainable = t.is_require_grad();
    let mut whole = gather_along(t.detach(), dim, group);
    if trainable {
        whole = whole.require_grad();
    }
    Param::from_mapped_value(id, whole, mapper)
}

/// Splits a linear layer in `mode` (with its bias and adapter).
fn shard_linear<B: Backend>(
    mut l: Linear<B>,
    mode: ParallelMode,
    group: &Group,
    sharded: &mut Split,
) -> Linear<B> {
    let (rank, tp) = (group.rank(), group.size());
    // Weights are [d_in, d_out]: column = split dim 1, row = split dim 0.
    let dim = if mode == ParallelMode::Column { 1 } else { 0 };
    l.weight = shard_param(l.weight, dim, rank, tp, sharded);
    if mode == ParallelMode::Column {
        l.bias = l.bias.map(|b| shard_param(b, 0, rank, tp, sharded));
    }
    l.adapter = l.adapter.map(|a| match a {
        // x·A·B: a column layer splits B's columns, a row layer A's rows.
        Adapter::Lora(mut lora) => {
            if mode == ParallelMode::Column {
                lora.b = shard_param(lora.b, 1, rank, tp, sharded);
                sharded.partial.push(lora.a.id);
            } else {
                lora.a = shard_param(lora.a, 0, rank, tp, sharded);
                sharded.partial.push(lora.b.id);
            }
            Adapter::Lora(lora)
        }
        // The scale vector follows the features it multiplies when those are split.
        Adapter::Ia3(mut ia3) => {
            let split_features = (mode == ParallelMode::Column) != ia3.on_input;
            if split_features {
                ia3.scale = shard_param(ia3.scale, 0, rank, tp, sharded);
            } else if mode == ParallelMode::Column {
                // Scales the replicated input of a split product.
                sharded.partial.push(ia3.scale.id);
            }
            Adapter::Ia3(ia3)
        }
    });
    l.parallel = mode;
    l.tp = Some(group.clone());
    l
}

/// The inverse of [`shard_linear`].
fn join_linear<B: Backend>(mut l: Linear<B>, group: &Group) -> Linear<B> {
    let mode = l.parallel;
    let dim = if mode == ParallelMode::Column { 1 } else { 0 };
    l.weight = join_param(l.weight, dim, group);
    if mode == ParallelMode::Column {
        l.bias = l.bias.map(|b| join_param(b, 0, group));
    }
    l.adapter = l.adapter.map(|a| match a {
        Adapter::Lora(mut lora) => {
            if mode == ParallelMode::Column {
                lora.b = join_param(lora.b, 1, group);
            } else {
                lora.a = join_param(lora.a, 0, group);
            }
            Adapter::Lora(lora)
        }
        Adapter::Ia3(mut ia3) => {
            if (mode == ParallelMode::Column) != ia3.on_input {
                ia3.scale = join_param(ia3.scale, 0, group);
            }
            Adapter::Ia3(ia3)
        }
    });
    l.parallel = ParallelMode::Full;
    l.tp = None;
    l
}

/// Checks that `tp` divides what it must split, naming the config key at fault.
pub fn check<B: Backend, M: BlockModel<B>>(model: &M, tp: usize) -> Result<()> {
    for (key, n) in model.tp_divisible() {
        if n % tp != 0 {
            return Err(CoreError::Config(format!(
                "parallel.tp = {tp} does not divide {key} = {n}"
            )));
        }
    }
    if model.virtual_tokens().is_some() {
        return Err(CoreError::Config(format!(
            "parallel.tp = {tp}: prompt learning (virtual tokens) is not split across tensor-parallel ranks; use LoRA or IA3"
        )));
    }
    Ok(())
}

/// This rank's tensor-parallel shard of a whole `model` (the same model on every rank of
/// `group`), and which parameters were split.
pub fn shard<B: Backend, M: BlockModel<B>>(mut model: M, group: &Group) -> Result<(M, Split)> {
    let (rank, tp) = (group.rank(), group.size());
    let mut sharded = Split::default();
    if tp == 1 {
        return Ok((model, sharded));
    }
    check(&model, tp)?;
    sharded.partial.extend(model.head_local_params());
    for slot in model.linears_mut() {
        if slot.parallel != ParallelMode::Full {
            *slot.linear = shard_linear(slot.linear.clone(), slot.parallel, group, &mut sharded);
        }
    }
    model.scale_heads(tp, true);
    let embed = model.embed_mut();
    let vocab = embed.weight.dims()[0];
    embed.weight = shard_param(embed.weight.clone(), 0, rank, tp, &mut sharded);
    embed.shard = Some(VocabShard {
        group: group.clone(),
        start: rank * vocab / tp,
    });
    Ok((model, sharded))
}

/// The whole model from every rank's shard (collective over `group`; every rank gets it).
pub fn gather<B: Backend, M: BlockModel<B>>(model: &M, group: &Group) -> M {
    let mut model = model.clone();
    if model.embed().shard.is_none() {
        return model;
    }
    for slot in model.linears_mut() {
        if slot.linear.parallel != ParallelMode::Full {
            *slot.linear = join_linear(slot.linear.clone(), group);
        }
    }
    model.scale_heads(group.size(), false);
    let embed = model.embed_mut();
    embed.weight = join_param(embed.weight.clone(), 0, group);
    embed.shard = None;
    model
}
