//! Memory-efficient ("flash") attention: `softmax(q·kᵀ / √d + mask) · v` without the
//! `[batch, heads, s_q, s_k]` score matrix, forward and backward, with GQA (query heads of one
//! key/value head share it; K/V are never repeated) and the causal / padding / document / window
//! rules of [`AttnMask`] evaluated tile by tile.
//!
//! Forward keeps, per query row, the running maximum and sum of the softmax (online softmax over
//! key tiles) and returns the output and the row's log-sum-exp. Backward recomputes the scores
//! from q, k and the log-sum-exp (FlashAttention-2's order): with `D_i = Σ_d dO_i · O_i`,
//! `P = exp(S − lse)`, `dV = Pᵀ·dO`, `dS = P ∘ (dO·Vᵀ − D)`, `dQ = dS·K/√d`, `dK = dSᵀ·Q/√d`.
//!
//! Two implementations of these kernels ([`FlashKernels`]):
//! - [`Chunked`]: any backend, Burn tensor ops over blocks of query rows (memory
//!   `O(block · s_k)` instead of `O(s_q · s_k)`); the CPU path, and the reference the GPU
//!   kernel is tested against;
//! - `Cube` (features `wgpu` / `cuda`): CubeCL kernels, one thread per query (or key) row, key
//!   (or query) tiles staged in shared memory ([`cube`]).
//!
//! The model code is generic over `B: Backend` and cannot name `Autodiff<I>`'s structure, so
//! [`register`] records, per backend type, the inference function (for `I`) and the
//! differentiable op (a burn-autodiff `Backward` step, for `Autodiff<I>`); `device::dispatch`
//! registers every backend it runs.

mod chunked;
#[cfg(feature = "gpu-kernels")]
pub mod cube;

use std::fmt::Debug;
use std::marker::PhantomData;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorPrimitive};

use crate::attention::AttnMask;

pub use chunked::Chunked;

/// The two kernels of memory-efficient attention on backend `I` (no autodiff).
pub trait FlashKernels<I: Backend>: Debug + Send + Sync + 'static {
    /// Output and per-row log-sum-exp of the scaled, masked scores.
    ///
    /// # Shapes
    /// - q: `[batch, heads, s_q, d]`; k, v: `[batch, kv_heads, s_k, d]`
    /// - returns `([batch, heads, s_q, d], [batch, heads, s_q])` (log-sum-exp in f32)
    fn forward(
        q: Tensor<I, 4>,
        k: Tensor<I, 4>,
        v: Tensor<I, 4>,
        mask: Option<&AttnMask<I>>,
    ) -> (Tensor<I, 4>, Tensor<I, 3>);

    /// Gradients of q, k and v from the output's gradient `d_o`, recomputing the scores.
    ///
    /// # Shapes
    /// - as [`FlashKernels::forward`]; `o`, `d_o`: `[batch, heads, s_q, d]`
    /// - returns `(dq, dk, dv)` shaped as `(q, k, v)`
    #[allow(clippy::too_many_arguments)]
    fn backward(
        q: Tensor<I, 4>,
        k: Tensor<I, 4>,
        v: Tensor<I, 4>,
        o: Tensor<I, 4>,
        lse: Tensor<I, 3>,
        d_o: Tensor<I, 4>,
        mask: Option<&AttnMask<I>>,
    ) -> (Tensor<I, 4>, Tensor<I, 4>, Tensor<I, 4>);
}

/// Attention of backend `B` as a plain function (what the registry holds).
type FlashFn<B> =
    fn(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>, Option<&AttnMask<B>>) -> Tensor<B, 4>;

/// Makes [`flash_attention`] run `K`'s kernels on `I` (inference) and on `Autodiff<I>` (with
/// the recomputing backward). Idempotent; the last registration of a backend wins.
pub fn register<I: Backend, K: FlashKernels<I>>() {
    let inference: FlashFn<I> = |q, k, v, mask| K::forward(q, k, v, mask).0;
    let autodiff: FlashFn<Autodiff<I>> = flash_autodiff::<I, K>;
    crate::registry::insert(inference);
    crate::registry::insert(autodiff);
}

