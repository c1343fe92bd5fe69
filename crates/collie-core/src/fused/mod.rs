//! Fused kernels for the element-wise half of a step: the attention softmax, RMSNorm/LayerNorm,
//! the gated MLP activations, the exact GELU, dropout, rotary embeddings, the heads' transpose,
//! matrix products (into one buffer, where the backend's op copies its output once more), the
//! embedding lookup, the LM head's
//! cross-entropy and the AdamW and Lion updates, each one pass over its rows forward and one backward, where
//! the layers otherwise run a chain of tensor operations (each a pass over memory, each a node
//! that autodiff keeps alive).
//!
//! The layers ([`crate::nn::Norm`], [`crate::nn::Activation::glu`], [`crate::nn::gelu`],
//! [`crate::nn::dropout`], [`crate::attention::swap_seq_heads`], the naive attention,
//! [`crate::rope::apply_rotary`], [`crate::loss::cross_entropy_sum`], `collie_optim::AdamW`) ask
//! [`kernels`] for backend `B`'s functions and run them when the input is f32; otherwise, and
//! on backends without kernels (wgpu and CUDA, where Burn's fusion already merges element-wise
//! chains), they run their unfused arithmetic, which stays the reference the kernels are tested
//! against. [`register`] records, per backend, the inference functions (for `I`) and
//! differentiable ops whose backward calls the kernels (for `Autodiff<I>`), as
//! [`crate::flash`] does for attention. The same kernel serves training, recomputation
//! (activation checkpointing runs the inner backend) and inference, so they agree bit for bit.
//!
//! `COLLIE_FUSED=0` in the environment skips the registration: every layer runs unfused
//! (for comparisons and benchmarks).

#[cfg(feature = "cpu")]
mod cpu;

use std::fmt::Debug;
use std::marker::PhantomData;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Bool, Int, Tensor, TensorPrimitive};
pub use collie_kernels::adamw::AdamWStep;
pub use collie_kernels::dropout::Mask as DropoutMask;
pub use collie_kernels::glu::Gate;
pub use collie_kernels::lion::LionStep;
pub use collie_kernels::norm::NormSpec;

#[cfg(feature = "cpu")]
pub use cpu::FlexKernels;

