//! The fused CPU kernels (`collie_core::fused`) against the layers' unfused arithmetic: values
//! and gradients (relative to the largest element, f32) of the attention softmax, RMSNorm,
//! Gemma's offset norm, LayerNorm, SwiGLU, GeGLU and the exact GELU, on odd shapes (one row, widths that are not
//! a multiple of the SIMD lanes, rows over several parallel blocks, causal / padded / decoding
//! masks); the inference kernel equals the differentiable op bit for bit (recomputation relies on
//! it); dropout applies one mask to values and gradients; and the portable and AVX2 fallbacks
//! give the same bits as the best instruction set.

use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Distribution, Int, Tensor, TensorData};
use collie_core::attention::{masked_softmax_unfused, AttnMask};
use collie_core::device::{Cpu, RegisterOps};
use collie_core::fused::{kernels, DropoutMask, Gate};
use collie_core::nn::{dropout, gelu, Activation, NormConfig};
use collie_kernels::simd::{set_level, Level, LEVEL_LOCK};
use collie_tests::compare::{assert_within, max_rel, max_rel_diff, values};

type A = Autodiff<Cpu>;

/// Largest relative difference, fused vs unfused (worst achieved: see each use).
const TOL: f64 = 1e-6;

fn setup() {
    Cpu::register_ops();
    assert!(
        kernels::<A>().is_some() && kernels::<Cpu>().is_some(),
        "CPU kernels registered"
    );
}

fn random<const D: usize>(shape: [usize; D], seed: u64, scale: f64) -> Tensor<A, D> {
    Cpu::seed(&Default::default(), seed);
    Tensor::random(shape, Distribution::Normal(0.0, scale), &Default::default())
}

/// Causal + left-padding mask `[batch, 1, s_q, s_k]` (row 1 padded by `pad`).
fn padded_mask(batch: usize, s_q: usize, s_k: usize, pad: usize) -> Tensor<A, 4, Bool> {
    let seg: Vec<i64> = (0..batch)
        .flat_map(|r| (0..s_k).map(move |j| i64::from(r == 0 || j >= pad)))
        .collect();
    let seg =
        Tensor::<A, 2, Int>::from_data(TensorData::new(seg, [batch, s_k]), &Default::default());
    AttnMask::new(batch, s_q, s_k, Some(seg), None, 0).rows(0..s_q, &Default::default())
}

/// `(output, d input)` of `sum(f(x) · w)` for one softmax implementation.
fn softmax_run(
    fused: bool,
    scores: &Tensor<A, 4>,
    mask: Option<&Tensor<A, 4, Bool>>,
    w: &Tensor<A, 4>,
    scale: f64,
) -> (Tensor<Cpu, 4>, Tensor<Cpu, 4>) {
    let x = scores.clone().detach().require_grad();
    let p = if fused {
        (kernels::<A>().unwrap().softmax)(x.clone(), mask.cloned(), scale as f32)
    } else {
        masked_softmax_unfused(x.clone(), mask, scale)
    };
    let grads = (p.clone() * w.clone()).sum().backward();
    (p.inner(), x.grad(&grads).unwrap())
}

