//! Rotary position embeddings in HF's `rotate_half` convention (Su et al. 2021), or on interleaved
//! pairs (GLM), over a whole head or its first `rotary_dim` features.
//!
//! The inverse frequencies are computed on the host in `f32` with the same operations as
//! transformers' rope init functions, so positions map to the same angles bit for bit; the
//! `cos`/`sin` tables are then built on the device for the positions of each batch.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, ElementConversion, Int, Tensor, TensorData};

/// Frequency scaling applied on top of the base RoPE frequencies (HF `rope_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// `rope_type = "default"`: no scaling.
    None,
    /// `rope_type = "linear"`: every frequency divided by `factor` (position interpolation).
    Linear {
        /// The divisor.
        factor: f32,
    },
    /// `rope_type = "llama3"`: low frequencies divided by `factor`, high ones kept, the band in
    /// between interpolated (Llama 3.1).
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f32,
        /// Wavelengths longer than `original_max_position_embeddings / low_freq_factor` are scaled.
        low_freq_factor: f32,
        /// Wavelengths shorter than `original_max_position_embeddings / high_freq_factor` are kept.
        high_freq_factor: f32,
        /// Context length of pre-training.
        original_max_position_embeddings: f32,
    },
    /// `rope_type = "dynamic"` (dynamic NTK, InternLM2): a call whose longest position `L`
    /// passes `max_position_embeddings` raises the base to
    /// `θ · (factor · L / max − (factor − 1))^(d / (d − 2))`; shorter calls keep the base.
    Dynamic {
        /// How fast the base grows past `max_position_embeddings`.
        factor: f32,
        /// Positions the model was trained for.
        max_position_embeddings: usize,
    },
}

/// Rotary embedding tables for one head size.
#[derive(Debug, Clone)]
pub struct Rope {
    /// `head_dim / 2` inverse frequencies.
    pub inv_freq: Vec<f32>,
    /// Multiplier of `cos` and `sin` (1 for the types above).
    pub attention_scaling: f32,
    /// Dynamic NTK: `(θ, head_dim, factor, max_position_embeddings)` to recompute the
    /// frequencies of a longer call.
    pub dynamic: Option<(f64, usize, f32, usize)>,
    /// Whether pairs `(2i, 2i + 1)` rotate together (GLM) rather than `(i, i + d/2)`: the tables
    /// then repeat each angle twice in a row.
    pub interleaved: bool,
}

