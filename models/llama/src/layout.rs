//! Checkpoint layouts other than HF's LLaMA naming: their own names (Mixtral's
//! `block_sparse_moe`, [`Mixtral`]; CodeGen's GPT-J-style names, [`CodeGen`]) and layers stored
//! fused into one tensor (InternLM2's grouped `wqkv`, [`crate::internlm2`]), which the model keeps
//! apart: loading cuts each fused tensor into its parts, saving fuses them back. (GLM's
//! `gate_up_proj` and CodeGen's `qkv_proj` are layers of their own in the model, so they need no
//! cutting.)

use std::collections::BTreeMap;

use burn::tensor::backend::Backend;
use collie_io::module::{
    load_module_lazy, torch_state_dict, Binding, Convert, ParamInfo, SharedSource,
};
use collie_io::HostTensor;

use crate::error::Result;
use crate::hf::hf_key;
use crate::model::{Llama, ParamPath};

/// How a checkpoint names our parameters and which of them it fuses.
pub trait CheckpointLayout: Clone + 'static {
    /// The checkpoint key of one of our parameter paths, with the index of the part it is when
    /// the key names a fused tensor; `None` for parameters the checkpoint does not hold
    /// (adapters).
    fn key(&self, path: &str) -> Option<(String, Option<usize>)>;
    /// Part `part` of a fused tensor (PyTorch's layout: outputs are rows).
    fn cut(&self, fused: &HostTensor, _part: usize) -> HostTensor {
        fused.clone()
    }
    /// The fused tensor from all its parts, in part order.
    fn fuse(&self, parts: &[HostTensor]) -> HostTensor {
        parts[0].clone()
    }
    /// How many parts a fused tensor has.
    fn parts(&self) -> usize {
        1
    }
}

/// Loads `model`'s parameters from a checkpoint in `layout`.
pub fn load<B: Backend, L: CheckpointLayout>(
    model: Llama<B>,
    source: SharedSource,
    layout: &L,
) -> Result<Llama<B>> {
    Ok(load_module_lazy(model, source, |info: &ParamInfo| {
        let (key, part) = layout.key(&info.path)?;
        let linear = info.is_linear_weight();
        let convert = match part {
            Some(part) => {
                let layout = layout.clone();
                Convert::Custom(Box::new(move |t| layout.cut(&t, part)), linear)
            }
            None if linear => Convert::Transpose,
            None => Convert::Identity,
        };
        Some(Binding { key, convert })
    })?)
}

/// Every parameter of `model` under its key in `layout`, in PyTorch's layout, parts fused.
pub fn state_dict<B: Backend, L: CheckpointLayout>(
    model: &Llama<B>,
    layout: &L,
) -> Vec<(String, HostTensor)> {
    // Parts first get distinct keys (`…wqkv.weight#1`), then are fused in model order.
    let state = torch_state_dict(model, |path| {
        layout.key(path).map(|(k, part)| match part {
            Some(part) => format!("{k}#{part}"),
            None => k,
        })
    });
    let mut out = Vec::with_capacity(state.len());
    let mut pending: BTreeMap<String, BTreeMap<usize, HostTensor>> = BTreeMap::new();
    for (k, t) in state {
        let Some((fused, part)) = k.split_once('#') else {
            out.push((k, t));
            continue;
        };
        let part: usize = part.parse().expect("a part index written above");
        let slot = pending.entry(fused.to_string()).or_default();
        slot.insert(part, t);
        if slot.len() == layout.parts() {
            let parts: Vec<HostTensor> = (pending.remove(fused).expect("just filled"))
                .into_values()
                .collect();
            out.push((fused.to_string(), layout.fuse(&parts)));
        }
    }
    out
}

/// Whose module names a model's adapters and tensor-parallel plan use: HF's LLaMA names
/// (`model.layers.N.self_attn.q_proj`) for every family but CodeGen, whose peft adapters name its
/// own modules (`transformer.h.N.attn.qkv_proj`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Names {
    /// HF's LLaMA names.
    #[default]
    Llama,
    /// CodeGen's names.
    CodeGen,
}

