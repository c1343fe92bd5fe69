//! The step trainer: micro-batches × gradient accumulation → token-weighted loss → global-norm
//! clipping → optimizer, with evaluation, checkpoints, exact resume and monitors.
//!
//! The loss of an optimizer step is the summed NLL of all its target tokens divided by their
//! number (each micro-batch's sum is divided by the step's total before its backward pass), as
//! transformers' Trainer computes it. The learning rate of step `k` (from 0) is
//! `lr · λ(k)`; metrics count steps from 1, after the update.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::{AutodiffModule, Module, ModuleMapper, Param};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, ElementConversion, Int, Tensor, TensorData};
use collie_core::loss::cross_entropy_sum;
use collie_core::nn::to_dtype;
use collie_data::chat::{render, BuiltinTemplate, ChatMessage, TemplateTokens};
use collie_data::dataset::{Encoder, Example, JsonlDataset};
use collie_data::loader::{Batch, DataLoader, Order};
use collie_io::tokenizer::TokenizerBundle;
use collie_llama::{Llama, LlamaConfig};
use collie_optim::clip::global_norm;
use collie_optim::schedule::Schedule;
use collie_optim::{AdamW, AdamWConfig, AnyOptimizer, Optimizer, Sgd, SgdConfig};
use serde_json::{json, Map, Value};

use crate::checkpoint::{self, TrainerState};
use crate::config::TrainConfig;
use crate::error::TrainError;
use crate::eval::{batch_nll, classification, corpus_nll, generation};
use crate::generate::GenerationConfig;
use crate::metrics::{flops_per_token, peak_rss_bytes, MetricsLog, Progress};
use crate::plot;

/// How to run, beyond the config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// `latest` or a checkpoint directory.
    pub resume: Option<String>,
    /// Peak TFLOPS of the device for MFU (overrides `output.peak_tflops`).
    pub peak_tflops: Option<f64>,
    /// No progress output.
    pub quiet: bool,
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
    /// The last checkpoint written.
    pub checkpoint: PathBuf,
    /// Whether early stopping ended the run.
    pub stopped_early: bool,
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
}

/// A training run in progress.
pub struct Trainer<B: AutodiffBackend> {
    /// The resolved configuration.
    pub config: TrainConfig,
    /// The model's HF config (written into checkpoints).
    pub model_config: LlamaConfig,
    /// Tokenizer (absent only for `tokens` data without a tokenizer-bearing model).
    pub tokenizer: Option<TokenizerBundle>,
    /// The model being trained.
    pub model: Llama<B>,
    /// Progress counters, saved in checkpoints.
    pub state: TrainerState,
    optimizer: AnyOptimizer<B::InnerBackend>,
    schedule: Schedule,
    loader: DataLoader,
    eval_examples: Vec<Example>,
    device: B::Device,
    /// Compute dtype (`f32`, `bf16`, `f16`); parameters stay `f32`.
    compute: DType,
}

/// Casts every float parameter (an autodiff op, so gradients flow back to the f32 masters).
struct CastParams(DType);

impl<B: Backend> ModuleMapper<B> for CastParams {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let dtype = self.0;
        param.map(|t| to_dtype(t, dtype))
    }
}

/// PyTorch GradScaler defaults for f16.
const INITIAL_LOSS_SCALE: f64 = 65536.0;
const SCALE_GROWTH_INTERVAL: u64 = 2000;

fn tensor2<B: Backend>(
    v: &[i64],
    rows: usize,
    cols: usize,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    Tensor::from_data(TensorData::new(v.to_vec(), [rows, cols]), device)
}

