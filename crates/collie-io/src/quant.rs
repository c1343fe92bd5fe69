//! llama.cpp's block quantizers, for writing GGUF files: F16, Q8_0 and Q4_K rows encoded with the
//! same arithmetic as ggml's reference quantizers (`quantize_row_q8_0_ref`,
//! `quantize_row_q4_K_ref` without an importance matrix), so a tensor gets the bytes llama.cpp's
//! quantizer writes for it (tests/fixtures/gguf_quant, made by llama.cpp and gguf-py).
//!
//! Every operation is an f32 operation in the reference's order, with no fused multiply-add: a
//! contraction would change roundings, and with them which candidate scale Q4_K's search keeps.
//!
//! [`Blocks`] holds a matrix in any block type the GGUF reader decodes, as the frozen base of a
//! [`collie_core::nn::Linear`] ([`collie_core::nn::QuantWeight`]); [`quantize_linears`] turns a
//! model's linear layers into such weights (`model.quantize`, [`Quantize`]).

use std::ops::Range;
use std::sync::Arc;

use burn::tensor::backend::Backend;
use collie_core::nn::{Adaptable, BlockFormat, QuantBlocks, QuantWeight};
use half::f16;
use rlx_gguf::GgmlType;

use crate::error::{IoError, Result};
use crate::HostTensor;

/// Elements per Q8_0 block.
pub const QK8_0: usize = 32;
/// Elements per K-quant super-block.
pub const QK_K: usize = 256;
/// Bytes of one Q8_0 block: an f16 scale and 32 signed bytes.
pub const Q8_0_BYTES: usize = 2 + QK8_0;
/// Bytes of one Q4_K super-block: f16 `d` and `dmin`, 12 bytes of packed 6-bit sub-block scales
/// and mins, 128 bytes of 4-bit quants.
pub const Q4_K_BYTES: usize = 2 + 2 + 12 + QK_K / 2;

/// A quantized storage type the writer can produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantType {
    /// IEEE half precision.
    F16,
    /// 8-bit, one f16 scale per 32 values.
    Q8_0,
    /// 4-bit K-quant: 256-value super-blocks of eight 32-value sub-blocks with 6-bit scales and
    /// mins.
    Q4K,
}

impl QuantType {
    /// Values per block (a row's length must be a multiple).
    pub fn block_len(self) -> usize {
        match self {
            QuantType::F16 => 1,
            QuantType::Q8_0 => QK8_0,
            QuantType::Q4K => QK_K,
        }
    }

    /// Encoded bytes of `n` values (`n` a multiple of [`QuantType::block_len`]).
    pub fn bytes(self, n: usize) -> usize {
        match self {
            QuantType::F16 => 2 * n,
            QuantType::Q8_0 => n / QK8_0 * Q8_0_BYTES,
            QuantType::Q4K => n / QK_K * Q4_K_BYTES,
        }
    }

    /// The GGUF tensor type.
    pub fn ggml(self) -> GgmlType {
        match self {
            QuantType::F16 => GgmlType::F16,
            QuantType::Q8_0 => GgmlType::Q8_0,
            QuantType::Q4K => GgmlType::Q4K,
        }
    }

    /// llama.cpp's name of the type (`f16`, `q8_0`, `q4_k`).
    pub fn name(self) -> &'static str {
        match self {
            QuantType::F16 => "f16",
            QuantType::Q8_0 => "q8_0",
            QuantType::Q4K => "q4_k",
        }
    }
}

/// Encodes `x` (a whole number of blocks) as `ty`.
///
/// # Panics
/// When `x.len()` is not a multiple of `ty.block_len()`; callers check row lengths first.
pub fn quantize(x: &[f32], ty: QuantType) -> Vec<u8> {
    assert_eq!(x.len() % ty.block_len(), 0, "{} blocks", ty.name());
    let mut out = vec![0u8; ty.bytes(x.len())];
    match ty {
        QuantType::F16 => {
            for (v, o) in x.iter().zip(out.chunks_exact_mut(2)) {
                o.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
            }
        }
        QuantType::Q8_0 => {
            for (b, o) in x.chunks_exact(QK8_0).zip(out.chunks_exact_mut(Q8_0_BYTES)) {
                q8_0_block(b, o);
            }
        }
        QuantType::Q4K => {
            for (b, o) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(Q4_K_BYTES)) {
                q4_k_block(b, o);
            }
        }
    }
    out
}

