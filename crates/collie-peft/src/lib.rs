//! Parameter-efficient fine-tuning, applied to any [`Adaptable`] model from outside: the model
//! code keeps its adapter slots (a [`Linear`]'s LoRA/IA3 slot, the model's virtual tokens) and
//! this crate decides what goes in them, initializes, merges, saves and loads them in HF peft's
//! format.
//!
//! - [`lora`]: LoRA / rsLoRA, merge and unmerge. - [`ia3`]: IA3 scaling vectors.
//! - [`prompt`]: prompt tuning. - [`ptuning`]: P-tuning (MLP prompt encoder).
//! - [`prefix`]: prefix tuning (with peft's projection option).
//! - [`adapter_io`]: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! [`apply`] freezes every base parameter (no gradient, hence no optimizer state) and adds the
//! method's trainable parameters; [`TrainableReport`] is peft's `print_trainable_parameters`.

pub mod adapter_io;
pub mod config;
pub mod error;
pub mod ia3;
pub mod lora;
pub mod prefix;
pub mod prompt;
pub mod ptuning;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use collie_core::nn::{Adaptable, Linear};
use collie_io::tokenizer::TokenizerBundle;

pub use config::{PeftConfig, PeftKind, PromptInit, TargetModules};
pub use error::{PeftError, Result};

/// Freezes `model` and adds the method `config` selects, freshly initialized (from the
/// backend's seeded RNG). `tokenizer` is needed only by prompt tuning's text initialization.
pub fn apply<B: Backend, M: Adaptable<B> + Module<B>>(
    model: M,
    config: &PeftConfig,
    tokenizer: Option<&TokenizerBundle>,
    device: &B::Device,
) -> Result<M> {
    config.validate()?;
    if !config.enabled() {
        return Ok(model);
    }
    let mut model = freeze(model);
    match config.kind {
        PeftKind::None => {}
        PeftKind::Lora => lora::inject(&mut model, config, device)?,
        PeftKind::Ia3 => ia3::inject(&mut model, config, device)?,
        PeftKind::Prompt => {
            let v = prompt::build(&model, config, tokenizer, device)?;
            *model.virtual_tokens_mut() = Some(v);
        }
        PeftKind::Ptuning => {
            let v = ptuning::build(&model, config, device);
            *model.virtual_tokens_mut() = Some(v);
        }
        PeftKind::Prefix => {
            let v = prefix::build(&model, config, device);
            *model.virtual_tokens_mut() = Some(v);
        }
    }
    Ok(model)
}

/// `module` with no parameter requiring a gradient. Unlike Burn's `no_grad`, a lazy parameter
/// (a base whose reads are deferred until it is sharded) stays lazy.
fn freeze<B: Backend, M: Module<B>>(module: M) -> M {
    struct Freeze;
    impl<B: Backend> ModuleMapper<B> for Freeze {
        fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            p.set_require_grad(false)
        }
    }
    module.map(&mut Freeze)
}

/// Whether the HF module `name` is one of `targets` (peft's rules: a list entry matches the
/// whole name or its last dotted components; a string is a regex the whole name must match;
/// `all-linear` is every linear layer but the output layer).
pub fn is_target(targets: &TargetModules, name: &str, output_layer: &str) -> bool {
    match targets {
        TargetModules::Names(names) => names
            .iter()
            .any(|t| name == t || name.ends_with(&format!(".{t}"))),
        TargetModules::Pattern(p) if p == "all-linear" => name != output_layer,
        TargetModules::Pattern(p) => regex::Regex::new(&format!("^(?:{p})$"))
            .map(|re| re.is_match(name))
            .unwrap_or(false),
    }
}

/// The linear layers of `model` that `targets` selects, or an error listing what there is.
pub(crate) fn select_targets<'a, B: Backend, M: Adaptable<B>>(
    model: &'a mut M,
    targets: &TargetModules,
) -> Result<Vec<(String, &'a mut Linear<B>)>> {
    let output = model.output_layer_name();
    let all = model.named_linears();
    let mut suffixes: Vec<String> = all
        .iter()
        .map(|(n, _)| n.rsplit('.').next().unwrap_or(n).to_string())
        .collect();
    suffixes.sort();
    suffixes.dedup();
    let example = all.first().map(|(n, _)| n.clone()).unwrap_or_default();
    let chosen: Vec<_> = all
        .into_iter()
        .filter(|(n, _)| is_target(targets, n, output))
        .collect();
    if chosen.is_empty() {
        return Err(PeftError::Config(format!(
            "peft.target_modules = {} matches no linear layer of the model; its layers are \
             named like `{example}` (last components: {})",
            describe(targets),
            suffixes.join(", ")
        )));
    }
    Ok(chosen)
}

