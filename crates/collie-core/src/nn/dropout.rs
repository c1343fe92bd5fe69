//! Dropout, as `nn.Dropout` in train mode: the identity unless gradients are recorded.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Tensor};

use crate::fused::DropoutMask;

/// Zeroes each element with probability `p` and scales the rest by `1/(1 − p)` where autodiff
/// records gradients (training); elsewhere, and for `p = 0`, returns `x`.
///
/// On a backend with fused kernels ([`crate::fused`]) and f32 input, one pass with a
/// counter-based mask whose seed is drawn from the backend's random stream (so `B::seed`
/// makes runs repeat), and nothing kept for the backward; otherwise Burn's `Dropout`, a
/// Bernoulli tensor multiplied in. The two draw different masks from the same seed.
///
/// # Shapes
/// - x: any → same
pub fn dropout<B: Backend, const D: usize>(x: Tensor<B, D>, p: f64) -> Tensor<B, D> {
    if p == 0.0 || !B::ad_enabled(&x.device()) {
        return x;
    }
    match crate::fused::kernels::<B>() {
        // The kernel takes p in f32: a p within 6e-8 of 1 rounds to 1 there and goes unfused.
        Some(k) if x.dtype() == DType::F32 && (0.0..1.0).contains(&(p as f32)) => {
            let dims = x.dims();
            let seed = draw_seed::<B>(&x.device());
            // [...] -> [n] -> [...]
            let n = x.shape().num_elements();
            let mask = DropoutMask { p: p as f32, seed };
            (k.dropout)(x.reshape([n]), mask).reshape(dims)
        }
        _ => burn::nn::DropoutConfig::new(p).init().forward(x),
    }
}

/// 64 random bits from the backend's stream: three uniform draws of 24 bits each.
fn draw_seed<B: Backend>(device: &B::Device) -> u64 {
    let u = Tensor::<B, 1>::random([3], Distribution::Default, device)
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 after convert");
    u.iter().fold(0u64, |seed, &v| {
        (seed << 24) ^ ((f64::from(v) * f64::from(1u32 << 24)) as u64)
    })
}
