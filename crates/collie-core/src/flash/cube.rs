//! The CubeCL kernels of memory-efficient attention (wgpu and CUDA).
//!
//! One cube handles `BLOCK` consecutive query rows of one (batch, head) — or, for the key and
//! value gradients, `BLOCK` key rows of one (batch, kv head). Each thread owns one row and keeps
//! it, and its accumulators, in f32 registers; the other side (key/value tiles, or query /
//! output-gradient tiles) is staged through shared memory `BLOCK` rows at a time, so every
//! thread reads the same staged row at once. Masking evaluates [`AttnMask`]'s rules per (query,
//! key) pair from the segment ids, and causal masks skip the tiles that lie wholly in a row's
//! future. GQA: query head `h` reads key/value head `h / n_rep`; the key-side kernel walks the
//! `n_rep` query heads of its group, so K and V are never repeated and dK, dV need no
//! reduction afterwards.
//!
//! Hidden scores use a large finite negative (WGSL has no infinity literal).

use burn::tensor::{DType, Shape, Tensor, TensorPrimitive};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::prelude::{CubeCount, CubeDim};

use super::FlashKernels;
use crate::attention::AttnMask;

/// The CubeCL kernels (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct Cube;

/// Rows per cube for a head width: two staged `[BLOCK, head_dim]` f32 tiles fit in 16 KiB,
/// the shared memory every WebGPU device offers.
fn block_rows(head_dim: usize) -> usize {
    (2048 / head_dim.max(1)).clamp(4, 32)
}

/// The `#[cube]` kernels (CubeCL's `Tensor`, not Burn's).
#[allow(clippy::manual_div_ceil)] // `div_ceil` has no CubeCL expansion
mod kernels {
    use cubecl::prelude::*;

    /// The runtime sizes of a call.
    #[derive(CubeLaunch, CubeType)]
    pub struct Dims {
        /// Query heads.
        pub heads: u32,
        /// Key/value heads.
        pub kv_heads: u32,
        /// Queries.
        pub s_q: u32,
        /// Key slots.
        pub s_k: u32,
        /// Sliding window (`0`: none).
        pub window: u32,
        /// Slots shared by every document.
        pub shared: u32,
    }

    /// Score of a hidden pair.
    const HIDDEN: f32 = -1.0e30;

    /// Whether query slot `slot` (segment `seg_q`) sees key slot `j` (segment `seg_k`): causality,
    /// the sliding window (`0` = none), and documents (`shared` leading slots belong to all).
    #[cube]
    #[allow(clippy::too_many_arguments)]
    fn visible(
        slot: usize,
        j: usize,
        seg_q: i32,
        seg_k: i32,
        window: usize,
        shared: usize,
        #[comptime] has_mask: bool,
        #[comptime] has_segments: bool,
    ) -> bool {
        let mut vis = true;
        if has_mask {
            vis = j <= slot;
            if window > 0 && j + window <= slot {
                vis = false;
            }
            if has_segments {
                let foreign = (seg_k != seg_q || seg_k == 0) && j >= shared;
                if foreign && j != slot {
                    vis = false;
                }
            }
        }
        vis
    }

