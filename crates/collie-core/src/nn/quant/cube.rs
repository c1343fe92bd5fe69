//! Decoding quantized rows on the device (wgpu, CUDA): a CubeCL kernel reads llama.cpp's blocks
//! from a copy kept on the device and writes a band of f32 rows, one thread per value, with the
//! GGUF reader's arithmetic (`d · sc · q − dmin · m` and friends, f16 fields decoded bit by bit),
//! so the band equals the host decoder's up to the device's rounding of fused multiply-adds.
//!
//! The blocks are uploaded once per weight (as u32 words, the last one zero-padded) and shared by
//! every clone of the [`QuantWeight`]; under Burn's kernel fusion each decode is one custom
//! operation in the stream.

use std::ops::Range;

use burn::tensor::ops::IntTensorOps;
use burn::tensor::{DType, Shape, Tensor, TensorData, TensorPrimitive};
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::calculate_cube_count_elemwise;
use cubecl::prelude::CubeDim;

use super::{BlockFormat, DeviceDecodeFn, QuantWeight};

/// Backends that decode quantized rows on their device.
pub trait DeviceDecode: burn::tensor::backend::Backend {
    /// Rows `rows` of `w` decoded to f32, `[rows.len(), d_in]`; `None` for a storage type the
    /// kernel does not read.
    fn decode(
        w: &QuantWeight,
        rows: Range<usize>,
        device: &Self::Device,
    ) -> Option<Tensor<Self, 2>>;
}

/// Makes [`QuantWeight::dequantize_band`] (and so `quant_matmul`) decode on `B`'s device.
pub fn register<B: DeviceDecode>() {
    crate::registry::insert::<DeviceDecodeFn<B>>(B::decode);
}

/// The layout the kernel decodes `rows` of `w` from, or `None` when it cannot (a storage type
/// without a kernel, no rows): the one check both the plain and the fused backend make before
/// they launch or register a decode.
fn decodable(w: &QuantWeight, rows: &Range<usize>) -> Option<BlockFormat> {
    let (format, _) = w.blocks().raw()?;
    let cols = w.shape()[1];
    (!rows.is_empty() && cols.is_multiple_of(format.block_len())).then_some(format)
}

/// The kernel's number for a format (a comptime switch).
fn code(f: BlockFormat) -> u32 {
    match f {
        BlockFormat::F16 => 0,
        BlockFormat::BF16 => 1,
        BlockFormat::Q8_0 => 2,
        BlockFormat::Q4_0 => 3,
        BlockFormat::Q4_1 => 4,
        BlockFormat::Q5_0 => 5,
        BlockFormat::Q5_1 => 6,
        BlockFormat::Q4K => 7,
        BlockFormat::Q5K => 8,
        BlockFormat::Q6K => 9,
        BlockFormat::F32 => 10,
    }
}

/// The `#[cube]` kernel and its helpers (CubeCL's `Tensor`, not Burn's).
// The kernels assign a default before branches that each overwrite it (CubeCL's `if` is a
// statement here).
#[allow(clippy::collapsible_else_if, unused_assignments)]
mod kernels {
    use cubecl::prelude::*;

    /// Where the band lies in the blocks.
    #[derive(CubeLaunch, CubeType)]
    pub struct Band {
        /// Values to write (`rows · cols`).
        pub n: u32,
        /// Values per row.
        pub cols: u32,
        /// The band's first row.
        pub row0: u32,
        /// Bytes per row.
        pub row_bytes: u32,
    }

    /// Byte `off` of the blocks.
    #[cube]
    fn byte(data: &Tensor<u32>, off: usize) -> u32 {
        (data[off / 4] >> (u32::cast_from(off % 4) * 8)) & 0xff
    }

    /// The little-endian IEEE half at byte `off`, exactly.
    #[cube]
    fn half(data: &Tensor<u32>, off: usize) -> f32 {
        let h = byte(data, off) | (byte(data, off + 1) << 8);
        let exp = (h >> 10) & 0x1f;
        let mant = h & 0x3ff;
        let mut v = f32::new(0.0);
        if exp == 0 {
            // Zero or subnormal: mant · 2⁻²⁴.
            v = f32::cast_from(mant) * f32::new(5.9604645e-8);
        } else if exp == 31 {
            v = f32::reinterpret(0x7f80_0000 | (mant << 13));
        } else {
            v = f32::reinterpret(((exp + 112) << 23) | (mant << 13));
        }
        if (h & 0x8000) != 0 {
            v = -v;
        }
        v
    }

    /// A byte read as `i8`.
    #[cube]
    fn signed(b: u32) -> f32 {
        let mut v = f32::cast_from(b);
        if b >= 128 {
            v -= f32::new(256.0);
        }
        v
    }

