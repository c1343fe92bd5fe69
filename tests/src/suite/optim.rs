//! Unit parity of every optimizer with its reference implementation (collie-lm's Lion and Adan,
//! sophia-opt's SophiaG incl. `update_hessian`, lomo-optim's LOMO and AdaLomo): a fixed two-layer
//! stack, 5 steps, fed the reference's own gradients; parameters after every step within
//! [`TOL`] relative. Fixtures: `scripts/fixtures/optim_ref.py`.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use collie_io::module::TensorSource;
use collie_io::safetensors::SafetensorsSource;
use collie_io::HostTensor;
use collie_optim::*;
use collie_optim::{Optimizer, StepInfo};
use serde_json::Value;

use super::Check;
use crate::compare::{max_rel_diff, worst};
use crate::golden::fixture;

/// Largest relative parameter difference from the reference (worst achieved, CPU and wgpu:
/// 9.6e-8, AdaLomo with value clipping).
pub const TOL: f64 = 9e-7;

/// A tensor of rank 1 or 2 (the stack has weights and biases).
enum P<B: Backend> {
    V(Tensor<B, 1>),
    M(Tensor<B, 2>),
}

impl<B: Backend> P<B> {
    fn of(t: HostTensor, d: &B::Device) -> P<B> {
        match t.shape.len() {
            1 => P::V(t.to_tensor(d)),
            _ => P::M(t.to_tensor(d)),
        }
    }
    fn host(&self) -> HostTensor {
        match self {
            P::V(t) => HostTensor::from_tensor(t.clone()),
            P::M(t) => HostTensor::from_tensor(t.clone()),
        }
    }
    fn sq_norm(&self) -> f64 {
        self.host().data.iter().map(|&x| (x as f64).powi(2)).sum()
    }
    fn scaled(&self, s: f64) -> P<B> {
        match self {
            P::V(t) => P::V(t.clone().mul_scalar(s)),
            P::M(t) => P::M(t.clone().mul_scalar(s)),
        }
    }
}

fn update<B: Backend, O: Optimizer<B>>(o: &mut O, path: &str, p: P<B>, g: P<B>, lr: f64) -> P<B> {
    match (p, g) {
        (P::V(p), P::V(g)) => P::V(o.update(path, p, g, lr)),
        (P::M(p), P::M(g)) => P::M(o.update(path, p, g, lr)),
        _ => panic!("rank mismatch"),
    }
}

fn f(c: &Value, k: &str, default: f64) -> f64 {
    c.get(k).and_then(Value::as_f64).unwrap_or(default)
}

fn run_case<B: Backend>(
    name: &str,
    c: &Value,
    names: &[String],
    steps: u64,
    src: &SafetensorsSource,
    device: &B::Device,
) -> f64 {
    let read = |k: String| P::<B>::of(src.read(&k).unwrap_or_else(|e| panic!("{k}: {e}")), device);
    let lr = f(c, "lr", 0.0);
    let wd = f(c, "weight_decay", 0.0);
    let clip_norm = f(c, "clip_grad_norm", 0.0);
    let mut opt: AnyOptimizer<B> = match c["opt"].as_str().unwrap() {
        "lion" => {
            let b = c.get("betas").map_or((0.9, 0.99), |b| {
                (b[0].as_f64().unwrap(), b[1].as_f64().unwrap())
            });
            AnyOptimizer::Lion(Lion::new(LionConfig {
                betas: b,
                weight_decay: wd,
                ..Default::default()
            }))
        }
        "adan" => AnyOptimizer::Adan(Adan::new(AdanConfig {
            weight_decay: wd,
            no_prox: c.get("no_prox").and_then(Value::as_bool).unwrap_or(false),
            max_grad_norm: f(c, "max_grad_norm", 0.0),
            ..Default::default()
        })),
        "sophiag" => {
            let mut s = Sophia::new(SophiaConfig {
                rho: f(c, "rho", 0.04),
                weight_decay: f(c, "weight_decay", 0.1),
                ..Default::default()
            });
            s.set_batch_tokens(f(c, "bs", 5120.0));
            AnyOptimizer::Sophia(s)
        }
        "lomo" => AnyOptimizer::Lomo(Lomo::new(LomoConfig {
            clip_grad_value: f(c, "clip_grad_value", 0.0),
            weight_decay: wd,
            ..Default::default()
        })),
        _ => AnyOptimizer::AdaLomo(AdaLomo::new(AdaLomoConfig {
            clip_grad_value: f(c, "clip_grad_value", 0.0),
            weight_decay: wd,
            ..Default::default()
        })),
    };
    let refresh: Vec<u64> = c
        .get("refresh")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    let mut params: Vec<P<B>> = names
        .iter()
        .map(|n| read(format!("{name}.0.param.{n}")))
        .collect();
    let mut rels = Vec::new();
    for step in 1..=steps {
        let grads: Vec<P<B>> = names
            .iter()
            .map(|n| read(format!("{name}.{step}.grad.{n}")))
            .collect();
        let norm = grads.iter().map(P::sq_norm).sum::<f64>().sqrt();
        // The optimizer's own preparation: Adan's clipping, the fused optimizers' coefficient.
        let info = StepInfo {
            grad_norm: norm,
            max_grad_norm: clip_norm,
            batch_tokens: f(c, "bs", 5120.0),
        };
        let factor = opt.prepare(&info).unwrap_or(1.0);
        // The fused optimizers see the gradient of the scaled loss and divide it back.
        let loss_scale = match &mut opt {
            AnyOptimizer::AdaLomo(_) => 1024.0,
            _ => 1.0,
        };
        params = params
            .into_iter()
            .zip(grads)
            .zip(names)
            .map(|((p, g), n)| update(&mut opt, n, p, g.scaled(loss_scale * factor), lr))
            .collect();
        if refresh.contains(&step) {
            let AnyOptimizer::Sophia(s) = &mut opt else {
                panic!("refresh is SophiaG's")
            };
            s.set_hessian_refresh(true);
            params = params
                .into_iter()
                .zip(names)
                .map(|(p, n)| {
                    let h = read(format!("{name}.{step}.hgrad.{n}"));
                    update(s, n, p, h, lr)
                })
                .collect();
            s.set_hessian_refresh(false);
        }
        for (p, n) in params.iter().zip(names) {
            let want = src.read(&format!("{name}.{step}.param.{n}")).unwrap();
            let got = p.host();
            assert_eq!(got.shape, want.shape, "{name} step {step} {n}: shape");
            rels.push(max_rel_diff(&got.data, &want.data));
        }
    }
    worst(rels)
}

/// Every case of `optim/unit.json`: the worst relative parameter difference over its steps.
pub fn reference<B: Backend>(device: &B::Device) -> Vec<Check> {
    let dir = fixture("optim");
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("unit.json")).unwrap()).unwrap();
    let src = SafetensorsSource::open(&dir.join("unit.safetensors")).unwrap();
    let names: Vec<String> = meta["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let steps = meta["steps"].as_u64().unwrap();
    let cases = meta["cases"].as_object().unwrap();
    assert!(cases.len() >= 13, "optim/unit.json: {} cases", cases.len());
    cases
        .iter()
        .map(|(name, c)| {
            let worst = run_case::<B>(name, c, &names, steps, &src, device);
            Check::new(
                "optim",
                name,
                &format!("parameters max rel Δ over {steps} steps"),
                worst,
                TOL,
            )
        })
        .collect()
}
