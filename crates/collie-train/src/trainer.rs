//! The step trainer: micro-batches × gradient accumulation → token-weighted loss → global-norm
//! clipping → optimizer, with evaluation, checkpoints, exact resume and monitors.
//!
//! The loss of an optimizer step is the summed NLL of all its target tokens divided by their
//! number (each micro-batch's sum is divided by the step's total before its backward pass), as
//! transformers' Trainer computes it. The learning rate of step `k` (from 0) is
//! `lr · λ(k)`; metrics count steps from 1, after the update.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, ElementConversion, Tensor};
use collie_core::lm::CausalLm;
use collie_core::model::{block_params, LmHead, ModelConfig};
use collie_data::chat::{render, BuiltinTemplate, ChatMessage, TemplateTokens};
use collie_data::dataset::{Encoder, Example, JsonlDataset};
use collie_data::loader::{Batch, DataLoader, Order};
use collie_dist::dp::all_reduce_scalars;
use collie_dist::zero::ZeroPlan;
use collie_dist::Dist;
use collie_io::family::TrainModel;
use collie_io::quant::Quantize;
use collie_io::tokenizer::TokenizerBundle;
use collie_optim::clip::global_norm;
use serde_json::{json, Map, Value};

use crate::blockwise::{in_dtype, GradHook};
use crate::checkpoint::{self, TrainerState};
use crate::config::{ComputeDtype, ModelInit, OptimName, TrainConfig};
use crate::error::TrainError;
use crate::eval::{classification, corpus_nll, generation};
use crate::generate::GenerationConfig;
use crate::metrics::{
    eval_line, flops_per_token, fmt_metrics, peak_rss_bytes, summary_text, write_line,
    write_summary, MetricsLog, Progress, RankLog,
};
use crate::parallel::{release_spread, stage_plan, zero_plan};
use crate::plot::plot_metrics;
use crate::scaler::LossScaler;
use crate::step::Strategy;
use crate::update::Update;

/// How to run, beyond the config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// `latest` or a checkpoint directory.
    pub resume: Option<String>,
    /// Peak TFLOPS of the device for MFU (overrides `output.peak_tflops`).
    pub peak_tflops: Option<f64>,
    /// No progress output.
    pub quiet: bool,
    /// The process world of a parallel run (`None`: one process; `[parallel]` must then be 1).
    pub dist: Option<Arc<Dist>>,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Optimizer steps completed (in total, including before a resume).
    pub steps: u64,
    /// Loss of the last step.
    pub final_loss: f64,
    /// First evaluation of this run (before training, when eval data is given).
    pub eval_first: Option<BTreeMap<String, f64>>,
    /// Last evaluation.
    pub eval_last: Option<BTreeMap<String, f64>>,
    /// Non-padding tokens trained on in this run.
    pub tokens: u64,
    /// Wall time of this run's training steps, in seconds.
    pub train_seconds: f64,
    /// Training tokens per second.
    pub tokens_per_sec: f64,
    /// Peak RSS of the process.
    pub peak_rss_bytes: Option<u64>,
    /// Peak RSS of every rank of the run, indexed by world rank (one entry in one process; 0
    /// where a rank could not read its own).
    pub peak_rss_bytes_per_rank: Vec<u64>,
    /// The same when the training loop ended, before the final evaluation (which, under pipeline
    /// parallelism, brings every block to every stage) and checkpoint.
    pub train_peak_rss_bytes_per_rank: Vec<u64>,
    /// The last checkpoint written.
    pub checkpoint: PathBuf,
    /// Whether early stopping ended the run.
    pub stopped_early: bool,
    /// Parameters the optimizer updated (in this process's model: a stage's under pipeline
    /// parallelism, a shard's under ZeRO-3).
    pub trainable_params: usize,
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy)]
pub struct StepMetrics {
    /// Token-weighted loss.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Non-padding tokens.
    pub tokens: usize,
    /// Tokens that carried loss.
    pub target_tokens: usize,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Whether the update was skipped.
    pub skipped: bool,
    /// The load-balancing auxiliary loss, averaged over the step's micro-batches (unweighted,
    /// as transformers reports `aux_loss`), where the model adds one.
    pub aux_loss: Option<f64>,
    /// Seconds this rank spent blocked in communication during the step: collectives and the
    /// waits for non-blocking ones (the reductions that the backward walk did not hide), and a
    /// pipeline stage's receives. 0 in one process.
    pub comm_seconds: f64,
}

