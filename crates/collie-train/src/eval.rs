//! Evaluation: token negative log-likelihood and perplexity of a [`CausalLm`].

use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use collie_core::lm::CausalLm;
use collie_core::loss::{cross_entropy_sum, IGNORE_INDEX};

/// Summed NLL of every token after the first in each sequence, and how many tokens that is.
///
/// Sequences are right-padded into one batch; padding predicts nothing. A sequence shorter than
/// two tokens contributes nothing.
pub fn sequence_nll<B: Backend, M: CausalLm<B>>(
    model: &M,
    sequences: &[Vec<u32>],
    device: &B::Device,
) -> (f64, usize) {
    let seqs: Vec<&Vec<u32>> = sequences.iter().filter(|s| s.len() >= 2).collect();
    if seqs.is_empty() {
        return (0.0, 0);
    }
    let (b, s) = (seqs.len(), seqs.iter().map(|x| x.len()).max().unwrap_or(0));
    let mut ids = vec![0i64; b * s];
    let mut mask = vec![0i64; b * s];
    // targets[r, t] is the token at t + 1, or IGNORE_INDEX past the end.
    let mut targets = vec![IGNORE_INDEX; b * (s - 1)];
    for (r, seq) in seqs.iter().enumerate() {
        for (t, &tok) in seq.iter().enumerate() {
            ids[r * s + t] = tok as i64;
            mask[r * s + t] = 1;
            if t > 0 {
                targets[r * (s - 1) + t - 1] = tok as i64;
            }
        }
    }
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, s]), device);
    let padded = seqs.iter().any(|x| x.len() < s);
    let mask =
        padded.then(|| Tensor::<B, 2, Int>::from_data(TensorData::new(mask, [b, s]), device));
    let logits = model.logits(ids, mask.as_ref());
    let vocab = logits.dims()[2];
    // Positions 0..s-1 predict tokens 1..s: [b, s-1, vocab] -> [b·(s-1), vocab]
    let logits = logits.slice([0..b, 0..s - 1]).reshape([b * (s - 1), vocab]);
    let targets = Tensor::<B, 1, Int>::from_data(TensorData::new(targets, [b * (s - 1)]), device);
    let (sum, count) = cross_entropy_sum(logits, targets);
    let sum = sum.into_scalar().elem::<f64>();
    let count = count.into_scalar().elem::<f64>() as usize;
    (sum, count)
}