/// Decodes `n` values of type `ty` (the reader's dequantization, for checks and tests).
pub fn dequantize(bytes: &[u8], ty: QuantType, n: usize) -> crate::Result<Vec<f32>> {
    rlx_gguf::dequant_typed(ty.ggml(), bytes, n, ty.name()).map_err(|e| crate::IoError::Gguf {
        path: ty.name().into(),
        message: format!("cannot decode {n} values: {e:#}"),
    })
}

/// How a model's frozen linear weights are stored (`model.quantize`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Quantize {
    /// Float, as loaded.
    #[default]
    None,
    /// Encoded on load in a llama.cpp type.
    To(QuantType),
    /// A GGUF file's blocks kept as the file stores them.
    Keep,
}

impl std::str::FromStr for Quantize {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "none" => Quantize::None,
            "q8_0" => Quantize::To(QuantType::Q8_0),
            "q4_k" => Quantize::To(QuantType::Q4K),
            "keep" => Quantize::Keep,
            other => {
                return Err(format!(
                    "quantize `{other}`: expected none, q8_0, q4_k or keep"
                ))
            }
        })
    }
}

/// A `[rows, cols]` matrix in a GGUF block type, rows contiguous.
#[derive(Debug)]
pub struct Blocks {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl Blocks {
    /// `data` as `rows` rows of `cols` values of type `ty` (`name` for messages).
    fn new(name: &str, ty: GgmlType, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self> {
        let row = rlx_gguf::bytes_for_public(ty, cols);
        match row {
            Some(row) if row * rows == data.len() => Ok(Blocks {
                ty,
                rows,
                cols,
                data,
            }),
            _ => Err(IoError::Gguf {
                path: name.into(),
                message: format!(
                    "{} bytes are not {rows} rows of {cols} {ty:?} values",
                    data.len()
                ),
            }),
        }
    }

    /// Bytes of one row.
    fn row_bytes(&self) -> usize {
        self.data.len() / self.rows.max(1)
    }

    /// The rows reordered: row `i` of the result is row `from[i]`.
    pub fn permute_rows(self, from: &[usize]) -> Self {
        let rb = self.row_bytes();
        let mut data = Vec::with_capacity(self.data.len());
        for &r in from {
            data.extend_from_slice(&self.data[r * rb..(r + 1) * rb]);
        }
        Blocks { data, ..self }
    }

    /// As a layer's frozen weight.
    pub fn into_weight(self) -> QuantWeight {
        QuantWeight::new(Arc::new(self))
    }
}

impl QuantBlocks for Blocks {
    fn type_name(&self) -> &str {
        match self.ty {
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
            GgmlType::Q2K => "Q2_K",
            GgmlType::Q3K => "Q3_K",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::F32 => "F32",
            _ => "other",
        }
    }

    fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    fn bytes(&self) -> usize {
        self.data.len()
    }

    fn raw(&self) -> Option<(BlockFormat, &[u8])> {
        let format = match self.ty {
            GgmlType::F32 => BlockFormat::F32,
            GgmlType::F16 => BlockFormat::F16,
            GgmlType::BF16 => BlockFormat::BF16,
            GgmlType::Q8_0 => BlockFormat::Q8_0,
            GgmlType::Q4_0 => BlockFormat::Q4_0,
            GgmlType::Q4_1 => BlockFormat::Q4_1,
            GgmlType::Q5_0 => BlockFormat::Q5_0,
            GgmlType::Q5_1 => BlockFormat::Q5_1,
            GgmlType::Q4K => BlockFormat::Q4K,
            GgmlType::Q5K => BlockFormat::Q5K,
            GgmlType::Q6K => BlockFormat::Q6K,
            _ => return None,
        };
        Some((format, &self.data))
    }

