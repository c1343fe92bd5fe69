//! The step strategies of the trainer, one per way a step turns its batches into an update:
//! post-backward (accumulate every micro-batch's gradients, or this pipeline stage's, then update
//! once) and fused (LOMO / AdaLomo: each block updated inside the block-wise backward; under
//! pipeline parallelism, the stage's gradients then the fused update). The trainer picks one when
//! it is built ([`Strategy`]).

use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Distribution, ElementConversion, Int, Tensor, TensorData};
use collie_core::loss::cross_entropy_sum;
use collie_core::model::LmHead;
use collie_core::nn::to_dtype;
use collie_data::loader::Batch;
use collie_dist::dp::all_reduce_grads;
use collie_io::family::TrainModel;
use collie_optim::clip::global_norm;
use collie_optim::{AnyOptimizer, Optimizer};

use crate::blockwise::{backward_blockwise, BlockId, Walk};
use crate::eval::{batch_nll_aux, shifted_logits};
use crate::parallel::{add_block, Overlap};
use crate::trainer::Trainer;

/// How a step turns its batches into an update, fixed when the trainer is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Strategy {
    /// Backward over every micro-batch (accumulated), then one optimizer update.
    PostBackward,
    /// LOMO / AdaLomo: each block updated inside the block-wise backward pass.
    Fused,
    /// This rank's pipeline stage over the micro-batches (1F1B), then one update.
    Pipeline,
    /// LOMO / AdaLomo under pipeline parallelism: the stage's gradients, then the fused update.
    FusedPipeline,
}

impl<B: AutodiffBackend, M: TrainModel<B>> Trainer<B, M> {
    /// A step that back-propagates every micro-batch (or this rank's pipeline stage over them),
    /// reduces the gradients over the parallel groups, then updates once: the loss scaler's
    /// overflow check, the optimizer's preparation (clipping coefficient, Adan's own clipping,
    /// SophiaG's batch size), the update, ZeRO's gather, SophiaG's Hessian refresh.
    /// Returns `(summed NLL, gradient norm, skipped)`.
    pub(crate) fn post_backward_step(
        &mut self,
        batches: &[Batch],
        targets: usize,
        lr: f64,
    ) -> (f64, f64, bool) {
        // f16 multiplies the loss by the dynamic scale so small gradients survive the half range.
        let loss_scale = self.loss_scale();
        let scale = loss_scale / targets as f64;
        let aux_scale = self.aux_weight(loss_scale, batches.len());
        let (nll, aux, mut grads) = match &self.pipeline {
            None => {
                let mut acc = GradientsAccumulator::new();
                let (mut nll, mut aux) = (0.0, 0.0);
                let last = batches.len() - 1;
                for (k, b) in batches.iter().enumerate() {
                    // Over data-parallel replicas the last micro-batch's walk sums each block's
                    // gradients (the earlier micro-batches' included) as it leaves the block;
                    // ZeRO-3 sums every micro-batch's, since a replica keeps only its share.
                    let (n, a) = match (self.dist.dims.dp > 1, self.zero3()) {
                        (true, Some(_)) => {
                            self.micro_step_walk(b, scale, aux_scale, true, None, &mut acc)
                        }
                        (true, None) if k == last => {
                            let prior = acc.grads();
                            self.micro_step_walk(b, scale, aux_scale, true, Some(prior), &mut acc)
                        }
                        _ => self.micro_step(b, scale, aux_scale, &mut acc),
                    };
                    nll += n;
                    aux += a;
                }
                (nll, aux, acc.grads())
            }
            Some(_) => self.pipeline_grads(batches, scale, aux_scale),
        };
        self.record_aux(aux, batches.len());
        let nll = self.dp_sum(nll);
        if !self.tp_partial.is_empty() {
            collie_dist::dp::all_reduce_grads_of(
                &self.model,
                &mut grads,
                &self.tp_partial,
                &*self.dist.tp,
                &self.device,
            );
        }
        // Without a pipeline the walks above summed the gradients over the replicas already.
        if self.pipeline.is_some() {
            match &self.zero {
                None => all_reduce_grads(&self.model, &mut grads, &*self.dist.dp, &self.device),
                Some(plan) => {
                    plan.reduce_grads(&self.model, &mut grads, &*self.dist.dp, &self.device)
                }
            }
        }
        let scaled_norm = self.grad_norm(&grads);
        if !scaled_norm.is_finite() {
            // Overflow: skip the update and back off, as torch.cuda.amp.GradScaler does.
            if let Some(scaler) = &self.scaler {
                scaler.overflow(&mut self.state);
            }
            return (nll, scaled_norm, true);
        }
        let grad_norm = scaled_norm / loss_scale;
        self.model = self.update.apply(
            self.model.clone(),
            &mut grads,
            grad_norm,
            loss_scale,
            targets,
            lr,
        );
        if let Some(plan) = self.zero.as_ref().filter(|p| p.stage < 3) {
            // The updated parameters from their owners, a block at a time (one broadcast per
            // owner of the block), so no buffer of the whole model is ever formed.
            let (dp, device, m) = (&*self.dist.dp, &self.device, &mut self.model);
            *m.embed_mut() = plan.gather(m.embed().clone(), dp, device);
            *m.virtual_tokens_mut() = plan.gather(m.virtual_tokens().cloned(), dp, device);
            for i in 0..m.layers().len() {
                m.layers_mut()[i] = plan.gather(m.layers()[i].clone(), dp, device);
            }
            *m.head_mut() = plan.gather(m.head().clone(), dp, device);
        }
        if let Some(scaler) = &self.scaler {
            scaler.good_step(&mut self.state);
        }
        let interval = self.config.optim.hessian_interval;
        if matches!(self.update.optimizer, AnyOptimizer::Sophia(_))
            && interval > 0
            && self.state.step.is_multiple_of(interval)
        {
            self.refresh_hessian(batches);
        }
        (nll, grad_norm, false)
    }