/// Backend `I`'s fused kernels (no autodiff). Tensors are f32; shapes as documented per method.
pub trait FusedKernels<I: Backend>: Debug + Send + Sync + 'static {
    /// `softmax(scale · scores)` over the last dimension, hidden keys 0.
    ///
    /// # Shapes
    /// - scores: `[batch, groups, rows, keys]`
    /// - mask: `[batch, 1, mask_rows, keys]`, `true` = hidden; `rows` a multiple of
    ///   `mask_rows`, row `i` of a group reads mask row `i % mask_rows` (query heads stacked)
    fn softmax(scores: Tensor<I, 4>, mask: Option<Tensor<I, 4, Bool>>, scale: f32) -> Tensor<I, 4>;

    /// Gradient of the scores from the probabilities `p` and their gradient `dp` (same shapes).
    fn softmax_backward(p: Tensor<I, 4>, dp: Tensor<I, 4>, scale: f32) -> Tensor<I, 4>;

    /// The norm of each row and its root `σ`.
    ///
    /// # Shapes
    /// - x: `[rows, d]`, weight and bias: `[d]` → (`[rows, d]`, `[rows]`)
    fn norm(
        x: Tensor<I, 2>,
        weight: Tensor<I, 1>,
        bias: Option<Tensor<I, 1>>,
        spec: NormSpec,
    ) -> (Tensor<I, 2>, Tensor<I, 1>);

    /// `(dx, dweight, dbias)` from the output's gradient `dy` and the forward's `σ`.
    fn norm_backward(
        x: Tensor<I, 2>,
        weight: Tensor<I, 1>,
        sigma: Tensor<I, 1>,
        dy: Tensor<I, 2>,
        spec: NormSpec,
    ) -> (Tensor<I, 2>, Tensor<I, 1>, Tensor<I, 1>);

    /// Rotary embedding of `x` by the tables, `sign = −1` for the transpose (the backward).
    /// `x` may be any strided view; the result is contiguous, `[batch, heads, seq, head_dim]`,
    /// or `[batch, seq, heads, head_dim]` when `seq_major_out`.
    ///
    /// # Shapes
    /// - x: `[batch, heads, seq, head_dim]`; cos, sin: `[batch, seq, rotary_dim]`
    fn rope(
        x: Tensor<I, 4>,
        cos: Tensor<I, 3>,
        sin: Tensor<I, 3>,
        interleaved: bool,
        sign: f32,
        seq_major_out: bool,
    ) -> Tensor<I, 4>;

    /// Per-row cross-entropy of `logits` against `targets` (0 where the target is
    /// [`crate::loss::IGNORE_INDEX`]) and each row's log-sum-exp.
    ///
    /// # Shapes
    /// - logits: `[rows, vocab]`, targets: `rows` ids → (`[rows]`, `[rows]`)
    fn xent(logits: Tensor<I, 2>, targets: &[i64]) -> (Tensor<I, 1>, Tensor<I, 1>);

    /// Gradient of the logits from the per-row loss gradient `g` (`[rows]`).
    fn xent_backward(
        logits: Tensor<I, 2>,
        targets: &[i64],
        lse: Tensor<I, 1>,
        g: Tensor<I, 1>,
    ) -> Tensor<I, 2>;

    /// One AdamW step: `(θ, m, v)` updated from the gradient (all `[n]`).
    fn adamw(
        theta: Tensor<I, 1>,
        grad: Tensor<I, 1>,
        m: Tensor<I, 1>,
        v: Tensor<I, 1>,
        step: AdamWStep,
    ) -> (Tensor<I, 1>, Tensor<I, 1>, Tensor<I, 1>);

    /// One Lion step: `(θ, m)` updated from the gradient (all `[n]`).
    fn lion(
        theta: Tensor<I, 1>,
        grad: Tensor<I, 1>,
        m: Tensor<I, 1>,
        step: LionStep,
    ) -> (Tensor<I, 1>, Tensor<I, 1>);

    /// `act(gate) · up` (same shapes).
    fn glu(kind: Gate, gate: Tensor<I, 2>, up: Tensor<I, 2>) -> Tensor<I, 2>;

    /// `(dgate, dup)` from the output's gradient `dy`.
    fn glu_backward(
        kind: Gate,
        gate: Tensor<I, 2>,
        up: Tensor<I, 2>,
        dy: Tensor<I, 2>,
    ) -> (Tensor<I, 2>, Tensor<I, 2>);

    /// The exact GELU `x·Φ(x)` (same shape).
    fn gelu(x: Tensor<I, 1>) -> Tensor<I, 1>;

    /// `dx` from the output's gradient `dy`.
    fn gelu_backward(x: Tensor<I, 1>, dy: Tensor<I, 1>) -> Tensor<I, 1>;

    /// Inverted dropout of `x` by `mask` (same shape); its backward is the same call on the
    /// output's gradient.
    fn dropout(x: Tensor<I, 1>, mask: DropoutMask) -> Tensor<I, 1>;

    /// Rows of `table` by id.
    ///
    /// # Shapes
    /// - table: `[vocab, d]`, `ids`: `n` ids → `[n, d]`
    fn embedding(table: Tensor<I, 2>, ids: &[i64]) -> Tensor<I, 2>;

    /// The table's gradient (`[vocab, d]`) from the rows' gradient `dy` (`[n, d]`).
    fn embedding_backward(vocab: usize, ids: &[i64], dy: Tensor<I, 2>) -> Tensor<I, 2>;

    /// `a · b` of two views (any strides: a transposed operand is read, not copied).
    ///
    /// # Shapes
    /// - a: `[m, k]`, b: `[k, n]` → `[m, n]`
    fn matmul(a: Tensor<I, 2>, b: Tensor<I, 2>) -> Tensor<I, 2>;

    /// Whether the matrix is stored transposed (its columns contiguous, its rows strided): a
    /// tied LM head's weight, the embedding table viewed as `[d, vocab]`. A product's gradient
    /// for it is computed in that order, so the sum with the table's own gradient reads both
    /// contiguously.
    fn column_major(t: &Tensor<I, 2>) -> bool;

    /// `a · b` per batch index (the batch dimensions equal, not broadcast).
    ///
    /// # Shapes
    /// - a: `[p, q, m, k]`, b: `[p, q, k, n]` → `[p, q, m, n]`
    fn batched_matmul(a: Tensor<I, 4>, b: Tensor<I, 4>) -> Tensor<I, 4>;

    /// `x.swap_dims(1, 2)` written contiguous (any strided `x`); its own backward.
    ///
    /// # Shapes
    /// - x: `[a, b, c, d]` → `[a, c, b, d]`
    fn swap12(x: Tensor<I, 4>) -> Tensor<I, 4>;
}

