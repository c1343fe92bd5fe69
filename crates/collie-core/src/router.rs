//! What mixture-of-experts layers record for the load-balancing auxiliary loss (transformers'
//! `load_balancing_loss_func`, the Switch Transformer's).
//!
//! With `P_e` the router probability of expert `e` and `C_e` how many times it was chosen, each
//! summed over the real tokens of every MoE layer, and `N` those tokens counted once per layer,
//! the loss is `experts · Σ_e (C_e / N) · (P_e / N)`. The counts are constants (routing is
//! discrete); the loss reaches the routers through the probabilities only. It is linear in each
//! layer's probabilities, so it splits into one term per layer, `experts / N² · Σ_e C_e · P^l_e`,
//! once the counts of *all* layers are known: the block-wise backward (activation
//! checkpointing, LOMO) adds each layer's term to that layer's backward, and pipeline stages pass
//! the counts along with the activations ([`RoutingCounts`]).

use std::sync::Mutex;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};

use crate::nn::to_dtype;

/// How often each expert was chosen, summed over some MoE layers, and how many layers that is.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingCounts {
    /// Choices per expert.
    pub counts: Vec<f64>,
    /// MoE layers counted.
    pub layers: usize,
}

impl RoutingCounts {
    /// No layer yet, `experts` experts.
    pub fn zeros(experts: usize) -> Self {
        RoutingCounts {
            counts: vec![0.0; experts],
            layers: 0,
        }
    }

    /// Adds another set of layers' counts.
    pub fn add(&mut self, other: &RoutingCounts) {
        self.counts
            .iter_mut()
            .zip(&other.counts)
            .for_each(|(a, b)| *a += b);
        self.layers += other.layers;
    }

    /// As `experts + 1` floats (the counts, then the layers) for a point-to-point message; the
    /// values are small integers, exact in f32.
    pub fn to_message(&self) -> Vec<f32> {
        let mut m: Vec<f32> = self.counts.iter().map(|&c| c as f32).collect();
        m.push(self.layers as f32);
        m
    }

    /// The counts of a [`RoutingCounts::to_message`] buffer.
    pub fn from_message(m: &[f32]) -> Self {
        let (layers, counts) = m.split_last().expect("a routing message");
        RoutingCounts {
            counts: counts.iter().map(|&c| c as f64).collect(),
            layers: *layers as usize,
        }
    }
}

/// The routing of the MoE layers run with this log (in call order): per layer, the router
/// probabilities summed over the real tokens and the choice counts.
#[derive(Debug)]
pub struct RouterLog<B: Backend> {
    /// `[tokens]`: 1 for a real token, 0 for padding (f32).
    mask: Tensor<B, 1>,
    /// The same on the host.
    host_mask: Vec<f32>,
    /// Real tokens of the call (every MoE layer routes them all).
    tokens: f64,
    /// Experts of every MoE layer.
    experts: usize,
    /// What each MoE layer recorded, in call order.
    layers: Mutex<Vec<LayerRouting<B>>>,
}

/// One MoE layer's routing of the real tokens of a call.
#[derive(Debug)]
struct LayerRouting<B: Backend> {
    /// `[experts]`: router probabilities summed over the real tokens.
    probs: Tensor<B, 1>,
    /// How many times each expert was chosen.
    counts: Vec<f64>,
}

impl<B: Backend> RouterLog<B> {
    /// A log for a call whose real tokens are the non-zero entries of `mask` (`[batch, seq]`),
    /// routed over `experts` experts.
    pub fn new(mask: Tensor<B, 2>, experts: usize) -> Self {
        let [b, s] = mask.dims();
        let mask = to_dtype(mask, DType::F32).reshape([b * s]);
        let host_mask = mask
            .clone()
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("f32 mask");
        RouterLog {
            mask,
            tokens: host_mask.iter().map(|&m| m as f64).sum(),
            host_mask,
            experts,
            layers: Mutex::new(Vec::new()),
        }
    }

    /// Experts of every MoE layer.
    pub fn experts(&self) -> usize {
        self.experts
    }

    /// Records one MoE layer: `probs` (`[tokens, experts]`, f32) are the router's
    /// probabilities of every token of the call (padding included) and `chosen` (`[tokens ·
    /// top_k]`) each token's experts.
    pub fn record(&self, probs: Tensor<B, 2>, chosen: &[i64], top_k: usize) {
        let e = self.experts;
        // [tokens, experts] -> [experts]: probabilities summed over the real tokens.
        let probs = (probs * self.mask.clone().unsqueeze_dim(1))
            .sum_dim(0)
            .reshape([e]);
        let mut counts = vec![0.0; e];
        for (row, &m) in chosen.chunks(top_k).zip(&self.host_mask) {
            row.iter().for_each(|&c| counts[c as usize] += m as f64);
        }
        self.layers
            .lock()
            .expect("router log")
            .push(LayerRouting { probs, counts });
    }

