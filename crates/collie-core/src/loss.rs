//! Losses.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor};

/// Label value that contributes nothing to the loss (PyTorch's `ignore_index`, HF's `-100`).
pub const IGNORE_INDEX: i64 = -100;

/// [`cross_entropy_sum`] over logits split by vocabulary across a tensor-parallel group
/// (Megatron's vocabulary-parallel cross-entropy): `logits` holds this rank's columns
/// `shard.start ..`; the maximum, the softmax denominator and the target's logit are reduced over
/// the group, so the full logits are never gathered. `None` is the plain [`cross_entropy_sum`].
///
/// # Shapes
/// - logits: `[n, vocab / tp]`, targets: `[n]` (full-vocabulary ids) → `[1]` sum and count
pub fn cross_entropy_sum_sharded<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    shard: Option<&crate::nn::VocabShard>,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let Some(shard) = shard else {
        return cross_entropy_sum(logits, targets);
    };
    use crate::dist::reduce_from_group;
    let [n, cols] = logits.dims();
    let z = crate::nn::to_dtype(logits, DType::F32);
    let device = z.device();
    let valid = targets.clone().not_equal_elem(IGNORE_INDEX);
    // The row maximum over the whole vocabulary, a constant (it cancels in the gradient).
    let mut max: Vec<f64> = z
        .clone()
        .detach()
        .max_dim(1)
        .into_data()
        .convert::<f64>()
        .into_vec::<f64>()
        .expect("f64 after convert");
    shard.group.all_reduce_max_f64(&mut max);
    let max = Tensor::<B, 1>::from_data(
        burn::tensor::TensorData::new(max.into_iter().map(|v| v as f32).collect(), [n]),
        &device,
    );
    // [n] -> [n, 1]
    let shifted = z.sub(max.clone().reshape([n, 1]));
    let denom = reduce_from_group(shifted.clone().exp().sum_dim(1).reshape([n]), &shard.group);
    // The target's shifted logit, from the rank that holds its column.
    let local = targets.sub_scalar(shard.start as i64);
    let outside = local
        .clone()
        .lower_elem(0)
        .bool_or(local.clone().greater_equal_elem(cols as i64));
    let safe = local.mask_fill(outside.clone(), 0);
    let picked = shifted.gather(1, safe.reshape([n, 1])).reshape([n]) * outside.bool_not().float();
    let picked = reduce_from_group(picked, &shard.group);
    let weight = valid.float();
    // −log softmax = log(Σ exp(z − m)) − (z_t − m)
    let sum = ((denom.log() - picked) * weight.clone()).sum();
    (sum, weight.sum())
}

/// Summed token negative log-likelihood and the number of counted tokens.
///
/// Targets equal to [`IGNORE_INDEX`] are skipped. Divide the sum by the count for HF's mean loss.
///
/// # Shapes
/// - logits: `[n, vocab]`
/// - targets: `[n]`
/// - returns a `[1]` tensor (the sum) and the count
pub fn cross_entropy_sum<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    match crate::fused::kernels::<B>() {
        // One pass per row forward and one backward (crate::fused), no log-probabilities kept.
        Some(k) if logits.dtype() == DType::F32 => {
            let valid = targets.clone().not_equal_elem(IGNORE_INDEX);
            let sum = (k.xent)(logits, targets).sum();
            (sum, valid.float().sum())
        }
        _ => cross_entropy_sum_unfused(logits, targets),
    }
}

/// [`cross_entropy_sum`] as tensor operations (`log_softmax`, gather): the reference of the
/// fused kernel ([`crate::fused::FusedKernels::xent`]) and the path of backends without it.
///
/// # Shapes
/// - as [`cross_entropy_sum`]
pub fn cross_entropy_sum_unfused<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let [n, _] = logits.dims();
    let valid = targets.clone().not_equal_elem(IGNORE_INDEX);
    // Ignored targets point at class 0; their term is multiplied by zero below.
    let safe = targets.mask_fill(valid.clone().bool_not(), 0);
    // Reduced-precision logits are upcast for the loss, as HF does.
    let logp = log_softmax(crate::nn::to_dtype(logits, DType::F32), 1);
    // [n, 1] -> [n]
    let picked = logp.gather(1, safe.reshape([n, 1])).reshape([n]);
    let weight = valid.float();
    let sum = (picked * weight.clone()).sum().neg();
    (sum, weight.sum())
}