/// [`FusedKernels::softmax`] as a plain function.
pub type SoftmaxFn<B> = fn(Tensor<B, 4>, Option<Tensor<B, 4, Bool>>, f32) -> Tensor<B, 4>;
/// [`FusedKernels::norm`] as a plain function returning the normalized rows only.
pub type NormFn<B> = fn(Tensor<B, 2>, Tensor<B, 1>, Option<Tensor<B, 1>>, NormSpec) -> Tensor<B, 2>;

/// [`FusedKernels::rope`] (forward) as a plain function.
pub type RopeFn<B> = fn(Tensor<B, 4>, Tensor<B, 3>, Tensor<B, 3>, bool) -> Tensor<B, 4>;

/// [`FusedKernels::adamw`] as a plain function.
pub type AdamWFn<B> = fn(
    Tensor<B, 1>,
    Tensor<B, 1>,
    Tensor<B, 1>,
    Tensor<B, 1>,
    AdamWStep,
) -> (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>);

/// [`FusedKernels::lion`] as a plain function.
pub type LionFn<B> =
    fn(Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>, LionStep) -> (Tensor<B, 1>, Tensor<B, 1>);

/// Backend `B`'s fused ops as plain functions (inference kernels, or differentiable ops).
#[derive(Debug)]
pub struct Fused<B: Backend> {
    /// See [`FusedKernels::softmax`].
    pub softmax: SoftmaxFn<B>,
    /// See [`FusedKernels::norm`]; returns the normalized rows only.
    pub norm: NormFn<B>,
    /// See [`FusedKernels::glu`].
    pub glu: fn(Gate, Tensor<B, 2>, Tensor<B, 2>) -> Tensor<B, 2>,
    /// See [`FusedKernels::gelu`].
    pub gelu: fn(Tensor<B, 1>) -> Tensor<B, 1>,
    /// See [`FusedKernels::dropout`].
    pub dropout: fn(Tensor<B, 1>, DropoutMask) -> Tensor<B, 1>,
    /// See [`FusedKernels::swap12`].
    pub swap12: fn(Tensor<B, 4>) -> Tensor<B, 4>,
    /// See [`FusedKernels::embedding`].
    pub embedding: fn(Tensor<B, 2>, Tensor<B, 1, Int>) -> Tensor<B, 2>,
    /// See [`FusedKernels::matmul`].
    pub matmul: fn(Tensor<B, 2>, Tensor<B, 2>) -> Tensor<B, 2>,
    /// See [`FusedKernels::batched_matmul`].
    pub batched_matmul: fn(Tensor<B, 4>, Tensor<B, 4>) -> Tensor<B, 4>,
    /// Rotary embedding of the projection's `[batch, seq, heads, head_dim]` into the head-major
    /// `[batch, heads, seq, head_dim]` attention reads ([`FusedKernels::rope`]); the backward
    /// returns the gradient in the projection's order. The tables are constants.
    pub rope: RopeFn<B>,
    /// See [`FusedKernels::xent`]; returns the per-row losses.
    pub xent: fn(Tensor<B, 2>, Tensor<B, 1, Int>) -> Tensor<B, 1>,
    /// See [`FusedKernels::adamw`] (optimizers run on the inner backend; on `Autodiff<I>` the
    /// step is untracked).
    pub adamw: AdamWFn<B>,
    /// See [`FusedKernels::lion`] (untracked, as `adamw`).
    pub lion: LionFn<B>,
}