impl Rope {
    /// Frequencies for `head_dim` with base `theta` and the given scaling.
    pub fn new(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Self {
        let base = theta as f32;
        // HF: 1.0 / (base ** (arange(0, dim, 2).float() / dim)), all in f32.
        let mut inv_freq: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0f32 / base.powf(i as f32 / head_dim as f32))
            .collect();
        let mut dynamic = None;
        match *scaling {
            RopeScaling::None => {}
            RopeScaling::Dynamic {
                factor,
                max_position_embeddings,
            } => dynamic = Some((theta, head_dim, factor, max_position_embeddings)),
            RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_len,
            } => {
                let low_freq_wavelen = old_len / low_freq_factor;
                let high_freq_wavelen = old_len / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    let scaled = if wavelen > low_freq_wavelen {
                        *f / factor
                    } else {
                        *f
                    };
                    let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                    *f = if medium {
                        let smooth = (old_len / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    };
                }
            }
        }
        Rope {
            inv_freq,
            attention_scaling: 1.0,
            dynamic,
            interleaved: false,
        }
    }

    /// The same frequencies rotating interleaved pairs (GLM).
    pub fn interleaved(self) -> Self {
        Rope {
            interleaved: true,
            ..self
        }
    }

    /// The frequencies of a call whose longest position is `seq_len − 1`: transformers'
    /// `_compute_dynamic_ntk_parameters`, in `f32` as it computes them from a tensor length.
    fn dynamic_inv_freq(&self, seq_len: usize) -> Option<Vec<f32>> {
        let (theta, dim, factor, max) = self.dynamic?;
        if seq_len <= max {
            return None;
        }
        let grown = factor * seq_len as f32 / max as f32 - (factor - 1.0);
        let base = theta as f32 * grown.powf((dim as f64 / (dim - 2) as f64) as f32);
        Some(
            (0..dim)
                .step_by(2)
                .map(|i| 1.0f32 / base.powf(i as f32 / dim as f32))
                .collect(),
        )
    }

    /// `cos` and `sin` tables for the given positions.
    ///
    /// # Shapes
    /// - positions: `[batch, seq]` → (`[batch, seq, head_dim]`, `[batch, seq, head_dim]`)
    pub fn cos_sin<B: Backend>(
        &self,
        positions: Tensor<B, 2, Int>,
    ) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let device = positions.device();
        let half = self.inv_freq.len();
        // Dynamic NTK reads the longest position of the call (one host read, only then).
        let grown = self.dynamic.and_then(|_| {
            let longest = positions.clone().max().into_scalar().elem::<i64>();
            self.dynamic_inv_freq(longest.max(0) as usize + 1)
        });
        let inv_freq = grown.unwrap_or_else(|| self.inv_freq.clone());
        let inv_freq = Tensor::<B, 1>::from_data(TensorData::new(inv_freq, [half]), &device)
            .reshape([1, 1, half]);
        // [batch, seq, 1] * [1, 1, half] -> [batch, seq, half]
        let freqs = positions.float().unsqueeze_dim::<3>(2) * inv_freq;
        let [b, s, _] = freqs.dims();
        let emb = if self.interleaved {
            // [batch, seq, half, 2] -> [batch, seq, rotary_dim]: each angle twice in a row.
            let f = freqs.unsqueeze_dim::<4>(3);
            Tensor::cat(vec![f.clone(), f], 3).reshape([b, s, 2 * half])
        } else {
            // [batch, seq, rotary_dim]: the same frequencies for both halves.
            Tensor::cat(vec![freqs.clone(), freqs], 2)
        };
        let (cos, sin) = (emb.clone().cos(), emb.sin());
        if self.attention_scaling == 1.0 {
            (cos, sin)
        } else {
            let s = self.attention_scaling as f64;
            (cos.mul_scalar(s), sin.mul_scalar(s))
        }
    }
}

/// Rotates `x` by the angles in `cos`/`sin`: `x·cos + rotate(x)·sin`, where `rotate` pairs
/// feature `i` with `i + d/2` (`rotate_half`) or, `interleaved`, `2i` with `2i + 1`. Tables
/// narrower than the head rotate its first features only; the rest pass through (partial rotary).
///
/// On a backend with fused kernels ([`crate::fused`]) and in f32, one pass that also lays a
/// strided `x` (the projection's `[batch, seq, heads, d]` viewed head-major) out contiguously
/// for attention; otherwise [`apply_rotary_unfused`].
///
/// # Shapes
/// - x: `[batch, heads, seq, head_dim]`
/// - cos, sin: `[batch, seq, rotary_dim]` (`rotary_dim ≤ head_dim`)
pub fn apply_rotary<B: Backend>(
    x: Tensor<B, 4>,
    cos: &Tensor<B, 3>,
    sin: &Tensor<B, 3>,
    interleaved: bool,
) -> Tensor<B, 4> {
    apply_rotary_heads(x.swap_dims(1, 2), cos, sin, interleaved)
}

