//! Sparse mixture-of-experts feed-forward (Mixtral, Qwen3-MoE): a router scores every expert
//! for each token, the `top_k` best run on it (SwiGLU experts), and their outputs are summed with
//! the routing weights.
//!
//! Parameters are stored as transformers' checkpoints hold them (PyTorch's layout): the router as
//! `[experts, hidden]`, each expert's gate and up as `[intermediate, hidden]` and its down as
//! `[hidden, intermediate]`. They are not linear layers — transformers holds the experts as
//! stacked tensors — so PEFT's `all-linear` leaves them out as peft does, and tensor parallelism
//! keeps them whole on every rank (every rank computes the same experts on the same, all-reduced,
//! input).
//!
//! Routing is discrete: the top-k choice is made on the host from the router's probabilities
//! (ties to the lower expert, as `torch.topk` on the CPU), then the chosen probabilities are
//! gathered as tensors, so gradients reach the router through the routing weights as in
//! transformers. Each expert runs on its tokens only and adds its weighted output in expert
//! order, as transformers' expert loop does.

use burn::module::{Module, Param};
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Int, Tensor, TensorData};
use collie_core::nn::{to_dtype, Activation};

/// The router: one score per expert, `x · Wᵀ`.
#[derive(Module, Debug)]
pub struct Router<B: Backend> {
    /// `[experts, hidden]`.
    pub weight: Param<Tensor<B, 2>>,
}

/// One expert: `down(act(gate(x)) · up(x))`.
#[derive(Module, Debug)]
pub struct Expert<B: Backend> {
    /// `[intermediate, hidden]`.
    pub gate_proj: Param<Tensor<B, 2>>,
    /// `[intermediate, hidden]`.
    pub up_proj: Param<Tensor<B, 2>>,
    /// `[hidden, intermediate]`.
    pub down_proj: Param<Tensor<B, 2>>,
}

/// A sparse mixture-of-experts block in place of the dense MLP.
#[derive(Module, Debug)]
pub struct SparseMoe<B: Backend> {
    /// The router (HF `mlp.gate`).
    pub gate: Router<B>,
    /// The experts (HF `mlp.experts.N`).
    pub experts: Vec<Expert<B>>,
    /// Experts per token.
    #[module(skip)]
    pub top_k: usize,
    /// Whether the chosen probabilities are renormalized to sum to one (Mixtral always;
    /// Qwen3-MoE with `norm_topk_prob`).
    #[module(skip)]
    pub normalize: bool,
    /// The experts' gate activation.
    #[module(skip)]
    pub act: Activation,
}

/// The shape of a sparse MoE block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MoeSpec {
    /// Number of experts.
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Each expert's intermediate width.
    pub intermediate: usize,
    /// Whether the chosen probabilities are renormalized.
    pub normalize: bool,
}

impl MoeSpec {
    /// A block with weights drawn from `normal(0, std)` (HF's init), on `hidden` features.
    pub fn init<B: Backend>(
        &self,
        hidden: usize,
        act: Activation,
        std: f64,
        device: &B::Device,
    ) -> SparseMoe<B> {
        let normal = Distribution::Normal(0.0, std);
        let i = self.intermediate;
        let param = |shape: [usize; 2]| Param::from_tensor(Tensor::random(shape, normal, device));
        SparseMoe {
            gate: Router {
                weight: param([self.experts, hidden]),
            },
            experts: (0..self.experts)
                .map(|_| Expert {
                    gate_proj: param([i, hidden]),
                    up_proj: param([i, hidden]),
                    down_proj: param([hidden, i]),
                })
                .collect(),
            top_k: self.top_k,
            normalize: self.normalize,
            act,
        }
    }
}

impl<B: Backend> SparseMoe<B> {
    /// # Shapes
    /// - x: `[batch, seq, hidden]` → same
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, s, d] = x.dims();
        let (n, k) = (b * s, self.top_k);
        let dtype = x.dtype();
        let device = x.device();
        // [batch, seq, hidden] -> [tokens, hidden]
        let x = x.reshape([n, d]);
        // [tokens, experts], probabilities in f32 whatever the compute dtype (as transformers).
        let logits = x.clone().matmul(self.gate.weight.val().transpose());
        let probs = softmax(to_dtype(logits, DType::F32), 1);
        let e = probs.dims()[1];
        let host: Vec<f32> = probs
            .clone()
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("f32 router probabilities");
        // [tokens, k]: each token's experts, best first.
        let mut chosen = Vec::with_capacity(n * k);
        for row in host.chunks(e) {
            let mut order: Vec<usize> = (0..e).collect();
            order.sort_by(|&a, &c| row[c].total_cmp(&row[a]).then(a.cmp(&c)));
            chosen.extend(order[..k].iter().map(|&i| i as i64));
        }
        let index =
            Tensor::<B, 2, Int>::from_data(TensorData::new(chosen.clone(), [n, k]), &device);
        let mut weights = probs.gather(1, index);
        if self.normalize {
            weights = weights.clone() / weights.sum_dim(1);
        }
        // [tokens · k]: slot `t·k + j` is token t's j-th choice.
        let weights = to_dtype(weights.reshape([n * k]), dtype);
        // Slots grouped by expert (in slot order within each): one gather of the rows and
        // weights, then a contiguous run per expert. Every tensor thus feeds at most two ops, so
        // its gradient sums the same way however autodiff orders the graph (a recomputed block,
        // activation checkpointing, gives the same bits).
        let mut order: Vec<i64> = (0..(n * k) as i64).collect();
        order.sort_by_key(|&slot| chosen[slot as usize]);
        let counts: Vec<usize> = (0..e)
            .map(|x| chosen.iter().filter(|&&c| c == x as i64).count())
            .collect();
        let tokens: Vec<i64> = order.iter().map(|slot| slot / k as i64).collect();
        let tokens = Tensor::<B, 1, Int>::from_data(TensorData::new(tokens, [n * k]), &device);
        let order = Tensor::<B, 1, Int>::from_data(TensorData::new(order, [n * k]), &device);
        // [tokens · k, hidden] and [tokens · k], grouped by expert.
        let rows = x.select(0, tokens.clone());
        let weights = weights.select(0, order);
        let mut outputs = Vec::with_capacity(e);
        let mut start = 0;
        for (expert, m) in self.experts.iter().zip(counts) {
            if m == 0 {
                continue;
            }
            let run = start..start + m;
            start += m;
            // [m, hidden] -> [m, intermediate] -> [m, hidden], weighted by each token's
            // routing weight.
            let rows = rows.clone().slice([run.clone(), 0..d]);
            let gate = rows.clone().matmul(expert.gate_proj.val().transpose());
            let up = rows.matmul(expert.up_proj.val().transpose());
            let y = (self.act.forward(gate) * up).matmul(expert.down_proj.val().transpose());
            outputs.push(y * weights.clone().slice([run]).unsqueeze_dim(1));
        }
        // Each token's expert outputs added in expert order, as transformers' expert loop adds.
        let out = to_dtype(Tensor::<B, 2>::zeros([n, d], &device), dtype).select_assign(
            0,
            tokens,
            Tensor::cat(outputs, 0),
            burn::tensor::IndexingUpdateOp::Add,
        );
        out.reshape([b, s, d])
    }
}
