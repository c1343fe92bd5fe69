//! Training checkpoints: `output.dir/checkpoints/step-N/`.
//!
//! A checkpoint is an HF model directory (`config.json`, `model.safetensors`, tokenizer — loadable
//! by transformers and `collie generate`) plus `optimizer.safetensors`, `trainer_state.json`
//! (step, data position, optimizer counters, eval history) and `config.resolved.toml`. It is
//! written into `.step-N.partial` and renamed into place, so a run killed mid-write leaves the
//! previous checkpoint untouched and no half-written `step-N`. A PEFT run's checkpoint holds the
//! adapter instead of the model (`adapter_config.json`, `adapter_model.safetensors`, as peft
//! writes them), with the same trainer files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use collie_io::family::ModelFiles;
use collie_io::json::{read_json, write_json};
use collie_io::module::TensorSource;
use collie_io::safetensors::{save_safetensors, SafetensorsSource, SaveDtype};
use collie_io::tokenizer::TokenizerBundle;
use collie_optim::OptimizerState;
use serde::{Deserialize, Serialize};

use crate::error::TrainError;

/// Everything besides weights and optimizer tensors that a resumed run needs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Training examples consumed by each data-parallel replica (the data loader's position).
    pub consumed: u64,
    /// Data-parallel replicas of the run that wrote the state (a resume at another degree
    /// converts `consumed`).
    #[serde(default = "one_replica")]
    pub data_parallel: usize,
    /// Non-padding tokens trained on so far.
    pub tokens_seen: u64,
    /// Steps skipped (no target tokens, or f16 overflow).
    pub skipped_steps: u64,
    /// f16 dynamic loss scale.
    pub loss_scale: f64,
    /// Steps since the loss scale last grew.
    pub scale_good_steps: u64,
    /// Optimizer per-parameter step counters.
    pub optimizer_counters: BTreeMap<String, u64>,
    /// `(step, metrics)` of every evaluation.
    pub evals: Vec<(u64, BTreeMap<String, f64>)>,
    /// Evaluations since the best metric last improved.
    pub evals_without_improvement: usize,
}

fn one_replica() -> usize {
    1
}

/// `checkpoints/step-N` under `root`.
pub fn step_dir(root: &Path, step: u64) -> PathBuf {
    root.join("checkpoints").join(format!("step-{step}"))
}

/// Steps that have a complete checkpoint under `root`, ascending.
pub fn list(root: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(root.join("checkpoints"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
        .collect();
    steps.sort();
    steps
}

/// What a checkpoint stores as weights.
pub enum Weights<'a, M, C> {
    /// The whole model as an HF directory.
    Model {
        /// The model.
        model: &'a M,
        /// Its HF config.
        config: &'a C,
        /// Tokenizer to save beside it.
        tokenizer: Option<&'a TokenizerBundle>,
    },
    /// Only a PEFT adapter of `base`.
    Adapter {
        /// The adapted model.
        model: &'a M,
        /// The method.
        peft: &'a collie_peft::PeftConfig,
        /// The base model's path or asset spec (`base_model_name_or_path`).
        base: &'a str,
    },
}

impl<M, C> Weights<'_, M, C> {
    /// Writes the weights into the checkpoint directory `dir`.
    pub fn write<B: Backend>(self, dir: &Path) -> Result<(), TrainError>
    where
        M: ModelFiles<B, Config = C>,
    {
        match self {
            Weights::Model {
                model,
                config,
                tokenizer,
            } => model.save_hf_dir(config, tokenizer, dir, SaveDtype::F32)?,
            Weights::Adapter { model, peft, base } => {
                collie_peft::adapter_io::save(&mut model.clone(), peft, base, dir)?
            }
        }
        Ok(())
    }
}

/// Writes checkpoint `state.step` atomically: `write_weights` fills the directory with the
/// model's files (an HF directory, an adapter, or any model's own layout), then the optimizer
/// tensors, trainer state and resolved config go beside them.
pub fn save(
    root: &Path,
    write_weights: impl FnOnce(&Path) -> Result<(), TrainError>,
    optimizer: &OptimizerState,
    state: &TrainerState,
    resolved_config: &str,
) -> Result<PathBuf, TrainError> {
    let dir = step_dir(root, state.step);
    let parent = dir.parent().expect("checkpoints dir");
    std::fs::create_dir_all(parent).map_err(|e| TrainError::io(parent, e))?;
    let partial = parent.join(format!(".step-{}.partial", state.step));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).map_err(|e| TrainError::io(&partial, e))?;
    write_weights(&partial)?;
    let tensors: Vec<(String, collie_io::HostTensor)> =
        optimizer.tensors.clone().into_iter().collect();
    save_safetensors(
        &partial.join("optimizer.safetensors"),
        &tensors,
        SaveDtype::F32,
    )?;
    let mut state = state.clone();
    state.optimizer_counters = optimizer.counters.clone();
    write_json(&partial.join("trainer_state.json"), &state)?;
    std::fs::write(partial.join("config.resolved.toml"), resolved_config)
        .map_err(|e| TrainError::io(&partial, e))?;
    // Crash-safety test: die with everything written but before the rename.
    if fault_at("COLLIE_TEST_ABORT_CHECKPOINT", state.step) {
        std::process::abort();
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
    }
    std::fs::rename(&partial, &dir).map_err(|e| TrainError::io(&dir, e))?;
    // Kill-and-resume test: stop here, checkpoint complete, until killed from outside.
    if fault_at("COLLIE_TEST_PAUSE_AFTER_CHECKPOINT", state.step) {
        eprintln!("paused after checkpoint step-{}", state.step);
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
    Ok(dir)
}