#[test]
fn attention_softmax_equals_unfused() {
    setup();
    // (name, [batch, groups, rows, keys], mask rows: Some(rows or 1) or none)
    let cases: [(&str, [usize; 4], Option<usize>); 5] = [
        ("causal + padding, 37 keys", [2, 3, 37, 37], Some(37)),
        ("kv cache, 6 queries over 41 keys", [2, 4, 6, 41], Some(6)),
        ("decoding step, heads grouped", [2, 2, 4, 23], Some(1)),
        ("no mask", [1, 2, 5, 19], None),
        ("one row of one key", [1, 1, 1, 1], Some(1)),
    ];
    for (i, (name, shape @ [b, _, rows, keys], mask_rows)) in cases.into_iter().enumerate() {
        let scores = random(shape, 10 + i as u64, 3.0);
        let w = random(shape, 20 + i as u64, 1.0);
        let mask = mask_rows.map(|mr| {
            let m = padded_mask(b, rows, keys, 3.min(keys - 1));
            if mr == 1 {
                m.slice([0..b, 0..1, rows - 1..rows, 0..keys])
            } else {
                m
            }
        });
        let scale = 0.125;
        let (p, dx) = softmax_run(true, &scores, mask.as_ref(), &w, scale);
        let (p0, dx0) = softmax_run(false, &scores, mask.as_ref(), &w, scale);
        assert_within(
            &format!("{name}: probabilities"),
            max_rel(p.clone(), p0),
            TOL,
        );
        assert_within(&format!("{name}: d scores"), max_rel(dx, dx0), TOL);
        // inference kernel == differentiable op, bit for bit
        let inf = (kernels::<Cpu>().unwrap().softmax)(
            scores.clone().inner(),
            mask.clone()
                .map(|m| Tensor::from_primitive(m.into_primitive())),
            scale as f32,
        );
        assert_eq!(
            values(inf),
            values(p),
            "{name}: inference vs training forward"
        );
    }
}

#[test]
fn norms_equal_unfused() {
    setup();
    let device = Default::default();
    let specs = [
        ("rmsnorm", NormConfig::new(37)),
        ("gemma offset", NormConfig::new(37).with_offset(1.0)),
        (
            "layernorm",
            NormConfig::new(37).with_layer_norm(true).with_eps(1e-12),
        ),
    ];
    for (name, config) in specs {
        for shape in [[1, 1, 37], [3, 5, 37], [2, 700, 37]] {
            let mut norm = config.init::<A>(&device);
            // non-trivial weight and bias
            norm.weight = Param::from_tensor(random([37], 1, 0.5).add_scalar(1.0 - config.offset));
            norm.bias = norm.bias.map(|_| Param::from_tensor(random([37], 2, 0.5)));
            let x = random(shape, 3, 2.0);
            let w = random(shape, 4, 1.0);
            let mut out = Vec::new();
            for fused in [true, false] {
                let xg = x.clone().detach().require_grad();
                let y = if fused {
                    norm.forward(xg.clone())
                } else {
                    norm.forward_unfused(xg.clone())
                };
                let grads = (y.clone() * w.clone()).sum().backward();
                let dw = norm.weight.val().grad(&grads).unwrap();
                let db = norm.bias.as_ref().map(|b| b.val().grad(&grads).unwrap());
                out.push((y.inner(), xg.grad(&grads).unwrap(), dw, db));
            }
            let (unfused, fused) = (out.pop().unwrap(), out.pop().unwrap());
            let what = format!("{name} {shape:?}");
            assert_within(
                &format!("{what}: y"),
                max_rel(fused.0.clone(), unfused.0),
                TOL,
            );
            assert_within(&format!("{what}: dx"), max_rel(fused.1, unfused.1), TOL);
            assert_within(
                &format!("{what}: dweight"),
                max_rel(fused.2, unfused.2),
                TOL,
            );
            if let (Some(a), Some(b)) = (fused.3, unfused.3) {
                assert_within(&format!("{what}: dbias"), max_rel(a, b), TOL);
            }
            // inference == training forward
            let inf = norm.valid().forward(x.clone().inner());
            assert_eq!(
                values(inf),
                values(fused.0),
                "{what}: inference vs training forward"
            );
        }
    }
}

#[test]
fn frozen_norm_weight_still_gives_input_gradients() {
    setup();
    let mut norm = NormConfig::new(19).init::<A>(&Default::default());
    norm.weight = norm.weight.set_require_grad(false);
    let x = random([4, 19], 5, 1.0).require_grad();
    let grads = norm.forward(x.clone()).sum().backward();
    let x0 = x.clone().detach().require_grad();
    let grads0 = norm.forward_unfused(x0.clone()).sum().backward();
    assert_within(
        "frozen weight: dx",
        max_rel(x.grad(&grads).unwrap(), x0.grad(&grads0).unwrap()),
        TOL,
    );
    assert!(norm.weight.val().grad(&grads).is_none());
}

