//! The collectives a parallel run calls, as a trait: `collie-dist` implements it over MPI, and a
//! single-process run uses [`Solo`] (size 1, every collective the identity).
//!
//! Buffers are host `f32`/`f64` slices (collectives move host vectors, docs/parallelism.md); a caller copies
//! tensor data out, reduces, and copies it back.

use std::fmt::Debug;
use std::sync::Arc;

/// A group of processes that reduce together (the data-parallel group, a tensor-parallel group…).
///
/// Every method is collective: all members of the group call it, in the same order, with buffers
/// of the same length.
pub trait Collectives: Debug + Send + Sync {
    /// This process's rank within the group.
    fn rank(&self) -> usize;
    /// Number of processes in the group.
    fn size(&self) -> usize;
    /// Element-wise sum over the group, in place.
    fn all_reduce_sum(&self, buf: &mut [f32]);
    /// Element-wise sum over the group, in place, in double precision (counts, losses).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]);
    /// Element-wise maximum over the group, in place.
    fn all_reduce_max_f64(&self, buf: &mut [f64]);
    /// Concatenation of every member's `send` (all of the same length), in rank order.
    fn all_gather(&self, send: &[f32], recv: &mut [f32]);
    /// `recv` of member `r` = the sum over the group of `send[r·n .. (r+1)·n]`, `n = recv.len()`.
    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]);
    /// Element-wise sum over the group into member `root`'s `buf` (the other members' `buf` are
    /// left as they were).
    fn reduce_sum(&self, buf: &mut [f32], root: usize);
    /// Copies `buf` of member `root` into every member's `buf`.
    fn broadcast(&self, buf: &mut [f32], root: usize);
    /// Waits for every member.
    fn barrier(&self);
    /// Sends `buf` to member `dest` without waiting for it to be received (point-to-point; the
    /// pipeline's activations and their gradients).
    fn send(&self, buf: Vec<f32>, dest: usize);
    /// Receives exactly `buf.len()` values from member `src`, waiting for them.
    fn recv(&self, buf: &mut [f32], src: usize);
    /// Waits until every [`Collectives::send`] of this member has been received.
    fn flush(&self);
    /// [`Collectives::all_reduce_sum`] started without waiting: the sum is in the buffer that
    /// [`Pending::wait`] hands back. Calls that follow (collectives, computation) proceed while
    /// it travels, so a reduction overlaps the next block's backward pass.
    fn start_all_reduce_sum(&self, mut buf: Vec<f32>) -> Pending {
        self.all_reduce_sum(&mut buf);
        Pending::done(buf)
    }
    /// [`Collectives::reduce_sum`] started without waiting (see
    /// [`Collectives::start_all_reduce_sum`]): member `root`'s buffer comes back summed, the
    /// others' as they were.
    fn start_reduce_sum(&self, mut buf: Vec<f32>, root: usize) -> Pending {
        self.reduce_sum(&mut buf, root);
        Pending::done(buf)
    }
}

/// A collective in flight ([`Collectives::start_all_reduce_sum`]): it owns its buffer until
/// [`Pending::wait`] returns it.
pub struct Pending(Box<dyn InFlight>);

/// What a group's non-blocking collective implements for [`Pending`].
pub trait InFlight: Send {
    /// Lets the collective advance without blocking; true once it is complete.
    fn test(&mut self) -> bool;
    /// Blocks until the collective is complete and returns its buffer.
    fn wait(self: Box<Self>) -> Vec<f32>;
}

/// A collective that completed when it was started.
struct Done(Vec<f32>);

impl InFlight for Done {
    fn test(&mut self) -> bool {
        true
    }
    fn wait(self: Box<Self>) -> Vec<f32> {
        self.0
    }
}

impl Pending {
    /// A collective in flight, as a group implements it.
    pub fn new(op: Box<dyn InFlight>) -> Self {
        Pending(op)
    }
    /// A collective already complete, with its result in `buf`.
    pub fn done(buf: Vec<f32>) -> Self {
        Pending(Box::new(Done(buf)))
    }
    /// Lets the collective advance without blocking (MPI progresses a non-blocking collective
    /// only inside MPI calls); true once it is complete.
    pub fn test(&mut self) -> bool {
        self.0.test()
    }
    /// Blocks until the collective is complete and returns its buffer.
    pub fn wait(self) -> Vec<f32> {
        self.0.wait()
    }
}

impl Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pending")
    }
}

/// A shared handle to a group.
pub type Group = Arc<dyn Collectives>;

/// The group of one process: every collective is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct Solo;