/// A training run in progress.
pub struct Trainer<B: AutodiffBackend, M: TrainModel<B>> {
    /// The resolved configuration.
    pub config: TrainConfig,
    /// The model's HF config (written into checkpoints).
    pub model_config: M::Config,
    /// Tokenizer (absent only for `tokens` data without a tokenizer-bearing model).
    pub tokenizer: Option<TokenizerBundle>,
    /// The model being trained.
    pub model: M,
    /// Progress counters, saved in checkpoints.
    pub state: TrainerState,
    /// Optimizer, learning-rate schedule and clipping.
    pub(crate) update: Update<B::InnerBackend>,
    pub(crate) loader: DataLoader,
    pub(crate) eval_examples: Vec<Example>,
    pub(crate) device: B::Device,
    /// Compute dtype (`f32`, `bf16`, `f16`); parameters stay `f32`.
    pub(crate) compute: DType,
    /// How a step turns its batches into an update.
    pub(crate) strategy: Strategy,
    /// Dynamic loss scaling (f16 compute only).
    pub(crate) scaler: Option<LossScaler>,
    pub(crate) grad_hook: Option<GradHook>,
    /// This process's place in a parallel run.
    pub(crate) dist: Arc<Dist>,
    /// Which replica owns which parameter under ZeRO (`parallel.zero` ≥ 1 with dp > 1).
    pub(crate) zero: Option<ZeroPlan>,
    /// Which pipeline stage holds which parameter (`parallel.pp` > 1): a stage keeps only its
    /// own blocks.
    pub(crate) stage_plan: Option<ZeroPlan>,
    /// Parameters split across the tensor-parallel group, with the split dimension.
    pub(crate) tp_split: HashMap<ParamId, crate::parallel::SplitDim>,
    /// The auxiliary loss of the step in progress ([`StepMetrics::aux_loss`]).
    pub(crate) step_aux: Option<f64>,
    /// Whole parameters whose gradients are partial sums over the tensor-parallel group.
    pub(crate) tp_partial: std::collections::HashSet<ParamId>,
    /// This rank's pipeline stage and every stage's layers (`parallel.pp` > 1).
    pub(crate) pipeline: Option<(crate::pipeline::Stage, Vec<std::ops::Range<usize>>)>,
    /// Seconds the last step waited for pipeline neighbours.
    pub(crate) pp_wait: f64,
}

/// Applies `[peft]` to the freshly loaded base: a new adapter (seeded by `train.seed`), or the
/// one `peft.adapter` names, whose `adapter_config.json` then defines the method. Prints peft's
/// trainable-parameter line.
fn setup_peft<B: AutodiffBackend, M: TrainModel<B>>(
    config: &mut TrainConfig,
    model: M,
    tokenizer: Option<&TokenizerBundle>,
    quiet: bool,
    device: &B::Device,
) -> Result<M, TrainError> {
    let peft = &config.peft;
    if !peft.enabled() && peft.adapter.is_none() {
        return Ok(model);
    }
    let model = match &peft.adapter {
        Some(spec) => {
            let dir = collie_core::asset::resolve(spec).map_err(collie_io::IoError::from)?;
            let (model, loaded) = collie_peft::adapter_io::load(model, &dir, device)?;
            if peft.enabled() && peft.kind != loaded.kind {
                return Err(TrainError::Invalid(format!(
                    "peft.kind = \"{}\" but the adapter in {} is {}",
                    peft.kind.name(),
                    dir.display(),
                    loaded.kind.peft_type()
                )));
            }
            config.peft = collie_peft::PeftConfig {
                adapter: peft.adapter.clone(),
                ..loaded
            };
            model
        }
        None => {
            B::seed(device, config.train.seed);
            collie_peft::apply(model, peft, tokenizer, device)?
        }
    };
    if !quiet {
        eprintln!(
            "peft {}: {}",
            config.peft.kind.peft_type(),
            collie_peft::TrainableReport::of(&model)
        );
    }
    Ok(model)
}