    /// Forward: output and log-sum-exp of `BLOCK` query rows of one (batch, head).
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub fn flash_forward_kernel<F: Float, I: Int>(
        q: &Tensor<F>,
        k: &Tensor<F>,
        v: &Tensor<F>,
        seg: &Tensor<I>,
        out: &mut Tensor<F>,
        lse: &mut Tensor<f32>,
        dims: Dims,
        #[comptime] head_dim: usize,
        #[comptime] block: usize,
        #[comptime] has_mask: bool,
        #[comptime] has_segments: bool,
        #[define(F, I)] _dtypes: [StorageType; 2],
    ) {
        let heads = dims.heads as usize;
        let kv_heads = dims.kv_heads as usize;
        let s_q = dims.s_q as usize;
        let s_k = dims.s_k as usize;
        let window = dims.window as usize;
        let shared = dims.shared as usize;
        let past = s_k - s_q;
        let b = CUBE_POS_Z as usize;
        let h = CUBE_POS_Y as usize;
        let g = h / (heads / kv_heads);
        let row = UNIT_POS_X as usize;
        let i = CUBE_POS_X as usize * block + row;
        let valid = i < s_q;
        let slot = past + i;
        let scale = f32::new(1.0) / f32::sqrt(f32::cast_from(head_dim as u32));

        let q_base = ((b * heads + h) * s_q + i) * head_dim;
        let kv_base = (b * kv_heads + g) * s_k * head_dim;
        let mut qi = Array::<f32>::new(head_dim);
        let mut acc = Array::<f32>::new(head_dim);
        for d in 0..head_dim {
            acc[d] = f32::new(0.0);
            qi[d] = f32::new(0.0);
            if valid {
                qi[d] = f32::cast_from(q[q_base + d]) * scale;
            }
        }
        let mut seg_q = i32::new(1);
        if has_segments && valid {
            seg_q = i32::cast_from(seg[b * s_k + slot]);
        }
        let mut m = f32::new(HIDDEN);
        let mut l = f32::new(0.0);

        let mut ks = SharedMemory::<f32>::new(block * head_dim);
        let mut vs = SharedMemory::<f32>::new(block * head_dim);
        let mut segs = SharedMemory::<i32>::new(block);
        // Under a causal mask no key after the block's last query slot is visible.
        let mut n_tiles = (s_k + block - 1) / block;
        if has_mask {
            let mut end = CUBE_POS_X as usize * block + block;
            if end > s_q {
                end = s_q;
            }
            let last = past + end - 1;
            n_tiles = last / block + 1;
        }
        for t in 0..n_tiles {
            let j_load = t * block + row;
            for d in 0..head_dim {
                let mut kd = f32::new(0.0);
                let mut vd = f32::new(0.0);
                if j_load < s_k {
                    kd = f32::cast_from(k[kv_base + j_load * head_dim + d]);
                    vd = f32::cast_from(v[kv_base + j_load * head_dim + d]);
                }
                ks[row * head_dim + d] = kd;
                vs[row * head_dim + d] = vd;
            }
            let mut sj = i32::new(0);
            if has_segments && j_load < s_k {
                sj = i32::cast_from(seg[b * s_k + j_load]);
            }
            segs[row] = sj;
            sync_cube();
            if valid {
                for jj in 0..block {
                    let j = t * block + jj;
                    if j < s_k
                        && visible(
                            slot,
                            j,
                            seg_q,
                            segs[jj],
                            window,
                            shared,
                            has_mask,
                            has_segments,
                        )
                    {
                        let mut s = f32::new(0.0);
                        for d in 0..head_dim {
                            s += qi[d] * ks[jj * head_dim + d];
                        }
                        if s > m {
                            let c = f32::exp(m - s);
                            l *= c;
                            for d in 0..head_dim {
                                acc[d] *= c;
                            }
                            m = s;
                        }
                        let p = f32::exp(s - m);
                        l += p;
                        for d in 0..head_dim {
                            acc[d] += p * vs[jj * head_dim + d];
                        }
                    }
                }
            }
            sync_cube();
        }
        if valid {
            let mut safe = l;
            if safe < f32::new(1.0e-30) {
                safe = f32::new(1.0e-30);
            }
            let inv = f32::new(1.0) / safe;
            for d in 0..head_dim {
                out[q_base + d] = F::cast_from(acc[d] * inv);
            }
            lse[(b * heads + h) * s_q + i] = m + f32::ln(safe);
        }
    }