fn describe(t: &TargetModules) -> String {
    match t {
        TargetModules::Names(n) => format!("{n:?}"),
        TargetModules::Pattern(p) => format!("\"{p}\""),
    }
}

/// A linear layer initialized as `torch.nn.Linear` (weight and bias uniform in
/// `±1/sqrt(d_in)`), for the prompt encoders.
pub(crate) fn torch_linear<B: Backend>(d_in: usize, d_out: usize, device: &B::Device) -> Linear<B> {
    let bound = 1.0 / (d_in as f64).sqrt();
    let dist = Distribution::Uniform(-bound, bound);
    Linear {
        weight: Param::from_tensor(Tensor::random([d_in, d_out], dist, device)),
        bias: Some(Param::from_tensor(Tensor::random([d_out], dist, device))),
        adapter: None,
        parallel: Default::default(),
        tp: None,
        quant: None,
    }
}

/// Trainable and total parameter counts (peft's `print_trainable_parameters`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainableReport {
    /// Elements of parameters that receive gradients.
    pub trainable: usize,
    /// Elements of all parameters.
    pub total: usize,
}

impl TrainableReport {
    /// Counts the parameters of `model` (on an autodiff backend; elsewhere nothing is trainable).
    pub fn of<B: Backend, M: Module<B>>(model: &M) -> Self {
        struct Count {
            trainable: usize,
            total: usize,
        }
        impl<B: Backend> ModuleVisitor<B> for Count {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
                let n = param.lazy_shape().num_elements();
                self.total += n;
                if param.is_require_grad() {
                    self.trainable += n;
                }
            }
        }
        let mut c = Count {
            trainable: 0,
            total: 0,
        };
        model.visit(&mut c);
        TrainableReport {
            trainable: c.trainable,
            total: c.total,
        }
    }
}

impl std::fmt::Display for TrainableReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pct = 100.0 * self.trainable as f64 / self.total.max(1) as f64;
        write!(
            f,
            "trainable params: {} || all params: {} || trainable%: {pct:.4}",
            grouped(self.trainable),
            grouped(self.total)
        )
    }
}

/// `1234567` → `1,234,567`.
fn grouped(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_rules_follow_peft() {
        let names = TargetModules::Names(vec!["q_proj".into(), "mlp.down_proj".into()]);
        assert!(is_target(
            &names,
            "model.layers.0.self_attn.q_proj",
            "lm_head"
        ));
        assert!(is_target(&names, "model.layers.3.mlp.down_proj", "lm_head"));
        assert!(!is_target(
            &names,
            "model.layers.0.self_attn.qq_proj",
            "lm_head"
        ));
        let all = TargetModules::Pattern("all-linear".into());
        assert!(is_target(&all, "model.layers.0.mlp.up_proj", "lm_head"));
        assert!(!is_target(&all, "lm_head", "lm_head"));
        let re = TargetModules::Pattern(r".*\.(0|1)\.self_attn\.(q|v)_proj".into());
        assert!(is_target(&re, "model.layers.1.self_attn.v_proj", "lm_head"));
        assert!(!is_target(
            &re,
            "model.layers.2.self_attn.v_proj",
            "lm_head"
        ));
        // fullmatch, not search
        let partial = TargetModules::Pattern("q_proj".into());
        assert!(!is_target(
            &partial,
            "model.layers.0.self_attn.q_proj",
            "lm_head"
        ));
    }

    #[test]
    fn report_reads_like_peft() {
        let r = TrainableReport {
            trainable: 1_843_200,
            total: 775_873_280,
        };
        assert_eq!(
            r.to_string(),
            "trainable params: 1,843,200 || all params: 775,873,280 || trainable%: 0.2376"
        );
    }
}