impl<B: AutodiffBackend, M: TrainModel<B>> Trainer<B, M> {
    /// Builds model, data and optimizer from `config`, resuming if asked.
    pub fn new(
        mut config: TrainConfig,
        options: &RunOptions,
        device: &B::Device,
    ) -> Result<Self, TrainError> {
        if config.optim.is_fused() && config.train.grad_accum_steps > 1 {
            // As CoLLiE: the update happens inside the backward pass, so there is nothing to
            // accumulate into.
            tracing::warn!(
                "{} updates during the backward pass; train.grad_accum_steps = {} forced to 1",
                config.optim.name,
                config.train.grad_accum_steps
            );
            config.train.grad_accum_steps = 1;
        }
        if config.optim.betas.is_some() && !config.optim.takes_betas() {
            tracing::warn!(
                "{} takes no betas; optim.betas is ignored",
                config.optim.name
            );
        }
        let lomo_f16 =
            config.optim.name == OptimName::Lomo && config.model.dtype == ComputeDtype::F16;
        if lomo_f16 && config.train.max_grad_norm == 0.0 {
            // lomo-optim: loss scaling needs the measuring pass, which clips at 1.0 by default.
            tracing::warn!("lomo with f16 loss scaling: train.max_grad_norm = 0 set to 1.0");
            config.train.max_grad_norm = 1.0;
        }
        let (model_config, mut model, tokenizer) = match config.model.init {
            ModelInit::Scratch => {
                let table = config.model.config.clone().expect("validated");
                let model_config: M::Config = serde_json::from_value(table.into())
                    .map_err(|e| TrainError::Invalid(format!("model.config: {e}")))?;
                // Pre-tokenized data needs no tokenizer (validated: `model.path` may then be empty).
                let tokenizer = if config.model.path.is_empty() {
                    None
                } else {
                    let tokenizer = collie_io::family::load_tokenizer(&config.model.path)?;
                    tokenizer.check_fits(model_config.vocab_size())?;
                    Some(tokenizer)
                };
                B::seed(device, config.train.seed);
                let mut model = M::init(&model_config, device)?;
                if let Quantize::To(ty) = config.model.quantize() {
                    // Each random weight is drawn, encoded and dropped in turn.
                    collie_io::quant::quantize_linears(&mut model, ty)?;
                }
                (model_config, model, tokenizer)
            }
            ModelInit::Pretrained => {
                // Read as the model is sharded below: a rank holds its slices and one whole
                // tensor at a time, never the whole model.
                let loaded = match config.model.quantize() {
                    Quantize::None => M::load_lazy(&config.model.path, device)?,
                    q => M::load_quantized(&config.model.path, device, q)?,
                };
                (loaded.config, loaded.model, loaded.tokenizer)
            }
        };
        // A built-in template named in the config replaces the tokenizer's (and is saved with it).
        let tokenizer = match (tokenizer, &config.data.template) {
            (Some(mut tok), Some(name)) => {
                let builtin: BuiltinTemplate = name.parse().expect("validated");
                tok.chat_template = Some(builtin.source().to_string());
                Some(tok)
            }
            (tok, _) => tok,
        };
        model.set_attention(config.model.attention);
        let p = &config.parallel;
        let dist = match &options.dist {
            Some(d) => d.clone(),
            None => Arc::new(Dist::single(p.dp, p.tp, p.pp)?),
        };
        if dist.dims.pp > 1 {
            check_pipeline(&config)?;
        }
        if dist.dims.tp > 1 {
            check_tensor_parallel(&config)?;
        }
        let model = setup_peft(
            &mut config,
            model,
            tokenizer.as_ref(),
            options.quiet,
            device,
        )?;
        // Tensor parallelism: each rank reads a split tensor whole, keeps its slice and drops
        // the rest before reading the next; then every other weight is read. (Weights drawn at
        // random stay lazy until first used, as they always have: the order of the draws.)
        let (model, tp_split) = collie_core::tp::shard(model, &dist.tp)?;
        let pipeline = match dist.dims.pp {
            1 => None,
            pp => {
                // A tied table not split over tensor-parallel ranks lives on the last stage.
                let tied = model.head().is_tied();
                let rows_from_last = tied && model.embed().shard.is_none();
                // `parameters` balances the stages with a tied table where it is held: on the
                // last stage alone, or (split over tensor-parallel ranks) on the first and the last.
                let mut params = block_params(&model);
                let n = params.len();
                match (tied, rows_from_last) {
                    (true, true) => params[n - 1] += std::mem::take(&mut params[0]),
                    (true, false) => params[n - 1] += params[0],
                    _ => {}
                }
                let stages =
                    collie_dist::pp::Stages::partition(&config.parallel.partition, pp, &params)?;
                let index = dist.coords.pp;
                let stage = crate::pipeline::Stage {
                    index,
                    count: pp,
                    layers: stages.layers[index].clone(),
                    hidden: model_config.hidden_size(),
                    recompute: config.train.activation_checkpointing,
                    rows_from_last,
                };
                Some((stage, stages.layers))
            }
        };
        // ZeRO-3 drops the parameters other replicas own, a pipeline stage the blocks of other
        // stages, as they are read (or drawn): neither is ever held whole.
        let mut zero = zero_plan(&config, &model, &dist);
        let mut stage_plan = pipeline
            .as_ref()
            .map(|(stage, stages)| stage_plan(&model, stage, stages, &dist));
        let model = release_spread(&mut zero, &mut stage_plan, model);
        if config.model.init == ModelInit::Pretrained {
            collie_io::module::materialize(&model);
        }
        let seq_len = config.data.seq_len;
        let encoder = Encoder::new(config.data.format, tokenizer.clone(), seq_len);
        let train_path =
            collie_core::asset::resolve(&config.data.train).map_err(collie_io::IoError::from)?;
        let dataset = JsonlDataset::open(&train_path, encoder.clone())?;
        if config.data.validate {
            dataset.validate()?;
        }
        let dp = dist.dims.dp;
        if dataset.len() < dp {
            return Err(TrainError::Invalid(format!(
                "{}: {} examples cannot be shared by parallel.dp = {dp} replicas",
                train_path.display(),
                dataset.len()
            )));
        }
        // Replica r reads every dp-th example: a global batch is the next dp · micro_batch_size
        // · grad_accum_steps examples, whatever the layout.
        let order = Order::new(
            dataset.len(),
            config.train.seed,
            config.data.shuffle,
            dist.coords.dp,
            dp,
        );
        let loader = DataLoader::new(
            dataset,
            order,
            config.train.micro_batch_size,
            config.data.pack.then_some(seq_len),
        );
        let eval_examples = match &config.data.eval {
            Some(p) => {
                let path = collie_core::asset::resolve(p).map_err(collie_io::IoError::from)?;
                let ds = JsonlDataset::open(&path, encoder)?;
                let n = match config.eval.max_examples {
                    0 => ds.len(),
                    m => m.min(ds.len()),
                };
                (0..n).map(|i| ds.get(i)).collect::<Result<Vec<_>, _>>()?
            }
            None => Vec::new(),
        };
        let update = Update::new(
            &config.optim,
            &config.sched,
            config.train.max_grad_norm,
            config.train.max_steps,
        );
        let compute = config.model.dtype.dtype();
        let scaler = (config.model.dtype == ComputeDtype::F16).then(|| {
            if lomo_f16 {
                LossScaler::lomo()
            } else {
                LossScaler::torch()
            }
        });
        let strategy = match (config.optim.is_fused(), dist.dims.pp > 1) {
            (false, false) => Strategy::PostBackward,
            (true, false) => Strategy::Fused,
            (false, true) => Strategy::Pipeline,
            (true, true) => Strategy::FusedPipeline,
        };
        let mut trainer = Trainer {
            config,
            model_config,
            tokenizer,
            model,
            state: TrainerState::default(),
            update,
            loader,
            eval_examples,
            device: device.clone(),
            compute,
            strategy,
            scaler,
            grad_hook: None,
            dist,
            zero,
            stage_plan,
            tp_split: tp_split.split.into_iter().collect(),
            step_aux: None,
            tp_partial: tp_split.partial.into_iter().collect(),
            pipeline,
            pp_wait: 0.0,
        };
        if let Some(scaler) = &trainer.scaler {
            scaler.start(&mut trainer.state);
        }
        if let Some(spec) = &options.resume {
            trainer.resume(spec)?;
        }
        Ok(trainer)
    }