/// `(y, dgate, dup)` of `sum(act(g) · u · w)` in f64 on the host.
fn glu_f64(gate: Gate, g: &[f32], u: &[f32], w: &[f32]) -> [Vec<f64>; 3] {
    let (k, c) = ((2.0 / std::f64::consts::PI).sqrt(), 0.044715);
    let mut out = [Vec::new(), Vec::new(), Vec::new()];
    for ((&g, &u), &w) in g.iter().zip(u).zip(w) {
        let (g, u, w) = (g as f64, u as f64, w as f64);
        let (a, da) = match gate {
            Gate::Silu => {
                let s = 1.0 / (1.0 + (-g).exp());
                (g * s, s * (1.0 + g * (1.0 - s)))
            }
            Gate::GeluTanh => {
                let t = (k * (g + c * g * g * g)).tanh();
                (
                    0.5 * g * (1.0 + t),
                    0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * k * (1.0 + 3.0 * c * g * g),
                )
            }
        };
        out[0].push(a * u);
        out[1].push(w * u * da);
        out[2].push(w * a);
    }
    out
}

#[test]
fn gated_units_equal_unfused() {
    setup();
    for (act, gate) in [
        (Activation::Silu, Gate::Silu),
        (Activation::GeluTanh, Gate::GeluTanh),
    ] {
        for shape in [[1, 1, 1], [2, 7, 37], [1, 3, 4099]] {
            let g = random(shape, 6, 3.0);
            let u = random(shape, 7, 1.0);
            let w = random(shape, 8, 1.0);
            let truth = glu_f64(
                gate,
                &values(g.clone()),
                &values(u.clone()),
                &values(w.clone()),
            );
            let mut out = Vec::new();
            for fused in [true, false] {
                let (gg, ug) = (g.clone().require_grad(), u.clone().require_grad());
                let y = if fused {
                    act.glu(gg.clone(), ug.clone())
                } else {
                    act.glu_unfused(gg.clone(), ug.clone())
                };
                let grads = (y.clone() * w.clone()).sum().backward();
                out.push([
                    y.inner(),
                    gg.grad(&grads).unwrap(),
                    ug.grad(&grads).unwrap(),
                ]);
            }
            let (unfused, fused) = (out.pop().unwrap(), out.pop().unwrap());
            for (i, what) in ["y", "dgate", "dup"].into_iter().enumerate() {
                let what = format!("{gate:?} {shape:?}: {what}");
                let err = max_rel_diff(&values(fused[i].clone()), &truth[i]);
                let err0 = max_rel_diff(&values(unfused[i].clone()), &truth[i]);
                assert_within(&format!("{what} vs f64"), err, TOL);
                println!("{what}: unfused vs f64 {err0:.2e}");
                assert_within(
                    &format!("{what} vs unfused"),
                    max_rel(fused[i].clone(), unfused[i].clone()),
                    TOL,
                );
            }
        }
    }
}

#[test]
fn fallback_instruction_sets_give_the_same_bits() {
    setup();
    let _turn = LEVEL_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let norm = NormConfig::new(37).init::<A>(&Default::default());
    let x = random([3, 11, 37], 9, 2.0);
    let mask = padded_mask(3, 11, 11, 4);
    let scores = random([3, 2, 11, 11], 10, 3.0);
    let run = || {
        let xg = x.clone().require_grad();
        let y = Activation::Silu.glu(norm.forward(xg.clone()), xg.clone());
        let s = scores.clone().require_grad();
        let p = (kernels::<A>().unwrap().softmax)(s.clone(), Some(mask.clone()), 0.3);
        let grads = (y.clone().sum() + (p.clone() * p.clone()).sum()).backward();
        [
            values(y.inner()),
            values(p.inner()),
            values(xg.grad(&grads).unwrap()),
            values(s.grad(&grads).unwrap()),
        ]
    };
    let mut results = Vec::new();
    for level in [Level::Portable, Level::Avx2, Level::Best] {
        set_level(level);
        results.push((level, run()));
    }
    set_level(Level::Best);
    let (_, best) = results.pop().unwrap();
    for (level, r) in results {
        assert!(r == best, "{level:?} differs from the best instruction set");
    }
}