impl Collectives for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) {}
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) {}
    fn all_reduce_max_f64(&self, _buf: &mut [f64]) {}
    fn all_gather(&self, send: &[f32], recv: &mut [f32]) {
        recv.copy_from_slice(send);
    }
    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) {
        recv.copy_from_slice(send);
    }
    fn reduce_sum(&self, _buf: &mut [f32], _root: usize) {}
    fn broadcast(&self, _buf: &mut [f32], _root: usize) {}
    fn barrier(&self) {}
    fn send(&self, _buf: Vec<f32>, dest: usize) {
        panic!("send to member {dest} in a group of one");
    }
    fn recv(&self, _buf: &mut [f32], src: usize) {
        panic!("receive from member {src} in a group of one");
    }
    fn flush(&self) {}
}

/// The group of one process, as a [`Group`].
pub fn solo() -> Group {
    Arc::new(Solo)
}

// ---------------------------------------------------------------------------------------------
// Tensor-parallel collectives inside the autodiff graph (Megatron's `f` and `g`).
// ---------------------------------------------------------------------------------------------

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData, TensorPrimitive};

/// `x` summed over `group` on the host, as a tensor of `x`'s dtype and device (no graph).
fn host_all_reduce<B: Backend>(x: Tensor<B, 1>, group: &dyn Collectives) -> Tensor<B, 1> {
    let (device, dtype, n) = (x.device(), x.dtype(), x.dims()[0]);
    let mut values = crate::host::to_host(x);
    group.all_reduce_sum(&mut values);
    Tensor::<B, 1>::from_data(TensorData::new(values, [n]), &device).cast(dtype)
}

/// The backward of `f`: the incoming gradient summed over the group.
#[derive(Debug)]
struct SumGradOverGroup;

impl<I: Backend> Backward<I, 1> for SumGradOverGroup {
    type State = Group;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let group = ops.state;
        unary::<I, _>(ops.parents, ops.node, grads, |grad| {
            let t = Tensor::<I, 1>::from_primitive(TensorPrimitive::Float(grad));
            host_all_reduce(t, &*group).into_primitive().tensor()
        });
    }
}

/// `f` on `Autodiff<I>`: identity forward, gradient all-reduced backward.
fn copy_autodiff<I: Backend>(x: Tensor<Autodiff<I>, 1>, group: &Group) -> Tensor<Autodiff<I>, 1> {
    let x = x.into_primitive().tensor();
    let out = match SumGradOverGroup
        .prepare::<burn::backend::autodiff::checkpoint::strategy::NoCheckpointing>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(group.clone(), x.primitive.clone()),
        OpsKind::UnTracked(prep) => prep.finish(x.primitive.clone()),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// Makes [`copy_to_group`] differentiable on `Autodiff<I>`; `collie_core::device::dispatch` calls
/// it for every backend it runs.
pub fn register_autodiff<I: Backend>() {
    type Copy<I> = fn(Tensor<Autodiff<I>, 1>, &Group) -> Tensor<Autodiff<I>, 1>;
    let f: Copy<I> = copy_autodiff::<I>;
    crate::registry::insert(f);
}

/// Megatron's `f` before a column-parallel layer: the identity forward; backward, the gradient is
/// summed over `group` (each rank's shard contributes part of the input's gradient).
///
/// # Panics
/// On an autodiff backend that [`register_autodiff`] has not registered (a gradient would
/// otherwise silently miss the other ranks' parts).
pub fn copy_to_group<B: Backend, const D: usize>(x: Tensor<B, D>, group: &Group) -> Tensor<B, D> {
    if group.size() == 1 || !B::ad_enabled(&x.device()) {
        return x;
    }
    let dims = x.dims();
    let n: usize = dims.iter().product();
    let f = crate::registry::get::<fn(Tensor<B, 1>, &Group) -> Tensor<B, 1>>()
        .unwrap_or_else(|| {
            panic!(
                "tensor parallelism on the autodiff backend {} needs collie_core::dist::register_autodiff",
                std::any::type_name::<B>()
            )
        });
    // [..] -> [n] -> [..]: the registered op works on flat tensors.
    f(x.reshape([n]), group).reshape(dims)
}

/// Megatron's `g` after a row-parallel layer: forward, the sum of every rank's `x`; backward, the
/// identity. Exact without a custom op: `sum + (x − detach(x))` is `sum + 0` forward and passes
/// the gradient straight to `x`.
pub fn reduce_from_group<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    group: &Group,
) -> Tensor<B, D> {
    if group.size() == 1 {
        return x;
    }
    let dims = x.dims();
    let n: usize = dims.iter().product();
    // [..] -> [n]: the host buffer is flat.
    let summed = host_all_reduce(x.clone().detach().reshape([n]), &**group).reshape(dims);
    if B::ad_enabled(&x.device()) {
        summed + (x.clone() - x.detach())
    } else {
        summed
    }
}