    /// Logit elements per chunk of the block-wise walk's head (`train.head_chunk_mib` of f32).
    fn head_chunk(&self) -> usize {
        match self.config.train.head_chunk_mib {
            0.0 => 0,
            // At least one element: a positive size never reads as "unchunked".
            mib => ((mib * (1 << 20) as f64 / 4.0) as usize).max(1),
        }
    }

    /// The weight of the auxiliary loss (where the model adds one) in a backward pass that sees
    /// the loss times `loss_scale`: the loss is averaged over the global batch's micro-batches,
    /// `local` on each data-parallel replica.
    fn aux_weight(&self, loss_scale: f64, local: usize) -> Option<f64> {
        let micro = (local * self.dist.dims.dp) as f64;
        self.model
            .router_aux_loss_coef()
            .map(|c| c * loss_scale / micro)
    }

    /// The step's auxiliary loss (where the model adds one) from this replica's sum `aux` over
    /// its `local` micro-batches: the mean over the global batch's (a collective over the
    /// data-parallel group).
    fn record_aux(&mut self, aux: f64, local: usize) {
        if self.model.router_aux_loss_coef().is_some() {
            let micro = (local * self.dist.dims.dp) as f64;
            self.step_aux = Some(self.dp_sum(aux) / micro);
        }
    }

    /// Summed NLL, auxiliary loss (0 without one) and gradients of one micro-batch; the
    /// backward pass sees `nll · scale + aux · aux_scale`. Gradients stay this replica's own
    /// (under ZeRO-3 they are summed onto their owners: a replica holds only its share).
    pub(crate) fn micro_step(
        &self,
        batch: &Batch,
        scale: f64,
        aux_scale: Option<f64>,
        acc: &mut GradientsAccumulator<M>,
    ) -> (f64, f64) {
        if self.config.train.activation_checkpointing || self.zero3().is_some() {
            let reduce = self.zero3().is_some();
            return self.micro_step_walk(batch, scale, aux_scale, reduce, None, acc);
        }
        let model = self.in_compute_dtype(self.model.clone());
        let (sum, aux) = batch_nll_aux(&model, batch, &self.device);
        let nll = sum.clone().inner().into_scalar().elem::<f64>();
        let mut loss = sum.mul_scalar(scale);
        let mut aux_value = 0.0;
        if let (Some(aux), Some(aux_scale)) = (aux, aux_scale) {
            aux_value = aux.clone().inner().into_scalar().elem::<f64>();
            loss = loss + aux.mul_scalar(aux_scale);
        }
        let grads = loss.backward();
        // Gradients are read off the f32 masters (the casts' backward brings them there).
        acc.accumulate(&self.model, GradientsParams::from_grads(grads, &self.model));
        (nll, aux_value)
    }

