//! The fast method (docs/DESIGN.md §5): polynomial + rescaled Toeplitz + FFT, one head at a
//! time, f64.
//!
//! With `a_s = scale q[i,l1_s] w_s(δ_ij) k[j,l2_s]`, the score is `M_ij = Σ_{s in S} a_s`. A
//! certified polynomial `p ≈ exp` on `[-R, R]` ([`crate::poly`]) expands as
//!
//! ```text
//! p(M_ij) f(δ_ij) = Σ_{(α,β)} q_i^α C_αβ(δ_ij) k_j^β,     C_αβ(δ) = f(δ) Σ_{τ -> (α,β)} γ_τ Π_s w_s(δ)^{m_s}
//! ```
//!
//! over multisets `τ` of `S` (`|τ| <= degree`, [`toeplitz::expansion`]); `f = exp(b)` is the mask/bias factor
//! and multiplies every term. Each `C_αβ` is a Toeplitz sequence, so
//! `Σ_j p(M_ij) f_ij x_j = Σ_α q_i^α [Σ_β T[C_αβ] (k^β ∘ x)]_i` costs FFTs instead of `nq nk`
//! work ([`toeplitz::forward`]). Output `O = (p(M)∘F) V / (p(M)∘F) 1`, with an a-priori certificate that
//! `max |O - O_exact| <= certified_error` ([`toeplitz::certify`]).
//!
//! Call [`fast_forward_head`] for one head, or, to share work across heads with the same W,
//! scale, mask/bias and shape: [`FastBounds`] per head → one [`fast_plan`] with the largest
//! bounds → one [`FastKernel`] (expansion + kernel spectra) → [`FastKernel::apply`] per head.
//! The spectra ([`FastSpectra`]) do not depend on the plan's data-dependent bounds and are
//! cached across calls ([`cache`]); the kernel pairs them with the current call's plan.

// Shared vocabulary (below both routes).
pub mod bounds;
pub mod cache;
pub mod common;
pub mod grad;
pub mod grad_bounds;
pub mod plans;
// The two routes; they never import each other.
pub mod lowrank;
pub mod toeplitz;
// Naive twins for the tests.
pub mod naive;
pub mod naive_backward;

pub use bounds::{row_masses, FastBounds};
pub use common::{ExpansionCounts, FastLimits, FastOutput, FastReport, FastShape, HeadProblem};
pub use grad::{Grad5, GradCertificate, GradContract, GradEps, HeadGrads, Want};
pub use plans::{BackwardPlan, BackwardRequest, Band, FastPlan, LowRank, LowRankGrad};
pub use toeplitz::{
    fast_forward_head, fast_plan, plan_for_polynomial, Certificate, Expansion, FastKernel,
    FastSpectra,
};

#[cfg(test)]
mod backward_tests;
#[cfg(test)]
mod tests;
