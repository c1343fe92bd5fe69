//! Optimizer state round trips. (Parity with the reference implementations is backend-generic
//! and lives in `collie_tests::suite::optim`, run by `tests/tests/optim_parity.rs`.)

use burn::backend::Flex;
use burn::tensor::Tensor;
use collie_io::HostTensor;
use collie_optim::*;

type B = Flex;

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