impl<B: Backend> Clone for Fused<B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for Fused<B> {}

/// Whether `COLLIE_FUSED` leaves the fused kernels on (anything but `0`).
fn enabled() -> bool {
    std::env::var("COLLIE_FUSED").map_or(true, |v| v != "0")
}

/// Makes [`kernels`] return `K`'s kernels for `I` and differentiable ops over them for
/// `Autodiff<I>`, unless `COLLIE_FUSED=0`. Idempotent.
pub fn register<I: Backend, K: FusedKernels<I>>() {
    if !enabled() {
        return;
    }
    let inference = Fused::<I> {
        softmax: K::softmax,
        norm: |x, w, b, spec| K::norm(x, w, b, spec).0,
        glu: K::glu,
        gelu: K::gelu,
        dropout: K::dropout,
        swap12: K::swap12,
        embedding: |table, ids| K::embedding(table, &host_ids(ids)),
        matmul: K::matmul,
        batched_matmul: K::batched_matmul,
        rope: |x, cos, sin, interleaved| {
            K::rope(x.swap_dims(1, 2), cos, sin, interleaved, 1.0, false)
        },
        xent: |logits, targets| K::xent(logits, &host_ids(targets)).0,
        adamw: K::adamw,
        lion: K::lion,
    };
    let autodiff = Fused::<Autodiff<I>> {
        softmax: softmax_autodiff::<I, K>,
        norm: norm_autodiff::<I, K>,
        glu: glu_autodiff::<I, K>,
        gelu: gelu_autodiff::<I, K>,
        dropout: dropout_autodiff::<I, K>,
        swap12: swap12_autodiff::<I, K>,
        embedding: embedding_autodiff::<I, K>,
        matmul: matmul_autodiff::<I, K, 2>,
        batched_matmul: matmul_autodiff::<I, K, 4>,
        rope: rope_autodiff::<I, K>,
        xent: xent_autodiff::<I, K>,
        adamw: |theta, grad, m, v, step| {
            let (t, m, v) = K::adamw(theta.inner(), grad.inner(), m.inner(), v.inner(), step);
            (
                Tensor::from_inner(t),
                Tensor::from_inner(m),
                Tensor::from_inner(v),
            )
        },
        lion: |theta, grad, m, step| {
            let (t, m) = K::lion(theta.inner(), grad.inner(), m.inner(), step);
            (Tensor::from_inner(t), Tensor::from_inner(m))
        },
    };
    crate::registry::insert(inference);
    crate::registry::insert(autodiff);
}

/// Backend `B`'s fused ops, if [`register`] has seen it.
pub fn kernels<B: Backend>() -> Option<Fused<B>> {
    crate::registry::get::<Fused<B>>()
}

/// The inner backend's view of an autodiff tensor (same buffer).
fn inner<I: Backend, const D: usize>(t: &FloatTensor<Autodiff<I>>) -> Tensor<I, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t.primitive.clone()))
}

/// The float primitive of an inner tensor.
fn prim<I: Backend, const D: usize>(t: Tensor<I, D>) -> I::FloatTensorPrimitive {
    t.into_primitive().tensor()
}

/// The gradient flowing into `ops`' output.
pub(crate) fn grad_out<I: Backend, S, const N: usize, const D: usize>(
    ops: &Ops<S, N>,
    grads: &mut Gradients,
) -> Tensor<I, D> {
    Tensor::from_primitive(TensorPrimitive::Float(grads.consume::<I>(&ops.node)))
}

/// Adds `g` to the gradient of the parent `node`, when it is tracked.
pub(crate) fn give<I: Backend, const D: usize>(
    grads: &mut Gradients,
    node: Option<NodeId>,
    g: Tensor<I, D>,
) {
    if let Some(node) = node {
        grads.register::<I>(node, prim(g));
    }
}