    /// [`Trainer::micro_step`] as the block-wise walk, accumulating each block's gradients into
    /// `acc`; with activation checkpointing (and always under ZeRO-3, which gathers each block
    /// again for its backward) only block inputs are kept and blocks recomputed. With `reduce`,
    /// each block's gradients — plus that block's in `prior`, the step's earlier micro-batches'
    /// — are summed over the data-parallel group as the walk leaves the block (onto their owners
    /// under ZeRO), overlapped with the next blocks' backward ([`Overlap`]).
    pub(crate) fn micro_step_walk(
        &self,
        batch: &Batch,
        scale: f64,
        aux_scale: Option<f64>,
        reduce: bool,
        mut prior: Option<GradientsParams>,
        acc: &mut GradientsAccumulator<M>,
    ) -> (f64, f64) {
        let (model, dp, device) = (&self.model, &*self.dist.dp, &self.device);
        let mut overlap =
            Overlap::<B>::new(dp, self.zero.as_ref(), self.config.parallel.overlap, device);
        let mut reduced = Vec::new();
        let out = backward_blockwise(
            model.clone(),
            batch,
            Walk {
                compute: self.compute,
                scale,
                recompute: self.config.train.activation_checkpointing,
                aux: aux_scale,
                gather: self.gather(),
                head_chunk: self.head_chunk(),
            },
            device,
            None,
            |block, mut grads| {
                if let Some(prior) = prior.as_mut() {
                    add_block(model, block, prior, &mut grads);
                }
                match reduce {
                    true => reduced.extend(overlap.push(model, block, grads)),
                    false => acc.accumulate(model, grads),
                }
            },
        );
        for (_, grads) in reduced.into_iter().chain(overlap.finish()) {
            acc.accumulate(model, grads);
        }
        out
    }