    fn dequantize_rows(&self, rows: Range<usize>, out: &mut [f32]) {
        let (rb, cols) = (self.row_bytes(), self.cols);
        // Bands of rows decoded in parallel; each band's values land in its part of `out`.
        let per = rows
            .len()
            .div_ceil(rayon::current_num_threads().max(1))
            .max(1);
        use rayon::prelude::*;
        out.par_chunks_mut(per * cols)
            .enumerate()
            .for_each(|(i, chunk)| {
                let r0 = rows.start + i * per;
                let n = chunk.len() / cols;
                let bytes = &self.data[r0 * rb..(r0 + n) * rb];
                let v = rlx_gguf::dequant_typed(self.ty, bytes, n * cols, "quantized weight")
                    .expect("blocks checked when built");
                chunk.copy_from_slice(&v);
            });
    }
}

/// `[d_out, d_in]` float rows encoded as `ty` (`name` for messages).
pub fn quantize_weight(name: &str, w: &HostTensor, ty: QuantType) -> Result<QuantWeight> {
    let [rows, cols] = w.shape[..] else {
        return Err(IoError::Gguf {
            path: name.into(),
            message: format!("only matrices can be quantized, not shape {:?}", w.shape),
        });
    };
    if cols % ty.block_len() != 0 {
        return Err(IoError::Gguf {
            path: name.into(),
            message: format!(
                "rows of {cols} values cannot be quantized to {} (blocks of {})",
                ty.name(),
                ty.block_len()
            ),
        });
    }
    Ok(Blocks::new(name, ty.ggml(), rows, cols, quantize(&w.data, ty))?.into_weight())
}

/// A GGUF tensor's blocks as they are: `[rows, cols]` in PyTorch's order (`name` for messages).
pub fn gguf_blocks(src: &crate::gguf::GgufSource, key: &str) -> Result<Blocks> {
    let (ty, shape, bytes) = src.raw(key)?;
    let [cols, rows] = shape[..] else {
        return Err(IoError::Gguf {
            path: src.path().to_path_buf(),
            message: format!("tensor `{key}` is not a matrix ({shape:?})"),
        });
    };
    Blocks::new(key, ty, rows, cols, bytes.to_vec())
}

/// The type a matrix with rows of `cols` values is stored in when `ty` is asked for: `ty`, or,
/// when the rows are not a whole number of its blocks, Q8_0, then F16 (what the GGUF writer and
/// [`quantize_linears`] both do).
pub fn fallback(ty: QuantType, cols: usize) -> QuantType {
    [ty, QuantType::Q8_0, QuantType::F16]
        .into_iter()
        .find(|t| cols.is_multiple_of(t.block_len()))
        .expect("F16 has one-value blocks")
}

/// Replaces the weights of `model`'s linear layers (its LM head excepted) by `ty`-encoded frozen
/// weights ([`fallback`] for rows that are not whole blocks), one layer at a time (a lazily
/// loaded weight is read, encoded and dropped). Returns the bytes the encoded weights take.
pub fn quantize_linears<B: Backend, M: Adaptable<B>>(
    model: &mut M,
    ty: QuantType,
) -> Result<usize> {
    let head = model.output_layer_name();
    let mut total = 0;
    for slot in model.linears_mut() {
        if slot.name == head {
            continue;
        }
        // [d_in, d_out] -> [d_out, d_in]
        let w = HostTensor::from_tensor(slot.linear.weight.val()).transpose();
        let q = quantize_weight(&slot.name, &w, fallback(ty, w.shape[1]))?;
        total += q.bytes();
        slot.linear.set_quantized(q).map_err(|m| IoError::Gguf {
            path: slot.name.clone().into(),
            message: m,
        })?;
    }
    Ok(total)
}

/// ggml's `nearest_int`: round half to even through the 1.5·2²³ trick (valid for |x| < 2²²).
#[inline]
fn nearest_int(x: f32) -> i32 {
    let v = x + 12_582_912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

fn q8_0_block(x: &[f32], out: &mut [u8]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    for (v, o) in x.iter().zip(&mut out[2..]) {
        // `roundf`: half away from zero.
        *o = (v * id).round() as i8 as u8;
    }
}

/// ggml's `make_qkx2_quants` with the arguments Q4_K passes (nmax 15, rmin −1, rdelta 0.1,
/// 20 steps, squared error): an asymmetric scale and min for one 32-value sub-block, chosen among
/// least-squares fits of candidate roundings. Returns `(scale, -min)` and fills `l`.
fn make_qkx2_quants(x: &[f32; 32], w: &[f32; 32], l: &mut [u8; 32]) -> (f32, f32) {
    const NMAX: i32 = 15;
    const NSTEP: i32 = 20;
    let (rmin, rdelta) = (-1.0f32, 0.1f32);
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..32 {
        min = min.min(x[i]);
        max = max.max(x[i]);
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.fill(0);
        return (0.0, -min);
    }
    let mut iscale = NMAX as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best = 0f32;
    for i in 0..32 {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, NMAX);
        l[i] = q as u8;
        let diff = scale * q as f32 + min - x[i];
        best += w[i] * (diff * diff);
    }
    let mut laux = [0u8; 32];
    for is in 0..=NSTEP {
        iscale = (rmin + rdelta * is as f32 + NMAX as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..32 {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, NMAX);
            laux[i] = q as u8;
            let q = q as f32;
            sum_l += w[i] * q;
            sum_l2 += w[i] * q * q;
            sum_xl += w[i] * q * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut err = 0f32;
            for i in 0..32 {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                err += w[i] * (diff * diff);
            }
            if err < best {
                *l = laux;
                best = err;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

fn q4_k_block(x: &[f32], out: &mut [u8]) {
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let mut l = [[0u8; 32]; 8];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let sub: &[f32; 32] = x[32 * j..32 * (j + 1)].try_into().expect("32 values");
        let sum_x2 = sub.iter().fold(0f32, |s, v| s + v * v);
        let av_x = (sum_x2 / 32.0).sqrt();
        let w: [f32; 32] = std::array::from_fn(|i| av_x + sub[i].abs());
        (scales[j], mins[j]) = make_qkx2_quants(sub, &w, &mut l[j]);
        max_scale = max_scale.max(scales[j]);
        max_min = max_min.max(mins[j]);
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    for j in 0..8 {
        let ls = nearest_int(inv_scale * scales[j]).min(63) as u8;
        let lm = nearest_int(inv_min * mins[j]).min(63) as u8;
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xf) | ((lm & 0xf) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    out[..2].copy_from_slice(&d.to_le_bytes());
    out[2..4].copy_from_slice(&dmin.to_le_bytes());
    out[4..16].copy_from_slice(&packed);
    // Requantize each sub-block against the scale and min the decoder will see.
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &packed);
        let dj = d.to_f32() * sc as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * m as f32;
        for i in 0..32 {
            l[j][i] = nearest_int((x[32 * j + i] + dm) / dj).clamp(0, 15) as u8;
        }
    }
    // Sub-blocks 2k and 2k+1 share 32 bytes: low nibbles, then high nibbles.
    for (k, q) in out[16..].chunks_exact_mut(32).enumerate() {
        for i in 0..32 {
            q[i] = l[2 * k][i] | (l[2 * k + 1][i] << 4);
        }
    }
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` from the packed bytes.
fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dequant(bytes: &[u8], ty: QuantType, n: usize) -> Vec<f32> {
        dequantize(bytes, ty, n).unwrap()
    }

    #[test]
    fn nearest_int_rounds_half_to_even() {
        let cases = [
            (0.5, 0),
            (1.5, 2),
            (2.5, 2),
            (-0.5, 0),
            (-1.5, -2),
            (0.49999997, 0),
        ];
        for (x, want) in cases {
            assert_eq!(nearest_int(x), want, "{x}");
        }
    }

    #[test]
    fn round_trips_within_the_format_step() {
        // Values spanning signs and magnitudes; the error bound is half a quantization step.
        let x: Vec<f32> = (0..2 * QK_K)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i % 5) as f32))
            .collect();
        for ty in [QuantType::F16, QuantType::Q8_0, QuantType::Q4K] {
            let y = dequant(&quantize(&x, ty), ty, x.len());
            for (blk, (xb, yb)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
                let (lo, hi) = xb
                    .iter()
                    .fold((0f32, 0f32), |(a, b), v| (a.min(*v), b.max(*v)));
                let step = match ty {
                    QuantType::F16 => hi.abs().max(lo.abs()) / 1024.0,
                    QuantType::Q8_0 => hi.abs().max(lo.abs()) / 127.0,
                    // 4 bits over the range, plus the 6-bit rounding of scale and min.
                    QuantType::Q4K => 1.5 * (hi - lo) / 15.0,
                };
                for (a, b) in xb.iter().zip(yb) {
                    assert!((a - b).abs() <= step, "{ty:?} block {blk}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn zero_and_constant_blocks() {
        let zero = vec![0f32; QK_K];
        for ty in [QuantType::Q8_0, QuantType::Q4K] {
            assert!(quantize(&zero, ty).iter().all(|&b| b == 0), "{ty:?}");
        }
        let c = vec![-0.75f32; QK_K];
        let y = dequant(&quantize(&c, QuantType::Q4K), QuantType::Q4K, QK_K);
        assert!(y.iter().all(|v| (v + 0.75).abs() < 1e-2), "{:?}", &y[..4]);
    }
}
