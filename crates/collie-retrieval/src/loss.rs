//! UDR's training loss, as the released code computes it (`BiEncoder_list_ranking_loss.calc` and
//! `lambda_mrr_loss` in KaiLv69/UDR; `docs/udr.md` has the paper's variant):
//!
//! - `S = Q·Cᵀ`, `[B, B·L]`: each of the `B` queries against every candidate of the batch; query
//!   `b`'s own `L` candidates sit in columns `b·L..(b+1)·L`, best language-model score first.
//! - **List-wise rank loss**: for each query and each pair `(i, j)` of its candidates where `i`
//!   has the better LM rank, `|1/π_i − 1/π_j| · softplus(s_j − s_i)`, with `π` the 1-based
//!   positions in the retriever's own (predicted) order (a constant: no gradient) and `s_i − s_j`
//!   clamped to `[−50, 50]`; the mean over all `B·L(L−1)/2` pairs.
//! - **In-batch loss**: cross-entropy of each row of `S` with the query's best candidate as the
//!   target (all `B·L` candidates compete, temperature 1).
//! - **Total**: `rank_factor · L_rank + L_ib` (the scripts use 4; the paper writes
//!   `λ·L_rank + (1 − λ)·L_ib` with λ = 0.8, the same ratio scaled by 5).

use burn::tensor::activation::{log_softmax, softplus};
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};

/// The loss of one batch and its parts.
#[derive(Debug, Clone)]
pub struct UdrLoss<B: Backend> {
    /// `rank_factor · rank + in_batch` (differentiable).
    pub total: Tensor<B, 1>,
    /// The list-wise rank loss.
    pub rank: f64,
    /// The in-batch cross-entropy.
    pub in_batch: f64,
}

/// Which parts of the loss to use (the ablations drop one).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossWeights {
    /// Weight of the list-wise rank loss (UDR: 4; 0 = "without L_rank").
    pub rank: f64,
    /// Weight of the in-batch loss (UDR: 1; 0 = "without L_ib").
    pub in_batch: f64,
}

impl Default for LossWeights {
    fn default() -> Self {
        LossWeights {
            rank: 4.0,
            in_batch: 1.0,
        }
    }
}

/// UDR's loss for query vectors `q` and their candidates `c` (`l` per query, in LM order).
///
/// # Shapes
/// - q: `[B, d]`, c: `[B·l, d]`
pub fn udr_loss<B: Backend>(
    q: Tensor<B, 2>,
    c: Tensor<B, 2>,
    l: usize,
    weights: LossWeights,
) -> UdrLoss<B> {
    let [b, _] = q.dims();
    let device = q.device();
    // [B, B·l]
    let scores = q.matmul(c.transpose());
    // Each query's own candidates: [B, l], column k = LM rank k + 1.
    let own: Vec<i64> = (0..b)
        .flat_map(|r| (0..l).map(move |k| (r * l + k) as i64))
        .collect();
    let own = Tensor::<B, 2, Int>::from_data(TensorData::new(own, [b, l]), &device);
    let pred = scores.clone().gather(1, own);
    // Predicted 1-based positions, from the current scores (constants).
    let values: Vec<f32> = pred
        .clone()
        .into_data()
        .convert::<f32>()
        .into_vec()
        .expect("f32 scores");
    let pairs = b * l * (l - 1) / 2;
    let mut w = vec![0f32; b * l * l];
    for r in 0..b {
        let row = &values[r * l..(r + 1) * l];
        let mut order: Vec<usize> = (0..l).collect();
        // Stable: equal scores keep LM order, as torch's sort on CPU.
        order.sort_by(|&x, &y| row[y].total_cmp(&row[x]));
        let mut pos = vec![0usize; l];
        for (p, &k) in order.iter().enumerate() {
            pos[k] = p + 1;
        }
        for i in 0..l {
            for j in i + 1..l {
                w[r * l * l + i * l + j] = (1.0 / pos[i] as f32 - 1.0 / pos[j] as f32).abs();
            }
        }
    }
    let w = Tensor::<B, 3>::from_data(TensorData::new(w, [b, l, l]), &device);
    // [B, l, l]: s_i − s_j for the pair (i better, j worse)
    let diff = pred.clone().reshape([b, l, 1]) - pred.reshape([b, 1, l]);
    let rank = (softplus(diff.clamp(-50.0, 50.0).neg(), 1.0) * w)
        .sum()
        .div_scalar(pairs.max(1) as f64);
    let targets: Vec<i64> = (0..b).map(|r| (r * l) as i64).collect();
    let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(targets, [b, 1]), &device);
    let in_batch = log_softmax(scores, 1).gather(1, targets).neg().mean();
    let rank_v = rank.clone().into_scalar().elem::<f64>();
    let ib_v = in_batch.clone().into_scalar().elem::<f64>();
    UdrLoss {
        total: rank.mul_scalar(weights.rank) + in_batch.mul_scalar(weights.in_batch),
        rank: rank_v,
        in_batch: ib_v,
    }
}
