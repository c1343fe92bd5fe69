//! Tensor parallelism as a transform of any [`BlockModel`]: [`shard`] (a whole model → this
//! rank's shard), driven by the model's linear-layer table ([`Adaptable::linears_mut`]). Each
//! rank saves its own shards (checkpoints join them when read), so nothing gathers the model.
//!
//! Megatron's layout: layers marked `Column` split their output features (q/k/v and gate/up: each
//! rank holds whole attention heads and a slice of the MLP; `ColumnParts` splits each part of a
//! fused layer, GLM's gate/up, so a rank's slice is again a gate and an up), `Row` layers their input features
//! (o and down: outputs summed); the embedding and an untied LM head are split by vocabulary (the
//! loss is vocabulary-parallel, logits are never gathered in training). Norms stay whole on every
//! rank. LoRA and IA3 adapters split with their base layer.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Mutex, OnceLock};

use burn::module::{Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::dist::Group;
use crate::model::BlockModel;
use crate::nn::{Adapter, Linear, ParallelMode, VocabShard};
use crate::{CoreError, Result};

/// What a [`shard`] did to the parameters.
#[derive(Debug, Clone, Default)]
pub struct Split {
    /// Parameters split across the group, with the dimension each was split along and the
    /// number of parts of that dimension split each on its own (1, or `ColumnParts`' n).
    pub split: Vec<(ParamId, (usize, usize))>,
    /// Whole parameters inside the tensor-parallel region (LoRA's A of a column layer, B of a
    /// row layer, IA3 on a column layer's input): every rank's gradient is a partial sum, to be
    /// all-reduced over the group. The remaining parameters get identical gradients everywhere.
    pub partial: Vec<ParamId>,
}

/// Slice `rank`/`tp` of each of the `parts` equal consecutive parts of `t` along `dim` (rows:
/// dim 0, columns: dim 1), concatenated in part order.
fn split<B: Backend, const D: usize>(
    t: Tensor<B, D>,
    dim: usize,
    parts: usize,
    rank: usize,
    tp: usize,
) -> Tensor<B, D> {
    let part = t.dims()[dim] / parts;
    let n = part / tp;
    let slices = (0..parts).map(|k| t.clone().narrow(dim, k * part + rank * n, n));
    let slice = Tensor::cat(slices.collect(), dim);
    // A copy: a narrowed view (and the `cat` of one view) would keep the whole tensor's buffer
    // alive for as long as the shard lives, so every rank would hold the whole model.
    Tensor::from_data(slice.into_data(), &t.device())
}

/// The slice of a parameter that [`shard`] asks of its loader: a dimension of the parameter and
/// the index ranges along it that the rank keeps (concatenated along it).
pub type SliceRequest = (usize, Vec<Range<usize>>);

/// Parameters not read yet whose loader can read part of a tensor, with the slice asked of each.
fn slices() -> &'static Mutex<HashMap<ParamId, Option<SliceRequest>>> {
    static SLICES: OnceLock<Mutex<HashMap<ParamId, Option<SliceRequest>>>> = OnceLock::new();
    SLICES.get_or_init(Default::default)
}

/// A loader that defers the read of `id` and can read part of its tensor says so: [`shard`]
/// will then ask it for a rank's slice before the first read, so no rank reads a whole tensor
/// of which it keeps a slice.
pub fn offer_slices(id: ParamId) {
    slices().lock().expect("slice requests").insert(id, None);
}

/// Called by the loader as it reads `id`: the slice asked of it, if any (the offer ends here).
pub fn take_slice(id: ParamId) -> Option<SliceRequest> {
    slices()
        .lock()
        .expect("slice requests")
        .remove(&id)
        .flatten()
}

/// Asks the loader of the unread `id` for a slice; false where it offered none.
fn ask_slice(id: ParamId, request: SliceRequest) -> bool {
    match slices().lock().expect("slice requests").get_mut(&id) {
        Some(slot) => {
            *slot = Some(request);
            true
        }
        None => false,
    }
}

/// `p` replaced by its slice of each of `parts` parts (same id, same trainability): read as
/// that slice alone where `p` is unread and its loader reads slices, else cut from the whole.
fn shard_param<B: Backend, const D: usize>(
    p: Param<Tensor<B, D>>,
    (dim, parts): (usize, usize),
    rank: usize,
    tp: usize,
    sharded: &mut Split,
) -> Param<Tensor<B, D>> {
    let part = p.lazy_shape().dims::<D>()[dim] / parts;
    let n = part / tp;
    // An unread parameter whose loader reads slices is read as this rank's slice alone.
    let ranges = (0..parts)
        .map(|k| k * part + rank * n..k * part + rank * n + n)
        .collect();
    let asked = !p.is_initialized() && ask_slice(p.id, (dim, ranges));
    let (id, t, mapper) = p.consume();
    let trainable = t.is_require_grad();
    // A fresh leaf (the slice of a detached tensor is still an op output).
    let mut part = match asked && t.dims()[dim] == n * parts {
        true => t.detach(),
        false => split(t.detach(), dim, parts, rank, tp).detach(),
    };
    if trainable {
        part = part.require_grad();
    }
    sharded.split.push((id, (dim, parts)));
    Param::from_mapped_value(id, part, mapper)
}

/// Splits a linear layer in `mode` (with its bias and adapter).
fn shard_linear<B: Backend>(
    mut l: Linear<B>,
    mode: ParallelMode,
    group: &Group,
    sharded: &mut Split,
) -> Linear<B> {
    let (rank, tp) = (group.rank(), group.size());
    // Weights are [d_in, d_out]: a column layer splits dim 1 (per part), a row layer dim 0.
    // Vectors over the outputs (bias, IA3 after a column layer) split like the columns.
    let columns = mode.output_parts();
    let (w, outputs) = match columns {
        Some(parts) => ((1, parts), (0, parts)),
        None => ((0, 1), (0, 1)),
    };
    l.weight = shard_param(l.weight, w, rank, tp, sharded);
    if columns.is_some() {
        l.bias = l.bias.map(|b| shard_param(b, outputs, rank, tp, sharded));
    }
    l.adapter = l.adapter.map(|a| match a {
        // x·A·B: a column layer splits B's columns, a row layer A's rows.
        Adapter::Lora(mut lora) => {
            if columns.is_some() {
                lora.b = shard_param(lora.b, w, rank, tp, sharded);
                sharded.partial.push(lora.a.id);
            } else {
                lora.a = shard_param(lora.a, (0, 1), rank, tp, sharded);
                sharded.partial.push(lora.b.id);
            }
            Adapter::Lora(lora)
        }
        // The scale vector follows the features it multiplies when those are split.
        Adapter::Ia3(mut ia3) => {
            let split_features = columns.is_some() != ia3.on_input;
            if split_features {
                ia3.scale = shard_param(ia3.scale, outputs, rank, tp, sharded);
            } else if columns.is_some() {
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
    embed.weight = shard_param(embed.weight.clone(), (0, 1), rank, tp, &mut sharded);
    embed.shard = Some(VocabShard {
        group: group.clone(),
        start: rank * vocab / tp,
    });
    Ok((model, sharded))
}
