//! Frozen quantized weights: a [`Linear`] whose base weight stays in a llama.cpp block format
//! (Q8_0, Q4_K, … as a GGUF file holds it, or as `collie_io::quant` encodes it) and is decoded
//! for each product only — the frozen base of QLoRA, costing its block bytes instead of 4 bytes
//! a parameter.
//!
//! [`quant_matmul`] computes `x · Wᵀ` by decoding `W` a band of rows at a time into a scratch
//! matrix and multiplying by that band, so no whole float copy of the weight exists even for the
//! length of one product. On `Autodiff<I>` it is one op whose backward (`dx = dy · W`) decodes
//! the weight again instead of keeping a float copy in the graph; the weight itself gets no
//! gradient. The decoding is the GGUF reader's, so logits equal those of the same file
//! dequantized to f32 up to the order of the f32 sums.
//!
//! On wgpu and CUDA the bands are decoded on the device by a CubeCL kernel ([`cube`]) from a copy
//! of the blocks kept there (uploaded on first use), so a product moves no weight bytes between
//! host and device; formats without a kernel are decoded on the host and uploaded band by band.

#[cfg(feature = "gpu-kernels")]
pub mod cube;

use std::any::Any;
use std::fmt::Debug;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::Autodiff;
use burn::tensor::backend::{Backend, BackendTypes};
use burn::tensor::{Tensor, TensorData};

use super::Linear;

/// A llama.cpp block layout the device kernels decode (ggml's `block_*` structs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    /// IEEE single per value.
    F32,
    /// IEEE half per value.
    F16,
    /// bfloat16 per value.
    BF16,
    /// f16 scale, 32 signed bytes.
    Q8_0,
    /// f16 scale, 32 nibbles offset by 8.
    Q4_0,
    /// f16 scale and minimum, 32 nibbles.
    Q4_1,
    /// f16 scale, 32 five-bit values offset by 16 (high bits in a u32).
    Q5_0,
    /// f16 scale and minimum, 32 five-bit values.
    Q5_1,
    /// 256-value super-block: f16 scale and minimum, eight 6-bit sub-block scales and minima.
    Q4K,
    /// Q4_K with a fifth bit per value.
    Q5K,
    /// 256-value super-block: 6-bit values, sixteen signed 8-bit scales, f16 scale.
    Q6K,
}

impl BlockFormat {
    /// Values per block.
    pub fn block_len(self) -> usize {
        match self {
            BlockFormat::F32 | BlockFormat::F16 | BlockFormat::BF16 => 1,
            BlockFormat::Q4K | BlockFormat::Q5K | BlockFormat::Q6K => 256,
            _ => 32,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            BlockFormat::F32 => 4,
            BlockFormat::F16 | BlockFormat::BF16 => 2,
            BlockFormat::Q8_0 => 34,
            BlockFormat::Q4_0 => 18,
            BlockFormat::Q4_1 => 20,
            BlockFormat::Q5_0 => 22,
            BlockFormat::Q5_1 => 24,
            BlockFormat::Q4K => 144,
            BlockFormat::Q5K => 176,
            BlockFormat::Q6K => 210,
        }
    }
}

/// A `[rows, cols]` matrix (PyTorch's `[d_out, d_in]`) stored in blocks along each row.
pub trait QuantBlocks: Debug + Send + Sync {
    /// The storage type's name (`Q4_K`, `Q8_0`, …).
    fn type_name(&self) -> &str;
    /// `[rows, cols]`: `[d_out, d_in]`.
    fn shape(&self) -> [usize; 2];
    /// Bytes the blocks take.
    fn bytes(&self) -> usize;
    /// Decodes `rows` into `out` (`rows.len() · cols` values, row-major).
    fn dequantize_rows(&self, rows: Range<usize>, out: &mut [f32]);
    /// The layout and bytes (row after row, each a whole number of blocks) when the device
    /// kernels read this storage type; `None` otherwise (the host decodes it).
    fn raw(&self) -> Option<(BlockFormat, &[u8])> {
        None
    }
}

/// A frozen quantized weight (cheap to clone: the blocks, and their device copy, are shared).
#[derive(Clone, Debug)]
pub struct QuantWeight {
    blocks: Arc<dyn QuantBlocks>,
    /// The blocks on the device last used (a device decoder's own type), kept between products.
    on_device: Arc<Mutex<Option<Arc<dyn Any + Send + Sync>>>>,
}

