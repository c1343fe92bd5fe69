//! Training checkpoints: `output.dir/checkpoints/step-N/`.
//!
//! One process writes an HF model directory (`config.json`, `model.safetensors`, tokenizer —
//! loadable by transformers and `collie generate`) plus `optimizer.safetensors`,
//! `trainer_state.json` (step, data position, optimizer counters, eval history) and
//! `config.resolved.toml`. A PEFT run's checkpoint holds the adapter instead of the model
//! (`adapter_config.json`, `adapter_model.safetensors`, as peft writes them), with the same
//! trainer files. The ranks of a parallel run each write what they own ([`write_rank`],
//! `collie_io::sharded`): parameter and optimizer-state pieces with a manifest, which
//! [`load_state`] and the model loaders read at any layout and [`consolidate`] turns back into
//! one process's checkpoint. Either is written into `.step-N.partial` and renamed into place, so
//! a run killed mid-write leaves the previous checkpoint untouched and no half-written `step-N`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use collie_io::family::{ModelFiles, TrainModel};
use collie_io::json::{read_json, write_json};
use collie_io::module::TensorSource;
use collie_io::safetensors::{write_safetensors_with, SafetensorsSource, SaveDtype};
use collie_io::sharded::{
    is_sharded, Kind, Manifest, Part, RankWriter, ShardTensor, ShardedSource, Split,
};
use collie_io::tokenizer::TokenizerBundle;
use collie_io::HostTensor;
use collie_optim::{OptimizerState, StateSnapshot};
use serde::{Deserialize, Serialize};

use crate::error::TrainError;
use crate::parallel::SplitDim;
use crate::trainer::Trainer;

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
    optimizer: &StateSnapshot,
    state: &TrainerState,
    resolved_config: &str,
) -> Result<PathBuf, TrainError> {
    let partial = begin(root, state.step)?;
    write_weights(&partial)?;
    // One tensor at a time: the optimizer state is never copied to the host whole.
    let layout: Vec<(String, Vec<usize>)> = optimizer
        .tensors
        .iter()
        .map(|(k, shape, _)| (k.clone(), shape.clone()))
        .collect();
    write_safetensors_with(
        &partial.join("optimizer.safetensors"),
        &layout,
        SaveDtype::F32,
        |i| Ok((optimizer.tensors[i].2)().data),
    )?;
    let mut state = state.clone();
    state.optimizer_counters = optimizer.counters.clone();
    finish(root, &partial, &state, resolved_config)
}

/// The partial directory checkpoint `step` is written into: `checkpoints/.step-N.partial`.
pub fn partial_dir(root: &Path, step: u64) -> PathBuf {
    root.join("checkpoints")
        .join(format!(".step-{step}.partial"))
}

/// Starts writing checkpoint `step`: an empty [`partial_dir`] (a leftover of a killed run is
/// removed).
pub fn begin(root: &Path, step: u64) -> Result<PathBuf, TrainError> {
    let partial = partial_dir(root, step);
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).map_err(|e| TrainError::io(&partial, e))?;
    Ok(partial)
}

/// Completes a checkpoint whose weights and optimizer tensors are in `partial`: writes
/// `trainer_state.json` (`state`, optimizer counters included) and `config.resolved.toml`, then
/// renames it to `step-N`, replacing one of the same step.
pub fn finish(
    root: &Path,
    partial: &Path,
    state: &TrainerState,
    resolved_config: &str,
) -> Result<PathBuf, TrainError> {
    write_json(&partial.join("trainer_state.json"), state)?;
    std::fs::write(partial.join("config.resolved.toml"), resolved_config)
        .map_err(|e| TrainError::io(partial, e))?;
    // Crash-safety test: die with everything written but before the rename.
    if fault_at("COLLIE_TEST_ABORT_CHECKPOINT", state.step) {
        std::process::abort();
    }
    let dir = step_dir(root, state.step);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
    }
    std::fs::rename(partial, &dir).map_err(|e| TrainError::io(&dir, e))?;
    // Kill-and-resume test: stop here, checkpoint complete, until killed from outside.
    if fault_at("COLLIE_TEST_PAUSE_AFTER_CHECKPOINT", state.step) {
        eprintln!("paused after checkpoint step-{}", state.step);
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
    Ok(dir)
}

