//! Shared vocabulary of collie-rs.
//!
//! Everything a model, a loader or a binary needs to agree on lives here: which Burn backends are
//! compiled in and how a `--device` string selects one ([`device`]), the layers every model is
//! built from ([`nn`]: a [`nn::Linear`] with an adapter slot and a parallel mode, [`nn::Embedding`],
//! [`nn::Norm`]: RMSNorm and LayerNorm), rotary position embeddings ([`rope`]), mixture-of-experts routing statistics ([`router`]), attention ([`attention`], and its memory-efficient
//! kernels in [`flash`]), losses
//! ([`loss`]) and the asset resolver that turns `pypi:NAME==VERSION/path` into a local file
//! ([`asset`]); the collectives a parallel run calls ([`dist`]).

pub mod asset;
pub mod attention;
pub mod device;
pub mod dist;
pub mod error;
pub mod flash;
pub mod fused;
pub mod host;
pub mod lm;
pub mod loss;
pub mod model;
pub mod nn;
mod registry;
pub mod rope;
pub mod router;
pub mod tp;

/// The binaries' global allocator (large freed blocks kept mapped for reuse; see its docs).
pub use collie_kernels::alloc::CachingAlloc;
pub use error::{CoreError, Result};
