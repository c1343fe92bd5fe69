//! Token embedding.

use burn::config::Config;
use burn::module::{Initializer, Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

/// Configuration of an [`Embedding`].
#[derive(Config, Debug)]
pub struct EmbeddingConfig {
    /// Number of rows (vocabulary size).
    pub n_embedding: usize,
    /// Width of a row.
    pub d_model: usize,
    /// Standard deviation of the normal initialization.
    #[config(default = 0.02)]
    pub init_std: f64,
}

/// A lookup table `[n_embedding, d_model]`, in the same layout as PyTorch's `nn.Embedding`.
#[derive(Module, Debug)]
pub struct Embedding<B: Backend> {
    /// `[n_embedding, d_model]`.
    pub weight: Param<Tensor<B, 2>>,
}

impl EmbeddingConfig {
    /// Builds the table (lazily initialized).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Embedding<B> {
        let weight = Initializer::Normal {
            mean: 0.0,
            std: self.init_std,
        }
        .init([self.n_embedding, self.d_model], device);
        Embedding { weight }
    }
}

impl<B: Backend> Embedding<B> {
    /// # Shapes
    /// - ids: `[batch, seq]` → `[batch, seq, d_model]`
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        burn::tensor::module::embedding(self.weight.val(), ids)
    }
}
