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
//! over multisets `τ` of `S` (`|τ| <= degree`, [`expansion`]); `f = exp(b)` is the mask/bias factor
//! and multiplies every term. Each `C_αβ` is a Toeplitz sequence, so
//! `Σ_j p(M_ij) f_ij x_j = Σ_α q_i^α [Σ_β T[C_αβ] (k^β ∘ x)]_i` costs FFTs instead of `nq nk`
//! work ([`forward`]). Output `O = (p(M)∘F) V / (p(M)∘F) 1`, with an a-priori certificate that
//! `max |O - O_exact| <= certified_error` ([`certify`]).
//!
//! Call [`fast_forward_head`] for one head, or, to share work across heads with the same W,
//! scale, mask/bias and shape: [`FastBounds`] per head → one [`fast_plan`] with the largest
//! bounds → one [`FastKernel`] (expansion + kernel spectra) → [`FastKernel::apply`] per head.
//! The spectra ([`FastSpectra`]) do not depend on the plan's data-dependent bounds and are
//! cached across calls ([`cache`]); the kernel pairs them with the current call's plan.

pub mod backward;
pub mod backward_certify;
pub mod blocks;
pub mod bounds;
pub mod cache;
pub mod certify;
pub mod expansion;
pub mod forward;
pub mod lowrank;
pub mod lowrank_backward;
pub mod naive;
pub mod naive_backward;

use crate::error::{Error, Result};
use ndarray::{Array1, Array2, ArrayView2};

pub use bounds::{row_masses, FastBounds};
pub use certify::{fast_plan, plan_for_polynomial, Certificate, FastPlan, FastShape};
pub use expansion::{Expansion, ExpansionCounts};
pub use forward::{fast_forward_head, FastKernel, FastSpectra};

/// One head's problem in Toeplitz form. Positions: query `i` at `q_offset + i`, key `j` at
/// `k_offset + j`, `δ_ij = (q_offset - k_offset) + i - j`. Diagonals are indexed by
/// `g = j - i + nq - 1` in `0..glen`, `glen = nq + nk - 1` (so
/// `δ(g) = (q_offset - k_offset) + nq - 1 - g`).
pub struct HeadProblem<'a> {
    /// `nq x d`, unscaled.
    pub q: ArrayView2<'a, f64>,
    /// `nk x d`.
    pub k: ArrayView2<'a, f64>,
    /// `nk x dv`.
    pub v: ArrayView2<'a, f64>,
    pub scale: f64,
    /// S: the entries `(l1, l2)` of W that may be non-zero.
    pub support: &'a [(usize, usize)],
    /// `|S| x glen`: `seqs[[s, g]] = w_s(δ(g)) = W_δ(g)[l1_s, l2_s]`.
    pub seqs: ArrayView2<'a, f64>,
    /// `glen`: `exp(b(δ(g)))` (additive bias), `0.0` where masked.
    pub factor: &'a [f64],
}

impl HeadProblem<'_> {
    pub fn nq(&self) -> usize {
        self.q.nrows()
    }
    pub fn nk(&self) -> usize {
        self.k.nrows()
    }
    pub fn d(&self) -> usize {
        self.q.ncols()
    }
    pub fn dv(&self) -> usize {
        self.v.ncols()
    }
    /// `nq + nk - 1` (0 when either side is empty).
    pub fn glen(&self) -> usize {
        (self.nq() + self.nk()).saturating_sub(1)
    }

    /// Shapes agree, indices are in range, every value is finite and `factor >= 0`.
    pub fn validate(&self) -> Result<()> {
        let (nq, nk, d, ns) = (self.nq(), self.nk(), self.d(), self.support.len());
        if self.k.ncols() != d {
            return Err(Error::Value(format!(
                "k: expected {d} columns like q, got {}",
                self.k.ncols()
            )));
        }
        if self.v.nrows() != nk {
            return Err(Error::Value(format!(
                "v: expected {nk} rows like k, got {}",
                self.v.nrows()
            )));
        }
        if !self.scale.is_finite() {
            return Err(Error::Value(format!(
                "scale: expected a finite value, got {}",
                self.scale
            )));
        }
        if let Some(&(a, b)) = self.support.iter().find(|&&(a, b)| a >= d || b >= d) {
            return Err(Error::Value(format!(
                "support: expected entries < d = {d}, got ({a}, {b})"
            )));
        }
        if nq == 0 || nk == 0 {
            return Ok(());
        }
        let glen = self.glen();
        if self.seqs.shape() != [ns, glen] {
            return Err(Error::Value(format!(
                "seqs: expected shape ({ns}, {glen}), got {:?}",
                self.seqs.shape()
            )));
        }
        if self.factor.len() != glen {
            return Err(Error::Value(format!(
                "factor: expected length {glen}, got {}",
                self.factor.len()
            )));
        }
        for (name, x) in [
            ("q", &self.q),
            ("k", &self.k),
            ("v", &self.v),
            ("seqs", &self.seqs),
        ] {
            if x.iter().any(|v| !v.is_finite()) {
                return Err(Error::Value(format!(
                    "{name}: expected finite values, got inf or nan"
                )));
            }
        }
        if let Some(f) = self.factor.iter().find(|f| !(f.is_finite() && **f >= 0.0)) {
            return Err(Error::Value(format!(
                "factor: expected finite values >= 0, got {f}"
            )));
        }
        Ok(())
    }
}

/// Knobs that bound the work and memory of the fast method.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FastLimits {
    /// Highest polynomial degree tried (at most [`crate::poly::MAX_DEGREE`]).
    pub max_degree: usize,
    /// Largest number of expansion terms `C(|S| + g, g)` we enumerate.
    pub max_terms: usize,
    /// Bytes the fast method may hold at once (kernel spectra, accumulators, monomials); the
    /// columns of `[V, 1]` are processed in tiles to stay below it.
    pub max_working_bytes: usize,
}

impl Default for FastLimits {
    fn default() -> Self {
        FastLimits {
            max_degree: 40,
            max_terms: 1_000_000,
            max_working_bytes: 2 << 30,
        }
    }
}

/// What the fast method did and what it guarantees.
#[derive(Clone, Debug, PartialEq)]
pub struct FastReport {
    pub degree: usize,
    pub kind: crate::poly::PolyKind,
    /// The plan's score bound `R >= max |M_ij|`: the polynomial is certified on `[-r, r]` (on
    /// [`certify::snap_radius`]`(r)` for Chebyshev, at most 1/64 wider, so that calls share
    /// kernel spectra).
    pub r: f64,
    /// Verified relative error of `p` against `exp` on `[-r, r]`.
    pub rho: f64,
    pub terms: usize,
    pub n_alpha: usize,
    pub n_beta: usize,
    pub n_pairs: usize,
    pub fft_len: usize,
    /// Bound on `max |out - exact|` (polynomial error plus floating-point rounding).
    pub certified_error: f64,
    /// The polynomial's share of `certified_error`: `max|v| 2ρ/(1-ρ)`.
    pub approximation_error: f64,
    /// The rounding share of `certified_error`, from this head's data (see [`certify`]).
    pub rounding_error: f64,
    /// Bound on `max |lse - exact lse|` over rows with a visible key.
    pub certified_lse_error: f64,
}

/// Output of one head: `out` (`nq x dv`), `lse` (`nq`, `-inf` for rows with no visible key).
#[derive(Clone, Debug)]
pub struct FastOutput {
    pub out: Array2<f64>,
    pub lse: Array1<f64>,
    pub report: FastReport,
}

#[cfg(test)]
mod backward_tests;
#[cfg(test)]
mod tests;