impl<B: AutodiffBackend> Trainer<B> {
    /// Builds model, data and optimizer from `config`, resuming if asked.
    pub fn new(
        config: TrainConfig,
        options: &RunOptions,
        device: &B::Device,
    ) -> Result<Self, TrainError> {
        let (model_config, model, tokenizer) = match config.model.init.as_str() {
            "scratch" => {
                let model_config = config.model.config.clone().expect("validated");
                let tokenizer = collie_llama::load_tokenizer(&config.model.path)?;
                tokenizer.check_fits(model_config.vocab_size)?;
                B::seed(device, config.train.seed);
                let model = model_config.init::<B>(device)?;
                (model_config, model, Some(tokenizer))
            }
            _ => {
                let loaded = collie_llama::load::<B>(&config.model.path, device)?;
                (loaded.config, loaded.model, loaded.tokenizer)
            }
        };
        let seq_len = config.data.seq_len;
        let encoder = Encoder::new(config.data.format, tokenizer.clone(), seq_len);
        let train_path =
            collie_core::asset::resolve(&config.data.train).map_err(collie_io::IoError::from)?;
        let dataset = JsonlDataset::open(&train_path, encoder.clone())?;
        if config.data.validate {
            dataset.validate()?;
        }
        let order = Order::new(dataset.len(), config.train.seed, config.data.shuffle, 0, 1);
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
        let optimizer = match config.optim.name.as_str() {
            "sgd" => AnyOptimizer::Sgd(Sgd::new(SgdConfig {
                momentum: config.optim.momentum,
                dampening: config.optim.dampening,
                weight_decay: config.optim.weight_decay,
                nesterov: config.optim.nesterov,
            })),
            _ => AnyOptimizer::AdamW(AdamW::new(AdamWConfig {
                betas: (config.optim.betas[0], config.optim.betas[1]),
                eps: config.optim.eps,
                weight_decay: config.optim.weight_decay,
            })),
        };
        let schedule = Schedule {
            kind: config.sched.kind,
            warmup_steps: config.sched.warmup_steps,
            total_steps: config.train.max_steps,
        };
        let compute = match config.model.dtype.as_str() {
            "bf16" => DType::BF16,
            "f16" => DType::F16,
            _ => DType::F32,
        };
        let mut trainer = Trainer {
            config,
            model_config,
            tokenizer,
            model,
            state: TrainerState::default(),
            optimizer,
            schedule,
            loader,
            eval_examples,
            device: device.clone(),
            compute,
        };
        if compute == DType::F16 {
            trainer.state.loss_scale = INITIAL_LOSS_SCALE;
        }
        if let Some(spec) = &options.resume {
            trainer.resume(spec)?;
        }
        Ok(trainer)
    }

    fn resume(&mut self, spec: &str) -> Result<(), TrainError> {
        let dir = checkpoint::resolve_resume(&self.config.output.dir, spec)?;
        let (_, model) = collie_llama::hf::load_hf_dir::<B>(&dir, &self.device)?;
        let (opt_state, state) = checkpoint::load_state(&dir)?;
        self.model = model;
        self.optimizer.load_state(opt_state, &self.device)?;
        self.loader.consumed = state.consumed;
        self.state = state;
        Ok(())
    }

    /// The device.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// `module` in the compute dtype: a cast copy whose gradients land on the f32 masters.
    fn in_compute_dtype<M: Module<B>>(&self, module: M) -> M {
        if self.compute == DType::F32 {
            module
        } else {
            module.map(&mut CastParams(self.compute))
        }
    }

    /// Summed NLL and gradients of one micro-batch; the backward pass sees `nll · scale`.
    fn micro_step(
        &self,
        batch: &Batch,
        scale: f64,
        acc: &mut GradientsAccumulator<Llama<B>>,
    ) -> f64 {
        if self.config.train.activation_checkpointing {
            return self.micro_step_checkpointed(batch, scale, acc);
        }
        let model = self.in_compute_dtype(self.model.clone());
        let (sum, _) = batch_nll(&model, batch, &self.device);
        let nll = sum.clone().inner().into_scalar().elem::<f64>();
        let grads = sum.mul_scalar(scale).backward();
        // Gradients are read off the f32 masters (the casts' backward brings them there).
        acc.accumulate(&self.model, GradientsParams::from_grads(grads, &self.model));
        nll
    }

