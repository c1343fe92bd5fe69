//! AdaLomo (Lv et al. 2023, "AdaLomo: Low-memory Optimization with Adaptive Learning Rate"), with
//! the update of the official `lomo-optim` package (`AdaLomo.fuse_update`), t counted from 1:
//!
//! ```text
//! ĝ = g / S            (static loss scale S = 2¹⁰, applied in every precision), then value and
//!                      norm clipping as LOMO ([`crate::lomo::FusedGrad`])
//! β2ₜ = 1 − t^c        (c = −0.8; β2₁ = 0)
//! U = ĝ² + ε1
//! matrix:  R ← β2ₜ·R + (1 − β2ₜ)·mean_cols(U)    C ← β2ₜ·C + (1 − β2ₜ)·mean_rows(U)
//!          Û = ĝ ⊙ (R / mean(R))^(−1/2) ⊗ C^(−1/2)
//! vector:  V ← β2ₜ·V + (1 − β2ₜ)·U,  Û = ĝ / sqrt(V)
//! Û ← Û / max(1, RMS(Û)/d)                  (update clipping, d = 1)
//! α = lr · max(ε2, RMS(θ))                   (relative step size)
//! θ ← θ·(1 − α·wd) − α·Û
//! ```
//!
//! R runs over the first axis of the parameter *as stored*. collie stores a linear weight as
//! `[in, out]`, the transpose of PyTorch's `[out, in]`, so for those R and C trade places with
//! lomo-optim's row and column vectors; the update is the same because `R_i·C_j / mean(R)` is
//! symmetric (`mean(R) = mean(C) = EMA of mean(U)`). Unlike CoLLiE, the moments are part of
//! [`Optimizer::state`] and so of every checkpoint.

use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor};
use serde::{Deserialize, Serialize};

use crate::lomo::FusedGrad;
use crate::state::{OptimizerState, StateError};
use crate::{DecayFilter, Optimizer};
use collie_io::HostTensor;

/// AdaLomo hyper-parameters (lomo-optim defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdaLomoConfig {
    /// Static loss scale S.
    pub loss_scale: f64,
    /// `(ε1, ε2)`: added to ĝ², and the floor of RMS(θ) in the step size.
    pub eps: (f64, f64),
    /// Update clipping threshold d.
    pub clip_threshold: f64,
    /// Exponent c of `β2ₜ = 1 − t^c`.
    pub decay_rate: f64,
    /// Element-wise gradient bound (`0` = off).
    pub clip_grad_value: f64,
    /// Weight decay, scaled by the relative step size.
    pub weight_decay: f64,
    /// Which parameters decay.
    pub decay_filter: DecayFilter,
}

impl Default for AdaLomoConfig {
    fn default() -> Self {
        AdaLomoConfig {
            loss_scale: 1024.0,
            eps: (1e-30, 1e-3),
            clip_threshold: 1.0,
            decay_rate: -0.8,
            clip_grad_value: 0.0,
            weight_decay: 0.0,
            decay_filter: DecayFilter::All,
        }
    }
}

/// Second moments of one parameter: factored for matrices, full for vectors.
enum Moments<B: Backend> {
    Factored {
        row: Tensor<B, 1>,
        col: Tensor<B, 1>,
    },
    Full(Tensor<B, 1>),
}

/// AdaLomo with factored second moments.
pub struct AdaLomo<B: Backend> {
    config: AdaLomoConfig,
    /// How this step's gradients are unscaled and clipped (`loss_scale` is the static S).
    pub fused: FusedGrad,
    moments: std::collections::BTreeMap<String, Moments<B>>,
    steps: std::collections::BTreeMap<String, u64>,
}

impl<B: Backend> AdaLomo<B> {
    /// The static loss scale `S` the backward pass sees the loss multiplied by.
    pub fn static_loss_scale(&self) -> f64 {
        self.config.loss_scale
    }

    /// A fresh optimizer.
    pub fn new(config: AdaLomoConfig) -> Self {
        AdaLomo {
            fused: FusedGrad {
                loss_scale: config.loss_scale,
                clip_value: config.clip_grad_value,
                clip_coef: None,
            },
            config,
            moments: Default::default(),
            steps: Default::default(),
        }
    }
}

fn rms<B: Backend>(t: &Tensor<B, 1>) -> f64 {
    let n = t.dims()[0] as f64;
    t.clone().square().sum().into_scalar().elem::<f64>().sqrt() / n.sqrt()
}

impl<B: Backend> Optimizer<B> for AdaLomo<B> {
    /// AdaLomo clips inside the block-wise backward, like LOMO.
    fn prepare(&mut self, step: &crate::StepInfo) -> Option<f64> {
        self.fused.clip_coef = self.fused.coefficient(step);
        None
    }

