//! The stages of a UDR run. Each writes its outputs under `output.dir` and is skipped when they
//! exist, so an interrupted run resumes where it stopped (scoring resumes mid-stage through its
//! score cache).
//!
//! ```text
//! prepare   data/{task}.json                 seeded splits: pool (train), dev, test
//! score     cand/{task}.iter0.json           BM25 top-K of each training query over the pool
//!           scores/{task}.jsonl              LM feedback per (query, candidate), fingerprinted
//!           ranked/{task}.iter0.json         candidates sorted by LM score, best first
//! train     retriever/iter0/{query,demo}/    the two towers (HF BertModel directories)
//! mine      cand/{task}.iter1.json           + the trained retriever's top-K, scored, re-ranked
//! train     retriever/iter1/…
//! evaluate  results/{method}/{task}.json     per-example scores (resumable per task), then
//!           results/{method}.json            per-task scores of each method; udr_results.json
//! ablate    results/ablation.json            one task: full loss, without L_rank, without L_ib
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::tensor::backend::AutodiffBackend;
use collie_bert::Pooling;
use collie_core::lm::CausalLm;
use collie_io::tokenizer::TokenizerBundle;
use collie_llama::Llama;
use collie_retrieval::bm25::{tokenize, Bm25, Bm25Params};
use collie_retrieval::icl::{
    bootstrap_ci, bootstrap_task_average, build_prompt, classify, generate_line,
};
use collie_retrieval::retriever::{self, BiEncoder, RankedQuery, TrainOptions};
use collie_retrieval::scoring::{fingerprint, mean_nll, ScoreCache};
use collie_retrieval::tasks::{self, Example, Metric, Splits, Task};
use collie_retrieval::{CandidateSampling, DenseIndex, LossWeights};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::{json, Value};

use crate::config::UdrConfig;

/// One inference tower.
type Tower<B> = collie_bert::Encoder<<B as burn::tensor::backend::AutodiffBackend>::InnerBackend>;

/// A trained retriever loaded for inference: both towers and how they encode.
struct Towers<B: AutodiffBackend> {
    query: Tower<B>,
    demo: Tower<B>,
    enc: retriever::TextEncoding,
}

/// Beside the towers: how they pool (`{"pooling": "mean", "max_len": 128}`).
const RETRIEVER_FILE: &str = "retriever.json";

/// Everything the stages share.
pub struct Run<'a, B: AutodiffBackend> {
    /// The configuration.
    pub config: &'a UdrConfig,
    /// The device.
    pub device: B::Device,
    /// Progress lines on stderr.
    pub quiet: bool,
}

fn read<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

/// Writes `value` as JSON atomically (temporary file + rename).
fn write<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, serde_json::to_string(value)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