    /// Nibble `j` (0..32) of a 32-value block whose 16 bytes start at `qs`: low nibbles are the
    /// first half, high nibbles the second.
    #[cube]
    fn nibble(data: &Tensor<u32>, qs: usize, j: usize) -> u32 {
        let b = byte(data, qs + j % 16);
        let mut v = b & 15;
        if j >= 16 {
            v = b >> 4;
        }
        v
    }

    /// The 6-bit scale (`min == false`) or minimum of sub-block `j` in a K-quant's 12 bytes at `s`.
    #[cube]
    fn k_scale(data: &Tensor<u32>, s: usize, j: usize, #[comptime] min: bool) -> u32 {
        let mut v = 0u32;
        if min {
            if j < 4 {
                v = byte(data, s + j + 4) & 63;
            } else {
                v = (byte(data, s + j + 4) >> 4) | ((byte(data, s + j) >> 6) << 4);
            }
        } else {
            // `min` is comptime: kept apart from the run-time test on `j`.
            if j < 4 {
                v = byte(data, s + j) & 63;
            } else {
                v = (byte(data, s + j + 4) & 15) | ((byte(data, s + j - 4) >> 6) << 4);
            }
        }
        v
    }

    /// Value `j` of the Q4_K (`five == false`) or Q5_K block at `base`.
    #[cube]
    fn q45_k(data: &Tensor<u32>, base: usize, j: usize, #[comptime] five: bool) -> f32 {
        let d = half(data, base);
        let dmin = half(data, base + 2);
        // 64-value groups: the low nibbles of 32 bytes, then their high nibbles.
        let group = j / 64;
        let within = j % 64;
        let sub = 2 * group + within / 32;
        let l = within % 32;
        let mut qs = base + 16;
        if five {
            qs = base + 48;
        }
        let b = byte(data, qs + group * 32 + l);
        let mut q = b & 15;
        if within >= 32 {
            q = b >> 4;
        }
        if five {
            q += ((byte(data, base + 16 + l) >> u32::cast_from(sub)) & 1) << 4;
        }
        let d1 = d * f32::cast_from(k_scale(data, base + 4, sub, false));
        let m1 = dmin * f32::cast_from(k_scale(data, base + 4, sub, true));
        d1 * f32::cast_from(q) - m1
    }

    /// Value `j` of the Q6_K block at `base` (`ql[128] qh[64] scales[16] d`).
    #[cube]
    fn q6_k(data: &Tensor<u32>, base: usize, j: usize) -> f32 {
        let h = j / 128;
        let quarter = (j % 128) / 32;
        let l = j % 32;
        let lb = byte(data, base + h * 64 + l + 32 * (quarter % 2));
        let mut lo = lb & 15;
        if quarter >= 2 {
            lo = lb >> 4;
        }
        let hi = (byte(data, base + 128 + h * 32 + l) >> (2 * u32::cast_from(quarter))) & 3;
        let q = f32::cast_from(lo | (hi << 4)) - f32::new(32.0);
        let sc = signed(byte(data, base + 192 + h * 8 + l / 16 + 2 * quarter));
        half(data, base + 208) * sc * q
    }

    /// One thread per value of the band: `out[r, c]` = value `c` of row `row0 + r`.
    #[cube(launch)]
    pub fn decode_kernel(
        data: &Tensor<u32>,
        out: &mut Tensor<f32>,
        band: Band,
        #[comptime] format: u32,
        #[comptime] block_len: usize,
        #[comptime] block_bytes: usize,
    ) {
        let i = ABSOLUTE_POS;
        if i >= band.n as usize {
            terminate!();
        }
        let cols = band.cols as usize;
        let r = i / cols;
        let c = i % cols;
        let base =
            (band.row0 as usize + r) * band.row_bytes as usize + (c / block_len) * block_bytes;
        let j = c % block_len;
        let mut v = f32::new(0.0);
        if comptime!(format == 0) {
            v = half(data, base);
        } else if comptime!(format == 1) {
            v = f32::reinterpret((byte(data, base) | (byte(data, base + 1) << 8)) << 16);
        } else if comptime!(format == 2) {
            v = half(data, base) * signed(byte(data, base + 2 + j));
        } else if comptime!(format == 3) {
            v = half(data, base) * (f32::cast_from(nibble(data, base + 2, j)) - f32::new(8.0));
        } else if comptime!(format == 4) {
            v = half(data, base) * f32::cast_from(nibble(data, base + 4, j)) + half(data, base + 2);
        } else if comptime!(format == 5 || format == 6) {
            // Q5_0: d, qh, qs; Q5_1: d, m, qh, qs. Bit j of qh is value j's fifth bit.
            let mut qh = base + 2;
            if comptime!(format == 6) {
                qh = base + 4;
            }
            let high = (byte(data, qh + j / 8) >> u32::cast_from(j % 8)) & 1;
            let q = nibble(data, qh + 4, j) | (high << 4);
            if comptime!(format == 5) {
                v = half(data, base) * (f32::cast_from(q) - f32::new(16.0));
            } else {
                v = half(data, base) * f32::cast_from(q) + half(data, base + 2);
            }
        } else if comptime!(format == 7) {
            v = q45_k(data, base, j, false);
        } else if comptime!(format == 8) {
            v = q45_k(data, base, j, true);
        } else if comptime!(format == 9) {
            v = q6_k(data, base, j);
        } else {
            // F32: rows of whole words.
            v = f32::reinterpret(data[base / 4]);
        }
        out[i] = v;
    }
}

