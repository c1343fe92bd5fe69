//! The UDR retriever: two BERT towers (queries, demonstrations), pooled vectors (position 0,
//! `[CLS]`, as UDR; or the token mean, the pooling a sentence-transformers encoder was trained
//! with), dot-product similarity, trained on LM-ranked candidate lists with [`crate::loss::udr_loss`]
//! (AdamW, linear warm-up and decay, global-norm clipping at 2.0 as UDR's scripts), one task per
//! batch with tasks drawn ∝ √size.

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor};
use collie_bert::{collate, encode, Bert, Pooling};
use collie_io::tokenizer::TokenizerBundle;
use collie_optim::clip::clip_global_norm;
use collie_optim::schedule::{Schedule, ScheduleKind};
use collie_optim::{AdamW, AdamWConfig};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::index::DenseIndex;
use crate::loss::{udr_loss, LossWeights};
use crate::sampling::{batch_schedule, CandidateSampling};
use crate::RetrievalError;

/// Query tower and demonstration tower.
#[derive(Module, Debug)]
pub struct BiEncoder<B: Backend> {
    /// Encodes the raw input of a query.
    pub query: Bert<B>,
    /// Encodes a demonstration (`{instruction}{x}\t{y}`).
    pub demo: Bert<B>,
}

/// How a tower turns texts into vectors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TextEncoding {
    /// Tokens per text (the final `[SEP]` kept when cut).
    pub max_len: usize,
    /// The tokenizer's padding id.
    pub pad_id: u32,
    /// `[CLS]` (UDR) or mean over real tokens.
    pub pooling: Pooling,
}

/// Texts to vectors with one tower.
///
/// # Shapes
/// - returns `[texts, hidden]`
pub fn encode_texts<B: Backend>(
    tower: &Bert<B>,
    tok: &TokenizerBundle,
    texts: &[String],
    enc: TextEncoding,
    device: &B::Device,
) -> Result<Tensor<B, 2>, RetrievalError> {
    let seqs = texts
        .iter()
        .map(|t| encode(tok, t.trim(), enc.max_len))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| RetrievalError::Data(e.to_string()))?;
    let (ids, mask) = collate::<B>(&seqs, enc.pad_id, device);
    Ok(tower.embed(ids, &mask, enc.pooling))
}

/// Texts to host vectors in batches (no gradients).
pub fn embed_all<B: Backend>(
    tower: &Bert<B>,
    tok: &TokenizerBundle,
    texts: &[String],
    enc: TextEncoding,
    batch: usize,
    device: &B::Device,
) -> Result<Vec<Vec<f32>>, RetrievalError> {
    let mut out = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(batch.max(1)) {
        let e = encode_texts(tower, tok, chunk, enc, device)?;
        let [n, d] = e.dims();
        let v: Vec<f32> = e.into_data().convert::<f32>().into_vec().expect("f32");
        out.extend((0..n).map(|i| v[i * d..(i + 1) * d].to_vec()));
    }
    Ok(out)
}

/// The demonstration pool of one task as an index (demonstration tower).
pub fn build_index<B: Backend>(
    tower: &Bert<B>,
    tok: &TokenizerBundle,
    demos: &[String],
    enc: TextEncoding,
    device: &B::Device,
) -> Result<DenseIndex<B>, RetrievalError> {
    let rows = embed_all(tower, tok, demos, enc, 32, device)?;
    Ok(DenseIndex::from_rows(&rows, device))
}

/// One training query: its raw input and the demonstration texts of its candidates, best LM
/// score first.
#[derive(Debug, Clone)]
pub struct RankedQuery {
    /// Raw input (query tower).
    pub query: String,
    /// Candidate demonstrations (demonstration tower), LM-ranked, best first.
    pub candidates: Vec<String>,
}

/// Training options (UDR's values where the scale allows).
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up steps.
    pub warmup_steps: u64,
    /// Passes over the schedule of batches.
    pub epochs: usize,
    /// Queries per batch.
    pub batch_queries: usize,
    /// Tokens per text.
    pub max_len: usize,
    /// Pooling of both towers.
    pub pooling: Pooling,
    /// Candidate sampling per query.
    pub sampling: CandidateSampling,
    /// Loss weights.
    pub loss: LossWeights,
    /// Global-norm clipping.
    pub max_grad_norm: f64,
    /// Seed of batching and sampling.
    pub seed: u64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            lr: 1e-4,
            warmup_steps: 20,
            epochs: 2,
            batch_queries: 8,
            max_len: 256,
            pooling: Pooling::Cls,
            sampling: CandidateSampling::default(),
            loss: LossWeights::default(),
            max_grad_norm: 2.0,
            seed: 1208,
        }
    }
}

