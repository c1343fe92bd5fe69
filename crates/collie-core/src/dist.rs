//! The collectives a parallel run calls, as a trait: `collie-dist` implements it over MPI, and a
//! single-process run uses [`Solo`] (size 1, every collective the identity).
//!
//! Buffers are host `f32`/`f64` slices (DESIGN.md: collectives move host vectors); a caller copies
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
    /// Copies `buf` of member `root` into every member's `buf`.
    fn broadcast(&self, buf: &mut [f32], root: usize);
    /// Waits for every member.
    fn barrier(&self);
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
    fn broadcast(&self, _buf: &mut [f32], _root: usize) {}
    fn barrier(&self) {}
}

/// The group of one process, as a [`Group`].
pub fn solo() -> Group {
    Arc::new(Solo)
}
