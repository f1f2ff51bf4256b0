//! The fast method for RoPE without Toeplitz products: a low-rank feature map.
//!
//! For [`RotaryW`](crate::position::RotaryW), `W_δ = R(p_i θ)^T R(p'_j θ)`: a rotation by the relative angle is the product
//! of the rotations by the absolute ones. With `x_i = scale f² R(p_i θ) q_i` and
//! `y_j = R(p'_j θ) k_j` (each pair `(a, b)` of coordinates turned by `ψ`:
//! `(a cos ψ - b sin ψ, a sin ψ + b cos ψ)`), `M_ij = x_i · y_j`, and the polynomial
//! `p(M) = Σ_t c_t M^t` is a rank-`r` matrix, `r = C(d + g, g)`:
//!
//! ```text
//! p(x_i · y_j) = Σ_{|α| <= g} [c_|α| (|α| choose α) x_i^α] y_j^α = Φq(x_i) · Φk(y_j).
//! ```
//!
//! Without a mask, `Ã [V, 1] = Φq (Φkᵀ [V, 1])`: two GEMMs, `O(n r (d_v + 1))`. With a causal
//! mask the query rows run in blocks: keys visible to every row of a block enter through a
//! running state `S = Σ_j Φk(y_j)ᵀ [v_j, 1]` (`r x (d_v + 1)`), the few partially visible keys
//! through `p(M)` itself. Memory is `O(block r + r d_v)` besides the outputs: no kernel spectra.
//! General `W` and biases other than ALiBi keep the Toeplitz path ([`crate::fast::toeplitz`]).
//!
//! # Windows and ALiBi
//!
//! A window and an ALiBi decay `e^{-s|δ|}` ([`crate::fast::Band`]) go through block states
//! aligned to the query blocks, decayed and summed over the keys a block sees in full, and
//! `p(M)` weighted by the decay on the tiles it sees in part (`band.rs`, `band_backward.rs`;
//! docs/DESIGN.md §7.3). The certificate below holds with the count of visible keys replaced
//! by each row's total weight `Σ_j e^{-s|δ_ij|}`, `ρ` by `(1+ρ)e^η - 1` for a table `η` off the
//! ALiBi form, and a tail term for the pairs past `s|δ| = 64`.
//!
//! # Certificate
//!
//! The polynomial's part is the Toeplitz path's: `|Õ - O| <= 2ρ/(1-ρ) max|v|` for `|p - exp|
//! <= ρ exp` on `[-R, R]`. Rounding (f64): the computed `x̂`, `ŷ` give scores `M̂` with
//! `|M̂ - M| <= R₂ (γ_{d+2} + 2u (ψ_max + 6))` (`R₂ = scale f² max|q_i| max|k_j| >= Σ_l |x_l
//! y_l|`, `ψ_max` the largest angle, whose rounding moves the rotation), hence `|p(M̂) - p(M)| <=
//! P'(R₂) |M̂ - M|` with `P(x) = Σ |c_t| x^t`; every sum the method forms (GEMMs in any order,
//! features by products, Horner on the diagonal blocks) is a sum of at most `N = n_k + r + 2g +
//! block + d + 16` rounded products of terms whose magnitudes add up to at most
//! `n_vis P(R₂) max|v|` per entry, so each numerator/denominator entry is off by at most
//! `n_vis E max|v|`, `E = γ_N P(R₂) + P'(R₂) |M̂ - M|`. With every denominator at least
//! `L n_vis`, `L = (1-ρ) e^{-R}`: `|out error| <= 2 E V / (L - E) + 2u V`.

mod backward;
mod band;
mod band_backward;
mod certificate;
mod forward;
mod plan;

#[cfg(test)]
mod backward_tests;
#[cfg(test)]
mod forward_tests;

pub use backward::lowrank_backward_head;
pub use certificate::{
    band_inverse_mass, feature_count, inverse_mass_sum, lowrank_grad_rounding, lowrank_psums,
    rounding_error,
};
pub use forward::{
    forward_block, lowrank_head, lowrank_head_into, rotate, rotate_back, rotate_pair, BLOCK,
};
pub use plan::{block_rows, cert_of, lowrank_backward_plan, lowrank_plan};