    /// Backward, query side: `dQ` of `BLOCK` query rows of one (batch, head).
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub fn flash_dq_kernel<F: Float, I: Int>(
        q: &Tensor<F>,
        k: &Tensor<F>,
        v: &Tensor<F>,
        d_o: &Tensor<F>,
        lse: &Tensor<f32>,
        delta: &Tensor<f32>,
        seg: &Tensor<I>,
        dq: &mut Tensor<F>,
        dims: Dims,
        #[comptime] head_dim: usize,
        #[comptime] block: usize,
        #[comptime] has_mask: bool,
        #[comptime] has_segments: bool,
        #[define(F, I)] _dtypes: [StorageType; 2],
    ) {
        let heads = dims.heads as usize;
        let kv_heads = dims.kv_heads as usize;
        let s_q = dims.s_q as usize;
        let s_k = dims.s_k as usize;
        let window = dims.window as usize;
        let shared = dims.shared as usize;
        let past = s_k - s_q;
        let b = CUBE_POS_Z as usize;
        let h = CUBE_POS_Y as usize;
        let g = h / (heads / kv_heads);
        let row = UNIT_POS_X as usize;
        let i = CUBE_POS_X as usize * block + row;
        let valid = i < s_q;
        let slot = past + i;
        let scale = f32::new(1.0) / f32::sqrt(f32::cast_from(head_dim as u32));

        let q_base = ((b * heads + h) * s_q + i) * head_dim;
        let kv_base = (b * kv_heads + g) * s_k * head_dim;
        let mut qi = Array::<f32>::new(head_dim);
        let mut doi = Array::<f32>::new(head_dim);
        let mut acc = Array::<f32>::new(head_dim);
        for d in 0..head_dim {
            acc[d] = f32::new(0.0);
            qi[d] = f32::new(0.0);
            doi[d] = f32::new(0.0);
            if valid {
                qi[d] = f32::cast_from(q[q_base + d]) * scale;
                doi[d] = f32::cast_from(d_o[q_base + d]);
            }
        }
        let mut lse_i = f32::new(0.0);
        let mut delta_i = f32::new(0.0);
        let mut seg_q = i32::new(1);
        if valid {
            lse_i = lse[(b * heads + h) * s_q + i];
            delta_i = delta[(b * heads + h) * s_q + i];
            if has_segments {
                seg_q = i32::cast_from(seg[b * s_k + slot]);
            }
        }

        let mut ks = SharedMemory::<f32>::new(block * head_dim);
        let mut vs = SharedMemory::<f32>::new(block * head_dim);
        let mut segs = SharedMemory::<i32>::new(block);
        let mut n_tiles = (s_k + block - 1) / block;
        if has_mask {
            let mut end = CUBE_POS_X as usize * block + block;
            if end > s_q {
                end = s_q;
            }
            let last = past + end - 1;
            n_tiles = last / block + 1;
        }
        for t in 0..n_tiles {
            let j_load = t * block + row;
            for d in 0..head_dim {
                let mut kd = f32::new(0.0);
                let mut vd = f32::new(0.0);
                if j_load < s_k {
                    kd = f32::cast_from(k[kv_base + j_load * head_dim + d]);
                    vd = f32::cast_from(v[kv_base + j_load * head_dim + d]);
                }
                ks[row * head_dim + d] = kd;
                vs[row * head_dim + d] = vd;
            }
            let mut sj = i32::new(0);
            if has_segments && j_load < s_k {
                sj = i32::cast_from(seg[b * s_k + j_load]);
            }
            segs[row] = sj;
            sync_cube();
            if valid {
                for jj in 0..block {
                    let j = t * block + jj;
                    if j < s_k
                        && visible(
                            slot,
                            j,
                            seg_q,
                            segs[jj],
                            window,
                            shared,
                            has_mask,
                            has_segments,
                        )
                    {
                        let mut s = f32::new(0.0);
                        let mut dp = f32::new(0.0);
                        for d in 0..head_dim {
                            s += qi[d] * ks[jj * head_dim + d];
                            dp += doi[d] * vs[jj * head_dim + d];
                        }
                        let ds = f32::exp(s - lse_i) * (dp - delta_i);
                        for d in 0..head_dim {
                            acc[d] += ds * ks[jj * head_dim + d];
                        }
                    }
                }
            }
            sync_cube();
        }
        if valid {
            for d in 0..head_dim {
                dq[q_base + d] = F::cast_from(acc[d] * scale);
            }
        }
    }