/// Decodes rows of a weight on backend `B`'s device (`None`: not this format, decode on the host).
pub type DeviceDecodeFn<B> =
    fn(&QuantWeight, Range<usize>, &<B as BackendTypes>::Device) -> Option<Tensor<B, 2>>;

/// Whether backend `B` decodes quantized rows on its device (wgpu and CUDA, once registered).
pub fn decodes_on_device<B: Backend>() -> bool {
    crate::registry::get::<DeviceDecodeFn<B>>().is_some()
}

impl QuantWeight {
    /// Wraps `blocks`.
    pub fn new(blocks: Arc<dyn QuantBlocks>) -> Self {
        QuantWeight {
            blocks,
            on_device: Arc::default(),
        }
    }

    /// `[d_out, d_in]`.
    pub fn shape(&self) -> [usize; 2] {
        self.blocks.shape()
    }

    /// The storage type's name.
    pub fn type_name(&self) -> &str {
        self.blocks.type_name()
    }

    /// Bytes the blocks take.
    pub fn bytes(&self) -> usize {
        self.blocks.bytes()
    }

    /// The blocks themselves (the host decoder, the raw bytes).
    pub fn blocks(&self) -> &dyn QuantBlocks {
        self.blocks.as_ref()
    }

    /// The device copy `fits` accepts, or a new one from `make` that replaces the kept copy
    /// (device decoders upload the blocks once, not once per product).
    pub fn device_copy<T: Clone + Send + Sync + 'static>(
        &self,
        fits: impl Fn(&T) -> bool,
        make: impl FnOnce(&[u8]) -> T,
    ) -> Option<T> {
        let (_, bytes) = self.blocks.raw()?;
        let mut kept = self.on_device.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = kept.as_ref().and_then(|k| k.downcast_ref::<T>()) {
            if fits(t) {
                return Some(t.clone());
            }
        }
        let t = make(bytes);
        *kept = Some(Arc::new(t.clone()));
        Some(t)
    }

    /// Rows `rows` decoded, `[rows.len(), d_in]`, in f32 on `device`: by the device's kernel
    /// where the backend registered one for this format, on the host otherwise.
    pub fn dequantize_band<B: Backend>(
        &self,
        rows: Range<usize>,
        device: &B::Device,
    ) -> Tensor<B, 2> {
        let on_device = crate::registry::get::<DeviceDecodeFn<B>>()
            .and_then(|decode| decode(self, rows.clone(), device));
        if let Some(t) = on_device {
            return t;
        }
        let cols = self.shape()[1];
        let mut out = vec![0f32; rows.len() * cols];
        let n = rows.len();
        self.blocks.dequantize_rows(rows, &mut out);
        Tensor::from_data(TensorData::new(out, [n, cols]), device)
    }

    /// The whole matrix decoded, `[d_out, d_in]` (tests, merging an adapter, saving).
    pub fn dequantize<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2> {
        self.dequantize_band(0..self.shape()[0], device)
    }

    /// Row bands of at most [`BAND_VALUES`] decoded values.
    fn bands(&self) -> impl Iterator<Item = Range<usize>> {
        let [rows, cols] = self.shape();
        let step = (BAND_VALUES / cols.max(1)).clamp(1, rows.max(1));
        (0..rows)
            .step_by(step)
            .map(move |r| r..(r + step).min(rows))
    }
}

/// Values decoded at once by [`quant_matmul`] (4 MiB of f32): bands of whole rows.
pub const BAND_VALUES: usize = 1 << 20;

/// `x · Wᵀ` over bands of `W`'s rows (output features); nothing tracked.
fn forward_plain<B: Backend>(x: Tensor<B, 2>, w: &QuantWeight) -> Tensor<B, 2> {
    let device = x.device();
    let dtype = x.dtype();
    let mut parts: Vec<Tensor<B, 2>> = w
        .bands()
        .map(|band| {
            let wb = super::to_dtype(w.dequantize_band::<B>(band, &device), dtype);
            // [n, d_in] · [d_in, band] -> [n, band]
            x.clone().matmul(wb.transpose())
        })
        .collect();
    // One band (most matrices of small models) needs no concatenation, which would copy it.
    match parts.len() {
        1 => parts.pop().expect("one band"),
        _ => Tensor::cat(parts, 1),
    }
}

