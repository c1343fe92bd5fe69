//! [`FlexKernels`]: the fused kernels on Burn's Flex (CPU) backend, [`collie_kernels`] over the
//! tensors' contiguous f32 buffers.

use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::tensor::{Bool, DType, Tensor, TensorData, TensorPrimitive};
use collie_kernels::{
    adamw, dropout, embedding, gelu, glu, lion, matmul, norm, rope, softmax, transpose, xent, View4,
};

use super::{AdamWStep, DropoutMask, FusedKernels, Gate, LionStep, NormSpec};
use crate::loss::IGNORE_INDEX;

/// The CPU kernels.
#[derive(Debug, Clone, Copy, Default)]
pub struct FlexKernels;

/// The contiguous buffer of a float tensor (copied only when it is a strided view).
fn buffer<const D: usize>(t: Tensor<Flex, D>) -> FlexTensor {
    let t = t.into_primitive().tensor();
    assert_eq!(t.dtype(), DType::F32, "fused kernels take f32 tensors");
    t.to_contiguous()
}

/// The buffer of a float tensor of rank ≤ 4 and the view it holds, leading axes of size 1
/// added (copied only for negative strides).
fn strided<const D: usize>(t: Tensor<Flex, D>) -> (FlexTensor, View4) {
    const { assert!(D <= 4) };
    let dims = t.dims();
    let mut t = t.into_primitive().tensor();
    assert_eq!(t.dtype(), DType::F32, "fused kernels take f32 tensors");
    if t.layout().strides().iter().any(|&s| s < 0) {
        t = t.to_contiguous();
    }
    let (mut shape, mut strides) = ([1; 4], [0; 4]);
    for (i, &s) in t.layout().strides().iter().enumerate() {
        shape[4 - D + i] = dims[i];
        strides[4 - D + i] = s as usize;
    }
    let view = View4 {
        shape,
        strides,
        offset: t.layout().start_offset(),
    };
    (t, view)
}

fn f32s(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("contiguous f32 buffer")
}

/// A buffer (one the kernel wrote in place) as a float tensor.
fn wrap<const D: usize>(t: FlexTensor) -> Tensor<Flex, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn tensor<const D: usize>(values: Vec<f32>, shape: [usize; D]) -> Tensor<Flex, D> {
    wrap(FlexTensor::from_data(TensorData::new(values, shape)))
}

impl FusedKernels<Flex> for FlexKernels {
    fn softmax(
        scores: Tensor<Flex, 4>,
        mask: Option<Tensor<Flex, 4, Bool>>,
        scale: f32,
    ) -> Tensor<Flex, 4> {
        let shape @ [_, groups, rows, keys] = scores.dims();
        let s = buffer(scores);
        let mut out = vec![0.0f32; s.layout().num_elements()];
        match mask {
            Some(m) => {
                let mask_rows = m.dims()[2];
                assert!(
                    mask_rows > 0 && rows.is_multiple_of(mask_rows),
                    "softmax mask rows {mask_rows} vs {rows}"
                );
                // Bool tensors hold one byte per element.
                let m = m.into_primitive().to_contiguous();
                let hidden = softmax::RowMask {
                    hidden: m.bytes(),
                    rows_per_batch: groups * rows,
                    rows,
                    mask_rows,
                };
                softmax::forward(f32s(&s), keys, scale, Some(hidden), &mut out);
            }
            None => softmax::forward(f32s(&s), keys, scale, None, &mut out),
        }
        tensor(out, shape)
    }

    fn softmax_backward(p: Tensor<Flex, 4>, dp: Tensor<Flex, 4>, scale: f32) -> Tensor<Flex, 4> {
        let shape = p.dims();
        let (p, dp) = (buffer(p), buffer(dp));
        let mut ds = vec![0.0f32; p.layout().num_elements()];
        softmax::backward(f32s(&p), f32s(&dp), shape[3], scale, &mut ds);
        tensor(ds, shape)
    }

    fn norm(
        x: Tensor<Flex, 2>,
        weight: Tensor<Flex, 1>,
        bias: Option<Tensor<Flex, 1>>,
        spec: NormSpec,
    ) -> (Tensor<Flex, 2>, Tensor<Flex, 1>) {
        let shape @ [rows, _] = x.dims();
        let (x, w) = (buffer(x), buffer(weight));
        let b = bias.map(buffer);
        let mut y = vec![0.0f32; x.layout().num_elements()];
        let mut sigma = vec![0.0f32; rows];
        norm::forward(
            f32s(&x),
            f32s(&w),
            b.as_ref().map(f32s),
            spec,
            &mut y,
            &mut sigma,
        );
        (tensor(y, shape), tensor(sigma, [rows]))
    }

