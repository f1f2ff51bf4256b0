//! # fastrope
//!
//! Attention with relative-position matrices: the score between query `i` and key `j` is
//!
//! ```text
//! M_ij = scale * q_i^T W_{δ_ij} k_j,     δ_ij = (q_offset + i) - (k_offset + j)
//! A_ij = exp(M_ij + b(δ_ij))             (0 where a causal/window mask drops δ_ij)
//! l_i  = Σ_j A_ij,  lse_i = ln l_i,  O_i = Σ_j A_ij v_j / l_i
//! ```
//!
//! Rotary position embedding (RoPE) is `W_δ = f² blockdiag_m R(-δ θ_m)`; learned 2x2 blocks,
//! sparse and dense `W_δ` are the general case. Two methods compute it:
//!
//! * [`exact`]: streaming ("online") softmax over key blocks, memory `O((n_q + n_k) d)` beyond
//!   inputs and outputs, forward and backward (FlashAttention-2's recompute scheme);
//! * [`fast`]: the polynomial method: `exp` replaced by a certified polynomial `p` on `[-R, R]`,
//!   `p(M)` expanded into rescaled Toeplitz matrices and applied with FFTs ([`toeplitz`]), in
//!   almost linear time in `n` for small supports and bounded entries.
//!
//! [`plan`] predicts the cost of both and picks. The mathematics and the contract are in
//! `docs/DESIGN.md`; the Python package (`python/fastrope`) is the user-facing API.

pub mod arch;
pub mod error;
pub mod exact;
pub mod fast;
pub mod plan;
pub mod poly;
pub mod position;
pub mod problem;
pub mod profile;
pub mod toeplitz;

#[cfg(feature = "python")]
mod fork;
#[cfg(feature = "python")]
mod python;

/// The Python extension's allocator (see Cargo.toml): per-call buffers are reused instead of
/// being mapped and page-faulted in on every call.
#[cfg(feature = "python")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub use arch::Real;
pub use error::{Error, Result};
pub use position::{Bias, Position, RotaryW, SparseW};
pub use problem::{Control, Problem};

#[cfg(test)]
mod robustness_tests;
#[cfg(test)]
pub(crate) mod test_util;