/// Records an op with `parents` on `Autodiff<I>`: `forward(tracked)` computes the output on the
/// inner backend and, when the graph tracks it, the state `op`'s backward keeps.
fn record<I: Backend, BO: Backward<I, N>, const N: usize>(
    op: BO,
    parents: [&FloatTensor<Autodiff<I>>; N],
    forward: impl FnOnce(bool) -> (I::FloatTensorPrimitive, Option<BO::State>),
) -> FloatTensor<Autodiff<I>> {
    match op
        .prepare::<NoCheckpointing>(parents.map(|p| p.node.clone()))
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (y, state) = forward(true);
            prep.finish(state.expect("a tracked op keeps its state"), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(false).0),
    }
}

/// [`record`] for a one-input op: `forward` gets the input on the inner backend.
pub(crate) fn unary<I: Backend, BO: Backward<I, 1>, const D: usize, const E: usize>(
    op: BO,
    x: Tensor<Autodiff<I>, D>,
    forward: impl FnOnce(Tensor<I, D>, bool) -> (Tensor<I, E>, Option<BO::State>),
) -> Tensor<Autodiff<I>, E> {
    let x = x.into_primitive().tensor();
    let xi = inner::<I, D>(&x);
    let out = record(op, [&x], |tracked| {
        let (y, state) = forward(xi, tracked);
        (prim(y), state)
    });
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// Backward of the softmax: keeps the probabilities.
#[derive(Debug)]
struct SoftmaxBackward<I, K>(PhantomData<(I, K)>);

impl<I: Backend, K: FusedKernels<I>> Backward<I, 1> for SoftmaxBackward<I, K> {
    type State = (Tensor<I, 4>, f32);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dp = grad_out::<I, _, 1, 4>(&ops, grads);
        let [node] = ops.parents.map(|n| n.map(|n| n.id));
        let (p, scale) = ops.state;
        give(grads, node, K::softmax_backward(p, dp, scale));
    }
}

fn softmax_autodiff<I: Backend, K: FusedKernels<I>>(
    scores: Tensor<Autodiff<I>, 4>,
    mask: Option<Tensor<Autodiff<I>, 4, Bool>>,
    scale: f32,
) -> Tensor<Autodiff<I>, 4> {
    // Bool tensors are not tracked: the autodiff primitive is the inner one.
    let mask = mask.map(|m| Tensor::<I, 4, Bool>::from_primitive(m.into_primitive()));
    unary(
        SoftmaxBackward::<I, K>(PhantomData),
        scores,
        |s, tracked| {
            let p = K::softmax(s, mask, scale);
            let state = tracked.then(|| (p.clone(), scale));
            (p, state)
        },
    )
}

/// Backward of a norm: keeps the input, the weight and each row's `σ`.
#[derive(Debug)]
struct NormBackward<I, K, const N: usize>(PhantomData<(I, K)>);

#[derive(Debug, Clone)]
struct NormSaved<I: Backend> {
    x: Tensor<I, 2>,
    weight: Tensor<I, 1>,
    sigma: Tensor<I, 1>,
    spec: NormSpec,
}

impl<I: Backend, K: FusedKernels<I>, const N: usize> Backward<I, N> for NormBackward<I, K, N> {
    type State = NormSaved<I>;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grad_out::<I, _, N, 2>(&ops, grads);
        let s = ops.state;
        let (dx, dw, db) = K::norm_backward(s.x, s.weight, s.sigma, dy, s.spec);
        let mut parents = ops.parents.into_iter().map(|n| n.map(|n| n.id));
        give(grads, parents.next().flatten(), dx);
        give(grads, parents.next().flatten(), dw);
        if let Some(node) = parents.next() {
            give(grads, node, db);
        }
    }
}

