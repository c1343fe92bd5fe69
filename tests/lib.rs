//! Cross-crate integration tests of collie-rs; the tests live in `tests/tests/*.rs` and the golden
//! fixtures they compare against in `tests/fixtures/` (generators in `scripts/fixtures/`).
