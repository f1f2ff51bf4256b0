//! The data-dependent numbers the certificate of the fast method needs, all `O(n d + glen |S|)`:
//! the score bound `R >= max |M_ij|` (docs/DESIGN.md §5.2; computed by [`crate::poly::WNorms`]),
//! `max |v|`, and the statistics of the mask/bias factor.

use crate::error::Result;
use crate::fast::common::HeadProblem;
use crate::poly::{norm2, ScoreBound, WNorms, U};
use std::collections::VecDeque;

/// Bounds read from one head (or the element-wise worst over several heads sharing a plan).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FastBounds {
    /// `R >= max |M_ij|` over visible pairs.
    pub r: f64,
    /// `>= Σ_s |a_s|` for every pair (sizes the expanded terms; see [`ScoreBound::r_abs`]).
    pub r_abs: f64,
    /// `max |v|`.
    pub v_max: f64,
    /// `Σ_g factor[g]`.
    pub factor_sum: f64,
    /// `(Σ_g factor[g]^2)^(1/2)`.
    pub factor_norm2: f64,
    /// A lower bound on `min_i Σ_j factor[g(i,j)]` over rows with a visible key (`+inf` if none):
    /// every visible row's denominator is at least `(1-ρ) e^{-R}` times this.
    pub min_row_mass: f64,
}

impl FastBounds {
    /// Validates the problem and reads its bounds.
    pub fn from_problem(prob: &HeadProblem) -> Result<Self> {
        prob.validate()?;
        let (nq, nk) = (prob.nq(), prob.nk());
        let score = if nq == 0 || nk == 0 {
            ScoreBound {
                r: 0.0,
                r_abs: 0.0,
                spectral: 0.0,
                blocks: 0.0,
            }
        } else {
            WNorms::new(prob.d(), prob.support, prob.seqs, prob.factor)?.bound(
                prob.support,
                prob.q,
                prob.k,
                prob.scale,
            )
        };
        Ok(Self::from_parts(
            score,
            max_abs(prob.v.iter()),
            nq,
            nk,
            prob.factor,
        ))
    }

    /// Combines a score bound and `max |v|` with the statistics of `factor` (`nq + nk - 1` long).
    pub fn from_parts(score: ScoreBound, v_max: f64, nq: usize, nk: usize, factor: &[f64]) -> Self {
        Self::with_factor(score, v_max, &FactorStats::new(nq, nk, factor))
    }

    /// [`FastBounds::from_parts`] with the factor's statistics computed once for many heads.
    pub fn with_factor(score: ScoreBound, v_max: f64, f: &FactorStats) -> Self {
        FastBounds {
            r: score.r,
            r_abs: score.r_abs,
            v_max,
            factor_sum: f.factor_sum,
            factor_norm2: f.factor_norm2,
            min_row_mass: f.min_row_mass,
        }
    }

    /// The element-wise worst of two bounds, for one plan shared by several heads.
    pub fn worst(&self, other: &FastBounds) -> FastBounds {
        FastBounds {
            r: self.r.max(other.r),
            r_abs: self.r_abs.max(other.r_abs),
            v_max: self.v_max.max(other.v_max),
            factor_sum: self.factor_sum.max(other.factor_sum),
            factor_norm2: self.factor_norm2.max(other.factor_norm2),
            min_row_mass: self.min_row_mass.min(other.min_row_mass),
        }
    }

    /// True when every bound of `self` is within those of `plan` (so `plan`'s certificate holds).
    pub fn within(&self, plan: &FastBounds) -> bool {
        self.r <= plan.r
            && self.r_abs <= plan.r_abs
            && self.v_max <= plan.v_max
            && self.factor_sum <= plan.factor_sum
            && self.factor_norm2 <= plan.factor_norm2
            && self.min_row_mass >= plan.min_row_mass
    }
}

pub(crate) fn max_abs<'a>(x: impl Iterator<Item = &'a f64>) -> f64 {
    x.fold(0.0f64, |m, v| m.max(v.abs()))
}