fn norm_autodiff<I: Backend, K: FusedKernels<I>>(
    x: Tensor<Autodiff<I>, 2>,
    weight: Tensor<Autodiff<I>, 1>,
    bias: Option<Tensor<Autodiff<I>, 1>>,
    spec: NormSpec,
) -> Tensor<Autodiff<I>, 2> {
    let (x, w) = (
        x.into_primitive().tensor(),
        weight.into_primitive().tensor(),
    );
    let b = bias.map(|b| b.into_primitive().tensor());
    let (xi, wi) = (inner::<I, 2>(&x), inner::<I, 1>(&w));
    let bi = b.as_ref().map(inner::<I, 1>);
    let forward = |tracked: bool| {
        let (y, sigma) = K::norm(xi.clone(), wi.clone(), bi.clone(), spec);
        let saved = tracked.then(|| NormSaved {
            x: xi.clone(),
            weight: wi.clone(),
            sigma,
            spec,
        });
        (prim(y), saved)
    };
    let out = match &b {
        Some(b) => record(NormBackward::<I, K, 3>(PhantomData), [&x, &w, b], forward),
        None => record(NormBackward::<I, K, 2>(PhantomData), [&x, &w], forward),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// Backward of a gated unit: keeps gate and up.
#[derive(Debug)]
struct GluBackward<I, K>(PhantomData<(I, K)>);

impl<I: Backend, K: FusedKernels<I>> Backward<I, 2> for GluBackward<I, K> {
    type State = (Gate, Tensor<I, 2>, Tensor<I, 2>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grad_out::<I, _, 2, 2>(&ops, grads);
        let [node_g, node_u] = ops.parents.map(|n| n.map(|n| n.id));
        let (kind, gate, up) = ops.state;
        let (dg, du) = K::glu_backward(kind, gate, up, dy);
        give(grads, node_g, dg);
        give(grads, node_u, du);
    }
}

fn glu_autodiff<I: Backend, K: FusedKernels<I>>(
    kind: Gate,
    gate: Tensor<Autodiff<I>, 2>,
    up: Tensor<Autodiff<I>, 2>,
) -> Tensor<Autodiff<I>, 2> {
    let (g, u) = (gate.into_primitive().tensor(), up.into_primitive().tensor());
    let (gi, ui) = (inner::<I, 2>(&g), inner::<I, 2>(&u));
    let out = record(GluBackward::<I, K>(PhantomData), [&g, &u], |tracked| {
        let y = K::glu(kind, gi.clone(), ui.clone());
        (prim(y), tracked.then_some((kind, gi, ui)))
    });
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// Backward of the exact GELU: keeps the input.
#[derive(Debug)]
struct GeluBackward<I, K>(PhantomData<(I, K)>);

impl<I: Backend, K: FusedKernels<I>> Backward<I, 1> for GeluBackward<I, K> {
    type State = Tensor<I, 1>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grad_out::<I, _, 1, 1>(&ops, grads);
        let [node] = ops.parents.map(|n| n.map(|n| n.id));
        give(grads, node, K::gelu_backward(ops.state, dy));
    }
}

fn gelu_autodiff<I: Backend, K: FusedKernels<I>>(
    x: Tensor<Autodiff<I>, 1>,
) -> Tensor<Autodiff<I>, 1> {
    unary(GeluBackward::<I, K>(PhantomData), x, |x, tracked| {
        let y = K::gelu(x.clone());
        (y, tracked.then_some(x))
    })
}

/// Backward of dropout: the same mask on the gradient (nothing but the seed is kept).
#[derive(Debug)]
struct DropoutBackward<I, K>(PhantomData<(I, K)>);

impl<I: Backend, K: FusedKernels<I>> Backward<I, 1> for DropoutBackward<I, K> {
    type State = DropoutMask;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grad_out::<I, _, 1, 1>(&ops, grads);
        let [node] = ops.parents.map(|n| n.map(|n| n.id));
        give(grads, node, K::dropout(dy, ops.state));
    }
}

fn dropout_autodiff<I: Backend, K: FusedKernels<I>>(
    x: Tensor<Autodiff<I>, 1>,
    mask: DropoutMask,
) -> Tensor<Autodiff<I>, 1> {
    unary(DropoutBackward::<I, K>(PhantomData), x, |x, tracked| {
        (K::dropout(x, mask), tracked.then_some(mask))
    })
}

/// Backward of the lookup: the rows' gradient added into a zero table by id.
#[derive(Debug)]
struct EmbeddingBackward<I, K>(PhantomData<(I, K)>);

impl<I: Backend, K: FusedKernels<I>> Backward<I, 1> for EmbeddingBackward<I, K> {
    type State = (usize, Vec<i64>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grad_out::<I, _, 1, 2>(&ops, grads);
        let [node] = ops.parents.map(|n| n.map(|n| n.id));
        let (vocab, ids) = ops.state;
        give(grads, node, K::embedding_backward(vocab, &ids, dy));
    }
}

fn embedding_autodiff<I: Backend, K: FusedKernels<I>>(
    table: Tensor<Autodiff<I>, 2>,
    ids: Tensor<Autodiff<I>, 1, Int>,
) -> Tensor<Autodiff<I>, 2> {
    let ids = host_ids(ids);
    let vocab = table.dims()[0];
    unary(
        EmbeddingBackward::<I, K>(PhantomData),
        table,
        |t, tracked| {
            let rows = K::embedding(t, &ids);
            (rows, tracked.then_some((vocab, ids)))
        },
    )
}

/// The kernel's product at rank 2 or 4 (the float primitive carries no rank).
fn product<I: Backend, K: FusedKernels<I>, const D: usize>(
    a: Tensor<I, D>,
    b: Tensor<I, D>,
) -> Tensor<I, D> {
    let (a, b) = (a.into_primitive(), b.into_primitive());
    match D {
        2 => Tensor::from_primitive(
            K::matmul(Tensor::from_primitive(a), Tensor::from_primitive(b)).into_primitive(),
        ),
        4 => Tensor::from_primitive(
            K::batched_matmul(Tensor::from_primitive(a), Tensor::from_primitive(b))
                .into_primitive(),
        ),
        _ => unreachable!("fused products are 2-d or 4-d"),
    }
}

/// Backward of a product: `da = dc · bᵀ`, `db = aᵀ · dc` (transposes are strided views), `db`
/// computed as `(dcᵀ · a)ᵀ` when `b` is stored transposed, so it has `b`'s memory order. Keeps
/// `a` only when `b` wants a gradient and `b` only when `a` does.
#[derive(Debug)]
struct MatmulBackward<I, K, const D: usize>(PhantomData<(I, K)>);

/// What a product's backward keeps: `a`, `b`, and whether `b` is stored transposed.
type MatmulSaved<I, const D: usize> = (Option<Tensor<I, D>>, Option<Tensor<I, D>>, bool);

impl<I: Backend, K: FusedKernels<I>, const D: usize> Backward<I, 2> for MatmulBackward<I, K, D> {
    type State = MatmulSaved<I, D>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dc = grad_out::<I, _, 2, D>(&ops, grads);
        let [node_a, node_b] = ops.parents.map(|n| n.map(|n| n.id));
        let (a, b, b_transposed) = ops.state;
        let t = |x: Tensor<I, D>| x.swap_dims(D - 2, D - 1);
        if let (Some(node), Some(b)) = (node_a, b) {
            give(grads, Some(node), product::<I, K, D>(dc.clone(), t(b)));
        }
        if let (Some(node), Some(a)) = (node_b, a) {
            let db = if b_transposed {
                t(product::<I, K, D>(t(dc), a))
            } else {
                product::<I, K, D>(t(a), dc)
            };
            give(grads, Some(node), db);
        }
    }
}