#[test]
fn rotary_embedding_equals_unfused() {
    use collie_core::rope::{
        apply_rotary, apply_rotary_heads, apply_rotary_unfused, Rope, RopeScaling,
    };
    setup();
    let device = Default::default();
    // (name, [batch, seq, heads, head_dim], rotary_dim, interleaved)
    let cases = [
        ("rotate_half d16", [2, 7, 3, 16], 16, false),
        ("partial rotary 6 of 10", [1, 5, 2, 10], 6, false),
        ("interleaved (GLM) d8", [2, 4, 2, 8], 8, true),
        ("one position", [1, 1, 1, 4], 4, false),
    ];
    for (i, (name, [b, s, h, d], rd, interleaved)) in cases.into_iter().enumerate() {
        let rope = Rope::new(rd, 10000.0, &RopeScaling::None);
        let rope = if interleaved {
            rope.interleaved()
        } else {
            rope
        };
        let positions: Vec<i64> = (0..b * s)
            .map(|j| (j % s) as i64 + 3 * (j / s) as i64)
            .collect();
        let positions = Tensor::<A, 2, Int>::from_data(TensorData::new(positions, [b, s]), &device);
        let (cos, sin) = rope.cos_sin(positions);
        // the projection's layout, viewed head-major (a strided input)
        let x = random([b, s, h, d], 30 + i as u64, 1.0);
        let w = random([b, h, s, d], 40 + i as u64, 1.0);
        let mut out = Vec::new();
        for fused in [true, false] {
            let xg = x.clone().require_grad();
            let xv = xg.clone().swap_dims(1, 2);
            let y = if fused {
                apply_rotary(xv, &cos, &sin, interleaved)
            } else {
                apply_rotary_unfused(xv, &cos, &sin, interleaved)
            };
            let grads = (y.clone() * w.clone()).sum().backward();
            out.push((y.inner(), xg.grad(&grads).unwrap()));
        }
        let (unfused, fused) = (out.pop().unwrap(), out.pop().unwrap());
        assert_within(
            &format!("{name}: y"),
            max_rel(fused.0.clone(), unfused.0),
            TOL,
        );
        assert_within(
            &format!("{name}: dx"),
            max_rel(fused.1.clone(), unfused.1),
            TOL,
        );
        // the sequence-major entry: same values, gradient in the projection's order
        let xg = x.clone().require_grad();
        let y = apply_rotary_heads(xg.clone(), &cos, &sin, interleaved);
        let grads = (y.clone() * w.clone()).sum().backward();
        assert_eq!(
            values(y.inner()),
            values(fused.0.clone()),
            "{name}: heads entry, y"
        );
        let dx = xg.grad(&grads).unwrap();
        assert_eq!(
            values(dx.clone()),
            values(fused.1.clone()),
            "{name}: heads entry, dx"
        );
        let inf = apply_rotary(
            x.clone().inner().swap_dims(1, 2),
            &cos.clone().inner(),
            &sin.clone().inner(),
            interleaved,
        );
        assert_eq!(
            values(inf),
            values(fused.0),
            "{name}: inference vs training forward"
        );
    }
}