/// Whether the test variable `var` names `step`.
fn fault_at(var: &str, step: u64) -> bool {
    test_var(var).and_then(|s| s.parse::<u64>().ok()) == Some(step)
}

/// Kill-while-writing test: when `COLLIE_TEST_PAUSE_WRITING` is `STEP:RANK`, that rank stops after
/// writing its part of checkpoint `STEP` (the checkpoint incomplete) until killed from outside.
pub fn pause_while_writing(step: u64, rank: usize) {
    if test_var("COLLIE_TEST_PAUSE_WRITING") == Some(format!("{step}:{rank}")) {
        eprintln!("rank {rank} paused while writing checkpoint step-{step}");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

/// A fault-injection variable (feature `test-hooks`, which only the crash-safety tests enable).
#[cfg(feature = "test-hooks")]
fn test_var(var: &str) -> Option<String> {
    std::env::var(var).ok()
}

/// Release builds inject no faults.
#[cfg(not(feature = "test-hooks"))]
fn test_var(_var: &str) -> Option<String> {
    None
}

/// Reads the trainer state of a checkpoint directory and the optimizer tensors whose key
/// `keep` accepts (a rank reads only the state it will hold), from either layout: one
/// `optimizer.safetensors`, or the pieces of a sharded checkpoint put back together.
pub fn load_state(
    dir: &Path,
    keep: &dyn Fn(&str) -> bool,
) -> Result<(OptimizerState, TrainerState), TrainError> {
    let state: TrainerState = read_json(&dir.join("trainer_state.json"))?;
    let source: Box<dyn TensorSource> = if is_sharded(dir) {
        Box::new(ShardedSource::open(dir, Part::Optimizer)?)
    } else {
        Box::new(SafetensorsSource::open(&dir.join("optimizer.safetensors"))?)
    };
    let mut tensors = BTreeMap::new();
    for key in source.keys().into_iter().filter(|k| keep(k)) {
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

/// The trainer's checkpoints: one process's HF directory, or each rank's part of a sharded one.
impl<B: AutodiffBackend, M: TrainModel<B>> Trainer<B, M> {
    /// Writes checkpoint `step-{state.step}` and prunes old ones; every rank returns when the
    /// checkpoint exists. One process writes an HF directory (or a peft adapter) with its
    /// optimizer state; the ranks of a parallel run each write what they own
    /// ([`collie_io::sharded`]), which any layout resumes from and `collie convert` turns into an
    /// HF directory.
    pub fn save(&self) -> Result<PathBuf, TrainError> {
        if self.dist.size() > 1 {
            return self.save_sharded();
        }
        let root = &self.config.output.dir;
        let optimizer_state = self.update.snapshot();
        let weights = if self.peft_active() {
            Weights::Adapter {
                model: &self.model,
                peft: &self.config.peft,
                base: &self.config.model.path,
            }
        } else {
            Weights::Model {
                model: &self.model,
                config: &self.model_config,
                tokenizer: self.tokenizer.as_ref(),
            }
        };
        let dir = save(
            root,
            |dir| weights.write::<B>(dir),
            &optimizer_state,
            &self.state,
            &self.config.to_toml(),
        )?;
        prune(root, self.config.train.keep_last, &self.best_steps())?;
        Ok(dir)
    }

    /// [`Self::save`] of a parallel run: rank 0 starts the partial directory, every rank writes
    /// its parameters and optimizer state, rank 0 merges the manifest, adds the config,
    /// tokenizer and trainer state and renames it into place. A failure on any rank fails the
    /// save on every rank (no one waits forever) and leaves the previous checkpoints as they
    /// were.
    fn save_sharded(&self) -> Result<PathBuf, TrainError> {
        let root = &self.config.output.dir;
        let step = self.state.step;
        let main = self.dist.is_main();
        let partial = partial_dir(root, step);
        let begun = match main {
            true => begin(root, step).map(|_| ()),
            false => Ok(()),
        };
        self.all_ranks_ok("start", begun)?;
        let c = self.dist.coords;
        let mut stage = self.stage_params();
        if let Some(plan) = self.zero3() {
            // Each replica holds (and writes) the parameters it owns.
            stage.retain(|id| plan.owns_id(id));
        }
        let share = RankShare {
            rank: self.dist.rank,
            stage: &stage,
            split: &self.tp_split,
            tp: (c.tp, self.dist.dims.tp),
            params: c.dp == 0 || self.zero3().is_some(),
            state: c.dp == 0 || self.zero.is_some(),
            trainable_only: self.peft_active(),
        };
        let wrote = write_rank(&partial, &self.model, &self.update.snapshot(), &share);
        pause_while_writing(step, self.dist.rank);
        self.all_ranks_ok("write", wrote)?;
        let finished = match main {
            true => self.finish_sharded(&partial),
            false => Ok(()),
        };
        self.all_ranks_ok("finish", finished)?;
        Ok(step_dir(root, step))
    }

    /// Rank 0's part of a sharded save once every rank has written.
    fn finish_sharded(&self, partial: &Path) -> Result<(), TrainError> {
        use collie_io::sharded::Kind;
        let root = &self.config.output.dir;
        let kind = match self.peft_active() {
            true => Kind::Adapter,
            false => Kind::Model,
        };
        let (_, metas) = collie_io::sharded::merge(partial, self.dist.size(), kind)?;
        let mut state = self.state.clone();
        state.optimizer_counters.clear();
        for meta in metas {
            let counters: BTreeMap<String, u64> = serde_json::from_value(meta)
                .map_err(|e| TrainError::Invalid(format!("optimizer counters: {e}")))?;
            state.optimizer_counters.extend(counters);
        }
        match kind {
            Kind::Adapter => collie_peft::adapter_io::write_config(
                &mut self.model.clone(),
                &self.config.peft,
                &self.config.model.path,
                partial,
            )?,
            Kind::Model => {
                collie_io::json::write_json(&partial.join("config.json"), &self.model_config)?
            }
        }
        if let Some(tok) = &self.tokenizer {
            tok.save(partial)?;
        }
        finish(root, partial, &state, &self.config.to_toml())?;
        prune(root, self.config.train.keep_last, &self.best_steps())
    }

    /// `result` of this rank, agreed by every rank: an error on any rank is an error on all
    /// (naming the ranks that failed), and rank 0 removes the partial checkpoint.
    fn all_ranks_ok(&self, what: &str, result: Result<(), TrainError>) -> Result<(), TrainError> {
        let (n, r) = (self.dist.world.size(), self.dist.world.rank());
        let mut failed = vec![0.0; n];
        failed[r] = f64::from(u8::from(result.is_err()));
        self.dist.world.all_reduce_sum_f64(&mut failed);
        let ranks: Vec<usize> = (0..n).filter(|&i| failed[i] > 0.0).collect();
        if ranks.is_empty() {
            return Ok(());
        }
        if self.dist.is_main() {
            let partial = partial_dir(&self.config.output.dir, self.state.step);
            let _ = std::fs::remove_dir_all(partial);
        }
        result?;
        Err(TrainError::Invalid(format!(
            "checkpoint step-{} ({what}): rank(s) {ranks:?} failed; see their logs",
            self.state.step
        )))
    }

    /// The parameters this rank's pipeline stage trains and writes (all of them without
    /// pipelining; [`crate::pipeline::stage_owners`]).
    fn stage_params(&self) -> HashSet<ParamId> {
        let mut ids = param_ids(&self.model);
        if let Some(plan) = &self.stage_plan {
            ids.retain(|id| plan.owns_id(id));
        }
        ids
    }

    /// Steps of the `keep_best` best evaluations.
    fn best_steps(&self) -> Vec<u64> {
        let key = &self.config.train.best_metric;
        let mut scored: Vec<(f64, u64)> = self
            .state
            .evals
            .iter()
            .filter_map(|(step, m)| m.get(key).map(|v| (*v, *step)))
            .collect();
        scored.sort_by(|a, b| {
            if self.config.train.greater_is_better {
                b.0.total_cmp(&a.0)
            } else {
                a.0.total_cmp(&b.0)
            }
        });
        scored
            .into_iter()
            .take(self.config.train.keep_best)
            .map(|(_, s)| s)
            .collect()
    }
}

/// What one rank of a parallel run writes into a sharded checkpoint
/// ([`collie_io::sharded`]): each parameter and each optimizer-state tensor is written by exactly
/// one rank, or by every tensor-parallel rank once per piece when it is split.
pub struct RankShare<'a> {
    /// This process's world rank (names its files).
    pub rank: usize,
    /// The parameters of this rank's pipeline stage (every parameter without pipelining).
    pub stage: &'a HashSet<ParamId>,
    /// Tensor-parallel split of the split parameters.
    pub split: &'a HashMap<ParamId, SplitDim>,
    /// This rank's tensor-parallel index and the degree.
    pub tp: (usize, usize),
    /// Whether this rank writes its parameters (data-parallel replica 0: replicas hold the same;
    /// under ZeRO-3 every replica, each the parameters it owns).
    pub params: bool,
    /// Whether this rank writes the optimizer state it holds (replica 0, or every replica under
    /// ZeRO, where each holds its own parameters' state).
    pub state: bool,
    /// Whether only trainable parameters are written (a PEFT adapter).
    pub trainable_only: bool,
}

/// The ids of `module`'s parameters (a pipeline stage's share: [`RankShare::stage`]).
pub fn param_ids<B: Backend, M: Module<B>>(module: &M) -> HashSet<ParamId> {
    struct Ids(HashSet<ParamId>);
    impl<B: Backend> ModuleVisitor<B> for Ids {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0.insert(param.id);
        }
    }
    let mut ids = Ids(HashSet::new());
    module.visit(&mut ids);
    ids.0
}

/// One parameter of the model as a rank sees it.
pub(crate) struct ParamEntry<B: Backend> {
    pub id: ParamId,
    pub shape: Vec<usize>,
    trainable: bool,
    value: Tensor<B, 1>,
}

/// Every parameter of `model` by path.
pub(crate) fn params_by_path<B: Backend, M: Module<B>>(
    model: &M,
) -> BTreeMap<String, ParamEntry<B>> {
    struct Params<B: Backend> {
        stack: Vec<String>,
        out: BTreeMap<String, ParamEntry<B>>,
    }
    impl<B: Backend> ModuleVisitor<B> for Params<B> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.stack.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let shape = param.lazy_shape().dims::<D>().to_vec();
            let n = shape.iter().product::<usize>();
            let entry = ParamEntry {
                id: param.id,
                shape,
                trainable: param.is_require_grad(),
                value: param.val().reshape([n]),
            };
            self.out.insert(self.stack.join("."), entry);
        }
    }
    let mut v = Params {
        stack: Vec::new(),
        out: BTreeMap::new(),
    };
    model.visit(&mut v);
    v.out
}

