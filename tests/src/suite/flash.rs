//! Memory-efficient attention (`collie_core::flash`) against the naive path: outputs and the
//! gradients of q, k and v (relative, f32; bounds below). Cases cover MHA, GQA and MQA, head widths
//! 8–64, left padding, packed documents, Mistral's window, a KV cache (`s_q < s_k`), prompt
//! tuning's shared slots, no mask, and lengths that are not a multiple of the kernels' tiles;
//! then the tiny LLaMA fixtures with `attention = flash` (logits and every parameter gradient).

use burn::backend::Autodiff;
use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use collie_core::attention::{attention, AttentionKind, AttnMask};
use collie_core::device::RegisterOps;

use super::{max_rel, Check};
use crate::golden::{fixture, read_golden, LLAMA_CASES};

/// Largest relative difference of an output or q/k/v gradient, and of the tiny LLaMAs' logits
/// (worst achieved, CPU and wgpu: 6.9e-7).
pub const OP_TOL: f64 = 5e-6;
/// Largest relative difference of a parameter gradient of the tiny LLaMAs (worst achieved: 2.4e-6).
pub const GRAD_TOL: f64 = 1.5e-5;

/// One attention call's shape and mask.
struct Case {
    name: &'static str,
    batch: usize,
    heads: usize,
    kv_heads: usize,
    s_q: usize,
    s_k: usize,
    d: usize,
    /// Segment ids `[batch, s_k]` row-major, or none.
    segments: Option<Vec<i64>>,
    window: Option<usize>,
    shared: usize,
    masked: bool,
}

fn cases() -> Vec<Case> {
    let padded = |b: usize, s: usize, pad: &[usize]| -> Vec<i64> {
        (0..b)
            .flat_map(|r| (0..s).map(move |j| i64::from(j >= pad[r])))
            .collect()
    };
    let docs: Vec<i64> = [1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 0, 0, 0]
        .into_iter()
        .chain([1; 9].into_iter().chain([2; 11]))
        .collect();
    let base = || Case {
        name: "",
        batch: 2,
        heads: 4,
        kv_heads: 2,
        s_q: 37,
        s_k: 37,
        d: 16,
        segments: None,
        window: None,
        shared: 0,
        masked: true,
    };
    vec![
        Case {
            name: "mha causal",
            heads: 3,
            kv_heads: 3,
            ..base()
        },
        Case {
            name: "gqa left padding",
            segments: Some(padded(2, 37, &[0, 5])),
            ..base()
        },
        Case {
            name: "mqa d64",
            heads: 3,
            kv_heads: 1,
            d: 64,
            s_q: 45,
            s_k: 45,
            segments: Some(padded(2, 45, &[3, 0])),
            ..base()
        },
        Case {
            name: "packed documents + window",
            s_q: 20,
            s_k: 20,
            segments: Some(docs),
            window: Some(5),
            ..base()
        },
        Case {
            name: "kv cache",
            s_q: 6,
            s_k: 41,
            segments: Some(padded(2, 41, &[2, 0])),
            ..base()
        },
        Case {
            name: "shared virtual slots",
            s_q: 33,
            s_k: 33,
            segments: Some(
                padded(2, 33, &[0, 4])
                    .into_iter()
                    .enumerate()
                    .map(|(i, x)| if i % 33 < 3 { 1 } else { x })
                    .collect(),
            ),
            shared: 3,
            ..base()
        },
        Case {
            name: "one query, no mask",
            s_q: 1,
            s_k: 23,
            masked: false,
            ..base()
        },
    ]
}

