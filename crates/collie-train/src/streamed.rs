//! Forward-only use of a model whose parameters are spread over a group — ZeRO-3's replicas, a
//! stage-local pipeline's stages: [`Streamed`] runs the block contract (docs/architecture.md)
//! with each block gathered from its owners just before it runs and dropped after, so an
//! evaluation or a generation holds this rank's share plus one block (and the embedding, which
//! the head may read) instead of the whole model.
//!
//! Every member of the group must make the same calls in the same order (each gather is a
//! collective): evaluation and sampling run on every rank.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use collie_core::lm::CausalLm;
use collie_core::model::{BlockModel, DecoderLayer, KvSlot, LmHead};
use collie_core::nn::VocabShard;

use crate::blockwise::Gather;

/// `model` (this rank's share) as a causal LM whose blocks come from their owners.
pub struct Streamed<'a, B: Backend, M: BlockModel<B>> {
    model: M,
    from: Gather<'a>,
    device: B::Device,
}

impl<'a, B: Backend, M: BlockModel<B>> Streamed<'a, B, M> {
    /// The view of `model`, its blocks gathered `from` their owners (prompt learning's virtual
    /// tokens are not supported: the caller gathers such a model whole).
    pub fn new(model: M, from: Gather<'a>, device: B::Device) -> Self {
        Streamed {
            model,
            from,
            device,
        }
    }

    fn whole<T: burn::module::Module<B>>(&self, module: T) -> T {
        self.from.plan.gather(module, self.from.group, &self.device)
    }

    /// Embedding, every layer under `ctx` (each with its cache slot, if any) and the head's
    /// hidden states of the last `tail` positions; returns the head's logits (this rank's
    /// vocabulary columns under tensor parallelism) and the gathered embedding.
    fn run(
        &self,
        ids: Tensor<B, 2, Int>,
        ctx: &M::Context,
        mut cache: Option<&mut Vec<KvSlot<B>>>,
        tail: usize,
    ) -> (Tensor<B, 3>, collie_core::nn::Embedding<B>) {
        let embed = self.whole(self.model.embed().clone());
        let mut x = M::embed_tokens(&embed, ids);
        for (i, layer) in self.model.layers().iter().enumerate() {
            let layer = self.whole(layer.clone());
            let slot = cache.as_deref_mut().map(|c| &mut c[i]);
            x = layer.forward(x, ctx, slot);
        }
        let [b, s, d] = x.dims();
        // [batch, seq, hidden] -> [batch, tail, hidden]: the head runs only where it is read.
        let x = x.slice([0..b, s - tail.min(s)..s, 0..d]);
        let logits = self.whole(self.model.head().clone()).forward(x, &embed);
        (logits, embed)
    }
}

impl<B: Backend, M: BlockModel<B>> CausalLm<B> for Streamed<'_, B, M> {
    type Cache = Vec<KvSlot<B>>;

    fn new_cache(&self) -> Self::Cache {
        vec![None; self.model.layers().len()]
    }

    fn cache_prefix(&self) -> usize {
        self.model.cache_prefix()
    }

    fn logits(&self, ids: Tensor<B, 2, Int>, padding: Option<&Tensor<B, 2, Int>>) -> Tensor<B, 3> {
        let s = ids.dims()[1];
        self.logits_tail(ids, padding, s)
    }

    fn logits_tail(
        &self,
        ids: Tensor<B, 2, Int>,
        padding: Option<&Tensor<B, 2, Int>>,
        tail: usize,
    ) -> Tensor<B, 3> {
        let [b, s] = ids.dims();
        let ctx = self.model.context(b, s, 0, padding, None, &self.device);
        let (logits, embed) = self.run(ids, &ctx, None, tail);
        embed.gather_vocab(logits)
    }

    fn vocab_shard(&self) -> Option<&VocabShard> {
        self.model.embed().shard.as_ref()
    }

    fn logits_packed(
        &self,
        ids: Tensor<B, 2, Int>,
        segments: &Tensor<B, 2, Int>,
        positions: Tensor<B, 2, Int>,
    ) -> Tensor<B, 3> {
        let [b, s] = ids.dims();
        let ctx = self
            .model
            .context(b, s, 0, Some(segments), Some(positions), &self.device);
        self.run(ids, &ctx, None, s).0
    }

    fn router_aux_loss_coef(&self) -> Option<f64> {
        self.model.router_aux_loss_coef()
    }

    fn logits_cached(
        &self,
        ids: Tensor<B, 2, Int>,
        padding: Option<&Tensor<B, 2, Int>>,
        cache: &mut Self::Cache,
    ) -> Tensor<B, 3> {
        let [b, s] = ids.dims();
        // [batch, kv_heads, past, head_dim]: the positions the cache holds.
        let past = cache
            .first()
            .and_then(|slot| slot.as_ref())
            .map_or(0, |(k, _)| k.dims()[2]);
        let ctx = self.model.context(b, s, past, padding, None, &self.device);
        let (logits, embed) = self.run(ids, &ctx, Some(cache), s);
        embed.gather_vocab(logits)
    }
}