/// Writes this rank's part of a sharded checkpoint into `partial`: the parameters and optimizer
/// state `share` assigns to it, and `rank-{r}.json` with the step counters of the parameters
/// whose state it wrote. Every rank of the run calls it; [`collie_io::sharded::merge`] then
/// makes the manifest.
pub fn write_rank<B: Backend, M: Module<B>>(
    partial: &Path,
    model: &M,
    optimizer: &StateSnapshot,
    share: &RankShare,
) -> Result<(), TrainError> {
    let params = params_by_path(model);
    let (tp_rank, tp) = share.tp;
    // A parameter's pieces: `None` when it is whole (written by tensor-parallel rank 0 only).
    let piece = |p: &ParamEntry<B>| -> Option<Option<(Split, Vec<usize>)>> {
        if !share.stage.contains(&p.id) {
            return None;
        }
        match share.split.get(&p.id) {
            Some(&(dim, parts)) => {
                let mut whole = p.shape.clone();
                whole[dim] *= tp;
                let split = Split {
                    dim,
                    parts,
                    index: tp_rank,
                    count: tp,
                    block: p.shape.clone(),
                };
                Some(Some((split, whole)))
            }
            None => (tp_rank == 0).then_some(None),
        }
    };
    let mut writer = RankWriter::new(partial, share.rank);
    if share.params {
        let mut tensors = Vec::new();
        let mut values = Vec::new();
        for (path, p) in &params {
            if share.trainable_only && !p.trainable {
                continue;
            }
            let Some(split) = piece(p) else { continue };
            let (split, whole) = match split {
                Some((s, w)) => (Some(s), w),
                None => (None, p.shape.clone()),
            };
            tensors.push(ShardTensor {
                name: path.clone(),
                shape: p.shape.clone(),
                whole,
                split,
            });
            values.push(p.value.clone());
        }
        writer.write(Part::Params, &tensors, |i| {
            Ok(HostTensor::from_tensor(values[i].clone()).data)
        })?;
    }
    let mut counters = BTreeMap::new();
    if share.state {
        // Optimizer state is keyed `{path}.{slot}` and stored flat; a split parameter's state
        // is split as the parameter is.
        // State of no parameter (none today) is written once, by rank 0.
        let owned = |path: &str| match params.get(path) {
            Some(p) => piece(p),
            None => (share.rank == 0).then_some(None),
        };
        let mut tensors = Vec::new();
        let mut values = Vec::new();
        for (key, shape, read) in &optimizer.tensors {
            let path = key
                .rsplit_once('.')
                .map_or(key.as_str(), |(path, _slot)| path);
            let Some(split) = owned(path) else { continue };
            let n: usize = shape.iter().product();
            let (split, whole) = match split {
                Some((s, _)) => {
                    let local: usize = s.block.iter().product();
                    if n != local {
                        return Err(TrainError::Invalid(format!(
                            "optimizer state `{key}` has {n} values for a parameter shard of \
                             {local}; only element-wise optimizer state is split across \
                             tensor-parallel ranks"
                        )));
                    }
                    (Some(s), vec![n * tp])
                }
                None => (None, shape.clone()),
            };
            tensors.push(ShardTensor {
                name: key.clone(),
                shape: shape.clone(),
                whole,
                split,
            });
            values.push(read);
        }
        writer.write(Part::Optimizer, &tensors, |i| Ok(values[i]().data))?;
        for (path, &c) in &optimizer.counters {
            if owned(path).is_some() {
                counters.insert(path.clone(), c);
            }
        }
    }
    writer.finish(serde_json::to_value(counters).expect("counters serialize"))?;
    Ok(())
}

