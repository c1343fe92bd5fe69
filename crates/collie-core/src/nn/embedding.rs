//! Token embedding.

use burn::config::Config;
use burn::module::{Initializer, Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor};

use super::linear::matmul_2d;
use crate::dist::{copy_to_group, gather_along, reduce_from_group, Group};

/// This rank's rows of a vocabulary-parallel table: ids `start .. start + rows` of the full
/// vocabulary, over a tensor-parallel group.
#[derive(Debug, Clone)]
pub struct VocabShard {
    /// The tensor-parallel group.
    pub group: Group,
    /// First vocabulary id of this rank's rows.
    pub start: usize,
}

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
    /// Multiplies every looked-up row (Gemma's `√hidden`); the tied head's projection is not
    /// scaled.
    #[config(default = "None")]
    pub scale: Option<f64>,
}

/// A lookup table `[n_embedding, d_model]`, in the same layout as PyTorch's `nn.Embedding`.
#[derive(Module, Debug)]
pub struct Embedding<B: Backend> {
    /// `[n_embedding, d_model]` (this rank's rows under vocabulary parallelism).
    pub weight: Param<Tensor<B, 2>>,
    /// Which rows of the full vocabulary `weight` holds; `None` for the whole table.
    #[module(skip)]
    pub shard: Option<VocabShard>,
    /// Factor on looked-up rows, if the family scales its input embeddings.
    #[module(skip)]
    pub scale: Option<f64>,
}

impl EmbeddingConfig {
    /// Builds the table (lazily initialized).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Embedding<B> {
        let weight = Initializer::Normal {
            mean: 0.0,
            std: self.init_std,
        }
        .init([self.n_embedding, self.d_model], device);
        Embedding {
            weight,
            shard: None,
            scale: self.scale,
        }
    }
}

impl<B: Backend> Embedding<B> {
    /// # Shapes
    /// - ids: `[batch, seq]` → `[batch, seq, d_model]`
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let rows = self.lookup(ids);
        match self.scale {
            Some(scale) => rows.mul_scalar(scale),
            None => rows,
        }
    }

    /// The rows of `ids`, unscaled.
    fn lookup(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let Some(shard) = &self.shard else {
            return lookup(self.weight.val(), ids);
        };
        // Megatron's vocabulary-parallel lookup: rows this rank holds, zeros for the others,
        // summed over the group.
        let rows = self.weight.dims()[0] as i64;
        let local = ids.sub_scalar(shard.start as i64);
        let outside = local
            .clone()
            .lower_elem(0)
            .bool_or(local.clone().greater_equal_elem(rows));
        let safe = local.mask_fill(outside.clone(), 0);
        let found = lookup(self.weight.val(), safe);
        // [batch, seq] -> [batch, seq, 1]
        let keep = outside.bool_not().float().unsqueeze_dim::<3>(2);
        reduce_from_group(found * keep, &shard.group)
    }

    /// The tied LM head: `x · tableᵀ`. Under vocabulary parallelism this rank's columns of the
    /// logits; every rank's product adds to the replicated input's gradient (Megatron's `f`).
    ///
    /// # Shapes
    /// - x: `[..., d_model]` → `[..., n_embedding]`
    pub fn project<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let x = match &self.shard {
            Some(shard) => copy_to_group(x, &shard.group),
            None => x,
        };
        // [d_model, vocab] view of the [vocab, d_model] table.
        matmul_2d(x, self.weight.val().transpose())
    }

    /// Logits over the whole vocabulary from this rank's columns (every rank's gathered under
    /// vocabulary parallelism; inference reads them, training losses stay vocabulary-parallel).
    ///
    /// # Shapes
    /// - logits: `[batch, seq, local vocab]` → `[batch, seq, vocab]`
    pub fn gather_vocab(&self, logits: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.shard {
            Some(shard) => gather_along(logits, (2, 1), &shard.group),
            None => logits,
        }
    }
}

/// Rows of `table` by id: the backend's fused lookup for an f32 table where it has one (its
/// backward adds the rows' gradient into a fresh zero table), else Burn's `embedding`.
///
/// # Shapes
/// - table: `[vocab, d]`, ids: `[batch, seq]` → `[batch, seq, d]`
fn lookup<B: Backend>(table: Tensor<B, 2>, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
    match crate::fused::kernels::<B>() {
        Some(k) if table.dtype() == DType::F32 => {
            let [b, s] = ids.dims();
            let d = table.dims()[1];
            // [batch, seq] -> [batch · seq] ids; [batch · seq, d] -> [batch, seq, d]
            (k.embedding)(table, ids.reshape([b * s])).reshape([b, s, d])
        }
        _ => burn::tensor::module::embedding(table, ids),
    }
}