    /// [`Trainer::micro_step`] keeping only block inputs: the forward pass detaches between
    /// blocks, and the backward pass recomputes each block from its input, back-propagating
    /// `sum(out · g_out)` to get its parameter gradients and `g_in` for the block before.
    fn micro_step_checkpointed(
        &self,
        batch: &Batch,
        scale: f64,
        acc: &mut GradientsAccumulator<Llama<B>>,
    ) -> f64 {
        // Every use of a module below takes a fresh compute-dtype copy, so each backward pass has
        // its own cast nodes to flow through to the f32 masters.
        let (r, c, d) = (batch.rows, batch.cols, &self.device);
        let model = &self.model;
        let ids = tensor2::<B>(&batch.input_ids, r, c, d);
        let segments = tensor2::<B>(&batch.segments, r, c, d);
        let positions = tensor2::<B>(&batch.positions, r, c, d);
        let ctx = model.context(r, c, 0, Some(&segments), Some(positions), d);
        let embedded = self.in_compute_dtype(model.embed.clone()).forward(ids);
        let mut inputs = vec![embedded.clone().detach()];
        for layer in &model.layers {
            let x = inputs.last().expect("input").clone();
            inputs.push(
                self.in_compute_dtype(layer.clone())
                    .forward(x, &ctx, None)
                    .detach(),
            );
        }
        let h = inputs.pop().expect("last hidden").require_grad();
        let logits = self
            .in_compute_dtype(model.head.clone())
            .forward(h.clone(), &self.in_compute_dtype(model.embed.clone()));
        let vocab = logits.dims()[2];
        let logits = logits.slice([0..r, 0..c - 1]).reshape([r * (c - 1), vocab]);
        let targets: Vec<i64> = (0..r)
            .flat_map(|row| batch.labels[row * c + 1..(row + 1) * c].iter().copied())
            .collect();
        let targets = Tensor::<B, 1, Int>::from_data(TensorData::new(targets, [r * (c - 1)]), d);
        let (sum, _) = cross_entropy_sum(logits, targets);
        let nll = sum.clone().inner().into_scalar().elem::<f64>();
        let mut grads = sum.mul_scalar(scale).backward();
        let mut g = h.grad(&grads).expect("gradient of the head input");
        acc.accumulate(model, GradientsParams::from_module(&mut grads, &model.head));
        // A tied head puts gradient on the embedding too.
        acc.accumulate(
            model,
            GradientsParams::from_module(&mut grads, &model.embed),
        );
        for (layer, x) in model.layers.iter().zip(inputs).rev() {
            let x = x.require_grad();
            let out = self
                .in_compute_dtype(layer.clone())
                .forward(x.clone(), &ctx, None);
            let g_out = to_dtype(Tensor::from_inner(g), out.dtype());
            let mut grads = to_dtype(out * g_out, DType::F32).sum().backward();
            g = x.grad(&grads).expect("gradient of the block input");
            acc.accumulate(model, GradientsParams::from_module(&mut grads, layer));
        }
        let g_out = to_dtype(Tensor::from_inner(g), embedded.dtype());
        let mut grads = to_dtype(embedded * g_out, DType::F32).sum().backward();
        acc.accumulate(
            model,
            GradientsParams::from_module(&mut grads, &model.embed),
        );
        nll
    }

