//! Continuous batching: generation for sequences that arrive and finish at different times.
//!
//! A [`Batcher`] keeps one running batch and its KV cache. [`Batcher::admit`] prefills new
//! sequences (left-padded, as [`generate`](crate::generate::generate) does) and joins their
//! caches to the batch's, padding the shorter side at the front so every row ends in the same
//! column; [`Batcher::step`] decodes one token for every row. A row leaves the batch when it
//! reaches an EOS id or its token limit, or when its sink says the reader is gone; columns every
//! remaining row pads are dropped. Each row samples with its own settings and seeded generator,
//! so a sequence's tokens do not depend on which others share its steps (up to the float
//! rounding of padded attention), and a sequence alone runs exactly the calls of `generate`.

use burn::tensor::backend::Backend;
use collie_core::host::to_host;
use collie_core::lm::{CausalLm, RowCache};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::generate::{
    int_tensor, left_pad, pick, with_token_column, GenerateError, GenerationConfig,
};

/// Why a sequence stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    /// It produced one of its EOS ids (the last token it sent).
    Eos,
    /// It reached `max_new_tokens`.
    Length,
    /// Its request was invalid (the message says why); nothing was generated.
    Invalid(String),
}

/// What a sequence's sink receives: its tokens as they are chosen, then one [`Event::Finished`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The next token.
    Token(u32),
    /// The sequence is done; nothing follows.
    Finished(Finish),
}

/// Where a sequence's events go; returns `false` once nobody reads them (the sequence is then
/// dropped from the batch).
pub type Sink = Box<dyn FnMut(Event) -> bool + Send>;

/// One sequence to generate.
pub struct Request {
    /// Names the sequence for [`Batcher::cancel`] (unique among the running ones).
    pub id: u64,
    /// Prompt ids (not empty).
    pub prompt: Vec<u32>,
    /// Its sampling settings, token limit and EOS ids (`pad_id` must be the batch's).
    pub config: GenerationConfig,
    /// Where its tokens go.
    pub sink: Sink,
}

struct Row {
    id: u64,
    config: GenerationConfig,
    rng: StdRng,
    produced: usize,
    last: u32,
    sink: Sink,
}

impl Row {
    /// Picks and sends the next token; `false` when the row is done.
    fn advance(&mut self, logits: &[f32]) -> bool {
        let token = pick(logits, &self.config, &mut self.rng);
        self.produced += 1;
        self.last = token;
        if !(self.sink)(Event::Token(token)) {
            return false;
        }
        let finish = if self.config.eos_ids.contains(&token) {
            Finish::Eos
        } else if self.produced >= self.config.max_new_tokens {
            Finish::Length
        } else {
            return true;
        };
        (self.sink)(Event::Finished(finish));
        false
    }
}

/// The running batch of one model.
pub struct Batcher<'a, B: Backend, M: CausalLm<B>> {
    model: &'a M,
    device: B::Device,
    pad_id: u32,
    rows: Vec<Row>,
    cache: Option<M::Cache>,
    /// `[rows, width]` row-major: which cached positions (virtual tokens excluded) are tokens.
    mask: Vec<i64>,
}

impl<'a, B: Backend, M: CausalLm<B>> Batcher<'a, B, M> {
    /// An empty batch of `model`; `pad_id` fills padded slots.
    pub fn new(model: &'a M, device: B::Device, pad_id: u32) -> Self {
        Batcher {
            model,
            device,
            pad_id,
            rows: Vec::new(),
            cache: None,
            mask: Vec::new(),
        }
    }

    /// Sequences in the batch.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether no sequence is running.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Cached positions per row (padding included, virtual tokens excluded).
    pub fn width(&self) -> usize {
        self.mask.len().checked_div(self.rows.len()).unwrap_or(0)
    }

    /// The model on `ids` after `cache` (which it extends), with the padding `mask` of every
    /// slot; the last position's logits of every row, on the host (`rows · vocab`). A mask
    /// without padding is not passed: the unmasked path `generate` takes for unpadded prompts.
    fn last_logits(
        &self,
        ids: Vec<i64>,
        [rows, cols]: [usize; 2],
        mask: &[i64],
        cache: &mut M::Cache,
    ) -> Vec<f32> {
        let padding = mask
            .contains(&0)
            .then(|| int_tensor::<B>(mask.to_vec(), [rows, mask.len() / rows], &self.device));
        let input = int_tensor::<B>(ids, [rows, cols], &self.device);
        let logits = self.model.logits_cached(input, padding.as_ref(), cache);
        let [rows, s, vocab] = logits.dims();
        to_host(logits.slice([0..rows, s - 1..s]).reshape([rows, vocab]))
    }

