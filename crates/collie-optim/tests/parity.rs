//! Unit parity of every optimizer with its reference implementation (collie-lm's Lion and Adan,
//! sophia-opt's SophiaG incl. `update_hessian`, lomo-optim's LOMO and AdaLomo): a fixed two-layer
//! stack, 5 steps, fed the reference's own gradients; parameters after every step within 1e-6
//! relative. Fixtures: `scripts/fixtures/optim_ref.py`.

use std::path::PathBuf;

use burn::backend::Flex;
use burn::tensor::Tensor;
use collie_io::module::TensorSource;
use collie_io::safetensors::SafetensorsSource;
use collie_io::HostTensor;
use collie_optim::lomo::clip_coefficient;
use collie_optim::*;
use serde_json::Value;

type B = Flex;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/optim")
}

/// A tensor of rank 1 or 2 (the stack has weights and biases).
enum P {
    V(Tensor<B, 1>),
    M(Tensor<B, 2>),
}

impl P {
    fn of(t: HostTensor) -> P {
        let d = Default::default();
        match t.shape.len() {
            1 => P::V(t.to_tensor(&d)),
            _ => P::M(t.to_tensor(&d)),
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
    fn scaled(&self, s: f64) -> P {
        match self {
            P::V(t) => P::V(t.clone().mul_scalar(s)),
            P::M(t) => P::M(t.clone().mul_scalar(s)),
        }
    }
}

fn update<O: Optimizer<B>>(o: &mut O, path: &str, p: P, g: P, lr: f64) -> P {
    match (p, g) {
        (P::V(p), P::V(g)) => P::V(o.update(path, p, g, lr)),
        (P::M(p), P::M(g)) => P::M(o.update(path, p, g, lr)),
        _ => panic!("rank mismatch"),
    }
}

fn f(c: &Value, k: &str, default: f64) -> f64 {
    c.get(k).and_then(Value::as_f64).unwrap_or(default)
}

fn run_case(name: &str, c: &Value, names: &[String], steps: u64, src: &SafetensorsSource) -> f64 {
    let read = |k: String| P::of(src.read(&k).unwrap_or_else(|e| panic!("{k}: {e}")));
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
    let mut params: Vec<P> = names
        .iter()
        .map(|n| read(format!("{name}.0.param.{n}")))
        .collect();
    let mut worst = 0.0f64;
    for step in 1..=steps {
        let grads: Vec<P> = names
            .iter()
            .map(|n| read(format!("{name}.{step}.grad.{n}")))
            .collect();
        let norm = grads.iter().map(P::sq_norm).sum::<f64>().sqrt();
        if let AnyOptimizer::Adan(a) = &mut opt {
            let clip = a.clip_coefficient(norm);
            a.set_clip(clip);
        }
        // The fused optimizers see the gradient of the scaled loss and divide it back.
        let loss_scale = match &mut opt {
            AnyOptimizer::AdaLomo(_) => 1024.0,
            _ => 1.0,
        };
        if let Some(fused) = opt.fused() {
            fused.clip_coef = (clip_norm > 0.0).then(|| clip_coefficient(norm, clip_norm));
        }
        params = params
            .into_iter()
            .zip(grads)
            .zip(names)
            .map(|((p, g), n)| update(&mut opt, n, p, g.scaled(loss_scale), lr))
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
            let scale = want.data.iter().fold(0.0f64, |m, &x| m.max(x.abs() as f64));
            let diff = got
                .data
                .iter()
                .zip(&want.data)
                .fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
            let rel = diff / scale;
            worst = worst.max(rel);
            assert!(
                rel <= 1e-6,
                "{name} step {step} {n}: max |Δ| {diff:.3e} (relative {rel:.3e})"
            );
        }
    }
    worst
}

#[test]
fn optimizers_match_reference_implementations() {
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("unit.json")).unwrap())
            .unwrap();
    let src = SafetensorsSource::open(&fixtures().join("unit.safetensors")).unwrap();
    let names: Vec<String> = meta["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let steps = meta["steps"].as_u64().unwrap();
    let cases = meta["cases"].as_object().unwrap();
    assert!(cases.len() >= 13);
    for (name, c) in cases {
        let worst = run_case(name, c, &names, steps, &src);
        println!("{name}: parameters within {worst:.2e} relative over {steps} steps");
    }
}

/// Checkpointed state restores the exact trajectory: 2 steps, save, reload into a fresh optimizer,
/// 3 more steps == 5 uninterrupted steps.
#[test]
fn state_round_trip_continues_exactly() {
    let d = Default::default();
    let make = |k: &str| -> AnyOptimizer<B> {
        match k {
            "lion" => AnyOptimizer::Lion(Lion::new(LionConfig::default())),
            "adan" => AnyOptimizer::Adan(Adan::new(AdanConfig::default())),
            "sophiag" => AnyOptimizer::Sophia(Sophia::new(SophiaConfig::default())),
            _ => AnyOptimizer::AdaLomo(AdaLomo::new(AdaLomoConfig::default())),
        }
    };
    let w0 = Tensor::<B, 2>::from_floats([[0.5, -0.2, 0.1], [0.3, 0.8, -0.6]], &d);
    let b0 = Tensor::<B, 1>::from_floats([0.1, -0.4, 0.2], &d);
    let grad = |s: usize| {
        let s = s as f64;
        (
            Tensor::<B, 2>::from_floats([[0.1, -0.3, 0.2], [0.05, 0.4, -0.1]], &d)
                .mul_scalar(1.0 + s),
            Tensor::<B, 1>::from_floats([0.2, -0.1, 0.3], &d).mul_scalar(1.0 - 0.3 * s),
        )
    };
    for k in ["lion", "adan", "sophiag", "adalomo"] {
        let run = |opt: &mut AnyOptimizer<B>,
                   w: Tensor<B, 2>,
                   b: Tensor<B, 1>,
                   from: usize,
                   to: usize| {
            let (mut w, mut b) = (w, b);
            for s in from..to {
                let (gw, gb) = grad(s);
                w = opt.update("w", w, gw, 1e-2);
                b = opt.update("b", b, gb, 1e-2);
            }
            (w, b)
        };
        let mut full = make(k);
        let (w_full, _) = run(&mut full, w0.clone(), b0.clone(), 0, 5);
        let mut first = make(k);
        let (w, b) = run(&mut first, w0.clone(), b0.clone(), 0, 2);
        let mut second = make(k);
        Optimizer::<B>::load_state(&mut second, Optimizer::<B>::state(&first), &d).unwrap();
        let (w_resumed, _) = run(&mut second, w, b, 2, 5);
        let (a, b) = (
            HostTensor::from_tensor(w_full),
            HostTensor::from_tensor(w_resumed),
        );
        assert_eq!(a, b, "{k}: resumed trajectory differs");
        // Another optimizer's state is refused.
        let mut other = make(if k == "lion" { "adan" } else { "lion" });
        assert!(Optimizer::<B>::load_state(&mut other, Optimizer::<B>::state(&first), &d).is_err());
    }
}
