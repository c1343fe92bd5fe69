//! Tensor parallelism for LLaMA: the plan (which layer splits which way) and the two transforms
//! that apply it — [`shard`] (a whole model → this rank's shard) and [`gather`] (shards → the
//! whole model again, e.g. to save an HF checkpoint).
//!
//! Megatron's layout: q/k/v and gate/up are column-parallel (output features split, so each rank
//! holds whole attention heads and a slice of the MLP), o and down are row-parallel (input
//! features split, outputs summed), the embedding and the LM head are split by vocabulary (the
//! loss is vocabulary-parallel, logits are never gathered). Norms stay whole on every rank.
//! Heads split by kv-head groups: rank r holds kv heads `r·kv/tp ..` and the query heads that
//! read them. LoRA and IA3 adapters split with their base layer.

use burn::module::{Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use collie_core::dist::{gather_along, Group};
use collie_core::nn::{Adapter, Linear, ParallelMode, VocabShard};

use crate::error::{LlamaError, Result};
use crate::model::{Block, Llama};

/// The plan: module paths (as `collie_peft` and checkpoints name them) and their layout.
pub const PLAN: &[(&str, ParallelMode)] = &[
    ("layers.*.attn.q_proj", ParallelMode::Column),
    ("layers.*.attn.k_proj", ParallelMode::Column),
    ("layers.*.attn.v_proj", ParallelMode::Column),
    ("layers.*.attn.o_proj", ParallelMode::Row),
    ("layers.*.mlp.gate_proj", ParallelMode::Column),
    ("layers.*.mlp.up_proj", ParallelMode::Column),
    ("layers.*.mlp.down_proj", ParallelMode::Row),
    // Vocabulary-parallel: embedding rows, LM head columns.
    ("embed", ParallelMode::Row),
    ("head.lm_head", ParallelMode::Column),
];

/// The layout [`PLAN`] gives the module at `key`.
fn plan(key: &str) -> ParallelMode {
    PLAN.iter()
        .find(|(k, _)| *k == key)
        .map_or(ParallelMode::Full, |(_, m)| *m)
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

/// Replaces every linear layer of `layer` that [`PLAN`] names by `f(plan key, layer)`.
fn map_planned<B: Backend>(layer: &mut Block<B>, mut f: impl FnMut(&str, Linear<B>) -> Linear<B>) {
    let (a, m) = (&mut layer.attn, &mut layer.mlp);
    let slots: [(&str, &mut Linear<B>); 7] = [
        ("layers.*.attn.q_proj", &mut a.q_proj),
        ("layers.*.attn.k_proj", &mut a.k_proj),
        ("layers.*.attn.v_proj", &mut a.v_proj),
        ("layers.*.attn.o_proj", &mut a.o_proj),
        ("layers.*.mlp.gate_proj", &mut m.gate_proj),
        ("layers.*.mlp.up_proj", &mut m.up_proj),
        ("layers.*.mlp.down_proj", &mut m.down_proj),
    ];
    for (key, slot) in slots {
        *slot = f(key, slot.clone());
    }
}

/// Checks that `group.size()` divides what it must split, naming the config key at fault.
fn check<B: Backend>(model: &Llama<B>, tp: usize) -> Result<()> {
    let layer = model.layers.first();
    let mut sizes = vec![("vocab_size", model.embed.weight.dims()[0])];
    if let Some(l) = layer {
        sizes.push(("num_attention_heads", l.attn.n_heads));
        sizes.push(("num_key_value_heads", l.attn.n_kv_heads));
        sizes.push(("intermediate_size", l.mlp.up_proj.dims()[1]));
    }
    for (key, n) in sizes {
        if n % tp != 0 {
            return Err(LlamaError::Config(format!(
                "parallel.tp = {tp} does not divide {key} = {n}"
            )));
        }
    }
    if model.virtual_tokens.is_some() {
        return Err(LlamaError::Config(format!(
            "parallel.tp = {tp}: prompt learning (virtual tokens) is not split across tensor-parallel ranks; use LoRA or IA3"
        )));
    }
    Ok(())
}

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

/// This rank's tensor-parallel shard of a whole `model` (the same model on every rank of
/// `group`), and which parameters were split.
pub fn shard<B: Backend>(mut model: Llama<B>, group: &Group) -> Result<(Llama<B>, Split)> {
    let (rank, tp) = (group.rank(), group.size());
    let mut sharded = Split::default();
    if tp == 1 {
        return Ok((model, sharded));
    }
    check(&model, tp)?;
    for layer in &mut model.layers {
        map_planned(layer, |key, l| {
            shard_linear(l, plan(key), group, &mut sharded)
        });
        layer.attn.n_heads /= tp;
        layer.attn.n_kv_heads /= tp;
    }
    let vocab = model.embed.weight.dims()[0];
    model.embed.weight = shard_param(model.embed.weight, 0, rank, tp, &mut sharded);
    model.embed.shard = Some(VocabShard {
        group: group.clone(),
        start: rank * vocab / tp,
    });
    model.head.lm_head = model
        .head
        .lm_head
        .map(|l| shard_linear(l, plan("head.lm_head"), group, &mut sharded));
    Ok((model, sharded))
}

/// The whole model from every rank's shard (collective over `group`; every rank gets it).
pub fn gather<B: Backend>(model: &Llama<B>, group: &Group) -> Llama<B> {
    let mut model = model.clone();
    if model.embed.shard.is_none() {
        return model;
    }
    let tp = group.size();
    for layer in &mut model.layers {
        map_planned(layer, |_, l| join_linear(l, group));
        layer.attn.n_heads *= tp;
        layer.attn.n_kv_heads *= tp;
    }
    model.embed.weight = join_param(model.embed.weight, 0, group);
    model.embed.shard = None;
    model.head.lm_head = model.head.lm_head.map(|l| join_linear(l, group));
    model
}