#[test]
fn lm_head_cross_entropy_equals_unfused() {
    use collie_core::loss::{cross_entropy_sum, cross_entropy_sum_unfused, IGNORE_INDEX};
    setup();
    let device = Default::default();
    for (rows, vocab) in [(1, 7), (9, 1037), (5, 49)] {
        let logits = random([rows, vocab], 50 + rows as u64, 4.0);
        let ids: Vec<i64> = (0..rows)
            .map(|r| {
                if r % 4 == 2 {
                    IGNORE_INDEX
                } else {
                    ((r * 131) % vocab) as i64
                }
            })
            .collect();
        let targets = Tensor::<A, 1, Int>::from_data(TensorData::new(ids, [rows]), &device);
        let mut out = Vec::new();
        for fused in [true, false] {
            let z = logits.clone().require_grad();
            let (sum, count) = if fused {
                cross_entropy_sum(z.clone(), targets.clone())
            } else {
                cross_entropy_sum_unfused(z.clone(), targets.clone())
            };
            let grads = sum.clone().div(count.clone()).backward();
            out.push((sum.inner(), count.inner(), z.grad(&grads).unwrap()));
        }
        let (unfused, fused) = (out.pop().unwrap(), out.pop().unwrap());
        let what = format!("{rows}x{vocab}");
        assert_within(&format!("{what}: loss"), max_rel(fused.0, unfused.0), TOL);
        assert_eq!(values(fused.1), values(unfused.1), "{what}: counted tokens");
        assert_within(
            &format!("{what}: d logits"),
            max_rel(fused.2, unfused.2),
            TOL,
        );
    }
}

/// The backward writes the gradient over the logits' buffer when the loss holds it alone (the
/// product's fresh output) and copies it first when anyone else does: the head's gradients
/// equal the unfused path's, and logits kept by the caller read the same after the backward.
#[test]
fn lm_head_gradient_overwrites_only_logits_nobody_else_holds() {
    use collie_core::loss::{cross_entropy_sum, cross_entropy_sum_unfused, IGNORE_INDEX};
    setup();
    let device = Default::default();
    let (rows, d, vocab) = (7, 19, 1031);
    let h = random([rows, d], 71, 1.0);
    let w = random([d, vocab], 72, 0.5);
    let ids: Vec<i64> = (0..rows)
        .map(|r| match r {
            3 => IGNORE_INDEX,
            _ => ((r * 389) % vocab) as i64,
        })
        .collect();
    let targets = Tensor::<A, 1, Int>::from_data(TensorData::new(ids, [rows]), &device);
    for keep in [false, true] {
        let mut out = Vec::new();
        for fused in [true, false] {
            let (h, w) = (h.clone().require_grad(), w.clone().require_grad());
            let logits = h.clone().matmul(w.clone());
            let kept = keep.then(|| logits.clone().inner());
            let before = kept.clone().map(|k| values(k.clone()));
            let (sum, _) = match fused {
                true => cross_entropy_sum(logits, targets.clone()),
                false => cross_entropy_sum_unfused(logits, targets.clone()),
            };
            let grads = sum.backward();
            if let (Some(k), Some(b)) = (kept, before) {
                assert_eq!(
                    values(k),
                    b,
                    "logits the caller holds changed in the backward"
                );
            }
            out.push((h.grad(&grads).unwrap(), w.grad(&grads).unwrap()));
        }
        let (unfused, fused) = (out.pop().unwrap(), out.pop().unwrap());
        assert_within(
            &format!("kept {keep}: d h"),
            max_rel(fused.0, unfused.0),
            TOL,
        );
        assert_within(
            &format!("kept {keep}: d w"),
            max_rel(fused.1, unfused.1),
            TOL,
        );
    }
}