    fn resume(&mut self, spec: &str) -> Result<(), TrainError> {
        let dir = checkpoint::resolve_resume(&self.config.output.dir, spec)?;
        // Either layout: an HF directory (or peft adapter) of one process, or the sharded
        // checkpoint of a parallel run, whose pieces are put back together as they are read.
        let mut model = if self.peft_active() {
            // The checkpoint holds the adapter; the base comes from where it came from before.
            let base = match self.config.model.quantize() {
                Quantize::None => M::load_lazy(&self.config.model.path, &self.device)?.model,
                q => M::load_quantized(&self.config.model.path, &self.device, q)?.model,
            };
            collie_peft::adapter_io::load(base, &dir, &self.device)?.0
        } else {
            M::load_lazy(&dir.display().to_string(), &self.device)?.model
        };
        model.set_attention(self.config.model.attention);
        // A whole checkpoint, whatever layout wrote it: this rank keeps its tensor-parallel shard.
        let (model, split) = collie_core::tp::shard(model, &self.dist.tp)?;
        self.tp_split = split.split.into_iter().collect();
        self.tp_partial = split.partial.into_iter().collect();
        // The loaded model has new parameter ids: the ownership follows them.
        self.zero = self
            .zero
            .as_ref()
            .map(|p| ZeroPlan::new(&model, p.stage, &*self.dist.dp));
        self.stage_plan = self
            .pipeline
            .as_ref()
            .map(|(stage, stages)| stage_plan(&model, stage, stages, &self.dist));
        let model = release_spread(&mut self.zero, &mut self.stage_plan, model);
        collie_io::module::materialize(&model);
        // A pipeline stage keeps the state of the blocks it trains.
        let mut prefixes: Vec<String> = Vec::new();
        if let Some((stage, _)) = &self.pipeline {
            prefixes.extend(stage.layers.clone().map(|i| format!("layers.{i}.")));
            let embed_here = match stage.rows_from_last {
                true => stage.last(),
                false => stage.first() || (stage.last() && model.head().is_tied()),
            };
            if embed_here {
                prefixes.push("embed.".into());
            }
            if stage.last() {
                prefixes.push("head.".into());
            }
        }
        let stage_keeps =
            |k: &str| prefixes.is_empty() || prefixes.iter().any(|p| k.starts_with(p.as_str()));
        // Only the state this rank will hold is read.
        let zero = self.zero.as_ref();
        let keep = |key: &str| {
            let path = key.rsplit_once('.').map_or(key, |(path, _slot)| path);
            stage_keeps(key) && zero.is_none_or(|plan| plan.owns(key) || plan.owns(path))
        };
        let (mut opt_state, state) = checkpoint::load_state(&dir, &keep)?;
        opt_state.counters.retain(|k, _| stage_keeps(k));
        if !self.tp_split.is_empty() {
            let paths = crate::parallel::split_paths(&model, &self.tp_split);
            opt_state = crate::parallel::split_state(
                opt_state,
                &paths,
                self.dist.coords.tp,
                self.dist.dims.tp,
            )?;
        }
        if let Some(plan) = &self.zero {
            // Whatever layout wrote it, this replica keeps its own parameters' state.
            opt_state = collie_dist::zero::shard_state(plan, opt_state);
        }
        self.model = model;
        self.update.load_state(opt_state, &self.device)?;
        // Replica r of w reads examples r, r + w, ...: `consumed` per replica converts between
        // degrees as long as every replica read as many (no packing).
        let (saved, dp) = (state.data_parallel.max(1) as u64, self.dist.dims.dp as u64);
        let global = state.consumed * saved;
        if saved != dp && (self.config.data.pack || global % dp != 0) {
            return Err(TrainError::Resume(format!(
                "{}: written at parallel.dp = {saved} after {global} examples, which {} cannot be \
                 split evenly over parallel.dp = {dp}; resume at dp = {saved}",
                dir.display(),
                if self.config.data.pack {
                    "packed rows"
                } else {
                    ""
                }
            )));
        }
        self.loader.consumed = global / dp;
        self.state = state;
        self.state.data_parallel = dp as usize;
        Ok(())
    }

    /// Whether only a PEFT adapter is trained.
    pub fn peft_active(&self) -> bool {
        self.config.peft.enabled()
    }

    /// The device.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// `module` in the compute dtype: a cast copy whose gradients land on the f32 masters.
    pub(crate) fn in_compute_dtype<T: Module<B>>(&self, module: T) -> T {
        in_dtype(module, self.compute)
    }

