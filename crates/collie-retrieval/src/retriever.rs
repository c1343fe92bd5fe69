//! The UDR retriever: two BERT towers (queries, demonstrations), pooled vectors (position 0,
//! `[CLS]`, as UDR; or the token mean, the pooling a sentence-transformers encoder was trained
//! with), dot-product similarity, trained on LM-ranked candidate lists with [`crate::loss::udr_loss`],
//! one task per batch with tasks drawn ∝ √size.
//!
//! Training runs on the trainer's machinery ([`collie_train::update::Update`]): the optimizer
//! `[optim]` names (UDR's AdamW without decay by default), the `[sched]` schedule (linear warm-up
//! and decay), global-norm clipping (2.0 as UDR's scripts), `metrics.jsonl` + `loss.png`, and
//! atomic `checkpoints/step-N` (both towers as HF directories, optimizer state, trainer state)
//! from which a run resumes exactly.

use std::path::{Path, PathBuf};

use burn::module::{AutodiffModule, Module};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor};
use collie_bert::{collate, encode, Bert, BertConfig, Pooling};
use collie_io::tokenizer::TokenizerBundle;
use collie_optim::clip::global_norm;
use collie_optim::schedule::ScheduleKind;
use collie_train::checkpoint::{self, TrainerState};
use collie_train::config::{OptimName, OptimSection, SchedSection};
use collie_train::metrics::{truncate_metrics, MetricsLog};
use collie_train::update::Update;
use collie_train::TrainError;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::json;

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
    /// Optimizer and peak learning rate (default AdamW at 1e-4 without weight decay).
    pub optim: OptimSection,
    /// Learning-rate schedule (default: linear decay after 20 warm-up steps).
    pub sched: SchedSection,
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
    /// Global-norm clipping (0 = off).
    pub max_grad_norm: f64,
    /// Seed of batching and sampling.
    pub seed: u64,
    /// Run directory for `metrics.jsonl`, `loss.png` and `checkpoints/` (none: nothing written).
    pub output: Option<PathBuf>,
    /// Save a checkpoint every N steps (0 = only at the end); needs `output`.
    pub save_every: u64,
    /// Keep the last K checkpoints (0 = all).
    pub keep_last: usize,
    /// Resume from `latest` (the newest checkpoint under `output`) or a checkpoint directory.
    pub resume: Option<String>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            optim: OptimSection {
                weight_decay: Some(0.0),
                ..OptimSection::named(OptimName::AdamW, 1e-4)
            },
            sched: SchedSection {
                kind: ScheduleKind::Linear,
                warmup_steps: 20,
            },
            epochs: 2,
            batch_queries: 8,
            max_len: 256,
            pooling: Pooling::Cls,
            sampling: CandidateSampling::default(),
            loss: LossWeights::default(),
            max_grad_norm: 2.0,
            seed: 1208,
            output: None,
            save_every: 0,
            keep_last: 0,
            resume: None,
        }
    }
}

/// What a training run did.
#[derive(Debug, Clone, Default)]
pub struct TrainReport {
    /// `(step, total, rank, in_batch)` per step run by this call (a resumed run starts after its
    /// checkpoint).
    pub losses: Vec<(u64, f64, f64, f64)>,
    /// Queries trained on per second.
    pub queries_per_sec: f64,
    /// Wall time of the steps.
    pub seconds: f64,
    /// The checkpoint of the final state (with `output`).
    pub checkpoint: Option<PathBuf>,
}