/// The model whose family reads the sharded checkpoint `dir`: the checkpoint itself, or the base
/// model (`adapter_config.json`'s `base_model_name_or_path`) of a PEFT run's adapter.
pub fn family_spec(dir: &Path) -> Result<String, TrainError> {
    match Manifest::read(dir)?.kind {
        Kind::Model => Ok(dir.display().to_string()),
        Kind::Adapter => {
            let path = dir.join(collie_peft::adapter_io::CONFIG_FILE);
            let config: serde_json::Value = read_json(&path)?;
            config
                .get("base_model_name_or_path")
                .and_then(|v| v.as_str())
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .ok_or_else(|| {
                    collie_io::IoError::invalid(
                        &path,
                        "no `base_model_name_or_path`: the base model of the adapter is unknown",
                    )
                    .into()
                })
        }
    }
}

/// Writes the sharded checkpoint `dir` as one process would have: an HF model directory
/// (`model.safetensors` in `dtype`, config, tokenizer), or a peft adapter directory for a PEFT
/// run. `out` is replaced only once complete. `M` is the family [`family_spec`] names.
pub fn consolidate<B: Backend, M: ModelFiles<B>>(
    dir: &Path,
    out: &Path,
    dtype: SaveDtype,
    device: &B::Device,
) -> Result<(), TrainError> {
    match Manifest::read(dir)?.kind {
        Kind::Model => {
            // Lazily: each tensor is read from its shards as the writer reaches it.
            let loaded = M::load_lazy(&dir.display().to_string(), device)?;
            let tokenizer = loaded.tokenizer.as_ref();
            loaded
                .model
                .save_hf_dir(&loaded.config, tokenizer, out, dtype)?;
        }
        Kind::Adapter => {
            if dtype != SaveDtype::F32 {
                return Err(TrainError::Invalid(format!(
                    "{}: adapters are written in f32",
                    dir.display()
                )));
            }
            let base = family_spec(dir)?;
            let model = M::load(&base, device)?.model;
            let (mut model, config) = collie_peft::adapter_io::load(model, dir, device)?;
            collie_io::dir::write_dir_atomically(out, |staging| -> Result<(), TrainError> {
                Ok(collie_peft::adapter_io::save(
                    &mut model, &config, &base, staging,
                )?)
            })?;
        }
    }
    Ok(())
}