/// Memory-efficient attention (see the module docs); `mask` `None` lets every query see every
/// key.
///
/// # Shapes
/// - q: `[batch, heads, s_q, d]`; k, v: `[batch, kv_heads, s_k, d]`
/// - returns `[batch, heads, s_q, d]`
///
/// # Panics
/// On an autodiff backend that [`register`] has not seen: tracing the chunked forward through
/// autodiff would keep every block's probabilities, the memory this path exists to save.
pub fn flash_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<&AttnMask<B>>,
) -> Tensor<B, 4> {
    let [_, h, _, d] = q.dims();
    let [_, kvh, _, dk] = k.dims();
    assert!(
        kvh > 0 && h % kvh == 0 && d == dk,
        "flash attention: {h} query heads of width {d} vs {kvh} key/value heads of width {dk}"
    );
    let f = crate::registry::get::<FlashFn<B>>();
    match f {
        Some(f) => f(q, k, v, mask),
        None if !B::ad_enabled(&q.device()) => Chunked::forward(q, k, v, mask).0,
        None => panic!(
            "flash attention on the autodiff backend {} needs collie_core::flash::register",
            std::any::type_name::<B>()
        ),
    }
}

/// The backward step: q, k, v (parents), output and log-sum-exp, the mask rules.
#[derive(Debug)]
struct FlashBackward<I, K>(PhantomData<(I, K)>);

/// What the backward step keeps from the forward pass.
#[derive(Debug, Clone)]
struct Saved<I: Backend> {
    q: Tensor<I, 4>,
    k: Tensor<I, 4>,
    v: Tensor<I, 4>,
    o: Tensor<I, 4>,
    lse: Tensor<I, 3>,
    mask: Option<AttnMask<I>>,
}

impl<I: Backend, K: FlashKernels<I>> Backward<I, 3> for FlashBackward<I, K> {
    type State = Saved<I>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_q, node_k, node_v] = ops.parents;
        let d_o =
            Tensor::<I, 4>::from_primitive(TensorPrimitive::Float(grads.consume::<I>(&ops.node)));
        let s = ops.state;
        let (dq, dk, dv) = K::backward(s.q, s.k, s.v, s.o, s.lse, d_o, s.mask.as_ref());
        for (node, g) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
            if let Some(node) = node {
                grads.register::<I>(node.id, g.into_primitive().tensor());
            }
        }
    }
}

/// The mask rules on the inner backend (the segment ids are never differentiated).
fn inner_mask<I: Backend>(mask: &AttnMask<Autodiff<I>>) -> AttnMask<I> {
    AttnMask {
        batch: mask.batch,
        s_q: mask.s_q,
        s_k: mask.s_k,
        segments: mask.segments.clone().map(|s| s.inner()),
        window: mask.window,
        shared: mask.shared,
        dense: None,
    }
}

/// The inner backend's view of an autodiff tensor (same buffer).
fn inner_of<I: Backend>(t: &burn::tensor::ops::FloatTensor<Autodiff<I>>) -> Tensor<I, 4> {
    Tensor::from_primitive(TensorPrimitive::Float(t.primitive.clone()))
}

/// [`flash_attention`] on `Autodiff<I>`: `K`'s forward, and a backward step that recomputes.
fn flash_autodiff<I: Backend, K: FlashKernels<I>>(
    q: Tensor<Autodiff<I>, 4>,
    k: Tensor<Autodiff<I>, 4>,
    v: Tensor<Autodiff<I>, 4>,
    mask: Option<&AttnMask<Autodiff<I>>>,
) -> Tensor<Autodiff<I>, 4> {
    let mask = mask.map(inner_mask);
    let (q, k, v) = (
        q.into_primitive().tensor(),
        k.into_primitive().tensor(),
        v.into_primitive().tensor(),
    );
    let (qi, ki, vi) = (inner_of::<I>(&q), inner_of::<I>(&k), inner_of::<I>(&v));
    let out = match FlashBackward::<I, K>(PhantomData)
        .prepare::<NoCheckpointing>([q.node.clone(), k.node.clone(), v.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (o, lse) = K::forward(qi.clone(), ki.clone(), vi.clone(), mask.as_ref());
            let prim = o.clone().into_primitive().tensor();
            let saved = Saved {
                q: qi,
                k: ki,
                v: vi,
                o,
                lse,
                mask,
            };
            prep.finish(saved, prim)
        }
        OpsKind::UnTracked(prep) => {
            let (o, _) = K::forward(qi, ki, vi, mask.as_ref());
            prep.finish(o.into_primitive().tensor())
        }
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}
