//! Cross-crate integration tests live in `tests/`; this library holds what they share: the
//! namespace [`lab`] for root-only tests.

pub mod lab;
pub mod pki;