/// `dy · W` summed over the bands of `W`'s rows.
fn backward_plain<B: Backend>(dy: Tensor<B, 2>, w: &QuantWeight) -> Tensor<B, 2> {
    let device = dy.device();
    let dtype = dy.dtype();
    let mut dx: Option<Tensor<B, 2>> = None;
    for band in w.bands() {
        let dyb = dy.clone().narrow(1, band.start, band.len());
        let wb = super::to_dtype(w.dequantize_band::<B>(band, &device), dtype);
        // [n, band] · [band, d_in] -> [n, d_in]
        let part = dyb.matmul(wb);
        dx = Some(match dx {
            Some(acc) => acc + part,
            None => part,
        });
    }
    dx.expect("a weight has at least one row")
}

/// [`quant_matmul`] on backend `B` (2-D input).
type QuantMatmulFn<B> = fn(Tensor<B, 2>, &QuantWeight) -> Tensor<B, 2>;

/// The op's backward: decodes the weight again.
#[derive(Debug)]
struct QuantMatmulBackward;

impl<I: Backend> Backward<I, 1> for QuantMatmulBackward {
    type State = QuantWeight;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = crate::fused::grad_out::<I, _, 1, 2>(&ops, grads);
        let [node] = ops.parents.map(|n| n.map(|n| n.id));
        crate::fused::give(grads, node, backward_plain(dy, &ops.state));
    }
}

fn forward_autodiff<I: Backend>(
    x: Tensor<Autodiff<I>, 2>,
    w: &QuantWeight,
) -> Tensor<Autodiff<I>, 2> {
    crate::fused::unary(QuantMatmulBackward, x, |x, tracked| {
        (forward_plain(x, w), tracked.then(|| w.clone()))
    })
}

/// Makes [`quant_matmul`] on `Autodiff<I>` a single op that keeps no float weight for its
/// backward (idempotent; [`crate::device::register`] calls it for every backend).
pub fn register<I: Backend>() {
    crate::registry::insert::<QuantMatmulFn<Autodiff<I>>>(forward_autodiff::<I>);
}

/// `x · Wᵀ` for the frozen quantized `W` (`[d_out, d_in]`), `x` of any rank.
///
/// # Shapes
/// - x: `[..., d_in]` → `[..., d_out]`
pub fn quant_matmul<B: Backend, const D: usize>(x: Tensor<B, D>, w: &QuantWeight) -> Tensor<B, D> {
    let mut dims = x.dims();
    let [d_out, d_in] = w.shape();
    assert_eq!(dims[D - 1], d_in, "input width vs the quantized weight's");
    let rows = dims[..D - 1].iter().product();
    let f = crate::registry::get::<QuantMatmulFn<B>>().unwrap_or(forward_plain::<B>);
    // [..., d_in] -> [rows, d_in] -> [rows, d_out] -> [..., d_out]
    let y = f(x.reshape([rows, d_in]), w);
    dims[D - 1] = d_out;
    y.reshape(dims)
}

impl<B: Backend> Linear<B> {
    /// Replaces the weight by the frozen quantized `w` (`[d_out, d_in]`): the float weight is
    /// dropped (an empty `[0, 0]` parameter stays in its place) and the forward pass multiplies
    /// by `w`. Fails on a tensor-parallel shard or a shape that is not this layer's.
    pub fn set_quantized(&mut self, w: QuantWeight) -> Result<(), String> {
        let [d_in, d_out] = self.dims();
        if w.shape() != [d_out, d_in] {
            return Err(format!(
                "quantized weight {:?} for a [{d_out}, {d_in}] layer",
                w.shape()
            ));
        }
        if self.tp.is_some() {
            return Err("a tensor-parallel shard cannot hold a quantized weight".into());
        }
        let device = self.weight.lazy_device();
        self.weight = burn::module::Param::from_tensor(Tensor::empty([0, 0], &device))
            .set_require_grad(false);
        self.quant = Some(w);
        Ok(())
    }

    /// Puts the decoded float weight back (merging an adapter into a quantized base, saving).
    pub fn dequantize_weight(&mut self) {
        if let Some(w) = self.quant.take() {
            let device = self.weight.lazy_device();
            let t = w.dequantize::<B>(&device).transpose();
            self.weight = burn::module::Param::from_tensor(t).set_require_grad(false);
        }
    }
}