    fn norm_backward(
        x: Tensor<Flex, 2>,
        weight: Tensor<Flex, 1>,
        sigma: Tensor<Flex, 1>,
        dy: Tensor<Flex, 2>,
        spec: NormSpec,
    ) -> (Tensor<Flex, 2>, Tensor<Flex, 1>, Tensor<Flex, 1>) {
        let shape @ [_, d] = x.dims();
        let (x, w, sigma, dy) = (buffer(x), buffer(weight), buffer(sigma), buffer(dy));
        let mut dx = vec![0.0f32; x.layout().num_elements()];
        let (mut dw, mut db) = (vec![0.0f32; d], vec![0.0f32; d]);
        norm::backward(
            f32s(&x),
            f32s(&w),
            f32s(&sigma),
            f32s(&dy),
            spec,
            &mut dx,
            &mut dw,
            &mut db,
        );
        (tensor(dx, shape), tensor(dw, [d]), tensor(db, [d]))
    }

    fn rope(
        x: Tensor<Flex, 4>,
        cos: Tensor<Flex, 3>,
        sin: Tensor<Flex, 3>,
        interleaved: bool,
        sign: f32,
        seq_major_out: bool,
    ) -> Tensor<Flex, 4> {
        let shape @ [b, h, s, d] = x.dims();
        let r = cos.dims()[2];
        // Read through the strides (the [batch, seq, heads, d] projection viewed head-major).
        let (x, view) = strided(x);
        let (cos, sin) = (buffer(cos), buffer(sin));
        let mut out = vec![0.0f32; shape.iter().product()];
        let tables = rope::Tables {
            cos: f32s(&cos),
            sin: f32s(&sin),
            width: r.min(d),
            interleaved,
        };
        rope::apply(
            x.storage::<f32>(),
            view,
            tables,
            sign,
            seq_major_out,
            &mut out,
        );
        if seq_major_out {
            tensor(out, [b, s, h, d])
        } else {
            tensor(out, shape)
        }
    }

    fn xent(logits: Tensor<Flex, 2>, targets: &[i64]) -> (Tensor<Flex, 1>, Tensor<Flex, 1>) {
        let [rows, vocab] = logits.dims();
        let z = buffer(logits);
        let (mut nll, mut lse) = (vec![0.0f32; rows], vec![0.0f32; rows]);
        xent::forward(f32s(&z), vocab, targets, IGNORE_INDEX, &mut nll, &mut lse);
        (tensor(nll, [rows]), tensor(lse, [rows]))
    }

    fn xent_backward(
        logits: Tensor<Flex, 2>,
        targets: &[i64],
        lse: Tensor<Flex, 1>,
        g: Tensor<Flex, 1>,
    ) -> Tensor<Flex, 2> {
        let [_, vocab] = logits.dims();
        let (mut z, lse, g) = (buffer(logits), buffer(lse), buffer(g));
        // The logits' buffer becomes their gradient (copied first only if it is shared).
        xent::backward_in_place(
            z.storage_mut::<f32>(),
            vocab,
            targets,
            IGNORE_INDEX,
            f32s(&lse),
            f32s(&g),
        );
        wrap(z)
    }

    fn adamw(
        theta: Tensor<Flex, 1>,
        grad: Tensor<Flex, 1>,
        m: Tensor<Flex, 1>,
        v: Tensor<Flex, 1>,
        step: AdamWStep,
    ) -> (Tensor<Flex, 1>, Tensor<Flex, 1>, Tensor<Flex, 1>) {
        // Updated in place where the buffer is this call's alone (the moments), else copied
        // once (the parameter, which the model still holds).
        let (mut t, mut m, mut v) = (buffer(theta), buffer(m), buffer(v));
        let g = buffer(grad);
        adamw::step(
            t.storage_mut::<f32>(),
            m.storage_mut::<f32>(),
            v.storage_mut::<f32>(),
            f32s(&g),
            step,
        );
        (wrap(t), wrap(m), wrap(v))
    }

    fn lion(
        theta: Tensor<Flex, 1>,
        grad: Tensor<Flex, 1>,
        m: Tensor<Flex, 1>,
        step: LionStep,
    ) -> (Tensor<Flex, 1>, Tensor<Flex, 1>) {
        // In place as `adamw`: the momentum is this call's, the parameter copied once.
        let (mut t, mut m, g) = (buffer(theta), buffer(m), buffer(grad));
        lion::step(
            t.storage_mut::<f32>(),
            m.storage_mut::<f32>(),
            f32s(&g),
            step,
        );
        (wrap(t), wrap(m))
    }

