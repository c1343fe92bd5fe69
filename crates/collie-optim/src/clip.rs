//! Global-norm gradient clipping, as `torch.nn.utils.clip_grad_norm_`.

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};

struct SquaredNorm<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    sum: Option<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SquaredNorm<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            let sq = g.square().sum();
            self.sum = Some(match self.sum.take() {
                Some(s) => s + sq,
                None => sq,
            });
        }
    }
}

/// The L2 norm of all gradients of `model` taken together.
pub fn global_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &GradientsParams,
) -> f64 {
    let mut v = SquaredNorm::<B> { grads, sum: None };
    model.visit(&mut v);
    v.sum.map_or(0.0, |s| s.into_scalar().elem::<f64>().sqrt())
}

/// The ε of `torch.nn.utils.clip_grad_norm_` (and lomo-optim's clipping).
pub const TORCH_CLIP_EPS: f64 = 1e-6;

/// The factor every gradient is multiplied by when their global norm is `norm`:
/// `min(1, max_norm / (norm + eps))` (`eps` = [`TORCH_CLIP_EPS`] for PyTorch; Adan uses its own).
/// The one clipping coefficient of the project.
pub fn clip_coefficient(norm: f64, max_norm: f64, eps: f64) -> f64 {
    (max_norm / (norm + eps)).min(1.0)
}

/// `(total_norm, coefficient)`: the pre-clipping norm and PyTorch's [`clip_coefficient`].
/// `max_norm <= 0` disables clipping (coefficient `None`).
pub fn clip_global_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &GradientsParams,
    max_norm: f64,
) -> (f64, Option<f64>) {
    let norm = global_norm(model, grads);
    let coef = (max_norm > 0.0).then(|| clip_coefficient(norm, max_norm, TORCH_CLIP_EPS));
    (norm, coef)
}
