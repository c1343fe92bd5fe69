//! Losses.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor};

/// Label value that contributes nothing to the loss (PyTorch's `ignore_index`, HF's `-100`).
pub const IGNORE_INDEX: i64 = -100;

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