/// Whether the test variable `var` names `step` (feature `test-hooks`, which only the crash-safety
/// tests enable).
#[cfg(feature = "test-hooks")]
fn fault_at(var: &str, step: u64) -> bool {
    std::env::var(var).ok().and_then(|s| s.parse::<u64>().ok()) == Some(step)
}

/// Release builds inject no faults.
#[cfg(not(feature = "test-hooks"))]
fn fault_at(_var: &str, _step: u64) -> bool {
    false
}

/// Reads the optimizer tensors and trainer state of a checkpoint directory.
pub fn load_state(dir: &Path) -> Result<(OptimizerState, TrainerState), TrainError> {
    let state: TrainerState = read_json(&dir.join("trainer_state.json"))?;
    let source = SafetensorsSource::open(&dir.join("optimizer.safetensors"))?;
    let mut tensors = BTreeMap::new();
    for key in source.keys() {
        let t = source.read(&key)?;
        tensors.insert(key, t);
    }
    let optimizer = OptimizerState {
        tensors,
        counters: state.optimizer_counters.clone(),
    };
    Ok((optimizer, state))
}

/// Resolves `--resume latest|DIR` against the run directory.
pub fn resolve_resume(root: &Path, spec: &str) -> Result<PathBuf, TrainError> {
    if spec == "latest" {
        let step = list(root).pop().ok_or_else(|| {
            TrainError::Resume(format!(
                "no checkpoint under {}/checkpoints",
                root.display()
            ))
        })?;
        return Ok(step_dir(root, step));
    }
    let dir = PathBuf::from(spec);
    if !dir.join("trainer_state.json").is_file() {
        return Err(TrainError::Resume(format!(
            "{} is not a checkpoint (no trainer_state.json)",
            dir.display()
        )));
    }
    Ok(dir)
}

/// Deletes checkpoints beyond `keep_last` most recent, sparing the `keep_best` best by metric.
pub fn prune(root: &Path, keep_last: usize, keep_best: &[u64]) -> Result<(), TrainError> {
    if keep_last == 0 {
        return Ok(());
    }
    let steps = list(root);
    let n = steps.len();
    for step in steps.into_iter().take(n.saturating_sub(keep_last)) {
        if keep_best.contains(&step) {
            continue;
        }
        let dir = step_dir(root, step);
        std::fs::remove_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
    }
    Ok(())
}

/// The union of the optimizer states of `group`'s members, on its member 0 (the others get an
/// empty state): each member writes its part under `root/.merge-{tag}/`, member 0 reads and
/// merges them. ZeRO replicas and pipeline stages each hold some parameters' state; checkpoints
/// hold all of it, as plain per-parameter state loadable at any layout. Needs `root` on a file
/// system every rank sees, as the checkpoint itself does.
pub fn merge_optimizer_states(
    root: &Path,
    tag: &str,
    mine: OptimizerState,
    group: &dyn collie_core::dist::Collectives,
) -> Result<OptimizerState, TrainError> {
    let dir = root.join(format!(".merge-{tag}"));
    let rank = group.rank();
    let merger = rank == 0;
    if merger {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
    }
    group.barrier();
    if !merger {
        write_json(&dir.join(format!("rank-{rank}.json")), &mine.counters)?;
        let tensors: Vec<(String, collie_io::HostTensor)> = mine.tensors.into_iter().collect();
        save_safetensors(
            &dir.join(format!("rank-{rank}.safetensors")),
            &tensors,
            SaveDtype::F32,
        )?;
        group.barrier();
        return Ok(OptimizerState::default());
    }
    group.barrier();
    let mut all = mine;
    for r in 1..group.size() {
        let source = SafetensorsSource::open(&dir.join(format!("rank-{r}.safetensors")))?;
        for key in source.keys() {
            let t = source.read(&key)?;
            all.tensors.insert(key, t);
        }
        let counters: BTreeMap<String, u64> = read_json(&dir.join(format!("rank-{r}.json")))?;
        all.counters.extend(counters);
    }
    std::fs::remove_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
    Ok(all)
}