impl<B: AutodiffBackend> Run<'_, B> {
    fn dir(&self) -> &Path {
        &self.config.output.dir
    }

    fn say(&self, line: &str) {
        if !self.quiet {
            eprintln!("recipe-udr: {line}");
        }
    }

    fn tasks(&self) -> Result<Vec<Task>> {
        self.config
            .data
            .tasks
            .iter()
            .map(|t| Ok(tasks::task(t)?))
            .collect()
    }

    /// The tasks whose `output` file of a stage does not exist yet.
    fn pending(&self, output: impl Fn(&Task) -> PathBuf) -> Result<Vec<Task>> {
        Ok(self
            .tasks()?
            .into_iter()
            .filter(|t| !output(t).is_file())
            .collect())
    }

    /// `data/{task}.json`: the seeded splits.
    pub fn prepare(&self) -> Result<()> {
        let d = &self.config.data;
        for task in self.tasks()? {
            let path = self.dir().join("data").join(format!("{}.json", task.name));
            if path.is_file() {
                continue;
            }
            let examples = task.load()?;
            let splits = tasks::split(task.name, examples, d.seed, d.test, d.dev, d.pool)?;
            self.say(&format!(
                "{}: pool {}, dev {}, test {}",
                task.name,
                splits.train.len(),
                splits.dev.len(),
                splits.test.len()
            ));
            write(&path, &splits)?;
        }
        Ok(())
    }

    fn splits(&self, task: &Task) -> Result<Splits> {
        let path = self.dir().join("data").join(format!("{}.json", task.name));
        if !path.is_file() {
            bail!("{} is missing: run the prepare stage first", path.display());
        }
        read(&path)
    }

    /// Training queries of a task: the first `train_queries` of its pool.
    fn queries(&self, splits: &Splits) -> usize {
        self.config.data.train_queries.min(splits.train.len())
    }

    /// `cand/{task}.iter0.json`: BM25 candidates of each training query over the pool.
    pub fn bm25_candidates(&self) -> Result<()> {
        for task in self.tasks()? {
            let path = self.cand_path(&task, 0);
            if path.is_file() {
                continue;
            }
            let s = self.splits(&task)?;
            let docs: Vec<Vec<String>> = s.train.iter().map(|e| tokenize(&e.input)).collect();
            let bm = Bm25::new(&docs, Bm25Params::default());
            let k = self.config.retriever.candidates;
            let cands: Vec<Vec<usize>> = (0..self.queries(&s))
                .map(|q| {
                    bm.top_k(&docs[q], k, Some(q))
                        .into_iter()
                        .map(|(i, _)| i)
                        .collect()
                })
                .collect();
            write(&path, &cands)?;
        }
        Ok(())
    }

    fn cand_path(&self, task: &Task, iter: usize) -> PathBuf {
        self.dir()
            .join("cand")
            .join(format!("{}.iter{iter}.json", task.name))
    }

    fn ranked_path(&self, task: &Task, iter: usize) -> PathBuf {
        self.dir()
            .join("ranked")
            .join(format!("{}.iter{iter}.json", task.name))
    }

    /// Loads the LM and its fingerprint (config, vocabulary, a slice of the embedding).
    fn lm(&self) -> Result<(Llama<B::InnerBackend>, TokenizerBundle, String)> {
        let loaded = collie_llama::load::<B::InnerBackend>(&self.config.lm.model, &self.device)
            .with_context(|| format!("loading lm.model `{}`", self.config.lm.model))?;
        let tok = loaded.tokenizer()?.clone();
        let head: Vec<f32> = loaded
            .model
            .embed
            .weight
            .val()
            .slice([0..1, 0..16])
            .into_data()
            .convert::<f32>()
            .into_vec()
            .expect("f32");
        let fp = fingerprint(&[
            &serde_json::to_string(&loaded.config)?,
            &tok.vocab_size().to_string(),
            &format!("{head:?}"),
        ]);
        Ok((loaded.model, tok, fp))
    }

    /// Scores every (query, candidate) of `cand/{task}.iter{iter}.json` not yet in the cache and
    /// writes the LM-ranked lists.
    pub fn score(&self, iter: usize) -> Result<()> {
        let todo = self.pending(|t| self.ranked_path(t, iter))?;
        if todo.is_empty() {
            return Ok(());
        }
        let (lm, tok, fp) = self.lm()?;
        let lmc = &self.config.lm;
        for task in todo {
            let s = self.splits(&task)?;
            let cands: Vec<Vec<usize>> = read(&self.cand_path(&task, iter))?;
            let cache_path = self
                .dir()
                .join("scores")
                .join(format!("{}.jsonl", task.name));
            let mut cache = ScoreCache::open(&cache_path, &fp)?;
            let missing: Vec<(usize, usize)> = cands
                .iter()
                .enumerate()
                .flat_map(|(q, cs)| cs.iter().map(move |&c| (q, c)))
                .filter(|&(q, c)| cache.get(q, c).is_none())
                .collect();
            let start = std::time::Instant::now();
            for chunk in missing.chunks(lmc.score_batch.max(1) * 4) {
                let pairs: Vec<(String, String)> = chunk
                    .iter()
                    .map(|&(q, c)| {
                        let (x, z) = (&s.train[q], &s.train[c]);
                        (
                            format!("{}\n{}\t", task.prompt_block(z), x.input),
                            x.output.clone(),
                        )
                    })
                    .collect();
                let nll = mean_nll(
                    &lm,
                    &tok,
                    &pairs,
                    lmc.score_batch,
                    lmc.max_len,
                    &self.device,
                )?;
                let new: Vec<_> = chunk.iter().copied().zip(nll).collect();
                cache.extend(&new)?;
            }
            if !missing.is_empty() {
                let secs = start.elapsed().as_secs_f64();
                self.say(&format!(
                    "{} iter {iter}: scored {} candidates in {secs:.0} s ({:.1}/s)",
                    task.name,
                    missing.len(),
                    missing.len() as f64 / secs.max(1e-9)
                ));
                self.log_throughput("score", &task, missing.len(), secs)?;
            }
            let ranked: Vec<Vec<usize>> = cands
                .iter()
                .enumerate()
                .map(|(q, cs)| {
                    let mut cs = cs.clone();
                    cs.sort_by(|&a, &b| {
                        let (x, y) = (cache.get(q, a).unwrap(), cache.get(q, b).unwrap());
                        x.total_cmp(&y).then(a.cmp(&b))
                    });
                    cs
                })
                .collect();
            write(&self.ranked_path(&task, iter), &ranked)?;
        }
        Ok(())
    }

    fn log_throughput(&self, what: &str, task: &Task, items: usize, secs: f64) -> Result<()> {
        let path = self.dir().join("throughput.jsonl");
        let line = json!({"stage": what, "task": task.name, "items": items, "seconds": secs,
                          "per_second": items as f64 / secs.max(1e-9)});
        let mut text = std::fs::read_to_string(&path).unwrap_or_default();
        text.push_str(&format!("{line}\n"));
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    }

    fn tower_dir(&self, iter: usize) -> PathBuf {
        self.dir().join("retriever").join(format!("iter{iter}"))
    }

    /// Trains a fresh retriever (both towers from `retriever.model`) on the ranked lists of
    /// iteration `iter` and saves it.
    pub fn train(&self, iter: usize) -> Result<()> {
        let r = &self.config.retriever;
        let loss = LossWeights {
            rank: r.rank_weight,
            in_batch: r.in_batch_weight,
        };
        self.train_into(&self.tower_dir(iter), &self.tasks()?, iter, loss)
    }

    /// Trains towers on `tasks`' ranked lists of round `iter` with `loss` into `out`.
    fn train_into(&self, out: &Path, tasks: &[Task], iter: usize, loss: LossWeights) -> Result<()> {
        if out.join("demo").join("model.safetensors").is_file() {
            return Ok(());
        }
        let r = &self.config.retriever;
        let encoder = collie_bert::load::<B>(&r.model, &self.device)
            .with_context(|| format!("loading retriever.model `{}`", r.model))?;
        let mut data = Vec::new();
        for task in tasks {
            let s = self.splits(task)?;
            let ranked: Vec<Vec<usize>> = read(&self.ranked_path(task, iter))?;
            data.push(
                ranked
                    .iter()
                    .enumerate()
                    .map(|(q, cs)| RankedQuery {
                        query: s.train[q].input.clone(),
                        candidates: cs
                            .iter()
                            .map(|&c| task.demonstration(&s.train[c]))
                            .collect(),
                    })
                    .collect::<Vec<_>>(),
            );
        }
        // The round's run directory: metrics, loss.png and checkpoints, resumed when a previous
        // attempt was interrupted.
        let run = out.with_extension("run");
        let resume = (!collie_train::checkpoint::list(&run).is_empty()).then(|| "latest".into());
        let opts = TrainOptions {
            optim: collie_train::config::OptimSection {
                weight_decay: Some(0.0),
                ..collie_train::config::OptimSection::named(
                    collie_train::config::OptimName::AdamW,
                    r.lr,
                )
            },
            sched: collie_train::config::SchedSection {
                kind: collie_train::config::ScheduleKind::Linear,
                warmup_steps: r.warmup_steps,
            },
            epochs: r.epochs,
            batch_queries: r.batch_queries,
            max_len: r.max_len,
            pooling: r.pooling(),
            sampling: CandidateSampling {
                per_query: r.per_query,
                ..Default::default()
            },
            loss,
            max_grad_norm: 2.0,
            seed: r.seed + iter as u64,
            output: Some(run.clone()),
            save_every: r.save_every,
            keep_last: 1,
            resume,
        };
        let model = BiEncoder {
            query: encoder.model.clone(),
            demo: encoder.model,
        };
        let quiet = self.quiet;
        let (_, report) = retriever::train(
            model,
            &encoder.config,
            &encoder.tokenizer,
            &data,
            &opts,
            &self.device,
            |step, total, loss| {
                if !quiet && (step % 10 == 0 || step == total) {
                    eprintln!("recipe-udr: train iter {iter}: step {step}/{total} loss {loss:.4}");
                }
            },
        )?;
        self.say(&format!(
            "train iter {iter}: {} steps, {:.1} queries/s",
            report.losses.len(),
            report.queries_per_sec
        ));
        let staging = out.with_extension("partial");
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging)?;
        let out = out.to_path_buf();
        // The final checkpoint already holds both towers as HF directories: move them.
        let last = report
            .checkpoint
            .as_ref()
            .expect("a run with an output directory");
        for name in ["query", "demo"] {
            std::fs::rename(last.join(name), staging.join(name))
                .with_context(|| format!("moving {}", last.join(name).display()))?;
        }
        write(
            &staging.join("report.json"),
            &json!({"losses": report.losses, "queries_per_sec": report.queries_per_sec,
                    "seconds": report.seconds}),
        )?;
        // How the towers pool: inference must pool as training did.
        write(
            &staging.join(RETRIEVER_FILE),
            &json!({"pooling": r.pooling, "max_len": r.max_len}),
        )?;
        for file in ["metrics.jsonl", "loss.png"] {
            if run.join(file).is_file() {
                std::fs::copy(run.join(file), staging.join(file))?;
            }
        }
        if out.exists() {
            std::fs::remove_dir_all(&out)?;
        }
        std::fs::rename(&staging, &out).with_context(|| format!("writing {}", out.display()))?;
        // The towers are in place: the round's checkpoints are no longer needed.
        std::fs::remove_dir_all(&run).with_context(|| format!("removing {}", run.display()))?;
        Ok(())
    }

    /// Loads the towers of iteration `iter` (inference).
    fn towers(&self, iter: usize) -> Result<Towers<B>> {
        self.towers_at(&self.tower_dir(iter))
    }

    /// Loads the towers saved in `dir` and how they pool (`retriever.json`).
    fn towers_at(&self, dir: &Path) -> Result<Towers<B>> {
        let load = |name: &str| {
            let p = dir.join(name);
            collie_bert::load::<B::InnerBackend>(p.to_str().unwrap_or_default(), &self.device)
                .with_context(|| format!("loading the retriever {}", p.display()))
        };
        let meta: Value = read(&dir.join(RETRIEVER_FILE))?;
        let pooling = meta["pooling"]
            .as_str()
            .unwrap_or_default()
            .parse::<Pooling>()
            .map_err(|e| anyhow::anyhow!("{}: {e}", dir.join(RETRIEVER_FILE).display()))?;
        let (query, demo) = (load("query")?, load("demo")?);
        let enc = retriever::TextEncoding {
            max_len: self.config.retriever.max_len,
            pad_id: query.config.pad_token_id,
            pooling,
        };
        Ok(Towers { query, demo, enc })
    }

    /// Mining round `iter` (≥ 1): the retriever of `iter − 1` adds its top-K per training query.
    pub fn mine(&self, iter: usize) -> Result<()> {
        let todo = self.pending(|t| self.cand_path(t, iter))?;
        if todo.is_empty() {
            return Ok(());
        }
        let towers = self.towers(iter - 1)?;
        let r = &self.config.retriever;
        for task in todo {
            let s = self.splits(&task)?;
            let index = self.demo_index(&towers, &task, &s)?;
            let nq = self.queries(&s);
            let inputs: Vec<String> = s.train[..nq].iter().map(|e| e.input.clone()).collect();
            let qv = retriever::encode_texts(
                &towers.query.model,
                &towers.query.tokenizer,
                &inputs,
                towers.enc,
                &self.device,
            )?;
            let exclude: Vec<usize> = (0..nq).collect();
            let hits = index.search(qv, r.mine_k, Some(&exclude));
            let old: Vec<Vec<usize>> = read(&self.cand_path(&task, iter - 1))?;
            let merged: Vec<Vec<usize>> = old
                .into_iter()
                .zip(hits)
                .map(|(mut cs, h)| {
                    for (i, _) in h {
                        if !cs.contains(&i) {
                            cs.push(i);
                        }
                    }
                    cs
                })
                .collect();
            write(&self.cand_path(&task, iter), &merged)?;
        }
        Ok(())
    }

    fn demo_index(
        &self,
        towers: &Towers<B>,
        task: &Task,
        s: &Splits,
    ) -> Result<DenseIndex<B::InnerBackend>> {
        let demos: Vec<String> = s.train.iter().map(|e| task.demonstration(e)).collect();
        Ok(retriever::build_index(
            &towers.demo.model,
            &towers.demo.tokenizer,
            &demos,
            towers.enc,
            &self.device,
        )?)
    }

    /// How `method` retrieves: by name, or with the towers of a trained retriever.
    fn towers_of(&self, method: &str) -> Option<PathBuf> {
        match method {
            "udr" => Some(self.tower_dir(self.config.retriever.mining_rounds)),
            "udr_iter0" => Some(self.tower_dir(0)),
            _ => None,
        }
    }

    /// Demonstrations (pool indices, most similar first) of every test example by `method`, or
    /// by the retriever saved in `towers`.
    fn retrieve(
        &self,
        method: &str,
        towers: Option<&Path>,
        task: &Task,
        s: &Splits,
    ) -> Result<Vec<Vec<usize>>> {
        if let Some(dir) = towers {
            let towers = self.towers_at(dir)?;
            let index = self.demo_index(&towers, task, s)?;
            let tests: Vec<String> = s.test.iter().map(|e| e.input.clone()).collect();
            let qv = retriever::encode_texts(
                &towers.query.model,
                &towers.query.tokenizer,
                &tests,
                towers.enc,
                &self.device,
            )?;
            return Ok(index
                .search(qv, self.config.eval.k, None)
                .into_iter()
                .map(|h| h.into_iter().map(|x| x.0).collect())
                .collect());
        }
        let k = self.config.eval.k;
        let n = s.train.len();
        Ok(match method {
            "random" => {
                let mut rng = rand::rngs::StdRng::seed_from_u64(self.config.data.seed);
                s.test
                    .iter()
                    .map(|_| {
                        let mut all: Vec<usize> = (0..n).collect();
                        all.shuffle(&mut rng);
                        all.truncate(k);
                        all
                    })
                    .collect()
            }
            "bm25" => {
                let docs: Vec<Vec<String>> = s.train.iter().map(|e| tokenize(&e.input)).collect();
                let bm = Bm25::new(&docs, Bm25Params::default());
                s.test
                    .iter()
                    .map(|e| {
                        bm.top_k(&tokenize(&e.input), k, None)
                            .into_iter()
                            .map(|h| h.0)
                            .collect()
                    })
                    .collect()
            }
            "sbert" => {
                // Off-the-shelf sentence embeddings of inputs, as sentence-transformers.
                let enc = collie_bert::load::<B::InnerBackend>(
                    &self.config.retriever.model,
                    &self.device,
                )?;
                let pool: Vec<String> = s.train.iter().map(|e| e.input.clone()).collect();
                let tests: Vec<String> = s.test.iter().map(|e| e.input.clone()).collect();
                let ml = self.config.retriever.max_len;
                let pv = enc.embed_texts(&pool, Pooling::Mean, true, ml, 32, &self.device)?;
                let tv = enc.embed_texts(&tests, Pooling::Mean, true, ml, 32, &self.device)?;
                let index = DenseIndex::<B::InnerBackend>::from_rows(&pv, &self.device);
                let q = DenseIndex::<B::InnerBackend>::from_rows(&tv, &self.device).vectors;
                index
                    .search(q, k, None)
                    .into_iter()
                    .map(|h| h.into_iter().map(|x| x.0).collect())
                    .collect()
            }
            other => bail!("unknown method `{other}`"),
        })
    }

    /// `results/{method}.json` for every method, then `udr_results.json` and `results.md`.
    pub fn evaluate(&self) -> Result<()> {
        let ev = &self.config.eval;
        let mut lm: Option<(Llama<B::InnerBackend>, TokenizerBundle, Vec<u32>)> = None;
        let mut all: BTreeMap<String, Value> = BTreeMap::new();
        for method in &ev.methods {
            let path = self.dir().join("results").join(format!("{method}.json"));
            if !path.is_file() {
                if lm.is_none() {
                    let loaded =
                        collie_llama::load::<B::InnerBackend>(&self.config.lm.model, &self.device)?;
                    let tok = loaded.tokenizer()?.clone();
                    lm = Some((loaded.model, tok, loaded.config.eos_ids()));
                }
                let (model, tok, eos) = lm.as_ref().expect("loaded");
                let mut per_task = serde_json::Map::new();
                for task in self.tasks()? {
                    // One file per task, so an interrupted evaluation resumes at the task.
                    let part = self
                        .dir()
                        .join("results")
                        .join(method)
                        .join(format!("{}.json", task.name));
                    if !part.is_file() {
                        let s = self.splits(&task)?;
                        let towers = self.towers_of(method);
                        let demos = self.retrieve(method, towers.as_deref(), &task, &s)?;
                        let start = std::time::Instant::now();
                        let (scores, predicted) = self.icl(model, tok, eos, &task, &s, &demos)?;
                        let (mean, lo, hi) =
                            bootstrap_ci(&scores, ev.bootstrap, self.config.data.seed);
                        self.say(&format!(
                            "{method} on {}: {:.1} [{:.1}, {:.1}] ({} test examples, {:.0} s)",
                            task.name,
                            100.0 * mean,
                            100.0 * lo,
                            100.0 * hi,
                            scores.len(),
                            start.elapsed().as_secs_f64()
                        ));
                        let mut r = json!({"score": 100.0 * mean, "ci95": [100.0 * lo, 100.0 * hi],
                                    "n": scores.len(), "metric": task.metric, "per_example": scores});
                        if let Some(a) = label_agreement(&s, &demos) {
                            // How often the demonstrations carry the test input's label, and how
                            // often the LM answers its most frequent label (1.0: collapsed).
                            r["demo_label_agreement"] = json!(100.0 * a);
                            r["majority_prediction_share"] =
                                json!(100.0 * majority_share(&predicted));
                            r["predicted"] = json!(predicted);
                        }
                        write(&part, &r)?;
                    }
                    let mut r: Value = read(&part)?;
                    if let Some(o) = r.as_object_mut() {
                        o.remove("per_example");
                        o.remove("predicted");
                    }
                    per_task.insert(task.name.to_string(), r);
                }
                write(&path, &Value::Object(per_task))?;
            }
            all.insert(method.clone(), read(&path)?);
        }
        self.report(&all)
    }

    /// Retrieval alone, without the LM: for every method of `eval.methods` whose retriever exists,
    /// the share of its k demonstrations that carry the test input's label, per classification
    /// task (`results/retrieval.json`; recomputed every time, a few minutes).
    pub fn probe(&self) -> Result<()> {
        let mut all = serde_json::Map::new();
        for method in &self.config.eval.methods {
            let towers = self.towers_of(method);
            if towers
                .as_ref()
                .is_some_and(|d| !d.join(RETRIEVER_FILE).is_file())
            {
                continue;
            }
            let mut per_task = serde_json::Map::new();
            for task in self.tasks()? {
                if task.metric != Metric::Accuracy {
                    continue;
                }
                let s = self.splits(&task)?;
                let demos = self.retrieve(method, towers.as_deref(), &task, &s)?;
                if let Some(a) = label_agreement(&s, &demos) {
                    self.say(&format!(
                        "probe {method} on {}: label agreement {:.1} %",
                        task.name,
                        100.0 * a
                    ));
                    per_task.insert(task.name.to_string(), json!(100.0 * a));
                }
            }
            all.insert(method.clone(), Value::Object(per_task));
        }
        write(
            &self.dir().join("results").join("retrieval.json"),
            &Value::Object(all),
        )
    }

    /// The loss ablations on `eval.ablation_task`: single-task retrievers trained on its
    /// round-0 lists with the full loss, without `L_rank`, and without `L_ib`, each evaluated on
    /// its test split (`results/ablation.json`).
    pub fn ablate(&self) -> Result<()> {
        let Some(name) = self.config.eval.ablation_task.clone() else {
            return Ok(());
        };
        let path = self.dir().join("results").join("ablation.json");
        if !path.is_file() {
            self.run_ablations(&name, &path)?;
        }
        // The summary carries the ablations (also when they were run before a re-report).
        let summary_path = self.dir().join("udr_results.json");
        if summary_path.is_file() {
            let mut summary: Value = read(&summary_path)?;
            summary["ablations"] = read(&path)?;
            write(&summary_path, &summary)?;
        }
        Ok(())
    }

    /// Trains and evaluates the three loss variants of [`Run::ablate`] into `path`.
    fn run_ablations(&self, name: &str, path: &Path) -> Result<()> {
        let task = tasks::task(name)?;
        let s = self.splits(&task)?;
        let r = &self.config.retriever;
        let variants = [
            ("full", r.rank_weight, r.in_batch_weight),
            ("without_rank", 0.0, r.in_batch_weight),
            ("without_in_batch", r.rank_weight, 0.0),
        ];
        let loaded = collie_llama::load::<B::InnerBackend>(&self.config.lm.model, &self.device)?;
        let tok = loaded.tokenizer()?.clone();
        let eos = loaded.config.eos_ids();
        let mut out = serde_json::Map::new();
        for (variant, rank, in_batch) in variants {
            let dir = self
                .dir()
                .join("retriever")
                .join(format!("ablation-{name}-{variant}"));
            let loss = LossWeights { rank, in_batch };
            self.train_into(&dir, std::slice::from_ref(&task), 0, loss)?;
            let demos = self.retrieve(variant, Some(&dir), &task, &s)?;
            let (scores, _) = self.icl(&loaded.model, &tok, &eos, &task, &s, &demos)?;
            let (mean, lo, hi) =
                bootstrap_ci(&scores, self.config.eval.bootstrap, self.config.data.seed);
            self.say(&format!(
                "ablation {variant} on {name}: {:.1} [{:.1}, {:.1}]",
                100.0 * mean,
                100.0 * lo,
                100.0 * hi
            ));
            out.insert(
                variant.into(),
                json!({"score": 100.0 * mean, "ci95": [100.0 * lo, 100.0 * hi], "n": scores.len(),
                       "rank_weight": rank, "in_batch_weight": in_batch}),
            );
        }
        write(path, &json!({"task": name, "variants": out}))
    }

    /// Throughput of the two heavy steps on the first task's prepared data, written with the
    /// exact work to `bench/` so `scripts/bench/udr_torch.py` can repeat it in PyTorch:
    /// LM scoring of `pairs` candidate pairs, and `steps` retriever training steps.
    pub fn bench(&self, pairs: usize, steps: usize) -> Result<Value> {
        let task = self.tasks()?.remove(0);
        let s = self.splits(&task)?;
        let cands: Vec<Vec<usize>> = read(&self.cand_path(&task, 0))?;
        let work: Vec<(String, String)> = cands
            .iter()
            .enumerate()
            .flat_map(|(q, cs)| cs.iter().map(move |&c| (q, c)))
            .take(pairs)
            .map(|(q, c)| {
                let (x, z) = (&s.train[q], &s.train[c]);
                (
                    format!("{}\n{}\t", task.prompt_block(z), x.input),
                    x.output.clone(),
                )
            })
            .collect();
        let (lm, tok, _) = self.lm()?;
        let lmc = &self.config.lm;
        let t = std::time::Instant::now();
        let nll = mean_nll(&lm, &tok, &work, lmc.score_batch, lmc.max_len, &self.device)?;
        let score_secs = t.elapsed().as_secs_f64();
        drop(lm);
        // Training: `steps` batches of the task's queries with their BM25 lists in LM order.
        let ranked: Vec<Vec<usize>> = read(&self.ranked_path(&task, 0))?;
        let r = &self.config.retriever;
        let n = (steps * r.batch_queries).min(ranked.len());
        let queries: Vec<RankedQuery> = ranked[..n]
            .iter()
            .enumerate()
            .map(|(q, cs)| RankedQuery {
                query: s.train[q].input.clone(),
                candidates: cs
                    .iter()
                    .map(|&c| task.demonstration(&s.train[c]))
                    .collect(),
            })
            .collect();
        let encoder = collie_bert::load::<B>(&r.model, &self.device)?;
        let model = BiEncoder {
            query: encoder.model.clone(),
            demo: encoder.model,
        };
        let opts = TrainOptions {
            epochs: 1,
            batch_queries: r.batch_queries,
            max_len: r.max_len,
            pooling: r.pooling(),
            sampling: CandidateSampling {
                per_query: r.per_query,
                ..Default::default()
            },
            seed: r.seed,
            ..Default::default()
        };
        let (_, report) = retriever::train(
            model,
            &encoder.config,
            &encoder.tokenizer,
            std::slice::from_ref(&queries),
            &opts,
            &self.device,
            |_, _, _| {},
        )?;
        let dir = self.dir().join("bench");
        write(
            &dir.join("pairs.json"),
            &json!({"pairs": work, "nll": nll, "max_len": lmc.max_len, "batch": lmc.score_batch}),
        )?;
        write(
            &dir.join("train.json"),
            &json!({"queries": queries.iter().map(|q| json!({"query": q.query, "candidates": q.candidates})).collect::<Vec<_>>(),
                    "batch_queries": r.batch_queries, "per_query": r.per_query, "max_len": r.max_len}),
        )?;
        let line = json!({"impl": "collie-rs", "task": task.name, "pairs": work.len(),
            "score_seconds": score_secs, "pairs_per_sec": work.len() as f64 / score_secs,
            "train_steps": report.losses.len(), "train_seconds": report.seconds,
            "queries_per_sec": report.queries_per_sec});
        write(&dir.join("collie.json"), &line)?;
        Ok(line)
    }

    /// Per-example scores (1/0 accuracy or ROUGE-L) of one method on one task's test split.
    fn icl<M: CausalLm<B::InnerBackend>>(
        &self,
        model: &M,
        tok: &TokenizerBundle,
        eos: &[u32],
        task: &Task,
        s: &Splits,
        demos: &[Vec<usize>],
    ) -> Result<(Vec<f64>, Vec<usize>)>
    where
        M::Cache: Clone,
    {
        let ev = &self.config.eval;
        let labels: Vec<String> = (0..task.labels.len()).map(|l| task.verbalize(l)).collect();
        let mut out = Vec::with_capacity(s.test.len());
        let mut predicted = Vec::new();
        for (e, d) in s.test.iter().zip(demos) {
            let d: Vec<&Example> = d.iter().map(|&i| &s.train[i]).collect();
            let prompt = build_prompt(task, &d, e, tok, ev.max_prompt_tokens)?;
            let score = match task.metric {
                Metric::Accuracy => {
                    let (best, _) = classify(model, tok, &prompt, &labels, &self.device)?;
                    predicted.push(best);
                    f64::from(Some(best) == e.label)
                }
                Metric::RougeL => {
                    let text =
                        generate_line(model, tok, &prompt, ev.max_new_tokens, eos, &self.device)?;
                    collie_train::textmetrics::rouge_l(&text, &e.output)
                }
            };
            out.push(score);
        }
        Ok((out, predicted))
    }

    /// Every task's per-example scores of `method` (`results/{method}/{task}.json`).
    fn per_example(&self, method: &str, tasks: &[String]) -> Result<Vec<Vec<f64>>> {
        tasks
            .iter()
            .map(|t| {
                let path = self
                    .dir()
                    .join("results")
                    .join(method)
                    .join(format!("{t}.json"));
                let v: Value = read(&path)?;
                let scores = v["per_example"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_f64).collect::<Vec<f64>>())
                    .unwrap_or_default();
                if scores.is_empty() {
                    bail!("{}: no per-example scores", path.display());
                }
                Ok(scores)
            })
            .collect()
    }

    /// `udr_results.json` and `results.md` from the per-method results: per-task scores with
    /// their intervals, the task average with a bootstrap interval over every task's examples,
    /// and paired differences between methods (the same test examples and demonstrations count).
    fn report(&self, all: &BTreeMap<String, Value>) -> Result<()> {
        let tasks: Vec<String> = self.config.data.tasks.clone();
        let (resamples, seed) = (self.config.eval.bootstrap, self.config.data.seed);
        let mut methods = serde_json::Map::new();
        let mut md = String::from("| method |");
        for t in &tasks {
            md.push_str(&format!(" {t} |"));
        }
        md.push_str(" avg |\n|---|");
        md.push_str(&"---|".repeat(tasks.len() + 1));
        md.push('\n');
        let mut examples = BTreeMap::new();
        for m in &self.config.eval.methods {
            let r = &all[m];
            let mut per = serde_json::Map::new();
            md.push_str(&format!("| {m} |"));
            for t in &tasks {
                let v = r[t]["score"].as_f64().unwrap_or(f64::NAN);
                let ci = &r[t]["ci95"];
                md.push_str(&format!(
                    " {v:.1} [{:.1}, {:.1}] |",
                    ci[0].as_f64().unwrap_or(f64::NAN),
                    ci[1].as_f64().unwrap_or(f64::NAN)
                ));
                per.insert(t.clone(), json!(v));
            }
            let scores = self.per_example(m, &tasks)?;
            let (avg, lo, hi) = bootstrap_task_average(&scores, None, resamples, seed);
            let (avg, lo, hi) = (100.0 * avg, 100.0 * lo, 100.0 * hi);
            md.push_str(&format!(" {avg:.1} [{lo:.1}, {hi:.1}] |\n"));
            methods.insert(
                m.clone(),
                json!({"avg": avg, "avg_ci95": [lo, hi], "per_task": per}),
            );
            examples.insert(m.clone(), scores);
        }
        // The claims to test: UDR > BM25 > Random, and what mining and training added.
        let pairs = [
            ("udr", "bm25"),
            ("bm25", "random"),
            ("udr", "random"),
            ("udr", "sbert"),
            ("udr", "udr_iter0"),
            ("udr_iter0", "bm25"),
        ];
        let mut comparisons = serde_json::Map::new();
        md.push_str(
            "\n| paired difference of the average | points | 95 % interval |\n|---|---|---|\n",
        );
        for (a, b) in pairs {
            let (Some(x), Some(y)) = (examples.get(a), examples.get(b)) else {
                continue;
            };
            let (d, lo, hi) = bootstrap_task_average(x, Some(y), resamples, seed);
            let (d, lo, hi) = (100.0 * d, 100.0 * lo, 100.0 * hi);
            md.push_str(&format!("| {a} − {b} | {d:+.1} | [{lo:+.1}, {hi:+.1}] |\n"));
            comparisons.insert(format!("{a}-{b}"), json!({"diff": d, "ci95": [lo, hi]}));
        }
        // What the demonstrations are: the share carrying the test input's label, and the share
        // of the LM's answers that are its most frequent one (a collapsed retriever shows 100).
        md.push_str("\n| demonstrations with the input's label / majority-answer share |");
        let cls: Vec<&String> = tasks
            .iter()
            .filter(|t| {
                all.values()
                    .any(|r| r[t.as_str()]["demo_label_agreement"].is_number())
            })
            .collect();
        for t in &cls {
            md.push_str(&format!(" {t} |"));
        }
        md.push_str("\n|---|");
        md.push_str(&"---|".repeat(cls.len()));
        md.push('\n');
        for m in &self.config.eval.methods {
            md.push_str(&format!("| {m} |"));
            for t in &cls {
                let r = &all[m][t.as_str()];
                let a = r["demo_label_agreement"].as_f64().unwrap_or(f64::NAN);
                let p = r["majority_prediction_share"].as_f64().unwrap_or(f64::NAN);
                md.push_str(&format!(" {a:.1} / {p:.0} |"));
            }
            md.push('\n');
        }
        let summary = json!({"k": self.config.eval.k, "lm": self.config.lm.model,
                             "retriever": self.config.retriever.model, "methods": methods,
                             "comparisons": comparisons});
        write(&self.dir().join("udr_results.json"), &summary)?;
        std::fs::write(self.dir().join("results.md"), &md)?;
        if !self.quiet {
            eprintln!("{md}");
        }
        Ok(())
    }
}

