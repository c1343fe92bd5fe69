//! `collie convert`: GGUF → HF directory.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::AutodiffBackend;
use collie_core::device::{dispatch, BackendTask, DeviceSpec};

/// Arguments of `collie convert`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// GGUF file (or an asset spec pointing at one).
    #[arg(long)]
    input: String,
    /// HF model directory to write (replaced if it exists).
    #[arg(long)]
    output: PathBuf,
    /// Storage dtype of model.safetensors: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

struct Task(Args);

impl BackendTask for Task {
    type Output = Result<()>;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<()> {
        let args = self.0;
        let dtype = crate::model::save_dtype(&args.dtype)?;
        let loaded = crate::model::load::<B::InnerBackend>(&args.input, &device)?;
        if loaded.path.is_dir() {
            bail!(
                "{} is already an HF directory; convert reads GGUF files",
                loaded.path.display()
            );
        }
        collie_llama::hf::save_hf_dir(
            &loaded.model,
            &loaded.config,
            loaded.tokenizer.as_ref(),
            &args.output,
            dtype,
        )
        .with_context(|| format!("writing {}", args.output.display()))?;
        eprintln!("wrote {}", args.output.display());
        Ok(())
    }
}

/// Runs `collie convert`.
pub fn run(args: Args, device: DeviceSpec) -> Result<()> {
    dispatch(device, Task(args)).context("selecting the device")?
}
