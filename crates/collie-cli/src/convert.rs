//! `collie convert`: a GGUF file or the sharded checkpoint of a parallel run → an HF model
//! directory (or, for a PEFT run's checkpoint, a peft adapter directory).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::tensor::backend::AutodiffBackend;
use collie_core::device::DeviceSpec;
use collie_io::family::TrainModel;
use collie_io::sharded::is_sharded;
use collie_train::checkpoint;

/// Arguments of `collie convert`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// GGUF file (or an asset spec pointing at one), or a checkpoint directory written by a
    /// parallel run (`checkpoints/step-N` with `manifest.json`).
    #[arg(long)]
    input: String,
    /// Directory to write (replaced if it exists): an HF model directory, or a peft adapter
    /// directory for a PEFT run's checkpoint.
    #[arg(long)]
    output: PathBuf,
    /// Storage dtype of model.safetensors: f32, f16 or bf16 (adapters are written in f32).
    #[arg(long, default_value = "f32")]
    dtype: String,
}

struct Task {
    args: Args,
    /// The model whose family reads the input (for a sharded adapter: its base).
    family: String,
}

impl crate::model::WithModel for Task {
    type Output = ();

    fn model_spec(&self) -> &str {
        &self.family
    }

    fn run<B: AutodiffBackend, M: TrainModel<B>>(self, device: B::Device) -> Result<()> {
        let args = self.args;
        let dtype = crate::model::save_dtype(&args.dtype)?;
        let input = Path::new(&args.input);
        if is_sharded(input) {
            checkpoint::consolidate::<B::InnerBackend, M::Inner>(
                input,
                &args.output,
                dtype,
                &device,
            )
            .with_context(|| format!("writing {}", args.output.display()))?;
            eprintln!("wrote {}", args.output.display());
            return Ok(());
        }
        let loaded = crate::model::load::<B::InnerBackend, M::Inner>(&args.input, &device)?;
        if loaded.path.is_dir() {
            bail!(
                "{} is already an HF directory; convert reads GGUF files and the sharded \
                 checkpoints of parallel runs",
                loaded.path.display()
            );
        }
        crate::model::write_hf_dir(&loaded, &args.output, dtype)
    }
}

/// Runs `collie convert`.
pub fn run(args: Args, device: DeviceSpec) -> Result<()> {
    let input = Path::new(&args.input);
    let family = match is_sharded(input) {
        true => checkpoint::family_spec(input)?,
        false => args.input.clone(),
    };
    crate::model::run(device, Task { args, family })
}
