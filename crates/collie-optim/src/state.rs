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

/// Copies one state tensor to the host.
pub type ReadTensor<'a> = Box<dyn Fn() -> HostTensor + 'a>;

/// [`OptimizerState`] whose tensors are copied to the host one at a time, when asked: a
/// checkpoint writer streams them instead of holding a host copy of the whole state.
pub struct StateSnapshot<'a> {
    /// `(key, shape, read)` of every tensor, in key order (keys as in [`OptimizerState`]).
    pub tensors: Vec<(String, Vec<usize>, ReadTensor<'a>)>,
    /// Per-parameter step counters.
    pub counters: BTreeMap<String, u64>,
}

impl From<OptimizerState> for StateSnapshot<'static> {
    fn from(state: OptimizerState) -> Self {
        StateSnapshot {
            tensors: state
                .tensors
                .into_iter()
                .map(|(k, t)| {
                    let shape = t.shape.clone();
                    let read: ReadTensor = Box::new(move || t.clone());
                    (k, shape, read)
                })
                .collect(),
            counters: state.counters,
        }
    }
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

    /// [`Slots::export`] read lazily: each tensor is copied to the host when asked.
    pub fn snapshot(&self, names: &[&str]) -> StateSnapshot<'_> {
        let mut tensors = Vec::new();
        for (path, slots) in &self.tensors {
            for (name, t) in names.iter().zip(slots) {
                let read: ReadTensor = Box::new(move || HostTensor::from_tensor(t.clone()));
                tensors.push((format!("{path}.{name}"), vec![t.dims()[0]], read));
            }
        }
        // Key order, as the map of an exported state has it.
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        StateSnapshot {
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