    /// Backward, key side: `dK` and `dV` of `BLOCK` key rows of one (batch, kv head), over the
    /// query heads of its group.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub fn flash_dkv_kernel<F: Float, I: Int>(
        q: &Tensor<F>,
        k: &Tensor<F>,
        v: &Tensor<F>,
        d_o: &Tensor<F>,
        lse: &Tensor<f32>,
        delta: &Tensor<f32>,
        seg: &Tensor<I>,
        dk: &mut Tensor<F>,
        dv: &mut Tensor<F>,
        dims: Dims,
        #[comptime] head_dim: usize,
        #[comptime] block: usize,
        #[comptime] has_mask: bool,
        #[comptime] has_segments: bool,
        #[define(F, I)] _dtypes: [StorageType; 2],
    ) {
        let heads = dims.heads as usize;
        let kv_heads = dims.kv_heads as usize;
        let s_q = dims.s_q as usize;
        let s_k = dims.s_k as usize;
        let window = dims.window as usize;
        let shared = dims.shared as usize;
        let past = s_k - s_q;
        let n_rep = heads / kv_heads;
        let b = CUBE_POS_Z as usize;
        let g = CUBE_POS_Y as usize;
        let row = UNIT_POS_X as usize;
        let j = CUBE_POS_X as usize * block + row;
        let valid = j < s_k;
        let scale = f32::new(1.0) / f32::sqrt(f32::cast_from(head_dim as u32));

        let kv_base = ((b * kv_heads + g) * s_k + j) * head_dim;
        let mut kj = Array::<f32>::new(head_dim);
        let mut vj = Array::<f32>::new(head_dim);
        let mut dkj = Array::<f32>::new(head_dim);
        let mut dvj = Array::<f32>::new(head_dim);
        for d in 0..head_dim {
            kj[d] = f32::new(0.0);
            vj[d] = f32::new(0.0);
            dkj[d] = f32::new(0.0);
            dvj[d] = f32::new(0.0);
            if valid {
                kj[d] = f32::cast_from(k[kv_base + d]);
                vj[d] = f32::cast_from(v[kv_base + d]);
            }
        }
        let mut seg_k = i32::new(0);
        if has_segments && valid {
            seg_k = i32::cast_from(seg[b * s_k + j]);
        }

        let mut qs = SharedMemory::<f32>::new(block * head_dim);
        let mut dos = SharedMemory::<f32>::new(block * head_dim);
        let mut lses = SharedMemory::<f32>::new(block);
        let mut deltas = SharedMemory::<f32>::new(block);
        let mut segs = SharedMemory::<i32>::new(block);
        let n_tiles = (s_q + block - 1) / block;
        // Under a causal mask, query i sees key j only if past + i >= j: skip earlier tiles.
        let mut first: usize = 0;
        if has_mask {
            let j0 = CUBE_POS_X as usize * block;
            if j0 > past {
                first = (j0 - past) / block;
            }
        }
        for r in 0..n_rep {
            let h = g * n_rep + r;
            let hq = (b * heads + h) * s_q;
            for t in first..n_tiles {
                let i_load = t * block + row;
                for d in 0..head_dim {
                    let mut qd = f32::new(0.0);
                    let mut dd = f32::new(0.0);
                    if i_load < s_q {
                        qd = f32::cast_from(q[(hq + i_load) * head_dim + d]) * scale;
                        dd = f32::cast_from(d_o[(hq + i_load) * head_dim + d]);
                    }
                    qs[row * head_dim + d] = qd;
                    dos[row * head_dim + d] = dd;
                }
                let mut li = f32::new(0.0);
                let mut di = f32::new(0.0);
                let mut si = i32::new(0);
                if i_load < s_q {
                    li = lse[hq + i_load];
                    di = delta[hq + i_load];
                    if has_segments {
                        si = i32::cast_from(seg[b * s_k + past + i_load]);
                    }
                }
                lses[row] = li;
                deltas[row] = di;
                segs[row] = si;
                sync_cube();
                if valid {
                    for ii in 0..block {
                        let i = t * block + ii;
                        if i < s_q
                            && visible(
                                past + i,
                                j,
                                segs[ii],
                                seg_k,
                                window,
                                shared,
                                has_mask,
                                has_segments,
                            )
                        {
                            let mut s = f32::new(0.0);
                            let mut dp = f32::new(0.0);
                            for d in 0..head_dim {
                                s += qs[ii * head_dim + d] * kj[d];
                                dp += dos[ii * head_dim + d] * vj[d];
                            }
                            let p = f32::exp(s - lses[ii]);
                            let ds = p * (dp - deltas[ii]);
                            for d in 0..head_dim {
                                dvj[d] += p * dos[ii * head_dim + d];
                                dkj[d] += ds * qs[ii * head_dim + d];
                            }
                        }
                    }
                }
                sync_cube();
            }
        }
        if valid {
            for d in 0..head_dim {
                dk[kv_base + d] = F::cast_from(dkj[d]);
                dv[kv_base + d] = F::cast_from(dvj[d]);
            }
        }
    }
}

