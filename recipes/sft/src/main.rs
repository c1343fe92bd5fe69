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
}

impl Default for Options {
    fn default() -> Self {
        Options {
            corpus: None,
            heldout_fraction: 0.05,
            samples: Vec::new(),
            sample_tokens: 40,
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

struct Sft;

impl Recipe for Sft {
    const NAME: &'static str = "recipe-sft";
    const DEFAULT_CONFIG: &'static str = include_str!("../configs/default.toml");

    fn prepare(&self, config: &mut TrainConfig) -> Result<()> {
        let options: Options = config.recipe_options()?;
        let Some(corpus) = &options.corpus else {
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

fn main() -> ExitCode {
    collie_train::cli::main::<_, collie_models::Registry>(Sft)
}