    fn update<const D: usize>(
        &mut self,
        path: &str,
        param: Tensor<B, D>,
        grad: Tensor<B, D>,
        lr: f64,
    ) -> Tensor<B, D> {
        let c = &self.config;
        let shape = param.shape();
        let n = shape.num_elements();
        let t = self.steps.get(path).copied().unwrap_or(0) + 1;
        let beta = 1.0 - (t as f64).powf(c.decay_rate);
        let g = self.fused.apply(grad);
        // [rows, cols] for matrices (leading axes folded into rows), [n] for vectors.
        let cols = if D > 1 { param.dims()[D - 1] } else { n };
        let rows = n / cols;
        let g2 = g.reshape([rows, cols]);
        let u = g2.clone().square().add_scalar(c.eps.0);
        let (update, moments) = if D > 1 {
            let (row, col) = match self.moments.remove(path) {
                Some(Moments::Factored { row, col }) => (row, col),
                _ => (
                    Tensor::zeros([rows], &g2.device()),
                    Tensor::zeros([cols], &g2.device()),
                ),
            };
            let row =
                row.mul_scalar(beta) + u.clone().mean_dim(1).reshape([rows]).mul_scalar(1.0 - beta);
            let col = col.mul_scalar(beta) + u.mean_dim(0).reshape([cols]).mul_scalar(1.0 - beta);
            // rsqrt(R / mean(R)) ⊗ rsqrt(C)
            let r_factor = (row.clone() / row.clone().mean().unsqueeze::<1>())
                .sqrt()
                .recip()
                .reshape([rows, 1]);
            let c_factor = col.clone().sqrt().recip().reshape([1, cols]);
            let update = (r_factor * c_factor) * g2;
            (update.reshape([n]), Moments::Factored { row, col })
        } else {
            let v = match self.moments.remove(path) {
                Some(Moments::Full(v)) => v,
                _ => Tensor::zeros([n], &g2.device()),
            };
            let v = v.mul_scalar(beta) + u.reshape([n]).mul_scalar(1.0 - beta);
            let update = v.clone().sqrt().recip() * g2.reshape([n]);
            (update, Moments::Full(v))
        };
        let denom = (rms(&update) / c.clip_threshold).max(1.0);
        let update = update.div_scalar(denom);
        let theta = param.reshape([n]);
        let alpha = lr * c.eps.1.max(rms(&theta));
        let wd = c.decay_filter.rate(D, c.weight_decay);
        let theta = if wd > 0.0 {
            theta.mul_scalar(1.0 - alpha * wd)
        } else {
            theta
        };
        let theta = theta - update.mul_scalar(alpha);
        self.moments.insert(path.to_string(), moments);
        self.steps.insert(path.to_string(), t);
        theta.reshape(shape)
    }

    fn state(&self) -> OptimizerState {
        let mut out = OptimizerState {
            counters: self.steps.clone(),
            ..Default::default()
        };
        for (path, m) in &self.moments {
            match m {
                Moments::Factored { row, col } => {
                    out.tensors.insert(
                        format!("{path}.exp_avg_sq_row"),
                        HostTensor::from_tensor(row.clone()),
                    );
                    out.tensors.insert(
                        format!("{path}.exp_avg_sq_col"),
                        HostTensor::from_tensor(col.clone()),
                    );
                }
                Moments::Full(v) => {
                    out.tensors.insert(
                        format!("{path}.exp_avg_sq"),
                        HostTensor::from_tensor(v.clone()),
                    );
                }
            }
        }
        out
    }

    fn load_state(&mut self, state: OptimizerState, device: &B::Device) -> Result<(), StateError> {
        let mut tensors = state.tensors;
        let mut moments = std::collections::BTreeMap::new();
        let mut take = |key: String| {
            tensors.remove(&key).map(|t| {
                let n = t.data.len();
                HostTensor::new(vec![n], t.data).to_tensor::<B, 1>(device)
            })
        };
        for path in state.counters.keys() {
            let m = match take(format!("{path}.exp_avg_sq")) {
                Some(v) => Moments::Full(v),
                None => {
                    let row = take(format!("{path}.exp_avg_sq_row"));
                    let col = take(format!("{path}.exp_avg_sq_col"));
                    match (row, col) {
                        (Some(row), Some(col)) => Moments::Factored { row, col },
                        _ => {
                            return Err(StateError(format!(
                                "missing AdaLomo moments of `{path}` (exp_avg_sq or exp_avg_sq_row/col)"
                            )))
                        }
                    }
                }
            };
            moments.insert(path.clone(), m);
        }
        if let Some(extra) = tensors.keys().next() {
            return Err(StateError(format!(
                "unexpected tensor `{extra}` (another optimizer's state?)"
            )));
        }
        self.moments = moments;
        self.steps = state.counters;
        Ok(())
    }
}