type Cb<R, F, I, BT> = CubeBackend<R, F, I, BT>;

fn prim<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement, const D: usize>(
    t: Tensor<Cb<R, F, I, BT>, D>,
) -> CubeTensor<R> {
    into_contiguous(t.into_primitive().tensor())
}

fn wrap<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement, const D: usize>(
    t: CubeTensor<R>,
) -> Tensor<Cb<R, F, I, BT>, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// What every kernel launch shares: the mask's runtime values and comptime switches.
struct Launch<R: CubeRuntime> {
    seg: CubeTensor<R>,
    dims: [u32; 6],
    has_mask: bool,
    has_segments: bool,
    block: usize,
}

impl<R: CubeRuntime> Launch<R> {
    fn new<F: FloatElement, I: IntElement, BT: BoolElement>(
        q: &CubeTensor<R>,
        k: &CubeTensor<R>,
        mask: Option<&AttnMask<Cb<R, F, I, BT>>>,
    ) -> Self {
        let [_, h, s_q, d] = q.meta.shape().dims::<4>();
        let [_, kvh, s_k, _] = k.meta.shape().dims::<4>();
        let segments = mask.and_then(|m| m.segments.clone());
        let has_segments = segments.is_some();
        let seg = match segments {
            Some(s) => into_contiguous(s.into_primitive()),
            // Never read: a one-element placeholder.
            None => Tensor::<Cb<R, F, I, BT>, 1, burn::tensor::Int>::zeros([1], &q.device)
                .into_primitive(),
        };
        let (window, shared) = mask.map_or((0, 0), |m| (m.window.unwrap_or(0), m.shared));
        Launch {
            seg,
            dims: [h, kvh, s_q, s_k, window, shared].map(|x| x as u32),
            has_mask: mask.is_some(),
            has_segments,
            block: block_rows(d),
        }
    }

