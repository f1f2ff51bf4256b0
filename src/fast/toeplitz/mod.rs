//! The Toeplitz route of the fast method (docs/DESIGN.md §5.3-§5.6), for every `W`, mask and
//! bias: `p(M) ∘ F` expanded into rescaled Toeplitz terms ([`expansion`]), applied with FFTs in
//! cache-sized frequency blocks ([`blocks`], [`forward`]), certified and costed before any FFT
//! runs ([`certify`]); the backward differentiates the same expansion ([`backward`], its rounding
//! certificate in [`backward_certify`]). It imports the shared vocabulary of [`crate::fast`] and
//! never the low-rank route.

pub mod backward;
pub mod backward_certify;
pub mod blocks;
pub mod certify;
pub mod expansion;
pub mod forward;

pub use backward::{
    backward_pair_chunk, backward_plan, fast_backward_head, BackwardKernel, BackwardSpectra,
};
pub use certify::{fast_plan, plan_for_polynomial, Certificate};
pub use expansion::Expansion;
pub use forward::{fast_forward_head, FastKernel, FastSpectra};