/// [`apply_rotary`] of a projection's output in its own `[batch, seq, heads, head_dim]` order,
/// returned head-major for attention: with fused kernels one pass forward, and the gradient
/// comes back in the projection's order (no transposed copy either way).
///
/// # Shapes
/// - x: `[batch, seq, heads, head_dim]`; cos, sin: `[batch, seq, rotary_dim]`
/// - returns `[batch, heads, seq, head_dim]`
pub fn apply_rotary_heads<B: Backend>(
    x: Tensor<B, 4>,
    cos: &Tensor<B, 3>,
    sin: &Tensor<B, 3>,
    interleaved: bool,
) -> Tensor<B, 4> {
    let [b, s, _, _] = x.dims();
    let [tb, ts, _] = cos.dims();
    let fits = [x.dtype(), cos.dtype(), sin.dtype()]
        .iter()
        .all(|&t| t == DType::F32)
        && (tb, ts) == (b, s)
        && sin.dims() == cos.dims();
    match crate::fused::kernels::<B>() {
        Some(k) if fits => (k.rope)(x, cos.clone(), sin.clone(), interleaved),
        _ => apply_rotary_unfused(x.swap_dims(1, 2), cos, sin, interleaved),
    }
}

/// [`apply_rotary`] as tensor operations: the reference arithmetic of the fused kernel
/// ([`crate::fused::FusedKernels::rope`]), and the path of backends without it.
///
/// # Shapes
/// - as [`apply_rotary`]
pub fn apply_rotary_unfused<B: Backend>(
    x: Tensor<B, 4>,
    cos: &Tensor<B, 3>,
    sin: &Tensor<B, 3>,
    interleaved: bool,
) -> Tensor<B, 4> {
    let [b, h, s, d] = x.dims();
    let rd = cos.dims()[2];
    if rd < d {
        let rot = x.clone().slice([0..b, 0..h, 0..s, 0..rd]);
        let pass = x.slice([0..b, 0..h, 0..s, rd..d]);
        return Tensor::cat(
            vec![apply_rotary_unfused(rot, cos, sin, interleaved), pass],
            3,
        );
    }
    let half = d / 2;
    let rotated = if interleaved {
        // [.., d] -> [.., d/2, 2]: (x₂ᵢ, x₂ᵢ₊₁) -> (−x₂ᵢ₊₁, x₂ᵢ), back to [.., d].
        let pairs = x.clone().reshape([b, h, s, half, 2]);
        let even = pairs.clone().slice([0..b, 0..h, 0..s, 0..half, 0..1]);
        let odd = pairs.slice([0..b, 0..h, 0..s, 0..half, 1..2]);
        Tensor::cat(vec![odd.neg(), even], 4).reshape([b, h, s, d])
    } else {
        // rotate_half: cat(-x[..., half:], x[..., :half])
        let x1 = x.clone().slice([0..b, 0..h, 0..s, 0..half]);
        let x2 = x.clone().slice([0..b, 0..h, 0..s, half..d]);
        Tensor::cat(vec![x2.neg(), x1], 3)
    };
    // [batch, 1, seq, head_dim] broadcasts over heads; the tables follow x's dtype (bf16/f16 compute).
    let dtype = x.dtype();
    let cos = crate::nn::to_dtype(cos.clone(), dtype).unsqueeze_dim::<4>(1);
    let sin = crate::nn::to_dtype(sin.clone(), dtype).unsqueeze_dim::<4>(1);
    x * cos + rotated * sin
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_frequencies_follow_the_base() {
        let rope = Rope::new(8, 10000.0, &RopeScaling::None);
        assert_eq!(rope.inv_freq.len(), 4);
        assert_eq!(rope.inv_freq[0], 1.0);
        assert!((rope.inv_freq[1] - 0.1).abs() < 1e-7);
        assert!((rope.inv_freq[3] - 0.001).abs() < 1e-9);
    }

    #[test]
    fn llama3_keeps_high_and_scales_low_frequencies() {
        let scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64.0,
        };
        let plain = Rope::new(16, 10000.0, &RopeScaling::None);
        let scaled = Rope::new(16, 10000.0, &scaling);
        // wavelength 2π < 16: untouched.
        assert_eq!(scaled.inv_freq[0], plain.inv_freq[0]);
        // the lowest frequency has wavelength > 64: divided by the factor.
        let last = plain.inv_freq.len() - 1;
        assert_eq!(scaled.inv_freq[last], plain.inv_freq[last] / 8.0);
    }
}