    fn dims(&self) -> kernels::DimsLaunch<R> {
        let [heads, kv_heads, s_q, s_k, window, shared] = self.dims;
        kernels::DimsLaunch::new(heads, kv_heads, s_q, s_k, window, shared)
    }
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>
    FlashKernels<CubeBackend<R, F, I, BT>> for Cube
{
    fn forward(
        q: Tensor<Cb<R, F, I, BT>, 4>,
        k: Tensor<Cb<R, F, I, BT>, 4>,
        v: Tensor<Cb<R, F, I, BT>, 4>,
        mask: Option<&AttnMask<Cb<R, F, I, BT>>>,
    ) -> (Tensor<Cb<R, F, I, BT>, 4>, Tensor<Cb<R, F, I, BT>, 3>) {
        let (q, k, v) = (prim(q), prim(k), prim(v));
        let l = Launch::new(&q, &k, mask);
        let [b, h, s_q, d] = q.meta.shape().dims::<4>();
        let (client, device, dtype) = (q.client.clone(), q.device.clone(), q.dtype);
        let out = empty_device_contiguous_dtype(
            client.clone(),
            device.clone(),
            q.meta.shape().clone(),
            dtype,
        );
        let lse = empty_device_contiguous_dtype(
            client.clone(),
            device,
            Shape::new([b, h, s_q]),
            DType::F32,
        );
        let count = CubeCount::Static(s_q.div_ceil(l.block) as u32, h as u32, b as u32);
        kernels::flash_forward_kernel::launch::<R>(
            &client,
            count,
            CubeDim::new_1d(l.block as u32),
            q.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            l.seg.clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            l.dims(),
            d,
            l.block,
            l.has_mask,
            l.has_segments,
            [dtype.into(), l.seg.dtype.into()],
        );
        (wrap(out), wrap(lse))
    }

    fn backward(
        q: Tensor<Cb<R, F, I, BT>, 4>,
        k: Tensor<Cb<R, F, I, BT>, 4>,
        v: Tensor<Cb<R, F, I, BT>, 4>,
        o: Tensor<Cb<R, F, I, BT>, 4>,
        lse: Tensor<Cb<R, F, I, BT>, 3>,
        d_o: Tensor<Cb<R, F, I, BT>, 4>,
        mask: Option<&AttnMask<Cb<R, F, I, BT>>>,
    ) -> (
        Tensor<Cb<R, F, I, BT>, 4>,
        Tensor<Cb<R, F, I, BT>, 4>,
        Tensor<Cb<R, F, I, BT>, 4>,
    ) {
        // D_i = Σ_d dO_i · O_i in f32 (element-wise and a row sum: no kernel of our own needed).
        let [b, h, s_q, _] = q.dims();
        let delta = (d_o.clone().cast(DType::F32) * o.cast(DType::F32))
            .sum_dim(3)
            .reshape([b, h, s_q]);
        let (q, k, v, d_o) = (prim(q), prim(k), prim(v), prim(d_o));
        let (lse, delta) = (prim(lse.cast(DType::F32)), prim(delta));
        let l = Launch::new(&q, &k, mask);
        let [_, kvh, s_k, d] = k.meta.shape().dims::<4>();
        let (client, device, dtype) = (q.client.clone(), q.device.clone(), q.dtype);
        let empty = |shape: Shape| {
            empty_device_contiguous_dtype(client.clone(), device.clone(), shape, dtype)
        };
        let (dq, dk, dv) = (
            empty(q.meta.shape().clone()),
            empty(k.meta.shape().clone()),
            empty(v.meta.shape().clone()),
        );
        kernels::flash_dq_kernel::launch::<R>(
            &client,
            CubeCount::Static(s_q.div_ceil(l.block) as u32, h as u32, b as u32),
            CubeDim::new_1d(l.block as u32),
            q.clone().into_tensor_arg(),
            k.clone().into_tensor_arg(),
            v.clone().into_tensor_arg(),
            d_o.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            delta.clone().into_tensor_arg(),
            l.seg.clone().into_tensor_arg(),
            dq.clone().into_tensor_arg(),
            l.dims(),
            d,
            l.block,
            l.has_mask,
            l.has_segments,
            [dtype.into(), l.seg.dtype.into()],
        );
        kernels::flash_dkv_kernel::launch::<R>(
            &client,
            CubeCount::Static(s_k.div_ceil(l.block) as u32, kvh as u32, b as u32),
            CubeDim::new_1d(l.block as u32),
            q.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            d_o.into_tensor_arg(),
            lse.into_tensor_arg(),
            delta.into_tensor_arg(),
            l.seg.clone().into_tensor_arg(),
            dk.clone().into_tensor_arg(),
            dv.clone().into_tensor_arg(),
            l.dims(),
            d,
            l.block,
            l.has_mask,
            l.has_segments,
            [dtype.into(), l.seg.dtype.into()],
        );
        (wrap(dq), wrap(dk), wrap(dv))
    }
}

/// The kernels under Burn's kernel fusion (`burn::backend::Wgpu`, `Cuda`): each call is one
/// custom operation in the fusion stream that runs [`Cube`] on the fused backend's inner tensors.
mod fusion {
    use burn::tensor::{DType, Int, Shape, Tensor, TensorPrimitive};
    use burn_fusion::stream::{Operation, OperationStreams};
    use burn_fusion::{Fusion, FusionBackend, FusionRuntime};
    use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

    use super::Cube;
    use crate::attention::AttnMask;
    use crate::flash::FlashKernels;

    /// The mask's scalars (its segment ids travel as the op's last input).
    #[derive(Debug, Clone, Copy)]
    struct Rules {
        batch: usize,
        s_q: usize,
        s_k: usize,
        window: Option<usize>,
        shared: usize,
        masked: bool,
    }

