//! `collie eval-ppl`.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::backend::AutodiffBackend;
use collie_core::device::DeviceSpec;
use collie_io::family::TrainModel;
use collie_train::eval::sequence_nll;

/// Arguments of `collie eval-ppl`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// HF directory, GGUF file, or `pypi:NAME==VERSION/path` asset.
    #[arg(long)]
    model: String,
    /// A PEFT adapter directory (HF peft format) to apply to the model.
    #[arg(long)]
    adapter: Option<std::path::PathBuf>,
    #[command(flatten)]
    quantize: crate::model::QuantizeArg,
    /// JSONL file, one {"text": ...} object per line.
    #[arg(long)]
    data: PathBuf,
    /// Tokens kept per text (longer texts are truncated).
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Print only the JSON result line.
    #[arg(long)]
    json: bool,
}

/// Reads the `text` field of every non-blank line.
fn read_texts(path: &PathBuf) -> Result<Vec<String>> {
    let content =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut texts = Vec::new();
    for (i, line) in content.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| anyhow!("{}: invalid JSON ({e})", at()))?;
        let text = value
            .get("text")
            .and_then(|t| t.as_str())
            .ok_or_else(|| anyhow!("{}: expected an object with a string field \"text\"", at()))?;
        texts.push(text.to_string());
    }
    if texts.is_empty() {
        bail!("{}: no texts", path.display());
    }
    Ok(texts)
}

struct Task(Args);

impl crate::model::WithModel for Task {
    type Output = ();

    fn model_spec(&self) -> &str {
        &self.0.model
    }

    fn run<B: AutodiffBackend, M: TrainModel<B>>(self, device: B::Device) -> Result<()> {
        let args = self.0;
        if args.seq_len < 2 || args.batch_size == 0 {
            bail!("--seq-len must be at least 2 and --batch-size at least 1");
        }
        let texts = read_texts(&args.data)?;
        let loaded = crate::model::load_adapted::<B::InnerBackend, M::Inner>(
            &args.model,
            args.adapter.as_deref(),
            args.quantize.get()?,
            &device,
        )?;
        let tok = loaded.tokenizer()?;
        let mut sequences = Vec::with_capacity(texts.len());
        for text in &texts {
            let mut ids = tok.encode(text, true)?;
            ids.truncate(args.seq_len);
            sequences.push(ids);
        }
        let (mut sum, mut count) = (0.0f64, 0usize);
        for chunk in sequences.chunks(args.batch_size) {
            let (s, c) = sequence_nll(&loaded.model, chunk, &device);
            sum += s;
            count += c;
        }
        if count == 0 {
            bail!(
                "{}: no text has two or more tokens, nothing to predict",
                args.data.display()
            );
        }
        let nll = sum / count as f64;
        let line = serde_json::json!({"tokens": count, "nll": nll, "ppl": nll.exp()});
        if !args.json {
            eprintln!("{} texts, {count} predicted tokens", texts.len());
        }
        println!("{line}");
        Ok(())
    }
}

/// Runs `collie eval-ppl`.
pub fn run(args: Args, device: DeviceSpec) -> Result<()> {
    crate::model::run(device, Task(args))
}
