//! What generation and evaluation need from a causal language model.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::model::KvSlot;

/// A decoder-only language model, as generation and perplexity code see it.
pub trait CausalLm<B: Backend> {
    /// Per-call state of incremental decoding (past keys and values); its rows can be selected
    /// and joined ([`RowCache`]), which continuous batching needs.
    type Cache: RowCache<B>;

    /// Slots at the front of every row of a non-empty cache that no padding mask covers: the
    /// virtual tokens of prompt learning. Padding inserted into a cache goes after them.
    fn cache_prefix(&self) -> usize {
        0
    }

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

/// A decoding cache whose rows are sequences: continuous batching removes the rows that finished
/// and joins the caches of new sequences, left-padded to a common length (the padding mask of the
/// next calls hides the padded slots).
pub trait RowCache<B: Backend>: Sized {
    /// Slots per row (virtual tokens included).
    fn slots(&self) -> usize;

    /// The rows at `rows`, in that order.
    fn select_rows(self, rows: &[usize]) -> Self;

    /// `n` empty slots inserted in every row after its first `after` slots.
    fn pad_front(self, after: usize, n: usize) -> Self;

    /// The `n` slots after the first `after` removed from every row (slots every row pads).
    fn drop_front(self, after: usize, n: usize) -> Self;

    /// The rows of every part, in order; the parts hold the same number of slots.
    fn cat_rows(parts: Vec<Self>) -> Self;
}

/// Every tensor of a cache at once: `f` on each `(k, v)` of each layer.
fn map_slots<B: Backend>(
    cache: Vec<KvSlot<B>>,
    f: impl Fn(Tensor<B, 4>) -> Tensor<B, 4>,
) -> Vec<KvSlot<B>> {
    cache
        .into_iter()
        .map(|slot| slot.map(|(k, v)| (f(k), f(v))))
        .collect()
}

impl<B: Backend> RowCache<B> for Vec<KvSlot<B>> {
    fn slots(&self) -> usize {
        self.iter().flatten().next().map_or(0, |(k, _)| k.dims()[2])
    }

    fn select_rows(self, rows: &[usize]) -> Self {
        map_slots(self, |t| {
            let device = t.device();
            let idx = rows.iter().map(|&r| r as i64).collect::<Vec<_>>();
            let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [rows.len()]), &device);
            t.select(0, idx)
        })
    }

    fn pad_front(self, after: usize, n: usize) -> Self {
        if n == 0 {
            return self;
        }
        map_slots(self, |t| {
            // [batch, heads, slots, dim] -> [batch, heads, after + n + rest, dim]
            let [b, h, s, d] = t.dims();
            let zeros = Tensor::zeros([b, h, n, d], &t.device());
            let head = t.clone().slice([0..b, 0..h, 0..after, 0..d]);
            let rest = t.slice([0..b, 0..h, after..s, 0..d]);
            Tensor::cat(vec![head, zeros, rest], 2)
        })
    }

    fn drop_front(self, after: usize, n: usize) -> Self {
        if n == 0 {
            return self;
        }
        map_slots(self, |t| {
            // [batch, heads, slots, dim] -> [batch, heads, slots - n, dim]
            let [b, h, s, d] = t.dims();
            let rest = t.clone().slice([0..b, 0..h, after + n..s, 0..d]);
            if after == 0 {
                return rest;
            }
            let head = t.slice([0..b, 0..h, 0..after, 0..d]);
            Tensor::cat(vec![head, rest], 2)
        })
    }

    fn cat_rows(parts: Vec<Self>) -> Self {
        let layers = parts.first().map_or(0, Vec::len);
        let mut parts: Vec<_> = parts.into_iter().map(Vec::into_iter).collect();
        (0..layers)
            .map(|_| {
                let slots: Vec<KvSlot<B>> = parts.iter_mut().map(|p| p.next().flatten()).collect();
                if slots.iter().any(Option::is_none) {
                    return None;
                }
                let (ks, vs) = slots.into_iter().flatten().unzip();
                Some((Tensor::cat(ks, 0), Tensor::cat(vs, 0)))
            })
            .collect()
    }
}
