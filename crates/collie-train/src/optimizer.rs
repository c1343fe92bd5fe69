//! The optimizer a config names, built with its reference defaults where the config is silent
//! (`docs/optimizers.md`).

use burn::tensor::backend::Backend;
use collie_optim::{
    AdaLomo, AdaLomoConfig, AdamW, AdamWConfig, Adan, AdanConfig, AnyOptimizer, Lion, LionConfig,
    Lomo, LomoConfig, Sgd, SgdConfig, Sophia, SophiaConfig,
};

use crate::config::{OptimName, OptimSection};

/// The optimizer `o` names, with its reference defaults where the config is silent;
/// `max_grad_norm` is the run's clipping threshold (Adan clips its own way).
pub fn build_optimizer<B: Backend>(o: &OptimSection, max_grad_norm: f64) -> AnyOptimizer<B> {
    let betas = o.betas_or_default();
    let weight_decay = o.weight_decay_or_default();
    let decay_filter = o.decay_filter;
    match o.name {
        OptimName::Sgd => AnyOptimizer::Sgd(Sgd::new(SgdConfig {
            momentum: o.momentum,
            dampening: o.dampening,
            weight_decay,
            nesterov: o.nesterov,
            decay_filter,
        })),
        OptimName::Lion => AnyOptimizer::Lion(Lion::new(LionConfig {
            betas: (betas[0], betas[1]),
            weight_decay,
            decay_filter,
        })),
        OptimName::Adan => AnyOptimizer::Adan(Adan::new(AdanConfig {
            betas: (betas[0], betas[1], betas[2]),
            eps: o.eps.unwrap_or(1e-8),
            weight_decay,
            no_prox: o.no_prox,
            // Adan clips with its own coefficient (ε instead of 1e-6), as the reference does.
            max_grad_norm,
            decay_filter,
        })),
        OptimName::SophiaG => AnyOptimizer::Sophia(Sophia::new(SophiaConfig {
            betas: (betas[0], betas[1]),
            rho: o.rho,
            weight_decay,
            decay_filter,
        })),
        OptimName::Lomo => AnyOptimizer::Lomo(Lomo::new(LomoConfig {
            clip_grad_value: o.clip_grad_value,
            weight_decay,
            decay_filter,
        })),
        OptimName::AdaLomo => AnyOptimizer::AdaLomo(AdaLomo::new(AdaLomoConfig {
            loss_scale: o.loss_scale.unwrap_or(1024.0),
            clip_grad_value: o.clip_grad_value,
            weight_decay,
            decay_filter,
            ..Default::default()
        })),
        OptimName::AdamW => AnyOptimizer::AdamW(AdamW::new(AdamWConfig {
            betas: (betas[0], betas[1]),
            eps: o.eps.unwrap_or(1e-8),
            weight_decay,
            decay_filter,
        })),
    }
}
