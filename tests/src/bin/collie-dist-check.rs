//! `mpirun -np 2 collie-dist-check tp-mlp`: checks run inside an MPI job, each rank comparing the
//! parallel computation with the single-device one it also computes. Exits non-zero (naming the
//! check and the rank) when they differ.

use std::process::ExitCode;

use burn::backend::Autodiff;
use burn::module::Param;
use burn::tensor::activation::relu;
use burn::tensor::{Tensor, TensorData};
use collie_core::device::Cpu;
use collie_core::dist::register_autodiff;
use collie_core::nn::{Linear, ParallelMode};
use collie_dist::Dist;

type A = Autodiff<Cpu>;

/// A fixed pseudo-random tensor (the same on every rank).
fn tensor(shape: [usize; 2], seed: u32) -> Tensor<A, 2> {
    let n = shape[0] * shape[1];
    let values: Vec<f32> = (0..n as u32)
        .map(|i| {
            let h =
                (i.wrapping_mul(2654435761) ^ seed.wrapping_mul(40503)).wrapping_mul(2246822519);
            (h >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect();
    Tensor::from_data(TensorData::new(values, shape), &Default::default())
}

fn vals<const D: usize>(t: Tensor<Cpu, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

/// `max |a − b|`, failing on NaN, infinities and length mismatches.
fn max_diff(a: &[f32], b: &[f32]) -> f64 {
    collie_tests::compare::max_abs_diff(a, b, |_| true)
}

fn linear(
    w: Tensor<A, 2>,
    bias: Option<Tensor<A, 1>>,
    mode: ParallelMode,
    dist: &Dist,
) -> Linear<A> {
    Linear {
        weight: Param::from_tensor(w.require_grad()),
        bias: bias.map(|b| Param::from_tensor(b.require_grad())),
        adapter: None,
        parallel: mode,
        tp: Some(dist.tp.clone()),
        quant: None,
    }
}

/// Column-parallel then row-parallel MLP (Megatron's f … g) against the dense MLP: loss, input
/// gradient and each rank's weight-gradient shards.
fn tp_mlp(dist: &Dist) -> Vec<(String, f64)> {
    let (tp, r) = (dist.dims.tp, dist.coords.tp);
    let (d, h) = (8, 16);
    let hs = h / tp;
    let (w1, w2, b2) = (
        tensor([d, h], 1),
        tensor([h, d], 2),
        tensor([1, d], 3).reshape([d]),
    );
    // Dense.
    let x = tensor([4, d], 4).require_grad();
    let (dw1, dw2, db2) = (
        w1.clone().require_grad(),
        w2.clone().require_grad(),
        b2.clone().require_grad(),
    );
    let y = relu(x.clone().matmul(dw1.clone())).matmul(dw2.clone()) + db2.clone().unsqueeze::<2>();
    let loss_dense = (y.clone() * y).sum();
    let g = loss_dense.backward();
    // Sharded.
    let xp = tensor([4, d], 4).require_grad();
    let col = linear(
        w1.slice([0..d, r * hs..(r + 1) * hs]),
        None,
        ParallelMode::Column,
        dist,
    );
    let row = linear(
        w2.slice([r * hs..(r + 1) * hs, 0..d]),
        Some(b2),
        ParallelMode::Row,
        dist,
    );
    let y = row.forward(relu(col.forward(xp.clone())));
    let loss_tp = (y.clone() * y).sum();
    let gp = loss_tp.backward();
    vec![
        (
            "loss".into(),
            max_diff(&vals(loss_dense.inner()), &vals(loss_tp.inner())),
        ),
        (
            "input grad".into(),
            max_diff(&vals(x.grad(&g).unwrap()), &vals(xp.grad(&gp).unwrap())),
        ),
        (
            "column weight grad".into(),
            max_diff(
                &vals(dw1.grad(&g).unwrap().slice([0..d, r * hs..(r + 1) * hs])),
                &vals(col.weight.val().grad(&gp).unwrap()),
            ),
        ),
        (
            "row weight grad".into(),
            max_diff(
                &vals(dw2.grad(&g).unwrap().slice([r * hs..(r + 1) * hs, 0..d])),
                &vals(row.weight.val().grad(&gp).unwrap()),
            ),
        ),
        (
            "row bias grad".into(),
            max_diff(
                &vals(db2.grad(&g).unwrap()),
                &vals(row.bias.as_ref().unwrap().val().grad(&gp).unwrap()),
            ),
        ),
    ]
}

fn main() -> ExitCode {
    let check = std::env::args().nth(1).unwrap_or_default();
    let dist = match check.as_str() {
        "tp-mlp" => Dist::init(Some(1), 2, 1),
        other => {
            eprintln!("unknown check `{other}` (tp-mlp)");
            return ExitCode::FAILURE;
        }
    }
    .unwrap_or_else(|e| panic!("{e}"));
    register_autodiff::<Cpu>();
    let diffs = tp_mlp(&dist);
    let mut ok = true;
    for (name, diff) in diffs {
        println!("rank {} {check}: {name} max |Δ| {diff:.2e}", dist.rank);
        // Worst achieved: 2.4e-7 (the row bias gradient).
        ok &= diff < 2e-6;
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        dist.abort(
            &format!("{check}: parallel result differs from the single-device one"),
            1,
        )
    }
}