    /// Installs the hook the block-wise backward calls with each block's gradients before they
    /// are used (see [`GradHook`]).
    pub fn set_grad_hook(&mut self, hook: GradHook) {
        self.grad_hook = Some(hook);
    }

    /// One optimizer step.
    pub fn train_step(&mut self) -> Result<StepMetrics, TrainError> {
        let start = Instant::now();
        // What the previous step's evaluation or checkpoint waited for is not this step's.
        collie_dist::world::take_exposed_comm();
        let lr = self.update.lr(self.state.step);
        let batches = (0..self.config.train.grad_accum_steps)
            .map(|_| self.loader.next_batch())
            .collect::<Result<Vec<_>, _>>()?;
        // Counts of the global batch: every replica's share added up.
        let mut counts = [
            batches.iter().map(Batch::target_tokens).sum::<usize>() as f64,
            batches.iter().map(Batch::real_tokens).sum::<usize>() as f64,
        ];
        all_reduce_scalars(&*self.dist.dp, &mut counts);
        let (targets, tokens) = (counts[0] as usize, counts[1] as usize);
        self.state.consumed = self.loader.consumed;
        self.state.data_parallel = self.dist.dims.dp;
        self.state.step += 1;
        self.state.tokens_seen += tokens as u64;
        if targets == 0 {
            self.state.skipped_steps += 1;
            return Ok(StepMetrics {
                loss: f64::NAN,
                lr,
                grad_norm: 0.0,
                tokens,
                target_tokens: 0,
                seconds: start.elapsed().as_secs_f64(),
                skipped: true,
                aux_loss: None,
                comm_seconds: collie_dist::world::take_exposed_comm(),
            });
        }
        self.step_aux = None;
        let (nll, grad_norm, skipped) = match self.strategy {
            Strategy::PostBackward | Strategy::Pipeline => {
                self.post_backward_step(&batches, targets, lr)
            }
            Strategy::Fused => self.fused_step(&batches[0], targets, lr),
            Strategy::FusedPipeline => self.fused_pipeline_step(&batches, targets, lr),
        };
        Ok(StepMetrics {
            loss: nll / targets as f64,
            lr,
            grad_norm,
            tokens,
            target_tokens: targets,
            seconds: start.elapsed().as_secs_f64(),
            skipped,
            aux_loss: self.step_aux,
            comm_seconds: collie_dist::world::take_exposed_comm(),
        })
    }

    /// The loss scale of this step (1 without f16 dynamic scaling).
    pub(crate) fn loss_scale(&self) -> f64 {
        self.scaler.map_or(1.0, |_| self.state.loss_scale)
    }

    /// The gradient norm of the whole model from this rank's gradients: the squares of
    /// tensor-parallel shards are summed over the tp group (replicated parameters counted once),
    /// and under ZeRO, where each replica holds its own parameters' gradients, over the replicas.
    pub(crate) fn grad_norm(&self, grads: &GradientsParams) -> f64 {
        if self.tp_split.is_empty() && self.pipeline.is_none() {
            let local = global_norm(&self.model, grads);
            return match self.zero {
                None => local,
                Some(_) => self.dp_sum(local * local).sqrt(),
            };
        }
        // A tied table's gradient on the first and the last stage (where both hold it): count
        // it once.
        let skip = match &self.pipeline {
            Some((stage, _))
                if !stage.first() && self.model.head().is_tied() && !stage.rows_from_last =>
            {
                Some(self.model.embed().weight.id)
            }
            _ => None,
        };
        let (mut split, whole) = squared_norms(&self.model, grads, &self.tp_split, skip);
        let mut v = [split];
        self.dist.tp.all_reduce_sum_f64(&mut v);
        split = v[0];
        let mut v = [split + whole];
        if self.pipeline.is_some() {
            self.dist.pp.all_reduce_sum_f64(&mut v);
        }
        let total = match self.zero {
            None => v[0],
            Some(_) => self.dp_sum(v[0]),
        };
        total.sqrt()
    }

    /// `value` summed over the data-parallel replicas.
    pub(crate) fn dp_sum(&self, value: f64) -> f64 {
        let mut v = [value];
        all_reduce_scalars(&*self.dist.dp, &mut v);
        v[0]
    }

    /// This process's place in a parallel run.
    pub fn dist(&self) -> &Dist {
        &self.dist
    }

    /// Evaluation metrics (`eval_loss`, `eval_ppl`, `eval_accuracy`, `eval_exact_match`,
    /// `eval_bleu`, `eval_rouge_l`, as configured).
    pub fn evaluate(&self) -> Result<BTreeMap<String, f64>, TrainError> {
        match self.streamed() {
            Some(lm) => self.evaluate_with(&lm),
            None => self.evaluate_with(&self.whole_model().valid()),
        }
    }

