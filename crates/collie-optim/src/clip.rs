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

/// `(total_norm, coefficient)`: the pre-clipping norm and the factor PyTorch multiplies every
/// gradient by, `min(1, max_norm / (total_norm + 1e-6))`. `max_norm <= 0` disables clipping
/// (coefficient `None`).
pub fn clip_global_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &GradientsParams,
    max_norm: f64,
) -> (f64, Option<f64>) {
    let norm = global_norm(model, grads);
    if max_norm <= 0.0 {
        return (norm, None);
    }
    let coef = (max_norm / (norm + 1e-6)).min(1.0);
    (norm, Some(coef))
}