#[test]
fn adamw_kernel_equals_the_tensor_arithmetic_bit_for_bit() {
    use collie_core::fused::AdamWStep;
    use collie_optim::adamw::adamw_unfused;
    setup();
    let k = kernels::<Cpu>().unwrap();
    let n = 3 * 16384 + 5;
    let (b1, b2, lr) = (0.9f64, 0.95f64, 3e-4f64);
    let mut fused = (
        random([n], 80, 1.0).inner(),
        Tensor::zeros([n], &Default::default()),
        Tensor::zeros([n], &Default::default()),
    );
    let mut plain = fused.clone();
    for (step, decay) in [
        (1, Some(1.0 - lr * 0.1)),
        (2, None),
        (3, Some(1.0 - lr * 0.1)),
    ] {
        let g = random([n], 81 + step as u64, 0.1).inner();
        let s = AdamWStep {
            one_minus_b1: 1.0 - b1,
            b2,
            one_minus_b2: 1.0 - b2,
            bias2_sqrt: (1.0 - b2.powi(step)).sqrt(),
            eps: 1e-8,
            decay,
            step_size: lr / (1.0 - b1.powi(step)),
        };
        // the parameter is also held elsewhere (as the model holds it): updated in a copy
        let held = fused.0.clone();
        fused = (k.adamw)(fused.0, g.clone(), fused.1, fused.2, s);
        plain = adamw_unfused(plain.0, g, plain.1, plain.2, s);
        assert_ne!(
            values(held),
            values(fused.0.clone()),
            "the held parameter is untouched"
        );
    }
    assert_eq!(values(fused.0), values(plain.0), "θ");
    assert_eq!(values(fused.1), values(plain.1), "m");
    assert_eq!(values(fused.2), values(plain.2), "v");
}

#[test]
fn lion_kernel_equals_the_tensor_arithmetic_bit_for_bit() {
    use collie_core::fused::LionStep;
    use collie_optim::lion::lion_unfused;
    setup();
    let k = kernels::<Cpu>().unwrap();
    let n = 3 * 16384 + 5;
    let (b1, b2, lr) = (0.9f64, 0.99f64, 1e-4f64);
    let mut fused = (
        random([n], 85, 1.0).inner(),
        Tensor::zeros([n], &Default::default()),
    );
    let mut plain = fused.clone();
    for (step, wd) in [(1, 0.1), (2, 0.0), (3, 0.1)] {
        // step 1 has zero gradients in places: m = g = 0 there, sign 0
        let g = random([n], 86 + step as u64, 0.1).inner();
        let g = match step {
            1 => g.slice_assign(0..7, Tensor::zeros([7], &Default::default())),
            _ => g,
        };
        let s = LionStep::new((b1, b2), lr, wd);
        let held = fused.0.clone();
        fused = (k.lion)(fused.0, g.clone(), fused.1, s);
        plain = lion_unfused(plain.0, g, plain.1, s);
        assert_ne!(
            values(held),
            values(fused.0.clone()),
            "the held parameter is untouched"
        );
    }
    assert_eq!(values(fused.0), values(plain.0), "θ");
    assert_eq!(values(fused.1), values(plain.1), "m");
}

#[test]
fn exact_gelu_equals_unfused() {
    setup();
    for shape in [[1, 1, 1], [2, 7, 37], [1, 3, 4099]] {
        // normal(0, 3): values out to ±12, both tails
        let x = random(shape, 90, 3.0);
        let w = random(shape, 91, 1.0);
        let mut out = Vec::new();
        for fused in [true, false] {
            let xg = x.clone().require_grad();
            let y = if fused {
                gelu(xg.clone())
            } else {
                burn::tensor::activation::gelu(xg.clone())
            };
            let grads = (y.clone() * w.clone()).sum().backward();
            out.push([y.inner(), xg.grad(&grads).unwrap()]);
        }
        let (unfused, fused) = (out.pop().unwrap(), out.pop().unwrap());
        for (i, what) in ["y", "dx"].into_iter().enumerate() {
            assert_within(
                &format!("gelu {shape:?}: {what} vs unfused"),
                max_rel(fused[i].clone(), unfused[i].clone()),
                TOL,
            );
        }
    }
}