fn matmul_autodiff<I: Backend, K: FusedKernels<I>, const D: usize>(
    a: Tensor<Autodiff<I>, D>,
    b: Tensor<Autodiff<I>, D>,
) -> Tensor<Autodiff<I>, D> {
    let (a, b) = (a.into_primitive().tensor(), b.into_primitive().tensor());
    let (a_tracked, b_tracked) = (a.is_tracked(), b.is_tracked());
    let (ai, bi) = (inner::<I, D>(&a), inner::<I, D>(&b));
    // Only b's own gradient is laid out by it: an untracked b skips the layout query.
    let b_transposed = D == 2
        && b_tracked
        && K::column_major(&Tensor::from_primitive(bi.clone().into_primitive()));
    let out = record(
        MatmulBackward::<I, K, D>(PhantomData),
        [&a, &b],
        |tracked| {
            let c = product::<I, K, D>(ai.clone(), bi.clone());
            let state = tracked.then(|| {
                (
                    b_tracked.then_some(ai),
                    a_tracked.then_some(bi),
                    b_transposed,
                )
            });
            (prim(c), state)
        },
    );
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// Backward of the axis swap: the swap back.
#[derive(Debug)]
struct Swap12Backward<I, K>(PhantomData<(I, K)>);

impl<I: Backend, K: FusedKernels<I>> Backward<I, 1> for Swap12Backward<I, K> {
    type State = ();

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grad_out::<I, _, 1, 4>(&ops, grads);
        let [node] = ops.parents.map(|n| n.map(|n| n.id));
        give(grads, node, K::swap12(dy));
    }
}