    /// SophiaG's Hessian refresh (the official training loop's Gauss-Newton-Bartlett estimator):
    /// labels sampled from the model's own softmax at every target position of `batches`
    /// (Gumbel-max, seeded by `train.seed` and the step), the mean NLL of those labels
    /// back-propagated, and its gradient fed to `update_hessian`.
    pub(crate) fn refresh_hessian(&mut self, batches: &[Batch]) {
        let device = self.device.clone();
        // Each replica samples its own labels (a different stream per data-parallel rank).
        let stream = (self.dist.coords.dp as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        B::seed(
            &device,
            self.config.train.seed.wrapping_add(self.state.step) ^ stream,
        );
        let local: usize = batches.iter().map(Batch::target_tokens).sum();
        let count = self.dp_sum(local as f64);
        let mut acc = GradientsAccumulator::new();
        for batch in batches {
            let model = self.in_compute_dtype(self.model.clone());
            let logits = shifted_logits(&model, batch, &device);
            let [n, vocab] = logits.dims();
            let noise = Tensor::<B::InnerBackend, 2>::random(
                [n, vocab],
                Distribution::Uniform(1e-20, 1.0),
                &device,
            );
            let gumbel = noise.log().neg().log().neg();
            let sampled = (to_dtype(logits.clone().inner(), DType::F32) + gumbel)
                .argmax(1)
                .into_data()
                .convert::<i64>()
                .into_vec::<i64>()
                .expect("sampled ids");
            let labels: Vec<i64> = batch
                .shifted_labels()
                .zip(sampled)
                .map(|(l, y)| if l == -100 { -100 } else { y })
                .collect();
            let labels = Tensor::<B, 1, Int>::from_data(TensorData::new(labels, [n]), &device);
            let (sum, _) = cross_entropy_sum(logits, labels);
            let grads = sum.div_scalar(count).backward();
            acc.accumulate(&self.model, GradientsParams::from_grads(grads, &self.model));
        }
        let mut grads = acc.grads();
        match &self.zero {
            None => all_reduce_grads(&self.model, &mut grads, &*self.dist.dp, &device),
            Some(plan) => plan.reduce_grads(&self.model, &mut grads, &*self.dist.dp, &device),
        }
        let AnyOptimizer::Sophia(sophia) = &mut self.update.optimizer else {
            return;
        };
        sophia.set_hessian_refresh(true);
        self.model = collie_optim::apply(self.model.clone(), &mut grads, sophia, 0.0, None);
        sophia.set_hessian_refresh(false);
    }

    /// This stage's gradients of one pipelined step (1F1B over `batches`, each micro-batch's NLL
    /// scaled by `scale`, its auxiliary loss, where the model adds one, by `aux_scale`), and the
    /// step's summed NLL and auxiliary loss (over the stages).
    pub(crate) fn pipeline_grads(
        &mut self,
        batches: &[Batch],
        scale: f64,
        aux_scale: Option<f64>,
    ) -> (f64, f64, GradientsParams) {
        let (stage, _) = self.pipeline.as_ref().expect("a pipeline");
        let crate::pipeline::StageStep {
            nll,
            aux,
            mut grads,
            waited,
        } = crate::pipeline::step(
            &self.model,
            stage,
            batches,
            self.compute,
            scale,
            aux_scale,
            &*self.dist.pp,
            &self.device,
        );
        self.pp_wait = waited;
        // Where the last stage holds a tied table alone, the lookups' share came back to it.
        if self.model.head().is_tied()
            && self.model.embed().weight.is_require_grad()
            && !stage.rows_from_last
        {
            // A tied table is used by the first stage (lookup) and the last (head): both copies
            // get the sum of the two gradients. A frozen one (a PEFT base) has none: registering
            // a zero gradient would exchange a vocabulary-sized buffer every step and hand the
            // optimizer a parameter it must not touch.
            let id = self.model.embed().weight.id;
            if grads.get::<B::InnerBackend, 2>(id).is_none() {
                // A middle stage holds a placeholder: the zeros take the table's real shape.
                let plan = self.stage_plan.as_ref().expect("a pipeline's plan");
                let shape: [usize; 2] = plan
                    .shape_of(&id)
                    .and_then(|s| s.try_into().ok())
                    .expect("the embedding table is 2-D");
                grads.register(id, Tensor::<B::InnerBackend, 2>::zeros(shape, &self.device));
            }
            collie_dist::dp::all_reduce_grads_of(
                &self.model,
                &mut grads,
                &[id].into_iter().collect(),
                &*self.dist.pp,
                &self.device,
            );
        }
        // Only the last stage computed the loss; each stage its layers' share of the auxiliary.
        let mut v = [nll, aux];
        self.dist.pp.all_reduce_sum_f64(&mut v);
        (v[0], v[1], grads)
    }

    /// One LOMO/AdaLomo step on `batch`: an optional measuring pass (global gradient norm for
    /// clipping, overflow check under f16 loss scaling), then the updating pass, both block-wise,
    /// so no more than one block's gradients (plus a tied embedding's head share) exist at a time;
    /// a tied embedding is updated once, with the sum of its two shares (see `blockwise`).
    /// Returns `(summed NLL, gradient norm or NaN when not measured, skipped)`.
    pub(crate) fn fused_step(
        &mut self,
        batch: &Batch,
        targets: usize,
        lr: f64,
    ) -> (f64, f64, bool) {
        let loss_scale = self
            .update
            .optimizer
            .static_loss_scale()
            .unwrap_or_else(|| self.loss_scale());
        let fused = self.update.optimizer.fused().expect("fused optimizer");
        fused.loss_scale = loss_scale;
        fused.clip_coef = None;
        let scale = loss_scale / targets as f64;
        let device = self.device.clone();
        // Field borrows, not `self.gather()`: the walk below borrows the model and the
        // optimizer mutably.
        let zero3 = self.zero.as_ref().filter(|p| p.stage >= 3);
        let walk = Walk {
            compute: self.compute,
            scale,
            // ZeRO-3 gathers each block again for its backward: it recomputes the block too.
            recompute: self.config.train.activation_checkpointing || zero3.is_some(),
            // One micro-batch per replica.
            aux: self.aux_weight(loss_scale, 1),
            gather: zero3.map(|plan| crate::blockwise::Gather {
                plan,
                group: &*self.dist.dp,
            }),
            head_chunk: self.head_chunk(),
        };
        let max_norm = self.config.train.max_grad_norm;
        let overlap_on = self.config.parallel.overlap;
        let mut grad_norm = f64::NAN;
        if max_norm > 0.0 || self.scaler.is_some() {
            // Measuring pass: the norm of every parameter's gradient, nothing updated.
            let mut squares = 0.0f64;
            let (hook, model, dp) = (&mut self.grad_hook, &self.model, &*self.dist.dp);
            let mut overlap = Overlap::<B>::new(dp, zero3, overlap_on, &device);
            let mut measure = |done: Vec<(BlockId, GradientsParams)>| {
                for (block, grads) in done {
                    let norm = match block {
                        BlockId::Head => global_norm(model.head(), &grads),
                        BlockId::Layer(i) => global_norm(&model.layers()[i], &grads),
                        BlockId::Embed => global_norm(model.embed(), &grads)
                            .hypot(global_norm(&model.virtual_tokens().cloned(), &grads)),
                    };
                    squares += norm * norm;
                }
            };
            backward_blockwise(
                model.clone(),
                batch,
                walk,
                &device,
                hook.as_mut(),
                |block, grads| measure(overlap.push(model, block, grads)),
            );
            measure(overlap.finish());
            if zero3.is_some() {
                // Each replica measured the gradients it owns.
                squares = self.dp_sum(squares);
            }
            let norm = squares.sqrt() / loss_scale;
            if !norm.is_finite() {
                // Overflow under f16: skip the step and back off (lomo-optim's scaler).
                if let Some(scaler) = &self.scaler {
                    scaler.overflow(&mut self.state);
                }
                return (f64::NAN, norm, true);
            }
            grad_norm = norm;
            let info = self.update.info(norm, targets);
            self.update.optimizer.prepare(&info);
        }
        // Updating pass: each block is updated as soon as its gradients exist.
        let (optimizer, hook, target) = (
            &mut self.update.optimizer,
            &mut self.grad_hook,
            &mut self.model,
        );
        // Each block is updated when its summed gradients arrive ([`Overlap`]): the walk holds
        // its own copy of the model, so a block updated late changes nothing it computes.
        let mut overlap = Overlap::<B>::new(&*self.dist.dp, zero3, overlap_on, &device);
        let mut done = Vec::new();
        let (nll, aux) = backward_blockwise(
            target.clone(),
            batch,
            walk,
            &device,
            hook.as_mut(),
            |block, grads| {
                for (block, grads) in overlap.push(&*target, block, grads) {
                    update_block(target, optimizer, block, grads, lr);
                }
            },
        );
        done.extend(overlap.finish());
        for (block, grads) in done {
            update_block(target, optimizer, block, grads, lr);
        }
        let nll = self.dp_sum(nll);
        self.record_aux(aux, 1);
        if let Some(scaler) = &self.scaler {
            scaler.good_step(&mut self.state);
        }
        (nll, grad_norm, false)
    }

    /// LOMO / AdaLomo under pipeline parallelism: the stage's gradients of the pipelined step,
    /// then the fused update of every parameter with the clipping coefficient of the global norm
    /// (the same update as the block-wise walk of one process, with a stage's gradients alive at
    /// once instead of a block's). Returns `(summed NLL, gradient norm, skipped)`.
    pub(crate) fn fused_pipeline_step(
        &mut self,
        batches: &[Batch],
        targets: usize,
        lr: f64,
    ) -> (f64, f64, bool) {
        let loss_scale = self.update.optimizer.static_loss_scale().unwrap_or(1.0);
        let aux_scale = self.aux_weight(loss_scale, batches.len());
        let (nll, aux, mut grads) =
            self.pipeline_grads(batches, loss_scale / targets as f64, aux_scale);
        let nll = self.dp_sum(nll);
        self.record_aux(aux, batches.len());
        all_reduce_grads(&self.model, &mut grads, &*self.dist.dp, &self.device);
        let norm = self.grad_norm(&grads) / loss_scale;
        self.update
            .optimizer
            .fused()
            .expect("fused optimizer")
            .loss_scale = loss_scale;
        let info = self.update.info(norm, targets);
        self.update.optimizer.prepare(&info);
        self.model = collie_optim::apply(
            self.model.clone(),
            &mut grads,
            &mut self.update.optimizer,
            lr,
            None,
        );
        (nll, norm, false)
    }
}

/// LOMO / AdaLomo's update of one block of `target` with its gradients.
fn update_block<B: AutodiffBackend, M: TrainModel<B>>(
    target: &mut M,
    optimizer: &mut AnyOptimizer<B::InnerBackend>,
    block: BlockId,
    mut grads: GradientsParams,
    lr: f64,
) {
    let path = block.path();
    match block {
        BlockId::Head => {
            *target.head_mut() = collie_optim::apply_at(
                &path,
                target.head().clone(),
                &mut grads,
                optimizer,
                lr,
                None,
            );
        }
        BlockId::Layer(i) => {
            target.layers_mut()[i] = collie_optim::apply_at(
                &path,
                target.layers()[i].clone(),
                &mut grads,
                optimizer,
                lr,
                None,
            );
        }
        BlockId::Embed => {
            *target.embed_mut() = collie_optim::apply_at(
                &path,
                target.embed().clone(),
                &mut grads,
                optimizer,
                lr,
                None,
            );
            // Prompt learning's virtual tokens belong to the embedding stage.
            *target.virtual_tokens_mut() = collie_optim::apply_at(
                "virtual_tokens",
                target.virtual_tokens().cloned(),
                &mut grads,
                optimizer,
                lr,
                None,
            );
        }
    }
}
