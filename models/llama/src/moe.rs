//! Sparse mixture-of-experts feed-forward (Mixtral, Qwen3-MoE): a router scores every expert
//! for each token, the `top_k` best run on it (SwiGLU experts), and their outputs are summed with
//! the routing weights.
//!
//! The router and each expert's gate, up and down projections are [`Linear`] layers (weights
//! `[in, out]`, transposed from transformers' `[out, in]` at load as every linear weight is).
//! Transformers holds the experts as stacked tensors rather than linear layers, so they are not
//! among the block's adaptable linears: PEFT's `all-linear` leaves them out as peft does, and
//! tensor parallelism keeps them whole on every rank (every rank computes the same experts on
//! the same, all-reduced, input).
//!
//! Routing is discrete: the top-k choice is made on the host from the router's probabilities
//! (ties to the lower expert, as `torch.topk` on the CPU), then the chosen probabilities are
//! gathered as tensors, so gradients reach the router through the routing weights as in
//! transformers. Each expert runs on its tokens only and adds its weighted output in expert
//! order, as transformers' expert loop does.

use burn::module::Module;
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use collie_core::nn::{to_dtype, Activation, Linear, LinearConfig};
use collie_core::router::RouterLog;

/// One expert: `down(act(gate(x)) · up(x))`, without biases.
#[derive(Module, Debug)]
pub struct Expert<B: Backend> {
    /// `hidden → intermediate`.
    pub gate_proj: Linear<B>,
    /// `hidden → intermediate`.
    pub up_proj: Linear<B>,
    /// `intermediate → hidden`.
    pub down_proj: Linear<B>,
}

/// A sparse mixture-of-experts block in place of the dense MLP.
#[derive(Module, Debug)]
pub struct SparseMoe<B: Backend> {
    /// The router, `hidden → experts` (HF `mlp.gate`).
    pub gate: Linear<B>,
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
    /// A block with weights drawn from `normal(0, std)` (HF's init, lazily as every
    /// [`Linear`]), on `hidden` features.
    pub fn init<B: Backend>(
        &self,
        hidden: usize,
        act: Activation,
        std: f64,
        device: &B::Device,
    ) -> SparseMoe<B> {
        let linear = |d_in, d_out| {
            LinearConfig::new(d_in, d_out)
                .with_init_std(std)
                .init(device)
        };
        let i = self.intermediate;
        SparseMoe {
            gate: linear(hidden, self.experts),
            experts: (0..self.experts)
                .map(|_| Expert {
                    gate_proj: linear(hidden, i),
                    up_proj: linear(hidden, i),
                    down_proj: linear(i, hidden),
                })
                .collect(),
            top_k: self.top_k,
            normalize: self.normalize,
            act,
        }
    }
}

impl<B: Backend> SparseMoe<B> {
    /// The block on `x`; with a `log`, its routing is recorded for the auxiliary loss.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]` → same
    pub fn forward(&self, x: Tensor<B, 3>, log: Option<&RouterLog<B>>) -> Tensor<B, 3> {
        let [b, s, d] = x.dims();
        let (n, k) = (b * s, self.top_k);
        let dtype = x.dtype();
        let device = x.device();
        // [batch, seq, hidden] -> [tokens, hidden]
        let x = x.reshape([n, d]);
        // [tokens, experts], probabilities in f32 whatever the compute dtype (as transformers).
        let logits = to_dtype(self.gate.forward(x.clone()), DType::F32);
        let probs = softmax(logits.clone(), 1);
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
        if let Some(log) = log {
            log.record(probs.clone(), &chosen, k);
        }
        let index =
            Tensor::<B, 2, Int>::from_data(TensorData::new(chosen.clone(), [n, k]), &device);
        // The chosen probabilities renormalized are the softmax of the chosen logits alone.
        // Written so, the other experts' logits get an exactly zero gradient, as the math says;
        // dividing the gathered probabilities by their sum (transformers) leaves them rounding
        // noise, which AdamW grows into full steps of the router rows of unchosen experts.
        let weights = if self.normalize {
            softmax(logits.gather(1, index), 1)
        } else {
            probs.gather(1, index)
        };
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
        let mut idle = Vec::new();
        let mut start = 0;
        for (expert, m) in self.experts.iter().zip(counts) {
            if m == 0 {
                idle.push(expert);
                continue;
            }
            let run = start..start + m;
            start += m;
            // [m, hidden] -> [m, intermediate] -> [m, hidden], weighted by each token's
            // routing weight.
            let rows = rows.clone().slice([run.clone(), 0..d]);
            let gate = expert.gate_proj.forward(rows.clone());
            let up = expert.up_proj.forward(rows);
            let y = expert.down_proj.forward(self.act.glu(gate, up));
            outputs.push(y * weights.clone().slice([run]).unsqueeze_dim(1));
        }
        // Each token's expert outputs added in expert order, as transformers' expert loop adds.
        let out = to_dtype(Tensor::<B, 2>::zeros([n, d], &device), dtype).select_assign(
            0,
            tokens,
            Tensor::cat(outputs, 0),
            burn::tensor::IndexingUpdateOp::Add,
        );
        // Experts no token chose still join the graph, times zero: transformers stacks the
        // experts into one parameter, so every expert gets a gradient (zero for these) each
        // step and AdamW moves it by its momentum and decay; an expert left out of the graph
        // would get no gradient and skip the update.
        let idle = idle
            .into_iter()
            .flat_map(|e| [&e.gate_proj, &e.up_proj, &e.down_proj].map(|l| l.weight.val().mean()));
        let idle: Vec<_> = idle.collect();
        let out = match idle.is_empty() {
            true => out,
            false => out + Tensor::cat(idle, 0).sum().mul_scalar(0.0).unsqueeze(),
        };
        out.reshape([b, s, d])
    }
}