    /// [`Trainer::evaluate`] with `model` as the forward-only language model.
    fn evaluate_with<L: CausalLm<B::InnerBackend>>(
        &self,
        model: &L,
    ) -> Result<BTreeMap<String, f64>, TrainError> {
        let device = &self.device;
        let mut out = BTreeMap::new();
        let batch_size = self
            .config
            .eval
            .batch_size
            .unwrap_or(self.config.train.micro_batch_size);
        if !self.eval_examples.is_empty() {
            let (sum, count) = corpus_nll(model, &self.eval_examples, batch_size, device);
            if count > 0 {
                let loss = sum / count as f64;
                out.insert("eval_loss".into(), loss);
                out.insert("eval_ppl".into(), loss.exp());
                out.insert("eval_tokens".into(), count as f64);
            }
        }
        let tok = self.tokenizer.as_ref();
        if let Some(path) = &self.config.eval.classification {
            let tok = tok.ok_or_else(|| {
                TrainError::Invalid("classification evaluation needs a tokenizer".into())
            })?;
            let path = collie_core::asset::resolve(path).map_err(collie_io::IoError::from)?;
            out.insert(
                "eval_accuracy".into(),
                classification(model, tok, &path, batch_size, device)?,
            );
        }
        if let Some(path) = &self.config.eval.generation {
            let tok = tok.ok_or_else(|| {
                TrainError::Invalid("generation evaluation needs a tokenizer".into())
            })?;
            let path = collie_core::asset::resolve(path).map_err(collie_io::IoError::from)?;
            let eos = self.model_config.eos_ids();
            let cfg = GenerationConfig {
                max_new_tokens: self.config.eval.max_new_tokens,
                pad_id: eos.first().copied().unwrap_or(0),
                eos_ids: eos,
                ..Default::default()
            };
            let s = generation(model, tok, &path, self.config.eval.chat, &cfg, device)?;
            if self.dist.is_main() {
                self.write_predictions(&s.predictions)?;
            }
            out.insert("eval_exact_match".into(), s.exact_match);
            out.insert("eval_bleu".into(), s.bleu);
            out.insert("eval_rouge_l".into(), s.rouge_l);
        }
        Ok(out)
    }

    /// Writes a generation evaluation's outputs to `output.dir/generations/step-N.jsonl` (one
    /// `{"input", "output", "generated", "generated_ids"}` line per example), replacing the step's
    /// file of an earlier run.
    fn write_predictions(&self, predictions: &[crate::eval::Prediction]) -> Result<(), TrainError> {
        let dir = self.config.output.dir.join("generations");
        std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
        let path = dir.join(format!("step-{}.jsonl", self.state.step));
        let mut text = String::new();
        for p in predictions {
            text.push_str(&serde_json::to_string(p).expect("a prediction serializes"));
            text.push('\n');
        }
        std::fs::write(&path, text).map_err(|e| TrainError::io(&path, e))
    }

    /// Continues `prompt` (as a user turn of the chat template when `chat`) with the current
    /// weights; returns the new text.
    pub fn complete(
        &self,
        prompt: &str,
        chat: bool,
        cfg: &GenerationConfig,
    ) -> Result<String, TrainError> {
        let tok = self
            .tokenizer
            .as_ref()
            .ok_or_else(|| TrainError::Invalid("sampling needs a tokenizer".into()))?;
        let ids = if chat {
            let template = tok
                .chat_template
                .clone()
                .unwrap_or_else(|| BuiltinTemplate::ChatMl.source().to_string());
            let tokens = TemplateTokens {
                bos_token: tok.bos_token.clone(),
                eos_token: tok.eos_token.clone(),
            };
            let text = render(
                &template,
                &[ChatMessage::new("user", prompt)],
                true,
                &tokens,
            )
            .map_err(|e| TrainError::Invalid(e.to_string()))?;
            tok.encode(&text, false)?
        } else {
            tok.encode(prompt, true)?
        };
        let mut cfg = cfg.clone();
        if cfg.eos_ids.is_empty() {
            cfg.eos_ids = self.model_config.eos_ids();
        }
        let prompts = [ids];
        let new = match self.streamed() {
            Some(lm) => crate::generate::generate(&lm, &prompts, &cfg, &self.device, |_, _| {})?,
            None => crate::generate::generate(
                &self.whole_model().valid(),
                &prompts,
                &cfg,
                &self.device,
                |_, _| {},
            )?,
        }
        .remove(0);
        Ok(tok.decode(&new, true)?)
    }

    /// Whether evaluation has anything to run.
    pub fn has_eval(&self) -> bool {
        !self.eval_examples.is_empty()
            || self.config.eval.classification.is_some()
            || self.config.eval.generation.is_some()
    }

    /// Records an evaluation; returns whether early stopping should end the run.
    fn record_eval(&mut self, metrics: BTreeMap<String, f64>) -> bool {
        let key = &self.config.train.best_metric;
        let better = |a: f64, b: f64| {
            if self.config.train.greater_is_better {
                a > b
            } else {
                a < b
            }
        };
        if let Some(&v) = metrics.get(key) {
            let best = self
                .state
                .evals
                .iter()
                .filter_map(|(_, m)| m.get(key).copied())
                .reduce(|a, b| if better(a, b) { a } else { b });
            if best.is_none_or(|b| better(v, b)) {
                self.state.evals_without_improvement = 0;
            } else {
                self.state.evals_without_improvement += 1;
            }
        }
        self.state.evals.push((self.state.step, metrics));
        let patience = self.config.train.early_stopping_patience;
        patience > 0 && self.state.evals_without_improvement >= patience
    }