    /// Prefills `requests` together and sends each its first token; those that go on join the
    /// batch. An invalid request gets [`Finish::Invalid`] and nothing else.
    pub fn admit(&mut self, requests: Vec<Request>) {
        let mut valid = Vec::with_capacity(requests.len());
        for mut r in requests {
            let problem = match r.config.validate() {
                Err(e) => Some(e.to_string()),
                Ok(()) if r.prompt.is_empty() => Some(GenerateError::EmptyPrompt(0).to_string()),
                Ok(()) => None,
            };
            if let Some(message) = problem {
                (r.sink)(Event::Finished(Finish::Invalid(message)));
            } else if r.config.max_new_tokens == 0 {
                (r.sink)(Event::Finished(Finish::Length));
            } else {
                valid.push(r);
            }
        }
        if valid.is_empty() {
            return;
        }
        let n = valid.len();
        let (ids, mask, width) = left_pad(valid.iter().map(|r| r.prompt.as_slice()), self.pad_id);
        let mut cache = self.model.new_cache();
        let host = self.last_logits(ids, [n, width], &mask, &mut cache);
        let vocab = host.len() / n;
        let mut keep = Vec::with_capacity(n);
        let mut joined = Vec::with_capacity(n);
        for (i, r) in valid.into_iter().enumerate() {
            let mut row = Row {
                id: r.id,
                rng: StdRng::seed_from_u64(r.config.seed),
                config: r.config,
                produced: 0,
                last: self.pad_id,
                sink: r.sink,
            };
            if row.advance(&host[i * vocab..(i + 1) * vocab]) {
                keep.push(i);
                joined.push(row);
            }
        }
        if joined.is_empty() {
            return;
        }
        let mut cache = if keep.len() < n {
            cache.select_rows(&keep)
        } else {
            cache
        };
        let mut new_mask = mask_rows(&mask, width, &keep);
        let mut new_width = width;
        let prefix = self.model.cache_prefix();
        if let Some(old) = self.cache.take() {
            // Both sides padded at the front to the longer one, then stacked.
            let old_width = self.width();
            let target = old_width.max(new_width);
            let old = old.pad_front(prefix, target - old_width);
            cache = cache.pad_front(prefix, target - new_width);
            self.mask = pad_mask(&self.mask, self.rows.len(), old_width, target);
            new_mask = pad_mask(&new_mask, joined.len(), new_width, target);
            cache = RowCache::cat_rows(vec![old, cache]);
            new_width = target;
        }
        debug_assert_eq!(cache.slots(), prefix + new_width);
        self.mask.extend(new_mask);
        self.rows.extend(joined);
        self.cache = Some(cache);
    }

    /// One decoding step for every running sequence.
    pub fn step(&mut self) {
        let Some(mut cache) = self.cache.take() else {
            return;
        };
        let n = self.rows.len();
        let mask = with_token_column(&self.mask, n);
        let last = self.rows.iter().map(|r| r.last as i64).collect();
        let host = self.last_logits(last, [n, 1], &mask, &mut cache);
        let vocab = host.len() / n;
        let mut keep = Vec::with_capacity(n);
        for (i, row) in self.rows.iter_mut().enumerate() {
            if row.advance(&host[i * vocab..(i + 1) * vocab]) {
                keep.push(i);
            }
        }
        self.mask = mask;
        self.cache = Some(cache);
        self.retain(&keep);
    }

    /// Ids of the running sequences, in batch order.
    pub fn ids(&self) -> Vec<u64> {
        self.rows.iter().map(|r| r.id).collect()
    }

    /// Drops the running sequences `ids` names (their sinks hear nothing more); others are
    /// ignored. Every process of a distributed engine cancels the same ids at the same step.
    pub fn cancel(&mut self, ids: &[u64]) {
        let keep: Vec<usize> = (self.rows.iter().enumerate())
            .filter(|(_, r)| !ids.contains(&r.id))
            .map(|(i, _)| i)
            .collect();
        if keep.len() < self.rows.len() {
            self.retain(&keep);
        }
    }

    /// Keeps the rows at `keep` (ascending) of the cache, mask and rows, then drops the columns
    /// every remaining row pads.
    fn retain(&mut self, keep: &[usize]) {
        let n = self.rows.len();
        let width = self.width();
        let Some(mut cache) = self.cache.take() else {
            return;
        };
        if keep.is_empty() {
            self.rows.clear();
            self.mask.clear();
            return;
        }
        let mut mask = std::mem::take(&mut self.mask);
        if keep.len() < n {
            cache = cache.select_rows(keep);
            mask = mask_rows(&mask, width, keep);
            let mut i = 0;
            self.rows.retain(|_| {
                i += 1;
                keep.contains(&(i - 1))
            });
        }
        // Columns every remaining row pads hold nothing any row reads.
        let rows = keep.len();
        let unused = (0..rows)
            .map(|r| {
                mask[r * width..(r + 1) * width]
                    .iter()
                    .take_while(|m| **m == 0)
                    .count()
            })
            .min()
            .unwrap_or(0);
        if unused > 0 {
            cache = cache.drop_front(self.model.cache_prefix(), unused);
            mask = (0..rows)
                .flat_map(|r| mask[r * width + unused..(r + 1) * width].iter().copied())
                .collect();
        }
        self.mask = mask;
        self.cache = Some(cache);
    }
}

/// The rows `keep` of a `[rows, width]` mask.
fn mask_rows(mask: &[i64], width: usize, keep: &[usize]) -> Vec<i64> {
    keep.iter()
        .flat_map(|&i| mask[i * width..(i + 1) * width].iter().copied())
        .collect()
}

/// Every row's `[rows, width]` mask padded at the front to `target` columns.
fn pad_mask(mask: &[i64], rows: usize, width: usize, target: usize) -> Vec<i64> {
    (0..rows)
        .flat_map(|r| {
            std::iter::repeat_n(0, target - width)
                .chain(mask[r * width..(r + 1) * width].iter().copied())
        })
        .collect()
}