    /// MoE layers recorded (and not yet taken).
    pub fn len(&self) -> usize {
        self.layers.lock().expect("router log").len()
    }

    /// Whether no MoE layer is recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The choice counts of the recorded layers.
    pub fn counts(&self) -> RoutingCounts {
        let mut all = RoutingCounts::zeros(self.experts);
        for layer in self.layers.lock().expect("router log").iter() {
            all.add(&RoutingCounts {
                counts: layer.counts.clone(),
                layers: 1,
            });
        }
        all
    }

    /// The loss's terms of the layers recorded from the `from`-th on, which leave the log:
    /// `experts / N² · Σ_e C_e · Σ_l P^l_e` with the counts `C` and `N` (real tokens × MoE
    /// layers) of `all` the call's layers. `None` when no such layer was recorded.
    pub fn take_term(&self, from: usize, all: &RoutingCounts) -> Option<Tensor<B, 1>> {
        let taken: Vec<_> = {
            let mut layers = self.layers.lock().expect("router log");
            let from = from.min(layers.len());
            layers.drain(from..).collect()
        };
        let mut probs = taken.into_iter().map(|l| l.probs).reduce(|a, b| a + b)?;
        let tokens = self.tokens * all.layers as f64;
        let experts = self.experts as f64;
        let counts: Vec<f32> = all.counts.iter().map(|&c| c as f32).collect();
        let counts =
            Tensor::<B, 1>::from_data(TensorData::new(counts, [self.experts]), &probs.device());
        probs = probs * counts;
        Some(probs.sum().mul_scalar(experts / (tokens * tokens)))
    }

    /// The auxiliary loss of every recorded layer (which leave the log), `None` if no MoE layer
    /// ran.
    pub fn take_aux_loss(&self) -> Option<Tensor<B, 1>> {
        let all = self.counts();
        self.take_term(0, &all)
    }
}

#[cfg(all(test, feature = "cpu"))]
mod tests {
    use super::*;
    type B = crate::device::Cpu;

    fn t2(v: &[f32], shape: [usize; 2]) -> Tensor<B, 2> {
        Tensor::from_data(TensorData::new(v.to_vec(), shape), &Default::default())
    }

    #[test]
    fn per_layer_terms_add_up_to_the_loss() {
        // Two layers of three tokens (the last one padding) over two experts, top-1.
        let mask = t2(&[1.0, 1.0, 0.0], [1, 3]);
        let probs = [
            t2(&[0.7, 0.3, 0.4, 0.6, 0.5, 0.5], [3, 2]),
            t2(&[0.2, 0.8, 0.9, 0.1, 0.5, 0.5], [3, 2]),
        ];
        let chosen = [[0i64, 1, 0], [1, 0, 1]];
        let log = RouterLog::<B>::new(mask.clone(), 2);
        for (p, c) in probs.iter().zip(&chosen) {
            log.record(p.clone(), c, 1);
        }
        let all = log.counts();
        assert_eq!(all.counts, vec![2.0, 2.0]);
        assert_eq!(all.layers, 2);
        // By hand: N = 2 tokens × 2 layers; P = (0.7+0.4+0.2+0.9, 0.3+0.6+0.8+0.1) = (2.2, 1.8);
        // loss = 2 · (2·2.2 + 2·1.8) / 16 = 1.
        let whole = log.take_aux_loss().unwrap().into_scalar();
        assert!((whole - 1.0).abs() < 1e-6, "{whole}");
        assert!(log.is_empty());
        // The same loss as the sum of the per-layer terms, taken last layer first.
        for (p, c) in probs.iter().zip(&chosen) {
            log.record(p.clone(), c, 1);
        }
        let second = log.take_term(1, &all).unwrap().into_scalar();
        let first = log.take_term(0, &all).unwrap().into_scalar();
        assert!((first - 2.0 * (2.0 * 1.1 + 2.0 * 0.9) / 16.0).abs() < 1e-6);
        assert!((first + second - whole).abs() < 1e-6);
        assert!(log.take_term(0, &all).is_none());
        // Counts travel between pipeline stages as f32 messages.
        assert_eq!(RoutingCounts::from_message(&all.to_message()), all);
    }
}
