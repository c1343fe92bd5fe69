//! `collie convert`: GGUF → HF directory.

use std::path::PathBuf;

use anyhow::{bail, Result};
use burn::tensor::backend::AutodiffBackend;
use collie_core::device::DeviceSpec;
use collie_io::family::TrainModel;

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

impl crate::model::WithModel for Task {
    type Output = ();

    fn model_spec(&self) -> &str {
        &self.0.input
    }

    fn run<B: AutodiffBackend, M: TrainModel<B>>(self, device: B::Device) -> Result<()> {
        let args = self.0;
        let dtype = crate::model::save_dtype(&args.dtype)?;
        let loaded = crate::model::load::<B::InnerBackend, M::Inner>(&args.input, &device)?;
        if loaded.path.is_dir() {
            bail!(
                "{} is already an HF directory; convert reads GGUF files",
                loaded.path.display()
            );
        }
        crate::model::write_hf_dir(&loaded, &args.output, dtype)
    }
}

/// Runs `collie convert`.
pub fn run(args: Args, device: DeviceSpec) -> Result<()> {
    crate::model::run(device, Task(args))
}