    /// One optimizer step.
    pub fn train_step(&mut self) -> Result<StepMetrics, TrainError> {
        let start = Instant::now();
        let lr = self.schedule.lr(self.config.optim.lr, self.state.step);
        let batches = (0..self.config.train.grad_accum_steps)
            .map(|_| self.loader.next_batch())
            .collect::<Result<Vec<_>, _>>()?;
        let targets: usize = batches.iter().map(Batch::target_tokens).sum();
        let tokens: usize = batches.iter().map(Batch::real_tokens).sum();
        self.state.consumed = self.loader.consumed;
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
            });
        }
        // f16 multiplies the loss by the dynamic scale so small gradients survive the half range.
        let loss_scale = if self.compute == DType::F16 {
            self.state.loss_scale
        } else {
            1.0
        };
        let scale = loss_scale / targets as f64;
        let mut acc = GradientsAccumulator::new();
        let nll: f64 = batches
            .iter()
            .map(|b| self.micro_step(b, scale, &mut acc))
            .sum();
        let mut grads = acc.grads();
        let scaled_norm = global_norm(&self.model, &grads);
        if !scaled_norm.is_finite() {
            // Overflow: skip the update and back off, as torch.cuda.amp.GradScaler does.
            self.state.skipped_steps += 1;
            self.state.loss_scale *= 0.5;
            self.state.scale_good_steps = 0;
            return Ok(StepMetrics {
                loss: nll / targets as f64,
                lr,
                grad_norm: scaled_norm,
                tokens,
                target_tokens: targets,
                seconds: start.elapsed().as_secs_f64(),
                skipped: true,
            });
        }
        // The clipping coefficient of torch's clip_grad_norm_, on the unscaled norm.
        let grad_norm = scaled_norm / loss_scale;
        let max_norm = self.config.train.max_grad_norm;
        let clip = (max_norm > 0.0).then(|| (max_norm / (grad_norm + 1e-6)).min(1.0));
        let factor = match clip {
            None if loss_scale == 1.0 => None,
            c => Some(c.unwrap_or(1.0) / loss_scale),
        };
        self.model = collie_optim::apply(
            self.model.clone(),
            &mut grads,
            &mut self.optimizer,
            lr,
            factor,
        );
        if self.compute == DType::F16 {
            self.state.scale_good_steps += 1;
            if self.state.scale_good_steps >= SCALE_GROWTH_INTERVAL {
                self.state.loss_scale *= 2.0;
                self.state.scale_good_steps = 0;
            }
        }
        Ok(StepMetrics {
            loss: nll / targets as f64,
            lr,
            grad_norm,
            tokens,
            target_tokens: targets,
            seconds: start.elapsed().as_secs_f64(),
            skipped: false,
        })
    }

    /// Evaluation metrics (`eval_loss`, `eval_ppl`, `eval_accuracy`, `eval_exact_match`,
    /// `eval_bleu`, `eval_rouge_l`, as configured).
    pub fn evaluate(&self) -> Result<BTreeMap<String, f64>, TrainError> {
        let model = self.model.valid();
        let device = &self.device;
        let mut out = BTreeMap::new();
        let batch_size = self
            .config
            .eval
            .batch_size
            .unwrap_or(self.config.train.micro_batch_size);
        if !self.eval_examples.is_empty() {
            let (sum, count) = corpus_nll(&model, &self.eval_examples, batch_size, device);
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
                classification(&model, tok, &path, device)?,
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
            let s = generation(&model, tok, &path, self.config.eval.chat, &cfg, device)?;
            out.insert("eval_exact_match".into(), s.exact_match);
            out.insert("eval_bleu".into(), s.bleu);
            out.insert("eval_rouge_l".into(), s.rouge_l);
        }
        Ok(out)
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
        let new =
            crate::generate::generate(&self.model.valid(), &[ids], &cfg, &self.device, |_, _| {})?
                .remove(0);
        Ok(tok.decode(&new, true)?)
    }

    /// Whether evaluation has anything to run.
    pub fn has_eval(&self) -> bool {
        !self.eval_examples.is_empty()
            || self.config.eval.classification.is_some()
            || self.config.eval.generation.is_some()
    }

    /// Writes checkpoint `step-{state.step}` and prunes old ones.
    pub fn save(&self) -> Result<PathBuf, TrainError> {
        let root = &self.config.output.dir;
        let dir = checkpoint::save(
            root,
            &self.model,
            &self.model_config,
            self.tokenizer.as_ref(),
            &self.optimizer.state(),
            &self.state,
            &self.config.to_toml(),
        )?;
        checkpoint::prune(root, self.config.train.keep_last, &self.best_steps())?;
        Ok(dir)
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
        std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
        std::fs::write(dir.join("config.resolved.toml"), self.config.to_toml())
            .map_err(|e| TrainError::io(&dir, e))?;
        truncate_metrics(&dir, self.state.step)?;
        let mut log = MetricsLog::open(&dir)?;
        let total = self.config.train.max_steps;
        let progress = Progress::new(
            self.state.step,
            total,
            self.config.train.log_every,
            options.quiet,
        );
        let c = &self.model_config;
        let embedding_params =
            c.vocab_size * c.hidden_size * if c.tie_word_embeddings { 1 } else { 2 };
        let flops = flops_per_token(
            self.model.num_params().saturating_sub(embedding_params),
            c.num_hidden_layers,
            c.num_attention_heads,
            c.head_dim(),
            self.config.data.seq_len,
        );
        let peak = options.peak_tflops.or(self.config.output.peak_tflops);
        let mut eval_first = None;
        if self.has_eval() && self.state.step == 0 {
            let m = self.evaluate()?;
            progress.println(&format!("eval before training: {}", fmt_metrics(&m)));
            log.write(&eval_line(0, &m))?;
            self.record_eval(m.clone());
            eval_first = Some(m);
        }
        let (mut tokens, mut seconds, mut last_loss) = (0u64, 0.0f64, f64::NAN);
        let mut stopped_early = false;
        let mut checkpoint = PathBuf::new();
        let eval_every = self.config.train.eval_every;
        let save_every = self.config.train.save_every;
        while self.state.step < total {
            let m = self.train_step()?;
            let step = self.state.step;
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
            line.insert("tokens".into(), json!(m.tokens));
            line.insert("target_tokens".into(), json!(m.target_tokens));
            line.insert("tokens_per_sec".into(), json!(tps));
            // One device per process for now: tokens/s/device (CoLLiE's TGS) equals tokens/s.
            line.insert("tokens_per_sec_per_device".into(), json!(tps));
            line.insert(
                "mfu".into(),
                peak.map_or(Value::Null, |p| json!(tps * flops / (p * 1e12))),
            );
            line.insert("peak_mem_bytes".into(), json!(peak_rss_bytes()));
            line.insert("step_seconds".into(), json!(m.seconds));
            if m.skipped {
                line.insert("skipped".into(), json!(true));
            }
            log.write(&line)?;
            progress.step(
                step,
                total,
                &format!("loss {:.4} lr {:.2e} {:.0} tok/s", m.loss, m.lr, tps),
            );
            if self.has_eval() && eval_every > 0 && step.is_multiple_of(eval_every) && step < total
            {
                let metrics = self.evaluate()?;
                progress.println(&format!("step {step}: {}", fmt_metrics(&metrics)));
                log.write(&eval_line(step, &metrics))?;
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
        let mut eval_last = None;
        if self.has_eval() && !stopped_early {
            let m = self.evaluate()?;
            log.write(&eval_line(self.state.step, &m))?;
            self.record_eval(m.clone());
            eval_last = Some(m);
        } else if let Some((_, m)) = self.state.evals.last() {
            eval_last = Some(m.clone());
        }
        if !checkpoint.ends_with(format!("step-{}", self.state.step)) {
            checkpoint = self.save()?;
        }
        let summary = Summary {
            steps: self.state.step,
            final_loss: last_loss,
            eval_first,
            eval_last,
            tokens,
            train_seconds: seconds,
            tokens_per_sec: tokens as f64 / seconds.max(1e-9),
            peak_rss_bytes: peak_rss_bytes(),
            checkpoint,
            stopped_early,
        };
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

fn fmt_metrics(m: &BTreeMap<String, f64>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k} {v:.4}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn eval_line(step: u64, m: &BTreeMap<String, f64>) -> Map<String, Value> {
    let mut line = Map::new();
    line.insert("step".into(), json!(step));
    for (k, v) in m {
        line.insert(k.clone(), json!(v));
    }
    line
}

/// Keeps the metric lines of steps up to `step` when resuming (dropping those a killed run wrote
/// after its last checkpoint); a fresh run (`step == 0`) starts an empty file.
fn truncate_metrics(dir: &Path, step: u64) -> Result<(), TrainError> {
    let path = dir.join("metrics.jsonl");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(Value::as_u64))
                .is_some_and(|s| step > 0 && s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&path, kept).map_err(|e| TrainError::io(&path, e))
}

fn summary_text(s: &Summary) -> String {
    let mut out = format!(
        "done: {} steps, final loss {:.4}, {} tokens in {:.1} s ({:.0} tokens/s)",
        s.steps, s.final_loss, s.tokens, s.train_seconds, s.tokens_per_sec
    );
    if let (Some(a), Some(b)) = (&s.eval_first, &s.eval_last) {
        if let (Some(x), Some(y)) = (a.get("eval_loss"), b.get("eval_loss")) {
            out.push_str(&format!(", eval_loss {x:.4} -> {y:.4}"));
        }
    }
    if let Some(rss) = s.peak_rss_bytes {
        out.push_str(&format!(
            ", peak RSS {:.0} MiB",
            rss as f64 / (1024.0 * 1024.0)
        ));
    }
    out.push_str(&format!("\ncheckpoint: {}", s.checkpoint.display()));
    out
}

fn write_summary(dir: &Path, s: &Summary) -> Result<(), TrainError> {
    let v = json!({
        "steps": s.steps,
        "final_loss": s.final_loss,
        "eval_first": s.eval_first,
        "eval_last": s.eval_last,
        "tokens": s.tokens,
        "train_seconds": s.train_seconds,
        "tokens_per_sec": s.tokens_per_sec,
        "peak_rss_bytes": s.peak_rss_bytes,
        "checkpoint": s.checkpoint,
        "stopped_early": s.stopped_early,
    });
    collie_io::json::write_json(&dir.join("summary.json"), &v).map_err(TrainError::from)
}

/// Draws `loss.png` from `metrics.jsonl`.
pub fn plot_metrics(dir: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).map_err(|e| e.to_string())?;
    let (mut loss, mut eval, mut lr) = (Vec::new(), Vec::new(), Vec::new());
    for v in text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
    {
        let step = v.get("step").and_then(Value::as_f64).unwrap_or(0.0);
        if let Some(l) = v.get("loss").and_then(Value::as_f64) {
            loss.push((step, l));
        }
        if let Some(l) = v.get("lr").and_then(Value::as_f64) {
            lr.push((step, l));
        }
        if let Some(l) = v.get("eval_loss").and_then(Value::as_f64) {
            eval.push((step, l));
        }
    }
    plot::draw(
        &dir.join("loss.png"),
        &plot::Curves {
            loss: &loss,
            eval_loss: &eval,
            lr: &lr,
        },
    )
}