    /// Trains to `max_steps` (or early stop), with evaluation, checkpoints, metrics, plot and
    /// summary.
    pub fn run(&mut self, options: &RunOptions) -> Result<Summary, TrainError> {
        let dir = self.config.output.dir.clone();
        // Rank 0 writes the run's files and prints; every rank of a parallel run keeps its own
        // log under logs/.
        let main = self.dist.is_main();
        std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
        let mut log = if main {
            std::fs::write(dir.join("config.resolved.toml"), self.config.to_toml())
                .map_err(|e| TrainError::io(&dir, e))?;
            crate::metrics::truncate_metrics(&dir, self.state.step)?;
            Some(MetricsLog::open(&dir)?)
        } else {
            None
        };
        let mut rank_log = RankLog::open(&dir, &self.dist)?;
        let total = self.config.train.max_steps;
        let progress = Progress::new(
            self.state.step,
            total,
            self.config.train.log_every,
            options.quiet || !main,
        );
        let c = &self.model_config;
        let embedding_params =
            c.vocab_size() * c.hidden_size() * if c.tie_word_embeddings() { 1 } else { 2 };
        // Where the parameters are spread, a rank holds placeholders for the others' share.
        let num_params = self
            .spread()
            .map_or_else(|| self.model.num_params(), |g| g.plan.elems());
        let flops = flops_per_token(
            num_params.saturating_sub(embedding_params),
            c.num_layers(),
            c.num_heads(),
            c.head_dim(),
            self.config.data.seq_len,
        );
        let peak = options.peak_tflops.or(self.config.output.peak_tflops);
        let mut eval_first = None;
        if self.has_eval() && self.state.step == 0 && self.config.train.eval_on_start {
            let m = self.evaluate()?;
            progress.println(&format!("eval before training: {}", fmt_metrics(&m)));
            write_line(&mut log, &eval_line(0, &m))?;
            self.record_eval(m.clone());
            eval_first = Some(m);
        }
        let (mut tokens, mut seconds, mut last_loss) = (0u64, 0.0f64, f64::NAN);
        let mut pp_waits: Vec<(f64, f64)> = Vec::new();
        let mut stopped_early = false;
        let mut checkpoint = PathBuf::new();
        let eval_every = self.config.train.eval_every;
        let save_every = self.config.train.save_every;
        while self.state.step < total {
            let m = self.train_step()?;
            let step = self.state.step;
            rank_log.step(step, &m, self.pipeline.as_ref().map(|_| self.pp_wait))?;
            if self.pipeline.is_some() {
                pp_waits.push((self.pp_wait, m.seconds));
            }
            tokens += m.tokens as u64;
            seconds += m.seconds;
            if !m.skipped {
                last_loss = m.loss;
            }
            let tps = m.tokens as f64 / m.seconds;
            let mut line = Map::new();
            line.insert("step".into(), json!(step));
            line.insert(
                "loss".into(),
                if m.skipped {
                    Value::Null
                } else {
                    json!(m.loss)
                },
            );
            line.insert("lr".into(), json!(m.lr));
            line.insert("grad_norm".into(), json!(m.grad_norm));
            if let Some(aux) = m.aux_loss {
                line.insert("aux_loss".into(), json!(aux));
            }
            line.insert("tokens".into(), json!(m.tokens));
            line.insert("target_tokens".into(), json!(m.target_tokens));
            line.insert("tokens_per_sec".into(), json!(tps));
            // One device per process: tokens/s/device is CoLLiE's TGS.
            line.insert(
                "tokens_per_sec_per_device".into(),
                json!(tps / self.dist.size() as f64),
            );
            line.insert(
                "mfu".into(),
                peak.map_or(Value::Null, |p| json!(tps * flops / (p * 1e12))),
            );
            line.insert("peak_mem_bytes".into(), json!(peak_rss_bytes()));
            line.insert("step_seconds".into(), json!(m.seconds));
            if m.skipped {
                line.insert("skipped".into(), json!(true));
            }
            write_line(&mut log, &line)?;
            progress.step(
                step,
                total,
                &format!("loss {:.4} lr {:.2e} {:.0} tok/s", m.loss, m.lr, tps),
            );
            if self.has_eval() && eval_every > 0 && step.is_multiple_of(eval_every) && step < total
            {
                let metrics = self.evaluate()?;
                progress.println(&format!("step {step}: {}", fmt_metrics(&metrics)));
                write_line(&mut log, &eval_line(step, &metrics))?;
                stopped_early = self.record_eval(metrics);
            }
            if save_every > 0 && step.is_multiple_of(save_every) && step < total {
                checkpoint = self.save()?;
            }
            if stopped_early {
                progress.println(&format!("early stopping at step {step}"));
                break;
            }
        }
        progress.finish();
        if let (Some((stage, _)), false) = (&self.pipeline, pp_waits.is_empty()) {
            // The bubble: the share of step time this stage waited for its neighbours (the first
            // step, which warms up, left out when there are more).
            let rest = if pp_waits.len() > 1 {
                &pp_waits[1..]
            } else {
                &pp_waits[..]
            };
            let (w, t): (f64, f64) = rest.iter().fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
            let m = self.config.train.grad_accum_steps;
            let line = format!(
                "pipeline stage {} of {}: layers {:?}, bubble (waiting) {:.3} of step time; ideal 1F1B {:.3} ({} micro-batches)",
                stage.index,
                stage.count,
                stage.layers,
                w / t.max(1e-12),
                collie_dist::pp::ideal_bubble(stage.count, m),
                m
            );
            rank_log.line(&line)?;
            progress.println(&line);
        }
        if self.dist.size() > 1 {
            // What ZeRO saves: this replica's optimizer state.
            let state = self.update.state();
            let bytes: usize = state.tensors.values().map(|t| t.data.len() * 4).sum();
            rank_log.line(&format!(
                "optimizer_state_bytes {bytes} tensors {}",
                state.tensors.len()
            ))?;
        }
        let train_peak = peak_rss_bytes();
        let mut eval_last = None;
        if self.has_eval() && !stopped_early {
            let m = self.evaluate()?;
            write_line(&mut log, &eval_line(self.state.step, &m))?;
            self.record_eval(m.clone());
            eval_last = Some(m);
        } else if let Some((_, m)) = self.state.evals.last() {
            eval_last = Some(m.clone());
        }
        if !checkpoint.ends_with(format!("step-{}", self.state.step)) {
            checkpoint = self.save()?;
        }
        // Every rank's peaks, exchanged while all ranks are still here (a collective): the
        // run's, then the training loop's.
        let peak = peak_rss_bytes();
        let (n, r) = (self.dist.world.size(), self.dist.world.rank());
        let mut peaks = vec![0.0; 2 * n];
        peaks[r] = peak.unwrap_or(0) as f64;
        peaks[n + r] = train_peak.unwrap_or(0) as f64;
        self.dist.world.all_reduce_sum_f64(&mut peaks);
        let peaks: Vec<u64> = peaks.into_iter().map(|p| p as u64).collect();
        let summary = Summary {
            steps: self.state.step,
            final_loss: last_loss,
            eval_first,
            eval_last,
            tokens,
            train_seconds: seconds,
            tokens_per_sec: tokens as f64 / seconds.max(1e-9),
            peak_rss_bytes: peak,
            peak_rss_bytes_per_rank: peaks[..n].to_vec(),
            train_peak_rss_bytes_per_rank: peaks[n..].to_vec(),
            checkpoint,
            stopped_early,
            trainable_params: collie_peft::TrainableReport::of(&self.model).trainable,
        };
        if !main {
            return Ok(summary);
        }
        write_summary(&dir, &summary)?;
        if let Err(e) = plot_metrics(&dir) {
            tracing::warn!("could not draw loss.png: {e}");
        }
        if !options.quiet {
            eprintln!("{}", summary_text(&summary));
        }
        Ok(summary)
    }
}