type Cb<R, F, I, BT> = CubeBackend<R, F, I, BT>;

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> DeviceDecode
    for Cb<R, F, I, BT>
{
    fn decode(w: &QuantWeight, rows: Range<usize>, device: &R::Device) -> Option<Tensor<Self, 2>> {
        let format = decodable(w, &rows)?;
        let [_, cols] = w.shape();
        let n = rows.len() * cols;
        let row_bytes = cols / format.block_len() * format.block_bytes();
        let blocks: CubeTensor<R> = w.device_copy(
            |t: &CubeTensor<R>| &t.device == device,
            |bytes| {
                // Little-endian u32 words; the kernel never reads the padding of the last one.
                let words: Vec<u32> = bytes
                    .chunks(4)
                    .map(|c| {
                        let mut b = [0u8; 4];
                        b[..c.len()].copy_from_slice(c);
                        u32::from_le_bytes(b)
                    })
                    .collect();
                let len = words.len();
                Self::int_from_data(TensorData::new(words, [len]), device)
            },
        )?;
        let client = blocks.client.clone();
        let out = empty_device_contiguous_dtype(
            client.clone(),
            device.clone(),
            Shape::new([rows.len(), cols]),
            DType::F32,
        );
        let cube_dim = CubeDim::new(&client, n);
        let count = calculate_cube_count_elemwise(&client, n, cube_dim);
        kernels::decode_kernel::launch::<R>(
            &client,
            count,
            cube_dim,
            blocks.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            kernels::BandLaunch::new(n as u32, cols as u32, rows.start as u32, row_bytes as u32),
            code(format),
            format.block_len(),
            format.block_bytes(),
        );
        Some(Tensor::from_primitive(TensorPrimitive::Float(out)))
    }
}

/// The decoder under Burn's kernel fusion (`burn::backend::Wgpu`, `Cuda`): each decode is one
/// custom operation, without inputs, that runs the inner backend's kernel.
mod fusion {
    use std::marker::PhantomData;
    use std::ops::Range;

    use burn::tensor::{DType, Shape, Tensor, TensorPrimitive};
    use burn_fusion::stream::{Operation, OperationStreams};
    use burn_fusion::{Fusion, FusionBackend, FusionRuntime};
    use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

    use super::DeviceDecode;
    use crate::nn::quant::QuantWeight;

    #[derive(Debug)]
    struct DecodeOp<B: FusionBackend> {
        desc: CustomOpIr,
        w: QuantWeight,
        rows: Range<usize>,
        device: B::Device,
        _b: PhantomData<B>,
    }

    impl<B: FusionBackend + DeviceDecode> Operation<B::FusionRuntime> for DecodeOp<B> {
        fn execute(
            &self,
            handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
        ) {
            let t = B::decode(&self.w, self.rows.clone(), &self.device)
                .expect("the format was checked when the op was registered");
            handles
                .register_float_tensor::<B>(&self.desc.outputs[0].id, t.into_primitive().tensor());
        }
    }

    impl<B: FusionBackend + DeviceDecode> DeviceDecode for Fusion<B> {
        fn decode(
            w: &QuantWeight,
            rows: Range<usize>,
            device: &B::Device,
        ) -> Option<Tensor<Self, 2>> {
            super::decodable(w, &rows)?;
            let [_, cols] = w.shape();
            let client = burn_fusion::get_client::<B>(device);
            let out = TensorIr::uninit(
                client.create_empty_handle(),
                Shape::new([rows.len(), cols]),
                DType::F32,
            );
            let desc = CustomOpIr::new("collie_quant_decode", &[], &[out]);
            let op = DecodeOp::<B> {
                desc: desc.clone(),
                w: w.clone(),
                rows,
                device: device.clone(),
                _b: PhantomData,
            };
            let mut outs =
                client.register(OperationStreams::default(), OperationIr::Custom(desc), op);
            let t = outs.pop().expect("one output");
            Some(Tensor::from_primitive(TensorPrimitive::Float(t)))
        }
    }
}
