//! Checkpoint layouts other than HF's LLaMA naming: their own names (Mixtral's
//! `block_sparse_moe`, [`Mixtral`]) and layers stored fused into one tensor (InternLM2's grouped
//! `wqkv`, [`crate::internlm2`]), which the model keeps apart: loading cuts each fused tensor into
//! its parts, saving fuses them back. (GLM's `gate_up_proj` is a layer of its own in the model,
//! so it needs no layout.)

use std::collections::BTreeMap;

use burn::tensor::backend::Backend;
use collie_io::module::{load_module, torch_state_dict, Binding, Convert, ParamInfo};
use collie_io::safetensors::SafetensorsSource;
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
    source: &SafetensorsSource,
    layout: &L,
) -> Result<Llama<B>> {
    Ok(load_module(model, source, |info: &ParamInfo| {
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
