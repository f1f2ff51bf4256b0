//! The leaf of the crate: the floating-point types the kernels are generic over ([`Real`]),
//! instruction-set detection and selection ([`simd`]), and the SIMD vocabulary the exact
//! kernels are written in ([`lanes`]). Nothing here imports the rest of the crate (besides
//! [`crate::error`]); everything else may import it.

// The AVX-512 intrinsics in `lanes` are stable from Rust 1.89 (the crate's `rust-version`).
pub mod lanes;
pub mod real;
pub mod simd;

pub use lanes::{Lanes, LanesTask, Portable};
pub use real::Real;
pub use simd::{call_isa, isa, with_isa, Isa};