impl Names {
    /// The module name of linear layer `module` (a [`BLOCK_MODULES`](crate::model::BLOCK_MODULES)
    /// path) of block `index`.
    pub fn block_module(self, index: usize, module: &str) -> Option<String> {
        match self {
            Names::Llama => {
                let (_, hf, _, _) = crate::model::block_module(module)?;
                Some(format!("model.layers.{index}.{hf}"))
            }
            Names::CodeGen => {
                let (_, name) = CODEGEN_BLOCK.iter().find(|(m, _)| *m == module)?;
                Some(format!("transformer.h.{index}.{name}"))
            }
        }
    }
}

/// CodeGen's names for our module paths inside a block.
const CODEGEN_BLOCK: &[(&str, &str)] = &[
    ("attn_norm", "ln_1"),
    ("attn.qkv_proj", "attn.qkv_proj"),
    ("attn.o_proj", "attn.out_proj"),
    ("mlp.up_proj", "mlp.fc_in"),
    ("mlp.down_proj", "mlp.fc_out"),
];

/// CodeGen (`model_type = "codegen"`, MOSS-MOON-003's architecture): GPT-J's names under
/// `transformer.`, the LM head's `lm_head.weight` and `lm_head.bias`.
#[derive(Debug, Clone, Copy)]
pub struct CodeGen;

impl CheckpointLayout for CodeGen {
    fn key(&self, path: &str) -> Option<(String, Option<usize>)> {
        let key = match ParamPath::parse(path)? {
            ParamPath::Embed => "transformer.wte.weight".into(),
            ParamPath::FinalNorm(p) => format!("transformer.ln_f.{p}"),
            ParamPath::LmHead(p) => format!("lm_head.{p}"),
            ParamPath::Block {
                index,
                module,
                param,
            } => {
                let (_, name) = CODEGEN_BLOCK.iter().find(|(m, _)| *m == module)?;
                format!("transformer.h.{index}.{name}.{param}")
            }
        };
        Some((key, None))
    }
}

/// Mixtral (`model_type = "mixtral"`): HF's names, with the mixture of experts under
/// `block_sparse_moe` and each expert's gate, up and down as `w1`, `w3` and `w2`.
#[derive(Debug, Clone, Copy)]
pub struct Mixtral;

impl CheckpointLayout for Mixtral {
    fn key(&self, path: &str) -> Option<(String, Option<usize>)> {
        if let ParamPath::Block {
            index,
            module,
            param,
        } = ParamPath::parse(path)?
        {
            let moe = format!("model.layers.{index}.block_sparse_moe");
            if module == "moe.gate" {
                return Some((format!("{moe}.gate.{param}"), None));
            }
            if let Some(expert) = module.strip_prefix("moe.experts.") {
                // `N.gate_proj` -> `N.w1`.
                let (n, proj) = expert.split_once('.')?;
                let w = match proj {
                    "gate_proj" => "w1",
                    "up_proj" => "w3",
                    "down_proj" => "w2",
                    _ => return None,
                };
                return Some((format!("{moe}.experts.{n}.{w}.{param}"), None));
            }
        }
        Some((hf_key(path, false)?, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codegen_names_follow_transformers() {
        let key = |p: &str| CodeGen.key(p).unwrap().0;
        assert_eq!(key("embed.weight"), "transformer.wte.weight");
        assert_eq!(key("head.norm.bias"), "transformer.ln_f.bias");
        assert_eq!(key("head.lm_head.bias"), "lm_head.bias");
        assert_eq!(
            key("layers.1.attn.qkv_proj.weight"),
            "transformer.h.1.attn.qkv_proj.weight"
        );
        assert_eq!(key("layers.0.attn_norm.bias"), "transformer.h.0.ln_1.bias");
        assert_eq!(
            key("layers.0.mlp.up_proj.bias"),
            "transformer.h.0.mlp.fc_in.bias"
        );
        assert_eq!(
            Names::CodeGen.block_module(2, "attn.o_proj").unwrap(),
            "transformer.h.2.attn.out_proj"
        );
    }

    #[test]
    fn mixtral_names_its_experts_w1_w3_w2() {
        assert_eq!(
            Mixtral
                .key("layers.1.moe.experts.3.up_proj.weight")
                .unwrap()
                .0,
            "model.layers.1.block_sparse_moe.experts.3.w3.weight"
        );
        assert_eq!(
            Mixtral.key("layers.0.moe.gate.weight").unwrap().0,
            "model.layers.0.block_sparse_moe.gate.weight"
        );
        assert_eq!(
            Mixtral.key("layers.0.attn.o_proj.weight").unwrap().0,
            "model.layers.0.self_attn.o_proj.weight"
        );
    }
}
