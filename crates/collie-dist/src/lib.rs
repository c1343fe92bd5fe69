//! Parallel training over MPI (docs/parallelism.md).
//!
//! - [`ParallelDims`]: the `dp × tp × pp` layout in Megatron's rank order, checked once.
//! - [`Dist`]: this process's world and groups — MPI under `mpirun` with the `mpi` feature, a
//!   world of one otherwise — plus the failure path (panic hook, `MPI_Abort`, collective watchdog).
//! - [`dp`]: data parallelism — gradient all-reduce over the data-parallel group.
//! - [`pp`]: pipeline stages (partition methods) and the 1F1B schedule.
//! - [`zero`]: ZeRO-1/2 — optimizer state (and gradients) sharded over the data-parallel group.
//!
//! The groups are [`collie_core::dist::Collectives`] trait objects, so the trainer and the layers
//! never see MPI.

pub mod dims;
pub mod dp;
pub mod error;
pub mod pp;
pub mod world;
pub mod zero;

pub use dims::{Coords, ParallelDims};
pub use error::DistError;
pub use world::Dist;