/// Output and gradients of `sum(attention(q, k, v) · w)` by one implementation.
fn run<I: Backend>(
    case: &Case,
    kind: AttentionKind,
    device: &I::Device,
    seed: u64,
) -> [Tensor<I, 4>; 4] {
    type A<I> = Autodiff<I>;
    // Drawn here, not from the backend's global generator, which the other tests of a binary
    // draw from concurrently (model initialization): both implementations get the same inputs.
    let mut state = seed;
    let mut normal = |shape: [usize; 4]| -> Tensor<A<I>, 4> {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| standard_normal(&mut state)).collect();
        Tensor::from_data(TensorData::new(values, shape), device)
    };
    let (b, h, kvh, d) = (case.batch, case.heads, case.kv_heads, case.d);
    let q = normal([b, h, case.s_q, d]).require_grad();
    let k = normal([b, kvh, case.s_k, d]).require_grad();
    let v = normal([b, kvh, case.s_k, d]).require_grad();
    let w = normal([b, h, case.s_q, d]);
    let segments = case.segments.as_ref().map(|s| {
        Tensor::<A<I>, 2, Int>::from_data(TensorData::new(s.clone(), [b, case.s_k]), device)
    });
    let mask = case
        .masked
        .then(|| AttnMask::new(b, case.s_q, case.s_k, segments, case.window, case.shared));
    let o = attention(q.clone(), k.clone(), v.clone(), mask.as_ref(), kind);
    let grads = (o.clone() * w).sum().backward();
    [
        o.inner(),
        q.grad(&grads).unwrap(),
        k.grad(&grads).unwrap(),
        v.grad(&grads).unwrap(),
    ]
}

/// A standard normal draw (Box–Muller over splitmix64).
fn standard_normal(state: &mut u64) -> f32 {
    let mut uniform = || {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // (0, 1]: never 0, so the logarithm is finite.
        ((z >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    };
    let (u1, u2) = (uniform(), uniform());
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// Flash against naive on every case: output, dq, dk, dv.
pub fn op<I: RegisterOps>(device: &I::Device) -> Vec<Check> {
    I::register_ops();
    let mut out = Vec::new();
    for (i, case) in cases().iter().enumerate() {
        let naive = run::<I>(case, AttentionKind::Naive, device, 7 + i as u64);
        let flash = run::<I>(case, AttentionKind::Flash, device, 7 + i as u64);
        for ((what, a), b) in ["output", "dq", "dk", "dv"].iter().zip(flash).zip(naive) {
            out.push(Check::new(
                "flash",
                case.name,
                &format!("{what} max rel Δ vs naive"),
                max_rel(a, b),
                OP_TOL,
            ));
        }
    }
    out
}

/// The tiny HF LLaMA fixtures with `attention = flash`: logits (left-padded batch) and the
/// gradient of every parameter against the naive path's.
pub fn llama<I: RegisterOps>(device: &I::Device) -> Vec<Check> {
    I::register_ops();
    type A<I> = Autodiff<I>;
    let mut out = Vec::new();
    for case in LLAMA_CASES {
        let dir = fixture(&format!("llama/{case}"));
        let golden = read_golden(&dir.join("golden.safetensors"));
        let ids = golden["ids_left"].int2::<A<I>>(device);
        let mask = golden["mask_left"].int2::<A<I>>(device);
        let mut model = collie_llama::load::<A<I>>(dir.to_str().unwrap(), device)
            .unwrap()
            .model;
        let mut runs = Vec::new();
        for kind in [AttentionKind::Naive, AttentionKind::Flash] {
            model.attention = kind;
            let logits = model.forward(ids.clone(), Some(&mask));
            let grads = logits.clone().powi_scalar(2).mean().backward();
            let mut g = Vec::new();
            model.visit(&mut GradCollector {
                grads: &grads,
                out: &mut g,
            });
            runs.push((logits.inner(), g));
        }
        let (flash, naive) = (runs.pop().unwrap(), runs.pop().unwrap());
        out.push(Check::new(
            "flash",
            case,
            "llama logits max rel Δ vs naive",
            max_rel(flash.0, naive.0),
            OP_TOL,
        ));
        let grad_rel = flash.1.into_iter().zip(naive.1).map(|(a, b)| max_rel(a, b));
        let grad_rel = crate::compare::worst(grad_rel);
        out.push(Check::new(
            "flash",
            case,
            "llama parameter gradients max rel Δ vs naive",
            grad_rel,
            GRAD_TOL,
        ));
    }
    out
}

/// Every float parameter's gradient, flattened, in visiting order.
pub(crate) struct GradCollector<'a, I: Backend> {
    pub(crate) grads: &'a <Autodiff<I> as burn::tensor::backend::AutodiffBackend>::Gradients,
    pub(crate) out: &'a mut Vec<Tensor<I, 1>>,
}

impl<I: Backend> burn::module::ModuleVisitor<Autodiff<I>> for GradCollector<'_, I> {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<Autodiff<I>, D>>) {
        if let Some(g) = param.val().grad(self.grads) {
            let n = g.shape().num_elements();
            self.out.push(g.reshape([n]));
        }
    }
}