#[test]
fn dropout_applies_one_mask_to_values_and_gradients() {
    setup();
    let p = 0.3;
    let scale = (1.0 / (1.0 - p)) as f32;
    for shape in [[1, 1, 1], [2, 7, 37], [1, 3, 4099]] {
        let n: usize = shape.iter().product();
        let x = random(shape, 92, 1.0);
        let w = random(shape, 93, 1.0);
        let xg = x.clone().require_grad();
        let y = dropout(xg.clone(), p);
        let grads = (y.clone() * w.clone()).sum().backward();
        let (xv, yv) = (values(x.clone()), values(y.inner()));
        let (gv, wv) = (values(xg.grad(&grads).unwrap()), values(w));
        let mut kept = 0usize;
        for i in 0..n {
            if yv[i] == 0.0 {
                assert_eq!(gv[i], 0.0, "{shape:?} element {i}: dropped, yet a gradient");
            } else {
                kept += 1;
                assert_eq!(yv[i], xv[i] * scale, "{shape:?} element {i}");
                assert_eq!(gv[i], wv[i] * scale, "{shape:?} element {i}: gradient");
            }
        }
        // binomial: within 5 standard deviations of n(1 − p)
        let (mean, sd) = (n as f64 * (1.0 - p), (n as f64 * p * (1.0 - p)).sqrt());
        assert!(
            (kept as f64 - mean).abs() <= 5.0 * sd,
            "{shape:?}: kept {kept} of {n}"
        );
        // without autodiff (evaluation) and at p = 0: the identity
        assert_eq!(values(dropout(x.clone().inner(), p)), xv);
        assert_eq!(values(dropout(x.clone(), 0.0)), xv);
    }
    // one mask, one result: the kernel on the inner backend equals the differentiable op
    let k = (kernels::<Cpu>().unwrap(), kernels::<A>().unwrap());
    let x = random([4099], 94, 1.0);
    let mask = DropoutMask { p: 0.5, seed: 11 };
    assert_eq!(
        values((k.0.dropout)(x.clone().inner(), mask)),
        values((k.1.dropout)(x.require_grad(), mask).inner())
    );
}

#[test]
fn heads_swap_equals_swap_dims_bit_for_bit() {
    use collie_core::attention::swap_seq_heads;
    setup();
    // one-element axes, odd widths, and a strided view (a narrowed fused projection)
    for (shape, narrowed) in [
        ([1, 1, 1, 1], false),
        ([2, 7, 3, 5], false),
        ([2, 9, 4, 64], true),
    ] {
        let [b, s, h, d] = shape;
        let x = if narrowed {
            random([b, s, 3 * h, d], 95, 1.0).narrow(2, h, h)
        } else {
            random(shape, 95, 1.0)
        };
        let w = random([b, h, s, d], 96, 1.0);
        let mut out = Vec::new();
        for fused in [true, false] {
            let xg = x.clone().detach().require_grad();
            let y = if fused {
                swap_seq_heads(xg.clone())
            } else {
                xg.clone().swap_dims(1, 2)
            };
            assert_eq!(y.dims(), [b, h, s, d]);
            // through a reshape, as the layers merge heads
            let grads = (y.clone().reshape([b, h * s * d]) * w.clone().reshape([b, h * s * d]))
                .sum()
                .backward();
            out.push((values(y.inner()), values(xg.grad(&grads).unwrap())));
        }
        assert!(
            out[0] == out[1],
            "{shape:?}: fused swap differs from swap_dims"
        );
    }
}

