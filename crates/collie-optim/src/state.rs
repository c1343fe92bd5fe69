//! Optimizer state as named host tensors plus counters, for checkpoints.

use std::collections::BTreeMap;

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use collie_io::HostTensor;

/// Serializable optimizer state: `tensors` keyed `"{param path}.{slot}"`, `counters` keyed by
/// parameter path (PyTorch's per-parameter `step`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OptimizerState {
    /// Per-parameter tensors (moments, momentum buffers), flattened.
    pub tensors: BTreeMap<String, HostTensor>,
    /// Per-parameter step counters.
    pub counters: BTreeMap<String, u64>,
}

/// A state that does not fit this optimizer.
#[derive(Debug, thiserror::Error)]
#[error("optimizer state: {0}")]
pub struct StateError(pub String);

/// Per-parameter slots on the device, flattened to rank 1 so one map holds every rank.
pub(crate) struct Slots<B: Backend> {
    pub tensors: BTreeMap<String, Vec<Tensor<B, 1>>>,
    pub counters: BTreeMap<String, u64>,
}

impl<B: Backend> Default for Slots<B> {
    fn default() -> Self {
        Slots {
            tensors: BTreeMap::new(),
            counters: BTreeMap::new(),
        }
    }
}

impl<B: Backend> Slots<B> {
    /// Host copy with slot names.
    pub fn export(&self, names: &[&str]) -> OptimizerState {
        let mut tensors = BTreeMap::new();
        for (path, slots) in &self.tensors {
            for (name, t) in names.iter().zip(slots) {
                tensors.insert(format!("{path}.{name}"), HostTensor::from_tensor(t.clone()));
            }
        }
        OptimizerState {
            tensors,
            counters: self.counters.clone(),
        }
    }

    /// Rebuilds device slots from `state`; every parameter with a counter must have all `names`.
    pub fn import(
        state: OptimizerState,
        names: &[&str],
        device: &B::Device,
    ) -> Result<Self, StateError> {
        let mut tensors = BTreeMap::new();
        let mut source = state.tensors;
        for path in state.counters.keys() {
            let mut slots = Vec::new();
            for name in names {
                let key = format!("{path}.{name}");
                let t = source
                    .remove(&key)
                    .ok_or_else(|| StateError(format!("missing tensor `{key}`")))?;
                let n = t.data.len();
                slots.push(HostTensor::new(vec![n], t.data).to_tensor::<B, 1>(device));
            }
            tensors.insert(path.clone(), slots);
        }
        if let Some(extra) = source.keys().next() {
            return Err(StateError(format!(
                "unexpected tensor `{extra}` (another optimizer's state?)"
            )));
        }
        Ok(Slots {
            tensors,
            counters: state.counters,
        })
    }
}
