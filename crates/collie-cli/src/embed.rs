//! `collie embed`: one JSON line `{"embedding": [...]}` per input line, from a BERT-family
//! encoder (sentence-transformers' recipe with `--pooling mean --normalize`).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use burn::tensor::backend::AutodiffBackend;
use collie_bert::Pooling;
use collie_core::device::{dispatch, BackendTask, DeviceSpec};

/// Arguments of `collie embed`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// HF encoder directory (BERT, MiniLM) or `pypi:NAME==VERSION/path` asset.
    #[arg(long)]
    model: String,
    /// JSONL file, one {"text": ...} object per line.
    #[arg(long)]
    input: PathBuf,
    /// `mean` over real tokens, or `cls` (position 0).
    #[arg(long, default_value = "mean")]
    pooling: Pooling,
    /// Scale every vector to unit length.
    #[arg(long)]
    normalize: bool,
    /// Tokens kept per text (the final [SEP] is kept when cutting).
    #[arg(long, default_value_t = 256)]
    max_len: usize,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
}

struct Task(Args);

impl BackendTask for Task {
    type Output = Result<()>;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<()> {
        let args = self.0;
        let text = std::fs::read_to_string(&args.input)
            .with_context(|| format!("reading {}", args.input.display()))?;
        let texts = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                let v: serde_json::Value = serde_json::from_str(l).with_context(|| {
                    format!("{}:{}: not a JSON object", args.input.display(), i + 1)
                })?;
                v.get("text")
                    .and_then(|t| t.as_str())
                    .map(String::from)
                    .with_context(|| {
                        format!(
                            "{}:{}: no string field \"text\"",
                            args.input.display(),
                            i + 1
                        )
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let encoder = collie_bert::load::<B::InnerBackend>(&args.model, &device)
            .with_context(|| format!("loading encoder `{}`", args.model))?;
        let out = std::io::stdout();
        let mut out = out.lock();
        for chunk in texts.chunks(args.batch_size.max(1) * 8) {
            let vectors = encoder.embed_texts(
                chunk,
                args.pooling,
                args.normalize,
                args.max_len,
                args.batch_size,
                &device,
            )?;
            for v in vectors {
                writeln!(out, "{}", serde_json::json!({ "embedding": v }))?;
            }
        }
        Ok(())
    }
}

/// Runs `collie embed`.
pub fn run(args: Args, device: DeviceSpec) -> Result<()> {
    dispatch(device, Task(args)).context("selecting the device")?
}