/// The share of retrieved demonstrations whose label is the test input's, over a
/// classification task's test split (`None` for generation tasks).
fn label_agreement(s: &Splits, demos: &[Vec<usize>]) -> Option<f64> {
    let (mut same, mut all) = (0usize, 0usize);
    for (e, d) in s.test.iter().zip(demos) {
        let label = e.label?;
        same += d
            .iter()
            .filter(|&&i| s.train[i].label == Some(label))
            .count();
        all += d.len();
    }
    (all > 0).then(|| same as f64 / all as f64)
}

/// The share of predictions that are the most frequent predicted label.
fn majority_share(predicted: &[usize]) -> f64 {
    let mut counts = BTreeMap::new();
    for &p in predicted {
        *counts.entry(p).or_insert(0usize) += 1;
    }
    let top = counts.values().copied().max().unwrap_or(0);
    top as f64 / predicted.len().max(1) as f64
}

/// Runs the stages named by `stage` (`all` or one of prepare, score, train, mine, evaluate).
pub fn run_stages<B: AutodiffBackend>(run: &Run<'_, B>, stage: &str) -> Result<()> {
    let rounds = run.config.retriever.mining_rounds;
    let all = stage == "all";
    if all || stage == "prepare" {
        run.prepare()?;
    }
    if all || stage == "score" {
        run.bm25_candidates()?;
        run.score(0)?;
    }
    if all || stage == "train" {
        run.train(0)?;
    }
    for iter in 1..=rounds {
        if all || stage == "mine" {
            run.mine(iter)?;
            run.score(iter)?;
        }
        // A lone `--stage train` trains the rounds whose candidates are mined and scored.
        let mined = run
            .tasks()?
            .iter()
            .all(|t| run.ranked_path(t, iter).is_file());
        if (all || stage == "train") && mined {
            run.train(iter)?;
        }
    }
    if all || stage == "evaluate" {
        run.evaluate()?;
    }
    if all || stage == "ablate" {
        run.ablate()?;
    }
    // Not part of `all`: a quick look at the retrievers between runs.
    if stage == "probe" {
        run.probe()?;
    }
    Ok(())
}
