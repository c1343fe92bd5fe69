//! What generation and evaluation need from a causal language model.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

/// A decoder-only language model, as generation and perplexity code see it.
pub trait CausalLm<B: Backend> {
    /// Per-call state of incremental decoding (past keys and values).
    type Cache;

    /// An empty cache.
    fn new_cache(&self) -> Self::Cache;

    /// Logits for every position, without a cache.
    ///
    /// # Shapes
    /// - ids, padding: `[batch, seq]` → `[batch, seq, vocab]`
    fn logits(&self, ids: Tensor<B, 2, Int>, padding: Option<&Tensor<B, 2, Int>>) -> Tensor<B, 3>;

    /// Logits of the last `tail` positions only: scoring code that needs a few positions at the
    /// end of left-padded rows skips the LM head (and the softmax) everywhere else.
    ///
    /// # Shapes
    /// - ids, padding: `[batch, seq]` → `[batch, tail, vocab]`
    fn logits_tail(
        &self,
        ids: Tensor<B, 2, Int>,
        padding: Option<&Tensor<B, 2, Int>>,
        tail: usize,
    ) -> Tensor<B, 3> {
        let logits = self.logits(ids, padding);
        let [b, s, v] = logits.dims();
        logits.slice([0..b, s - tail.min(s)..s, 0..v])
    }

    /// Which columns of the vocabulary this rank's logits hold under tensor parallelism (`None`:
    /// all of them). Training losses go through
    /// [`cross_entropy_sum_sharded`](crate::loss::cross_entropy_sum_sharded) with it.
    fn vocab_shard(&self) -> Option<&crate::nn::VocabShard> {
        None
    }

    /// Logits for packed rows: `segments` numbers the documents of each row (`0` = padding) and
    /// `positions` restart at every document; a token attends only within its document. Under
    /// tensor parallelism: this rank's vocabulary columns ([`CausalLm::vocab_shard`]).
    ///
    /// # Shapes
    /// - ids, segments, positions: `[batch, seq]` → `[batch, seq, vocab]`
    fn logits_packed(
        &self,
        ids: Tensor<B, 2, Int>,
        segments: &Tensor<B, 2, Int>,
        positions: Tensor<B, 2, Int>,
    ) -> Tensor<B, 3>;

    /// The weight with which training adds the model's auxiliary loss to the language-model
    /// loss (a mixture of experts' load balancing), if it has one.
    fn router_aux_loss_coef(&self) -> Option<f64> {
        None
    }

    /// [`CausalLm::logits_packed`] and, where [`CausalLm::router_aux_loss_coef`] is set, the
    /// auxiliary loss of the same pass (unweighted).
    ///
    /// # Shapes
    /// - ids, segments, positions: `[batch, seq]` → `[batch, seq, vocab]`, `[1]`
    fn logits_packed_aux(
        &self,
        ids: Tensor<B, 2, Int>,
        segments: &Tensor<B, 2, Int>,
        positions: Tensor<B, 2, Int>,
    ) -> (Tensor<B, 3>, Option<Tensor<B, 1>>) {
        (self.logits_packed(ids, segments, positions), None)
    }

    /// Logits for `ids` placed after the positions in `cache`, which it extends.
    ///
    /// # Shapes
    /// - ids: `[batch, s_new]`, padding: `[batch, past + s_new]` → `[batch, s_new, vocab]`
    fn logits_cached(
        &self,
        ids: Tensor<B, 2, Int>,
        padding: Option<&Tensor<B, 2, Int>>,
        cache: &mut Self::Cache,
    ) -> Tensor<B, 3>;
}
