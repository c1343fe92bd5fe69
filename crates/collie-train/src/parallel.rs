//! Optimizer state across tensor-parallel ranks: per-parameter state has its parameter's shape,
//! so it is split exactly as the parameter is (`collie_core::tp`); checkpoints store each rank's
//! piece with the layout that joins them, so a resume at any layout reads the whole state.

use std::collections::{BTreeMap, HashMap};

use burn::module::{Module, ParamId};
use burn::tensor::backend::Backend;
use collie_io::HostTensor;
use collie_optim::OptimizerState;

use crate::error::TrainError;

/// How a parameter is split across tensor-parallel ranks: the dimension, and the number of
/// parts of it that are split each on its own (`collie_core::tp::Split`).
pub type SplitDim = (usize, usize);

/// Path (as optimizer state names it) → (split, this rank's shape) of every split parameter of
/// `model`.
pub fn split_paths<B: Backend, M: Module<B>>(
    model: &M,
    split: &HashMap<ParamId, SplitDim>,
) -> HashMap<String, (SplitDim, Vec<usize>)> {
    crate::checkpoint::params_by_path(model)
        .into_iter()
        .filter_map(|(path, p)| split.get(&p.id).map(|&dim| (path, (dim, p.shape))))
        .collect()
}

/// The parameter path of a state key `"{path}.{slot}"` that `paths` knows.
fn param_of<'a, T>(key: &'a str, paths: &'a HashMap<String, T>) -> Option<&'a T> {
    let (path, _slot) = key.rsplit_once('.')?;
    paths.get(path)
}

/// The whole state (as a checkpoint holds it) → this tp rank's part.
pub fn split_state(
    state: OptimizerState,
    paths: &HashMap<String, (SplitDim, Vec<usize>)>,
    rank: usize,
    tp: usize,
) -> Result<OptimizerState, TrainError> {
    let mut tensors = BTreeMap::new();
    for (key, t) in state.tensors {
        let Some((dim, local)) = param_of(&key, paths) else {
            tensors.insert(key, t);
            continue;
        };
        let n: usize = local.iter().product();
        if t.data.len() != n * tp {
            return Err(TrainError::Resume(format!(
                "optimizer state `{key}` has {} values; the parameter has {}",
                t.data.len(),
                n * tp
            )));
        }
        let part = collie_core::dist::split_block(&t.data, local, *dim, rank, tp);
        tensors.insert(key, HostTensor::new(vec![n], part));
    }
    Ok(OptimizerState {
        tensors,
        counters: state.counters,
    })
}