    fn glu(kind: Gate, gate: Tensor<Flex, 2>, up: Tensor<Flex, 2>) -> Tensor<Flex, 2> {
        let shape = gate.dims();
        let (g, u) = (buffer(gate), buffer(up));
        let mut y = vec![0.0f32; g.layout().num_elements()];
        glu::forward(kind, f32s(&g), f32s(&u), &mut y);
        tensor(y, shape)
    }

    fn glu_backward(
        kind: Gate,
        gate: Tensor<Flex, 2>,
        up: Tensor<Flex, 2>,
        dy: Tensor<Flex, 2>,
    ) -> (Tensor<Flex, 2>, Tensor<Flex, 2>) {
        let shape = gate.dims();
        let (g, u, d) = (buffer(gate), buffer(up), buffer(dy));
        let n = g.layout().num_elements();
        let (mut dg, mut du) = (vec![0.0f32; n], vec![0.0f32; n]);
        glu::backward(kind, f32s(&g), f32s(&u), f32s(&d), &mut dg, &mut du);
        (tensor(dg, shape), tensor(du, shape))
    }

    fn gelu(x: Tensor<Flex, 1>) -> Tensor<Flex, 1> {
        let shape = x.dims();
        let x = buffer(x);
        let mut y = vec![0.0f32; x.layout().num_elements()];
        gelu::forward(f32s(&x), &mut y);
        tensor(y, shape)
    }

    fn gelu_backward(x: Tensor<Flex, 1>, dy: Tensor<Flex, 1>) -> Tensor<Flex, 1> {
        let shape = x.dims();
        let (x, dy) = (buffer(x), buffer(dy));
        let mut dx = vec![0.0f32; x.layout().num_elements()];
        gelu::backward(f32s(&x), f32s(&dy), &mut dx);
        tensor(dx, shape)
    }

    fn dropout(x: Tensor<Flex, 1>, mask: DropoutMask) -> Tensor<Flex, 1> {
        // In place where the buffer is this call's alone (copied on write otherwise).
        let mut x = buffer(x);
        dropout::apply(mask, x.storage_mut::<f32>());
        wrap(x)
    }

    fn swap12(x: Tensor<Flex, 4>) -> Tensor<Flex, 4> {
        let [a, b, c, d] = x.dims();
        let (x, view) = strided(x);
        let mut out = vec![0.0f32; a * b * c * d];
        transpose::swap12(x.storage::<f32>(), view, &mut out);
        tensor(out, [a, c, b, d])
    }

    fn matmul(a: Tensor<Flex, 2>, b: Tensor<Flex, 2>) -> Tensor<Flex, 2> {
        let (m, n) = (a.dims()[0], b.dims()[1]);
        let (a, av) = strided(a);
        let (b, bv) = strided(b);
        tensor(
            matmul::matmul(a.storage::<f32>(), av, b.storage::<f32>(), bv),
            [m, n],
        )
    }

    fn embedding(table: Tensor<Flex, 2>, ids: &[i64]) -> Tensor<Flex, 2> {
        let d = table.dims()[1];
        let t = buffer(table);
        let mut out = vec![0.0f32; ids.len() * d];
        embedding::gather(f32s(&t), d, ids, &mut out);
        tensor(out, [ids.len(), d])
    }

    fn embedding_backward(vocab: usize, ids: &[i64], dy: Tensor<Flex, 2>) -> Tensor<Flex, 2> {
        let d = dy.dims()[1];
        let dy = buffer(dy);
        // Fresh zero pages: the rows no id names are never written.
        let mut grad = vec![0.0f32; vocab * d];
        embedding::scatter_add(ids, f32s(&dy), d, &mut grad);
        tensor(grad, [vocab, d])
    }

    fn column_major(t: &Tensor<Flex, 2>) -> bool {
        let prim = t.clone().into_primitive().tensor();
        let s = prim.layout().strides();
        t.dims()[0] > 1 && s[0] == 1 && s[1] != 1
    }

    fn batched_matmul(a: Tensor<Flex, 4>, b: Tensor<Flex, 4>) -> Tensor<Flex, 4> {
        let [p, q, m, _] = a.dims();
        let n = b.dims()[3];
        let (a, av) = strided(a);
        let (b, bv) = strided(b);
        tensor(
            matmul::matmul(a.storage::<f32>(), av, b.storage::<f32>(), bv),
            [p, q, m, n],
        )
    }
}