/// What a fast plan needs of a mask/bias factor (`glen` values `e^{b(δ)}`, 0 where masked):
/// its sum and 2-norm (rounded up) and the smallest positive row mass ([`row_masses`]).
#[derive(Clone, Copy, Debug)]
pub struct FactorStats {
    pub factor_sum: f64,
    pub factor_norm2: f64,
    pub min_row_mass: f64,
}

impl FactorStats {
    pub fn new(nq: usize, nk: usize, factor: &[f64]) -> Self {
        Self::from_masses(factor, &row_masses(nq, nk, factor))
    }

    /// From the row masses already computed.
    pub fn from_masses(factor: &[f64], masses: &[f64]) -> Self {
        let up = 1.0 + factor.len() as f64 * U;
        FactorStats {
            factor_sum: factor.iter().sum::<f64>() * up,
            factor_norm2: norm2(factor.iter()) * up,
            min_row_mass: masses
                .iter()
                .copied()
                .filter(|&m| m > 0.0)
                .fold(f64::INFINITY, f64::min),
        }
    }
}

/// Per query row, a lower bound on its mass `Σ_j factor[g(i,j)]` (row `i` reads diagonals
/// `nq-1-i ..= nq-1-i+nk-1`); exactly `0.0` iff the row has no visible key.
///
/// Prefix sums give the masses, but a difference of prefix sums can lose everything when a few
/// huge factors dominate, so we subtract its rounding bound `(2 glen + 2) u Σ factor` and never go
/// below the row's largest single factor (an exact lower bound, by a sliding-window maximum).
pub fn row_masses(nq: usize, nk: usize, factor: &[f64]) -> Vec<f64> {
    if nq == 0 || nk == 0 || factor.len() != nq + nk - 1 {
        return vec![0.0; nq];
    }
    let glen = factor.len();
    let mut prefix = Vec::with_capacity(glen + 1);
    prefix.push(0.0);
    let mut acc = 0.0;
    for f in factor {
        acc += f;
        prefix.push(acc);
    }
    let slack = (2 * glen + 2) as f64 * U * acc;
    // Row i's window starts at lo = nq-1-i; walk lo upwards (i downwards) with a max-deque.
    let mut out = vec![0.0; nq];
    let mut deque: VecDeque<usize> = VecDeque::new();
    let mut next = 0; // next diagonal to push
    for lo in 0..nq {
        let hi = lo + nk - 1;
        while next <= hi {
            while deque.back().is_some_and(|&b| factor[b] <= factor[next]) {
                deque.pop_back();
            }
            deque.push_back(next);
            next += 1;
        }
        while deque.front().is_some_and(|&f| f < lo) {
            deque.pop_front();
        }
        let window_max = deque.front().map_or(0.0, |&f| factor[f]);
        let sum = prefix[hi + 1] - prefix[lo] - slack;
        out[nq - 1 - lo] = if window_max > 0.0 {
            sum.max(window_max)
        } else {
            0.0
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_masses_are_lower_bounds_and_zero_exactly_when_masked() {
        let (nq, nk) = (7, 5);
        // Causal with zero offsets: row i sees keys j <= i, i.e. δ = nq - 1 - g >= 0.
        let factor: Vec<f64> = (0..nq + nk - 1)
            .map(|g| if g < nq { 1.0 } else { 0.0 })
            .collect();
        let m = row_masses(nq, nk, &factor);
        for (i, mi) in m.iter().enumerate() {
            let exact = (0..nk).filter(|&j| j <= i).count() as f64;
            assert!(
                *mi <= exact && *mi >= exact * (1.0 - 1e-12),
                "row {i}: {mi} vs {exact}"
            );
        }
        // A huge factor far away must not wipe out the small rows.
        let mut f2 = vec![0.0; nq + nk - 1];
        f2[0] = 1e300;
        f2[nq + nk - 2] = 1.0;
        let m2 = row_masses(nq, nk, &f2);
        assert_eq!(m2[0], 1.0);
        assert_eq!(m2[nq - 1], 1e300);
        assert!(m2[1..nq - 1].iter().all(|&x| x == 0.0));
    }
}