fn swap12_autodiff<I: Backend, K: FusedKernels<I>>(
    x: Tensor<Autodiff<I>, 4>,
) -> Tensor<Autodiff<I>, 4> {
    unary(Swap12Backward::<I, K>(PhantomData), x, |x, tracked| {
        (K::swap12(x), tracked.then_some(()))
    })
}

/// Backward of the rotary embedding: the rotation by `−sin`, written in the input's order.
#[derive(Debug)]
struct RopeBackward<I, K>(PhantomData<(I, K)>);

impl<I: Backend, K: FusedKernels<I>> Backward<I, 1> for RopeBackward<I, K> {
    type State = (Tensor<I, 3>, Tensor<I, 3>, bool);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grad_out::<I, _, 1, 4>(&ops, grads);
        let [node] = ops.parents.map(|n| n.map(|n| n.id));
        let (cos, sin, interleaved) = ops.state;
        give(grads, node, K::rope(dy, cos, sin, interleaved, -1.0, true));
    }
}

fn rope_autodiff<I: Backend, K: FusedKernels<I>>(
    x: Tensor<Autodiff<I>, 4>,
    cos: Tensor<Autodiff<I>, 3>,
    sin: Tensor<Autodiff<I>, 3>,
    interleaved: bool,
) -> Tensor<Autodiff<I>, 4> {
    // The tables come from positions (integers): nothing to differentiate.
    let (cos, sin) = (cos.inner(), sin.inner());
    unary(RopeBackward::<I, K>(PhantomData), x, |x, tracked| {
        let y = K::rope(
            x.swap_dims(1, 2),
            cos.clone(),
            sin.clone(),
            interleaved,
            1.0,
            false,
        );
        (y, tracked.then_some((cos, sin, interleaved)))
    })
}

/// Target ids on the host (one read of `rows` integers).
fn host_ids<B: Backend>(targets: Tensor<B, 1, Int>) -> Vec<i64> {
    targets
        .into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .expect("i64 after convert")
}

/// Backward of the cross-entropy: keeps the logits, the targets and each row's log-sum-exp.
#[derive(Debug)]
struct XentBackward<I, K>(PhantomData<(I, K)>);

impl<I: Backend, K: FusedKernels<I>> Backward<I, 1> for XentBackward<I, K> {
    type State = (Tensor<I, 2>, Vec<i64>, Tensor<I, 1>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = grad_out::<I, _, 1, 1>(&ops, grads);
        let [node] = ops.parents.map(|n| n.map(|n| n.id));
        let (logits, targets, lse) = ops.state;
        give(grads, node, K::xent_backward(logits, &targets, lse, g));
    }
}

fn xent_autodiff<I: Backend, K: FusedKernels<I>>(
    logits: Tensor<Autodiff<I>, 2>,
    targets: Tensor<Autodiff<I>, 1, Int>,
) -> Tensor<Autodiff<I>, 1> {
    let targets = host_ids(targets);
    unary(XentBackward::<I, K>(PhantomData), logits, |z, tracked| {
        let (nll, lse) = K::xent(z.clone(), &targets);
        (nll, tracked.then_some((z, targets, lse)))
    })
}