/// What a training run did.
#[derive(Debug, Clone, Default)]
pub struct TrainReport {
    /// `(step, total, rank, in_batch)` per step.
    pub losses: Vec<(u64, f64, f64, f64)>,
    /// Queries trained on per second.
    pub queries_per_sec: f64,
    /// Wall time of the steps.
    pub seconds: f64,
}

/// Trains `model` on `tasks` (each a list of ranked queries). Batches hold one task's queries;
/// each epoch has `Σ_t ⌊n_t / B⌋` batches split among tasks ∝ √n_t.
pub fn train<B: AutodiffBackend>(
    mut model: BiEncoder<B>,
    tok: &TokenizerBundle,
    pad_id: u32,
    tasks: &[Vec<RankedQuery>],
    opts: &TrainOptions,
    device: &B::Device,
    mut on_step: impl FnMut(u64, u64, f64),
) -> Result<(BiEncoder<B>, TrainReport), RetrievalError> {
    let sizes: Vec<usize> = tasks.iter().map(Vec::len).collect();
    let bq = opts.batch_queries.max(1);
    let per_epoch: usize = sizes.iter().map(|n| n / bq).sum::<usize>().max(1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let schedules: Vec<Vec<usize>> = (0..opts.epochs)
        .map(|_| batch_schedule(&sizes, per_epoch, &mut rng))
        .collect();
    let total: u64 = schedules.iter().map(|s| s.len() as u64).sum();
    let sched = Schedule {
        kind: ScheduleKind::Linear,
        warmup_steps: opts.warmup_steps,
        total_steps: total,
    };
    let mut optim = AdamW::<B::InnerBackend>::new(AdamWConfig {
        weight_decay: 0.0,
        ..Default::default()
    });
    // Per task, a cursor over a per-epoch permutation of its queries.
    let mut orders: Vec<Vec<usize>> = sizes.iter().map(|&n| (0..n).collect()).collect();
    let mut cursors = vec![usize::MAX; tasks.len()];
    let mut report = TrainReport::default();
    let start = std::time::Instant::now();
    let mut step = 0u64;
    let mut queries = 0usize;
    for schedule in &schedules {
        for &t in schedule {
            let mut batch = Vec::with_capacity(bq);
            while batch.len() < bq.min(sizes[t]) {
                if cursors[t] >= sizes[t] {
                    orders[t].shuffle(&mut rng);
                    cursors[t] = 0;
                }
                batch.push(&tasks[t][orders[t][cursors[t]]]);
                cursors[t] += 1;
            }
            // Every query contributes the same number of candidates (the shortest list decides).
            let l = batch
                .iter()
                .map(|q| q.candidates.len().min(opts.sampling.per_query))
                .min()
                .unwrap_or(0);
            if l < 2 {
                continue;
            }
            let sampling = CandidateSampling {
                per_query: l,
                ..opts.sampling
            };
            let mut q_texts = Vec::with_capacity(batch.len());
            let mut c_texts = Vec::with_capacity(batch.len() * l);
            for q in &batch {
                q_texts.push(q.query.clone());
                for p in sampling.sample(q.candidates.len(), &mut rng) {
                    c_texts.push(q.candidates[p].clone());
                }
            }
            let enc = TextEncoding {
                max_len: opts.max_len,
                pad_id,
                pooling: opts.pooling,
            };
            let qv = encode_texts(&model.query, tok, &q_texts, enc, device)?;
            let cv = encode_texts(&model.demo, tok, &c_texts, enc, device)?;
            let loss = udr_loss(qv, cv, l, opts.loss);
            let total_v = loss.total.clone().into_scalar().elem::<f64>();
            let mut grads = GradientsParams::from_grads(loss.total.backward(), &model);
            let (_, coef) = clip_global_norm(&model, &grads, opts.max_grad_norm);
            let lr = sched.lr(opts.lr, step);
            model = collie_optim::apply(model, &mut grads, &mut optim, lr, coef);
            step += 1;
            queries += batch.len();
            report
                .losses
                .push((step, total_v, loss.rank, loss.in_batch));
            on_step(step, total, total_v);
        }
    }
    report.seconds = start.elapsed().as_secs_f64();
    report.queries_per_sec = queries as f64 / report.seconds.max(1e-9);
    Ok((model, report))
}
