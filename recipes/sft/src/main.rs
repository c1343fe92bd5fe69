//! `recipe-sft`: supervised fine-tuning of a chat model on conversations.
//!
//! The default run fine-tunes SmolLM2-135M-Instruct on the English Q/A pairs of the
//! `chatterbot-corpus` package (fetched through the asset resolver): each conversation becomes a
//! `{"messages": [...]}` line (user / assistant turns alternating), 5 % are held out, and the
//! run reports held-out loss and sample answers before and after training.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Result};
use burn::tensor::backend::AutodiffBackend;
use collie_data::dataset::{holdout_split, write_jsonl};
use collie_io::family::TrainModel;
use collie_train::cli::Recipe;
use collie_train::generate::GenerationConfig;
use collie_train::{TrainConfig, Trainer};
use serde::Deserialize;
use serde_json::{json, Value};

/// `[recipe]` options.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Options {
    /// Directory of chatterbot `*.yml` files (path or asset); unset: `data.train` is used as is.
    corpus: Option<String>,
    /// Fraction of conversations held out for `data.eval`.
    heldout_fraction: f64,
    /// Questions answered before and after training.
    samples: Vec<String>,
    /// New tokens per sample answer.
    sample_tokens: usize,
    /// Sentiment tasks of collie-retrieval's registry (`movie2`, `product2`, …) written to
    /// `eval.classification` for zero-shot accuracy: `Sentiment of the sentence: {text}\n`
    /// followed by each label's `It was {label} .`, the lowest NLL picked.
    classification_tasks: Vec<String>,
    /// Examples per classification task (a seeded sample, the same in every run).
    classification_examples: usize,
    /// The first question and answer of this many held-out conversations, written to
    /// `eval.generation` for ROUGE-L of greedy answers (0: none).
    generation_questions: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            corpus: None,
            heldout_fraction: 0.05,
            samples: Vec::new(),
            sample_tokens: 40,
            classification_tasks: Vec::new(),
            classification_examples: 100,
            generation_questions: 0,
        }
    }
}

/// Every conversation of the chatterbot corpus in `dir` as chat messages (user / assistant turns
/// alternating), in file-name order.
fn conversations(dir: &Path) -> Result<Vec<Value>> {
    let convs = collie_data::corpora::chatterbot_conversations(dir)?;
    Ok(convs
        .into_iter()
        .map(|turns| {
            let messages: Vec<Value> = turns
                .iter()
                .enumerate()
                .map(|(i, t)| json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": t}))
                .collect();
            json!({ "messages": messages })
        })
        .collect())
}

/// Where `eval.{key}` sends the rows the recipe writes; an error when it is unset.
fn eval_path<'a>(path: &'a Option<String>, key: &str) -> Result<&'a Path> {
    match path {
        Some(p) => Ok(Path::new(p)),
        None => bail!("config key `eval.{key}` must name where the recipe writes its {key} rows"),
    }
}

/// `n` examples of the classification task `name` (seeded, the same in every run) as
/// `{"input", "candidates", "label"}` rows.
fn sentiment_rows(name: &str, n: usize) -> Result<Vec<Value>> {
    let task = collie_retrieval::tasks::task(name)?;
    if !task.is_classification() {
        bail!("recipe.classification_tasks: `{name}` is not a classification task");
    }
    let sample = collie_retrieval::tasks::split(name, task.load()?, 0, n, 0, 0)?.test;
    let candidates: Vec<String> = (0..task.labels.len()).map(|i| task.verbalize(i)).collect();
    Ok(sample
        .iter()
        .map(|e| {
            json!({
                "input": format!("{}{}\n", task.instruction, e.input),
                "candidates": candidates,
                "label": e.label,
            })
        })
        .collect())
}

struct Sft;

impl Recipe for Sft {
    const NAME: &'static str = "recipe-sft";
    const DEFAULT_CONFIG: &'static str = include_str!("../configs/default.toml");

    fn prepare(&self, config: &mut TrainConfig) -> Result<()> {
        let options: Options = config.recipe_options()?;
        if !options.classification_tasks.is_empty() {
            let path = eval_path(&config.eval.classification, "classification")?;
            let mut rows = Vec::new();
            for name in &options.classification_tasks {
                rows.extend(sentiment_rows(name, options.classification_examples)?);
            }
            write_jsonl(path, &rows)?;
        }
        let Some(corpus) = &options.corpus else {
            if options.generation_questions > 0 {
                bail!("recipe.generation_questions needs `recipe.corpus`: the questions come from its held-out conversations");
            }
            return Ok(());
        };
        let dir = collie_core::asset::resolve(corpus)?;
        let (train, held_out) = holdout_split(conversations(&dir)?, options.heldout_fraction, 0);
        write_jsonl(Path::new(&config.data.train), &train)?;
        match &config.data.eval {
            Some(eval) => write_jsonl(Path::new(eval), &held_out)?,
            None => bail!("config key `data.eval` must name where the held-out conversations go"),
        }
        eprintln!(
            "{}: {} training and {} held-out conversations from {corpus}",
            Self::NAME,
            train.len(),
            held_out.len()
        );
        if options.generation_questions > 0 {
            // Each conversation's first user turn and the reply to it.
            let rows: Vec<Value> = held_out
                .iter()
                .take(options.generation_questions)
                .map(|c| {
                    let m = &c["messages"];
                    json!({"input": m[0]["content"], "output": m[1]["content"]})
                })
                .collect();
            write_jsonl(eval_path(&config.eval.generation, "generation")?, &rows)?;
        }
        Ok(())
    }

    fn report<B: AutodiffBackend, M: TrainModel<B>>(
        &self,
        trainer: &Trainer<B, M>,
        before: bool,
    ) -> Result<()> {
        let options: Options = trainer.config.recipe_options()?;
        let cfg = GenerationConfig {
            max_new_tokens: options.sample_tokens,
            ..Default::default()
        };
        let when = if before { "before" } else { "after" };
        let mut lines = Vec::new();
        for q in &options.samples {
            let answer = trainer.complete(q, true, &cfg)?;
            eprintln!("[{when} training] {q} -> {}", answer.trim());
            lines.push(
                json!({"when": when, "step": trainer.state.step, "prompt": q, "answer": answer}),
            );
        }
        collie_train::cli::append_samples(&trainer.config.output.dir, &lines)
    }
}

/// Large buffers kept mapped between steps, so steady-state steps do not page-fault.
#[global_allocator]
static ALLOC: collie_core::CachingAlloc = collie_core::CachingAlloc;

fn main() -> ExitCode {
    collie_train::cli::main::<_, collie_models::Registry>(Sft)
}
