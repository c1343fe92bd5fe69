//! Prompt tuning (Lester et al. 2021): `num_virtual_tokens` learned input embeddings in front of
//! every sequence. They take positions `0..n`, the real tokens follow at `n..`, and the virtual
//! positions carry no labels (the model cuts them from its output).

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use collie_core::nn::{Adaptable, EncoderActivation, VirtualTarget, VirtualTokens};
use collie_io::tokenizer::TokenizerBundle;

use crate::config::{PeftConfig, PromptInit};
use crate::error::{PeftError, Result};

/// The virtual tokens, initialized as `config.prompt_init` says (peft's `RANDOM`, `TEXT`,
/// `SAMPLE_VOCAB`).
pub fn build<B: Backend, M: Adaptable<B>>(
    model: &M,
    config: &PeftConfig,
    tokenizer: Option<&TokenizerBundle>,
    device: &B::Device,
) -> Result<VirtualTokens<B>> {
    let n = config.num_virtual_tokens;
    let dims = model.dims();
    let table = match config.prompt_init {
        PromptInit::Random => {
            Tensor::random([n, dims.hidden], Distribution::Normal(0.0, 1.0), device)
        }
        PromptInit::SampleVocab => {
            let ids =
                Tensor::<B, 1>::random([n], Distribution::Uniform(0.0, dims.vocab as f64), device)
                    .int()
                    .clamp(0, dims.vocab as i64 - 1);
            rows(model, ids)
        }
        PromptInit::Text => {
            let text = config.prompt_init_text.as_deref().unwrap_or_default();
            let tok = tokenizer.ok_or_else(|| {
                PeftError::Config("peft.prompt_init = \"text\" needs the model's tokenizer".into())
            })?;
            let ids = tok.encode(text, true)?;
            if ids.is_empty() {
                return Err(PeftError::Config(
                    "peft.prompt_init_text encodes to no tokens".into(),
                ));
            }
            // Repeated, then cut to n tokens (peft).
            let ids: Vec<i64> = ids.iter().cycle().take(n).map(|&t| t as i64).collect();
            rows(model, Tensor::from_data(TensorData::new(ids, [n]), device))
        }
    };
    Ok(VirtualTokens {
        embedding: Param::from_tensor(table),
        mlp: Vec::new(),
        activation: EncoderActivation::Relu,
        target: VirtualTarget::Input,
    })
}

/// Copies of rows `ids` of the model's input embedding.
fn rows<B: Backend, M: Adaptable<B>>(model: &M, ids: Tensor<B, 1, Int>) -> Tensor<B, 2> {
    model.input_embedding().weight.val().select(0, ids).detach()
}