#[test]
fn products_equal_burns_matmul_bit_for_bit() {
    use collie_core::attention::batched_matmul;
    use collie_core::nn::matmul_2d;
    setup();
    // (rows, k, n): one row, odd sizes, and one large enough for gemm to split over threads
    for (m, k, n) in [(1, 1, 1), (7, 37, 5), (200, 190, 210)] {
        let x = random([m, k], 100, 1.0);
        // the weight stored [n, k] and used transposed, as a tied LM head is
        let w = random([n, k], 101, 1.0);
        let dc = random([m, n], 102, 1.0);
        for frozen in [false, true] {
            let mut out = Vec::new();
            for fused in [true, false] {
                let xg = x.clone().detach().require_grad();
                let wg = if frozen {
                    w.clone().detach()
                } else {
                    w.clone().detach().require_grad()
                };
                let y = if fused {
                    matmul_2d(xg.clone(), wg.clone().transpose())
                } else {
                    xg.clone().matmul(wg.clone().transpose())
                };
                let grads = (y.clone() * dc.clone()).sum().backward();
                let dw = wg.grad(&grads).map(values);
                assert_eq!(dw.is_none(), frozen, "a frozen weight gets no gradient");
                out.push((values(y.inner()), values(xg.grad(&grads).unwrap()), dw));
            }
            assert!(out[0] == out[1], "[{m}, {k}] · [{k}, {n}] frozen={frozen}");
        }
    }
    // attention's products: scores q · kᵀ (k read transposed) and probs · v, batches of heads
    for [b, h, s, d] in [[1, 1, 1, 1], [2, 3, 9, 5], [2, 6, 33, 64]] {
        let q = random([b, h, s, d], 103, 1.0);
        let k = random([b, h, s, d], 104, 1.0);
        let v = random([b, h, s, d], 105, 1.0);
        let w = random([b, h, s, d], 106, 1.0);
        let mut out = Vec::new();
        for fused in [true, false] {
            let (qg, kg, vg) = (
                q.clone().detach().require_grad(),
                k.clone().detach().require_grad(),
                v.clone().detach().require_grad(),
            );
            let o = if fused {
                let p = batched_matmul(qg.clone(), kg.clone().swap_dims(2, 3));
                batched_matmul(p, vg.clone())
            } else {
                qg.clone()
                    .matmul(kg.clone().swap_dims(2, 3))
                    .matmul(vg.clone())
            };
            let grads = (o.clone() * w.clone()).sum().backward();
            out.push(
                [
                    o.inner(),
                    qg.grad(&grads).unwrap(),
                    kg.grad(&grads).unwrap(),
                    vg.grad(&grads).unwrap(),
                ]
                .map(values),
            );
        }
        assert!(out[0] == out[1], "attention products {:?}", [b, h, s, d]);
    }
}

#[test]
fn embedding_lookup_equals_burns_bit_for_bit() {
    setup();
    // repeated ids (their gradients add in token order), one token, a batch of sequences
    for (vocab, d, ids) in [
        (7, 5, vec![vec![3i64, 3, 0, 6, 3]]),
        (1, 1, vec![vec![0]]),
        (50, 37, vec![vec![1, 49, 2], vec![49, 49, 0]]),
    ] {
        let (b, s) = (ids.len(), ids[0].len());
        let ids = Tensor::<A, 2, Int>::from_data(
            TensorData::new(ids.concat(), [b, s]),
            &Default::default(),
        );
        let table = random([vocab, d], 110, 1.0);
        let w = random([b, s, d], 111, 1.0);
        let mut out = Vec::new();
        for fused in [true, false] {
            let t = table.clone().detach().require_grad();
            let rows = if fused {
                (kernels::<A>().unwrap().embedding)(t.clone(), ids.clone().reshape([b * s]))
                    .reshape([b, s, d])
            } else {
                burn::tensor::module::embedding(t.clone(), ids.clone())
            };
            let grads = (rows.clone() * w.clone()).sum().backward();
            let dt = t.grad(&grads).unwrap();
            out.push((values(rows.inner()), values(dt)));
        }
        assert!(
            out[0] == out[1],
            "vocab {vocab}, d {d}: fused lookup differs from Burn's"
        );
    }
}