/// Trains `model` (towers of `config`) on `tasks` (each a list of ranked queries). Batches hold
/// one task's queries; each epoch has `Σ_t ⌊n_t / B⌋` batches split among tasks ∝ √n_t.
/// `on_step(step, total, loss)` follows each step.
#[allow(clippy::too_many_arguments)]
pub fn train<B: AutodiffBackend>(
    mut model: BiEncoder<B>,
    config: &BertConfig,
    tok: &TokenizerBundle,
    tasks: &[Vec<RankedQuery>],
    opts: &TrainOptions,
    device: &B::Device,
    mut on_step: impl FnMut(u64, u64, f64),
) -> Result<(BiEncoder<B>, TrainReport), RetrievalError> {
    if opts.optim.is_fused() {
        return Err(RetrievalError::Config(format!(
            "retriever optim.name = \"{}\": it updates inside a block-wise backward pass, which \
             the two-tower retriever does not walk; use adamw, sgd, lion, adan or sophiag",
            opts.optim.name
        )));
    }
    if opts.output.is_none() && (opts.resume.is_some() || opts.save_every > 0) {
        return Err(RetrievalError::Config(
            "retriever checkpoints (save_every, resume) need an output directory".into(),
        ));
    }
    let sizes: Vec<usize> = tasks.iter().map(Vec::len).collect();
    let bq = opts.batch_queries.max(1);
    let per_epoch: usize = sizes.iter().map(|n| n / bq).sum::<usize>().max(1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let schedules: Vec<Vec<usize>> = (0..opts.epochs)
        .map(|_| batch_schedule(&sizes, per_epoch, &mut rng))
        .collect();
    let total: u64 = schedules.iter().map(|s| s.len() as u64).sum();
    let mut update =
        Update::<B::InnerBackend>::new(&opts.optim, &opts.sched, opts.max_grad_norm, total);
    let mut state = TrainerState::default();
    if let (Some(spec), Some(root)) = (&opts.resume, &opts.output) {
        let dir = checkpoint::resolve_resume(root, spec)?;
        let (optimizer, saved) = checkpoint::load_state(&dir, &|_| true)?;
        model = load_towers(&dir, device)?;
        update.load_state(optimizer, device)?;
        state = saved;
    }
    let mut log = match &opts.output {
        Some(root) => {
            std::fs::create_dir_all(root).map_err(|e| RetrievalError::io(root, e))?;
            truncate_metrics(root, state.step)?;
            Some(MetricsLog::open(root)?)
        }
        None => None,
    };
    let resumed_at = state.step;
    let enc = TextEncoding {
        max_len: opts.max_len,
        pad_id: config.pad_token_id,
        pooling: opts.pooling,
    };
    // Per task, a cursor over a per-epoch permutation of its queries.
    let mut orders: Vec<Vec<usize>> = sizes.iter().map(|&n| (0..n).collect()).collect();
    let mut cursors = vec![usize::MAX; tasks.len()];
    let mut report = TrainReport::default();
    let start = std::time::Instant::now();
    let mut step = 0u64;
    let mut queries = 0usize;
    for &t in schedules.iter().flatten() {
        // The batch and its candidates are drawn whether or not the step runs, so a resumed run
        // replays the random stream up to its checkpoint and continues exactly.
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
        if step < resumed_at {
            step += 1;
            continue;
        }
        let qv = encode_texts(&model.query, tok, &q_texts, enc, device)?;
        let cv = encode_texts(&model.demo, tok, &c_texts, enc, device)?;
        let loss = udr_loss(qv, cv, l, opts.loss);
        let total_v = loss.total.clone().into_scalar().elem::<f64>();
        let mut grads = GradientsParams::from_grads(loss.total.backward(), &model);
        let grad_norm = global_norm(&model, &grads);
        let lr = update.lr(step);
        model = update.apply(model, &mut grads, grad_norm, 1.0, batch.len(), lr);
        step += 1;
        queries += batch.len();
        state.step = step;
        state.consumed += batch.len() as u64;
        report
            .losses
            .push((step, total_v, loss.rank, loss.in_batch));
        if let Some(log) = &mut log {
            let line = json!({"step": step, "loss": total_v, "rank_loss": loss.rank,
                              "in_batch_loss": loss.in_batch, "lr": lr, "grad_norm": grad_norm,
                              "queries": batch.len()});
            log.write(line.as_object().expect("object"))?;
        }
        on_step(step, total, total_v);
        if let (Some(root), true) = (
            &opts.output,
            opts.save_every > 0 && step.is_multiple_of(opts.save_every),
        ) {
            save(root, &model, config, tok, &update, &state, opts)?;
        }
    }
    report.seconds = start.elapsed().as_secs_f64();
    report.queries_per_sec = queries as f64 / report.seconds.max(1e-9);
    if let Some(root) = &opts.output {
        // The final state, unless a periodic save or the resumed checkpoint already holds it
        // (the last scheduled batches may have been skipped, so this is not tied to a step).
        let last = checkpoint::step_dir(root, state.step);
        if !last.is_dir() {
            save(root, &model, config, tok, &update, &state, opts)?;
        }
        report.checkpoint = Some(last);
        if let Err(e) = collie_train::plot::plot_metrics(root) {
            eprintln!(
                "warning: could not draw {}: {e}",
                root.join("loss.png").display()
            );
        }
    }
    Ok((model, report))
}

/// Writes checkpoint `state.step` under `root`: `query/` and `demo/` as HF encoder directories
/// beside the trainer's optimizer and state files.
// The weight writer returns collie-train's error type, as `checkpoint::save` requires.
#[allow(clippy::result_large_err)]
fn save<B: AutodiffBackend>(
    root: &Path,
    model: &BiEncoder<B>,
    config: &BertConfig,
    tok: &TokenizerBundle,
    update: &Update<B::InnerBackend>,
    state: &TrainerState,
    opts: &TrainOptions,
) -> Result<PathBuf, RetrievalError> {
    let model = model.clone().valid();
    let resolved = format!(
        "# retriever training\n[optim]\n{}\n[sched]\n{}\n",
        toml::to_string(&opts.optim).expect("toml"),
        toml::to_string(&opts.sched).expect("toml")
    );
    let dir = checkpoint::save(
        root,
        |dir| {
            for (name, tower) in [("query", &model.query), ("demo", &model.demo)] {
                collie_bert::hf::save_hf_dir(tower, config, Some(tok), &dir.join(name))
                    .map_err(|e| TrainError::Invalid(format!("{}: {e}", dir.display())))?;
            }
            Ok(())
        },
        &update.snapshot(),
        state,
        &resolved,
    )?;
    checkpoint::prune(root, opts.keep_last, &[])?;
    Ok(dir)
}

/// The towers of a retriever checkpoint (or a trained retriever's directory).
pub fn load_towers<B: Backend>(
    dir: &Path,
    device: &B::Device,
) -> Result<BiEncoder<B>, RetrievalError> {
    let tower = |name: &str| {
        collie_bert::hf::load_hf_dir::<B>(&dir.join(name), device)
            .map(|(_, model)| model)
            .map_err(|e| RetrievalError::Data(format!("{}: {e}", dir.join(name).display())))
    };
    Ok(BiEncoder {
        query: tower("query")?,
        demo: tower("demo")?,
    })
}
