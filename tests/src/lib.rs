//! Cross-crate integration tests of collie-rs; the tests live in `tests/tests/*.rs` and the golden
//! fixtures they compare against in `tests/fixtures/` (generators in `scripts/fixtures/`). The
//! library holds what more than one runner needs: reading fixtures ([`golden`]) and the
//! backend-generic parity suite ([`suite`]) that the tests run on the CPU and wgpu and
//! `collie-gpu-check` runs on CUDA.

pub mod golden;
pub mod suite;