/// `t` split along `dim` over the ranks of `group` (each of `parts` equal parts of `dim` split on
/// its own, see `ParallelMode::ColumnParts`; 1 for a plain split) → the whole tensor on every
/// rank (a host all-gather, outside the autodiff graph: for inference and checkpoints).
pub fn gather_along<B: Backend, const D: usize>(
    t: Tensor<B, D>,
    (dim, parts): (usize, usize),
    group: &Group,
) -> Tensor<B, D> {
    let tp = group.size();
    let (device, dtype, local) = (t.device(), t.dtype(), t.dims());
    let send = crate::host::to_host(t);
    let mut all = vec![0.0f32; send.len() * tp];
    group.all_gather(&send, &mut all);
    let mut whole = local;
    whole[dim] *= tp;
    let out = join_blocks(&all, &local, (dim, parts), tp);
    Tensor::<B, D>::from_data(TensorData::new(out, whole), &device).cast(dtype)
}

/// Where rank `rank`'s block of a tensor split along `dim` (in `parts` parts, each split over the
/// `tp` ranks) lies in the whole row-major tensor: `(offset in the block, offset in the whole,
/// length)` runs, in block order.
fn block_runs(
    local: &[usize],
    (dim, parts): (usize, usize),
    rank: usize,
    tp: usize,
) -> impl Iterator<Item = (usize, usize, usize)> {
    let outer: usize = local[..dim].iter().product();
    let inner: usize = local[dim..].iter().product();
    let s = inner / parts;
    (0..outer).flat_map(move |o| {
        (0..parts).map(move |k| (o * inner + k * s, o * inner * tp + (k * tp + rank) * s, s))
    })
}

/// Rank-major blocks (`tp` copies of a `local`-shaped part, as an all-gather returns them) → the
/// whole row-major tensor split along `dim`: with one part, block r's slices land at
/// `r · local[dim]` of `dim`; with `parts`, dim is `parts` equal parts each split over the ranks,
/// and block r's k-th part lands at `(k · tp + r) · local[dim] / parts`.
pub fn join_blocks(all: &[f32], local: &[usize], split: (usize, usize), tp: usize) -> Vec<f32> {
    let n: usize = local.iter().product();
    let mut out = vec![0.0f32; n * tp];
    for r in 0..tp {
        for (at, to, len) in block_runs(local, split, r, tp) {
            out[to..to + len].copy_from_slice(&all[r * n + at..][..len]);
        }
    }
    out
}

/// This rank's block of a whole row-major tensor: the inverse of [`join_blocks`] for `rank`.
pub fn split_block(
    whole: &[f32],
    local: &[usize],
    split: (usize, usize),
    rank: usize,
    tp: usize,
) -> Vec<f32> {
    let mut part = vec![0.0f32; local.iter().product()];
    for (at, from, len) in block_runs(local, split, rank, tp) {
        part[at..at + len].copy_from_slice(&whole[from..from + len]);
    }
    part
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_split_and_join_per_part() {
        // A [2, 8] tensor whose columns are two parts of 4 (gate | up), over 2 ranks.
        let whole: Vec<f32> = (0..16).map(|v| v as f32).collect();
        let local = [2, 4];
        let r0 = split_block(&whole, &local, (1, 2), 0, 2);
        let r1 = split_block(&whole, &local, (1, 2), 1, 2);
        // Rank 0 holds columns 0-1 of each part, rank 1 columns 2-3.
        assert_eq!(r0, [0., 1., 4., 5., 8., 9., 12., 13.]);
        assert_eq!(r1, [2., 3., 6., 7., 10., 11., 14., 15.]);
        let all = [r0, r1].concat();
        assert_eq!(join_blocks(&all, &local, (1, 2), 2), whole);
        // One part: plain halves.
        let r1 = split_block(&whole, &local, (1, 1), 1, 2);
        assert_eq!(r1, [4., 5., 6., 7., 12., 13., 14., 15.]);
        let all = [split_block(&whole, &local, (1, 1), 0, 2), r1].concat();
        assert_eq!(join_blocks(&all, &local, (1, 1), 2), whole);
    }
}