    impl Rules {
        fn of<B: burn::tensor::backend::Backend>(mask: Option<&AttnMask<B>>) -> Rules {
            Rules {
                batch: mask.map_or(0, |m| m.batch),
                s_q: mask.map_or(0, |m| m.s_q),
                s_k: mask.map_or(0, |m| m.s_k),
                window: mask.and_then(|m| m.window),
                shared: mask.map_or(0, |m| m.shared),
                masked: mask.is_some(),
            }
        }

        /// The mask on the fused backend, with its segments read from the op's inputs.
        fn mask<B: FusionBackend>(
            &self,
            handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
            seg: Option<&TensorIr>,
        ) -> Option<AttnMask<B>> {
            self.masked.then(|| AttnMask {
                batch: self.batch,
                s_q: self.s_q,
                s_k: self.s_k,
                segments: seg.map(|s| Tensor::from_primitive(handles.get_int_tensor::<B>(s))),
                window: self.window,
                shared: self.shared,
                dense: None,
            })
        }
    }

    fn float<B: FusionBackend, const D: usize>(
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
        ir: &TensorIr,
    ) -> Tensor<B, D> {
        Tensor::from_primitive(TensorPrimitive::Float(handles.get_float_tensor::<B>(ir)))
    }

    fn put<B: FusionBackend, const D: usize>(
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
        ir: &TensorIr,
        t: Tensor<B, D>,
    ) {
        handles.register_float_tensor::<B>(&ir.id, t.into_primitive().tensor());
    }

    #[derive(Debug)]
    struct ForwardOp<B> {
        desc: CustomOpIr,
        rules: Rules,
        _b: std::marker::PhantomData<B>,
    }

    impl<B: FusionBackend> Operation<B::FusionRuntime> for ForwardOp<B>
    where
        Cube: FlashKernels<B>,
    {
        fn execute(
            &self,
            handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
        ) {
            let ins = &self.desc.inputs;
            let (q, k, v) = (
                float(handles, &ins[0]),
                float(handles, &ins[1]),
                float(handles, &ins[2]),
            );
            let mask = self.rules.mask::<B>(handles, ins.get(3));
            let (o, lse) = <Cube as FlashKernels<B>>::forward(q, k, v, mask.as_ref());
            put(handles, &self.desc.outputs[0], o);
            put(handles, &self.desc.outputs[1], lse);
        }
    }

    #[derive(Debug)]
    struct BackwardOp<B> {
        desc: CustomOpIr,
        rules: Rules,
        _b: std::marker::PhantomData<B>,
    }

    impl<B: FusionBackend> Operation<B::FusionRuntime> for BackwardOp<B>
    where
        Cube: FlashKernels<B>,
    {
        fn execute(
            &self,
            handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
        ) {
            let ins = &self.desc.inputs;
            let q = float(handles, &ins[0]);
            let k = float(handles, &ins[1]);
            let v = float(handles, &ins[2]);
            let o = float(handles, &ins[3]);
            let lse = float(handles, &ins[4]);
            let d_o = float(handles, &ins[5]);
            let mask = self.rules.mask::<B>(handles, ins.get(6));
            let (dq, dk, dv) =
                <Cube as FlashKernels<B>>::backward(q, k, v, o, lse, d_o, mask.as_ref());
            put(handles, &self.desc.outputs[0], dq);
            put(handles, &self.desc.outputs[1], dk);
            put(handles, &self.desc.outputs[2], dv);
        }
    }

    type Prim<B> = burn_fusion::FusionTensor<<B as FusionBackend>::FusionRuntime>;

    /// The op's inputs: `floats`, then the mask's segment ids when it has them.
    fn inputs<B: FusionBackend>(
        mut floats: Vec<Prim<B>>,
        mask: Option<&AttnMask<Fusion<B>>>,
    ) -> Vec<Prim<B>> {
        floats.extend(
            mask.and_then(|m| m.segments.clone())
                .map(|s: Tensor<Fusion<B>, 2, Int>| s.into_primitive()),
        );
        floats
    }