/// Squared gradient norms of `model`'s parameters split by tensor parallelism and of the others.
fn squared_norms<B: AutodiffBackend, M: TrainModel<B>>(
    model: &M,
    grads: &GradientsParams,
    split: &HashMap<ParamId, crate::parallel::SplitDim>,
    skip: Option<ParamId>,
) -> (f64, f64) {
    struct Squares<'a> {
        grads: &'a GradientsParams,
        split: &'a HashMap<ParamId, crate::parallel::SplitDim>,
        skip: Option<ParamId>,
        sums: (f64, f64),
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Squares<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if self.skip == Some(param.id) {
                return;
            }
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
                let sq = g.square().sum().into_scalar().elem::<f64>();
                if self.split.contains_key(&param.id) {
                    self.sums.0 += sq;
                } else {
                    self.sums.1 += sq;
                }
            }
        }
    }
    let mut v = Squares {
        grads,
        split,
        skip,
        sums: (0.0, 0.0),
    };
    model.visit(&mut v);
    v.sums
}

/// What pipeline parallelism does not combine with yet, as config errors.
fn check_pipeline(config: &TrainConfig) -> Result<(), TrainError> {
    let pp = config.parallel.pp;
    let refuse = |key: &str, what: &str| {
        Err(TrainError::Invalid(format!(
            "parallel.pp = {pp} with {key}: {what}"
        )))
    };
    if config.optim.name == OptimName::Lomo && config.model.dtype == ComputeDtype::F16 {
        return refuse(
            "model.dtype",
            "LOMO's f16 loss scaling under pipeline parallelism is not available yet; use bf16",
        );
    }
    if config.optim.name == OptimName::SophiaG {
        return refuse(
            "optim.name",
            "SophiaG's Hessian refresh runs the whole model",
        );
    }
    if config.peft.enabled() && config.peft.kind.is_prompt_learning() {
        return refuse(
            "peft.kind",
            "virtual tokens are not passed between pipeline stages",
        );
    }
    Ok(())
}

/// What tensor parallelism does not combine with yet, as config errors.
fn check_tensor_parallel(config: &TrainConfig) -> Result<(), TrainError> {
    let tp = config.parallel.tp;
    let refuse = |key: &str, what: &str| {
        Err(TrainError::Invalid(format!(
            "parallel.tp = {tp} with {key}: {what}"
        )))
    };
    if config.optim.is_fused() {
        return refuse(
            "optim.name",
            &format!(
                "{} under tensor parallelism is not available yet",
                config.optim.name
            ),
        );
    }
    if config.optim.name == OptimName::SophiaG {
        return refuse(
            "optim.name",
            "SophiaG's Hessian sampling needs whole-vocabulary logits",
        );
    }
    if config.peft.enabled() && config.peft.dropout > 0.0 {
        return refuse(
            "peft.dropout",
            "LoRA dropout masks would differ between the ranks sharing a layer; set it to 0",
        );
    }
    Ok(())
}
