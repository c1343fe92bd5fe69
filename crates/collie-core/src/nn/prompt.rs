//! Learned virtual tokens (prompt learning), the model-level counterpart of a [`Linear`]'s
//! adapter slot.
//!
//! A model that accepts virtual tokens keeps an `Option<VirtualTokens<B>>` and puts them in front
//! of every sequence: as input embeddings run through every block (prompt tuning, P-tuning), or as
//! keys and values every attention layer sees before the real ones (prefix tuning, through the
//! attention's past-key/value input). Only the types and their forward math live here; which
//! method builds them, how they are initialized, saved and loaded is `collie-peft`'s business.

use burn::module::{Module, Param};
use burn::tensor::activation::{relu, tanh};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use super::linear::Linear;

/// Where the virtual tokens enter the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtualTarget {
    /// Embeddings `[n, hidden]` prepended to the input embeddings: they run through every block
    /// at positions `0..n`, and the real tokens follow at `n..`.
    Input,
    /// Keys and values prepended in every attention layer, laid out per token as
    /// `[layers, 2 (key, value), kv_heads, head_dim]`: the real tokens sit at positions `n..` and
    /// attend to them, but they are never queries themselves.
    Prefix {
        /// Decoder layers.
        layers: usize,
        /// Key/value heads of each layer.
        kv_heads: usize,
        /// Width of a head.
        head_dim: usize,
    },
}

/// The nonlinearity between the layers of a reparameterization MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncoderActivation {
    /// P-tuning's MLP head.
    Relu,
    /// Prefix tuning's projection.
    Tanh,
}

/// `n` learned virtual tokens, optionally reparameterized by an MLP (peft's prompt encoders).
#[derive(Module, Debug)]
pub struct VirtualTokens<B: Backend> {
    /// `[n, d]`: one row per virtual token (peft's `prompt_encoder.embedding.weight`).
    pub embedding: Param<Tensor<B, 2>>,
    /// Reparameterization layers applied to the table, with `activation` between them; empty
    /// when the table holds the final vectors.
    pub mlp: Vec<Linear<B>>,
    /// Nonlinearity between the `mlp` layers.
    #[module(skip)]
    pub activation: EncoderActivation,
    /// Where the encoded vectors go.
    #[module(skip)]
    pub target: VirtualTarget,
}

impl<B: Backend> VirtualTokens<B> {
    /// Number of virtual tokens.
    pub fn len(&self) -> usize {
        self.embedding.lazy_shape().dims::<2>()[0]
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The final vectors: the table, through the MLP when there is one.
    ///
    /// # Shapes
    /// - returns `[n, hidden]` ([`VirtualTarget::Input`]) or `[n, layers · 2 · kv_heads · head_dim]`
    pub fn encode(&self) -> Tensor<B, 2> {
        let mut x = self.embedding.val();
        for (i, layer) in self.mlp.iter().enumerate() {
            if i > 0 {
                x = match self.activation {
                    EncoderActivation::Relu => relu(x),
                    EncoderActivation::Tanh => tanh(x),
                };
            }
            x = layer.forward(x);
        }
        x
    }

    /// The input embeddings to prepend, for [`VirtualTarget::Input`].
    ///
    /// # Shapes
    /// - returns `[batch, n, hidden]`
    pub fn input_embeddings(&self, batch: usize) -> Tensor<B, 3> {
        let e = self.encode();
        let [n, d] = e.dims();
        e.unsqueeze::<3>().expand([batch, n, d])
    }

    /// Each layer's key and value prefix, for [`VirtualTarget::Prefix`] (empty otherwise).
    ///
    /// # Shapes
    /// - returns per layer `(k, v)`, each `[batch, kv_heads, n, head_dim]`
    pub fn prefix_kv(&self, batch: usize) -> Vec<(Tensor<B, 4>, Tensor<B, 4>)> {
        let VirtualTarget::Prefix {
            layers,
            kv_heads,
            head_dim,
        } = self.target
        else {
            return Vec::new();
        };
        let e = self.encode();
        let n = e.dims()[0];
        // [n, layers·2·kv_heads·head_dim] -> [n, layers·2, kv_heads, head_dim]
        //   -> [layers·2, kv_heads, n, head_dim]
        let e = e
            .reshape([n, layers * 2, kv_heads, head_dim])
            .permute([1, 2, 0, 3]);
        (0..layers)
            .map(|l| {
                let part = |j: usize| {
                    // [1, kv_heads, n, head_dim] -> [batch, kv_heads, n, head_dim]
                    e.clone()
                        .slice([j..j + 1, 0..kv_heads, 0..n, 0..head_dim])
                        .expand([batch, kv_heads, n, head_dim])
                };
                (part(2 * l), part(2 * l + 1))
            })
            .collect()
    }

    /// Prepends the virtual embeddings to `x` for [`VirtualTarget::Input`]; `x` unchanged for a
    /// prefix.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]` → `[batch, n + seq, hidden]` (input) or unchanged
    pub fn prepend(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match self.target {
            VirtualTarget::Input => {
                let v = self.input_embeddings(x.dims()[0]);
                Tensor::cat(vec![v, x], 1)
            }
            VirtualTarget::Prefix { .. } => x,
        }
    }
}