    fn float_prim<B: FusionBackend, const D: usize>(t: Tensor<Fusion<B>, D>) -> Prim<B> {
        t.into_primitive().tensor()
    }

    fn uninit<R: FusionRuntime>(
        client: &burn_fusion::client::GlobalFusionClient<R>,
        shape: Shape,
        dtype: DType,
    ) -> TensorIr {
        TensorIr::uninit(client.create_empty_handle(), shape, dtype)
    }

    impl<B: FusionBackend> FlashKernels<Fusion<B>> for Cube
    where
        Cube: FlashKernels<B>,
    {
        fn forward(
            q: Tensor<Fusion<B>, 4>,
            k: Tensor<Fusion<B>, 4>,
            v: Tensor<Fusion<B>, 4>,
            mask: Option<&AttnMask<Fusion<B>>>,
        ) -> (Tensor<Fusion<B>, 4>, Tensor<Fusion<B>, 3>) {
            let [b, h, s_q, d] = q.dims();
            let dtype = q.dtype();
            let rules = Rules::of(mask);
            let prims = inputs::<B>(vec![float_prim(q), float_prim(k), float_prim(v)], mask);
            let client = prims[0].client.clone();
            let outs = [
                uninit(&client, Shape::new([b, h, s_q, d]), dtype),
                uninit(&client, Shape::new([b, h, s_q]), DType::F32),
            ];
            let streams = OperationStreams::with_inputs(prims.iter());
            let ins: Vec<TensorIr> = prims.into_iter().map(|t| t.into_ir()).collect();
            let desc = CustomOpIr::new("collie_flash_forward", &ins, &outs);
            let op = ForwardOp::<B> {
                desc: desc.clone(),
                rules,
                _b: std::marker::PhantomData,
            };
            let mut out = client.register(streams, OperationIr::Custom(desc), op);
            let lse = out.pop().expect("two outputs");
            let o = out.pop().expect("two outputs");
            (
                Tensor::from_primitive(TensorPrimitive::Float(o)),
                Tensor::from_primitive(TensorPrimitive::Float(lse)),
            )
        }

        fn backward(
            q: Tensor<Fusion<B>, 4>,
            k: Tensor<Fusion<B>, 4>,
            v: Tensor<Fusion<B>, 4>,
            o: Tensor<Fusion<B>, 4>,
            lse: Tensor<Fusion<B>, 3>,
            d_o: Tensor<Fusion<B>, 4>,
            mask: Option<&AttnMask<Fusion<B>>>,
        ) -> (
            Tensor<Fusion<B>, 4>,
            Tensor<Fusion<B>, 4>,
            Tensor<Fusion<B>, 4>,
        ) {
            let (qs, ks, dtype) = (q.shape(), k.shape(), q.dtype());
            let rules = Rules::of(mask);
            // Inputs in the order BackwardOp reads them: q, k, v, o, lse, dO, segments.
            let floats = vec![
                float_prim(q),
                float_prim(k),
                float_prim(v),
                float_prim(o),
                float_prim(lse),
                float_prim(d_o),
            ];
            let prims = inputs::<B>(floats, mask);
            let client = prims[0].client.clone();
            let outs = [
                uninit(&client, qs, dtype),
                uninit(&client, ks.clone(), dtype),
                uninit(&client, ks, dtype),
            ];
            let streams = OperationStreams::with_inputs(prims.iter());
            let ins: Vec<TensorIr> = prims.into_iter().map(|t| t.into_ir()).collect();
            let desc = CustomOpIr::new("collie_flash_backward", &ins, &outs);
            let op = BackwardOp::<B> {
                desc: desc.clone(),
                rules,
                _b: std::marker::PhantomData,
            };
            let mut out = client.register(streams, OperationIr::Custom(desc), op);
            let dv = out.pop().expect("three outputs");
            let dk = out.pop().expect("three outputs");
            let dq = out.pop().expect("three outputs");
            let t = |x| Tensor::from_primitive(TensorPrimitive::Float(x));
            (t(dq), t(dk), t(dv))
        }
    }
}
