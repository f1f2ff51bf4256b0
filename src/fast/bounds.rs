//! The data-dependent numbers the certificate of the fast method needs, all `O(n d + glen |S|)`:
//! the score bound `R >= max |M_ij|` (docs/DESIGN.md §5.2), `max |v|`, and the statistics of the
//! mask/bias factor.

use super::HeadProblem;
use crate::error::{Error, Result};
use crate::poly::U;
use ndarray::ArrayView2;
use std::collections::VecDeque;

/// Bounds on the scores, from the cheapest to the sharpest form (all `>= max |M_ij|`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScoreBound {
    /// `R = min(spectral, blocks, abs)`: the interval `[-R, R]` the polynomial must certify.
    pub r: f64,
    /// `scale Σ_s max|q[:,l1_s]| max|w_s| max|k[:,l2_s]|`, which also bounds `Σ_s |a_s|` for the
    /// expansion terms `a_s = scale q[i,l1_s] w_s k[j,l2_s]` (so `Σ_τ |terms| <= Σ_t |c_t| r_abs^t`).
    pub r_abs: f64,
    /// `scale max_i |q_i|_S max_δ ||W_δ||_2 max_j |k_j|_S`.
    pub spectral: f64,
    /// `Σ_blocks scale max_i |q_i[rows]| max_δ ||W_δ[block]||_2 max_j |k_j[cols]|`.
    pub blocks: f64,
}

/// The W-side of the score bound, computed once per (W, mask) in `O(glen |S|)` and reusable for
/// every head sharing them: per connected block of the support (W is block diagonal up to a
/// permutation of rows and columns) the largest spectral norm over visible diagonals, and per
/// support entry its largest magnitude.
///
/// Blocks of at most 2x2 (rotary, `BlockW`) use the exact 2x2 singular value
/// `σ_max = (√((a+d)² + (c-b)²) + √((a-d)² + (c+b)²)) / 2`; larger blocks use
/// `min(||B||_F, √(||B||_1 ||B||_∞))`, both upper bounds on `||B||_2`.
#[derive(Clone, Debug, PartialEq)]
pub struct WNorms {
    /// Per block: the row (l1) and column (l2) coordinates and `max_δ ||W_δ[block]||_2`.
    pub blocks: Vec<(Vec<usize>, Vec<usize>, f64)>,
    /// Per support entry: `max_{visible g} |seqs[s, g]|`.
    pub entry_max: Vec<f64>,
}

impl WNorms {
    /// `support` entries must be `< d`; `seqs` is `|S| x glen`; `factor[g] > 0` marks the
    /// visible diagonals (only those can reach a score that matters).
    pub fn new(
        d: usize,
        support: &[(usize, usize)],
        seqs: ArrayView2<f64>,
        factor: &[f64],
    ) -> Result<Self> {
        let ns = support.len();
        if seqs.nrows() != ns || seqs.ncols() != factor.len() {
            return Err(Error::Value(format!(
                "seqs: expected shape ({ns}, {}), got {:?}",
                factor.len(),
                seqs.shape()
            )));
        }
        if let Some(&(a, b)) = support.iter().find(|&&(a, b)| a >= d || b >= d) {
            return Err(Error::Value(format!(
                "support: expected entries < d = {d}, got ({a}, {b})"
            )));
        }
        // Union-find over 2d nodes: rows 0..d, columns d..2d.
        let mut parent: Vec<usize> = (0..2 * d).collect();
        fn find(p: &mut [usize], mut x: usize) -> usize {
            while p[x] != x {
                p[x] = p[p[x]];
                x = p[x];
            }
            x
        }
        for &(a, b) in support {
            let (ra, rb) = (find(&mut parent, a), find(&mut parent, d + b));
            parent[ra] = rb;
        }
        let mut root_block: Vec<Option<usize>> = vec![None; 2 * d];
        let mut members: Vec<(Vec<usize>, Vec<usize>, Vec<usize>)> = Vec::new();
        for (s, &(a, b)) in support.iter().enumerate() {
            let root = find(&mut parent, a);
            let id = *root_block[root].get_or_insert_with(|| {
                members.push((Vec::new(), Vec::new(), Vec::new()));
                members.len() - 1
            });
            let m = &mut members[id];
            if !m.0.contains(&a) {
                m.0.push(a);
            }
            if !m.1.contains(&b) {
                m.1.push(b);
            }
            m.2.push(s);
        }
        let visible: Vec<usize> = (0..factor.len()).filter(|&g| factor[g] > 0.0).collect();
        let mut entry_max = vec![0.0f64; ns];
        for (s, em) in entry_max.iter_mut().enumerate() {
            let row = seqs.row(s);
            *em = visible.iter().fold(0.0f64, |m, &g| m.max(row[g].abs()));
        }
        let mut blocks = Vec::with_capacity(members.len());
        for (rows, cols, entries) in members {
            let mut best = 0.0f64;
            let mut mat = vec![0.0; rows.len() * cols.len()];
            for &g in &visible {
                mat.iter_mut().for_each(|x| *x = 0.0);
                for &s in &entries {
                    let (a, b) = support[s];
                    let (ia, ib) = (
                        rows.iter().position(|&x| x == a),
                        cols.iter().position(|&x| x == b),
                    );
                    if let (Some(ia), Some(ib)) = (ia, ib) {
                        mat[ia * cols.len() + ib] += seqs[[s, g]];
                    }
                }
                best = best.max(spectral_bound(&mat, rows.len(), cols.len()));
            }
            blocks.push((rows, cols, best * (1.0 + 16.0 * U)));
        }
        Ok(WNorms { blocks, entry_max })
    }

    /// The score bounds for one head (`q`: `nq x d`, `k`: `nk x d`), in `O((nq + nk) d)`.
    pub fn bound(
        &self,
        support: &[(usize, usize)],
        q: ArrayView2<f64>,
        k: ArrayView2<f64>,
        scale: f64,
    ) -> ScoreBound {
        let col_max =
            |x: &ArrayView2<f64>, l: usize| x.column(l).fold(0.0f64, |m, v| m.max(v.abs()));
        let restricted_norm_max = |x: &ArrayView2<f64>, coords: &[usize]| {
            x.rows().into_iter().fold(0.0f64, |m, row| {
                m.max(coords.iter().map(|&l| row[l] * row[l]).sum::<f64>().sqrt())
            })
        };
        let scale = scale.abs();
        let r_abs: f64 = support
            .iter()
            .zip(&self.entry_max)
            .map(|(&(a, b), &w)| col_max(&q, a) * w * col_max(&k, b))
            .sum::<f64>()
            * scale;
        let mut all_rows: Vec<usize> = self
            .blocks
            .iter()
            .flat_map(|b| b.0.iter().copied())
            .collect();
        let mut all_cols: Vec<usize> = self
            .blocks
            .iter()
            .flat_map(|b| b.1.iter().copied())
            .collect();
        all_rows.sort_unstable();
        all_cols.sort_unstable();
        let wmax = self.blocks.iter().fold(0.0f64, |m, b| m.max(b.2));
        let spectral =
            scale * restricted_norm_max(&q, &all_rows) * wmax * restricted_norm_max(&k, &all_cols);
        let blocks: f64 = self
            .blocks
            .iter()
            .map(|(rows, cols, w)| {
                restricted_norm_max(&q, rows) * w * restricted_norm_max(&k, cols)
            })
            .sum::<f64>()
            * scale;
        // The products and sums above round; a relative slack of 64u keeps R an upper bound.
        let slack = 1.0 + 64.0 * U * (support.len() as f64 + 4.0);
        let (r_abs, spectral, blocks) = (r_abs * slack, spectral * slack, blocks * slack);
        ScoreBound {
            r: r_abs.min(spectral).min(blocks),
            r_abs,
            spectral,
            blocks,
        }
    }
}

/// Upper bound on the spectral norm of a row-major `m x n` block: exact for blocks up to 2x2.
fn spectral_bound(mat: &[f64], m: usize, n: usize) -> f64 {
    if m <= 2 && n <= 2 {
        let at = |i: usize, j: usize| if i < m && j < n { mat[i * n + j] } else { 0.0 };
        let (a, b, c, d) = (at(0, 0), at(0, 1), at(1, 0), at(1, 1));
        return 0.5 * ((a + d).hypot(c - b) + (a - d).hypot(c + b));
    }
    let fro = mat.iter().map(|x| x * x).sum::<f64>().sqrt();
    let norm1 = (0..n)
        .map(|j| (0..m).map(|i| mat[i * n + j].abs()).sum::<f64>())
        .fold(0.0, f64::max);
    let norm_inf = (0..m)
        .map(|i| mat[i * n..(i + 1) * n].iter().map(|x| x.abs()).sum::<f64>())
        .fold(0.0, f64::max);
    fro.min((norm1 * norm_inf).sqrt())
}

/// `R >= max_ij |M_ij|` for one head: the smaller of the spectral-norm bound (per block of the
/// support) and the sum over S of infinity norms. See [`WNorms`] and [`ScoreBound`].
pub fn bound_r(
    q: ArrayView2<f64>,
    k: ArrayView2<f64>,
    scale: f64,
    support: &[(usize, usize)],
    seqs: ArrayView2<f64>,
    factor: &[f64],
) -> Result<f64> {
    if q.ncols() != k.ncols() {
        return Err(Error::Value(format!(
            "k: expected {} columns like q, got {}",
            q.ncols(),
            k.ncols()
        )));
    }
    Ok(WNorms::new(q.ncols(), support, seqs, factor)?
        .bound(support, q, k, scale)
        .r)
}

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
        let masses = row_masses(nq, nk, factor);
        let min_row_mass = masses
            .iter()
            .copied()
            .filter(|&m| m > 0.0)
            .fold(f64::INFINITY, f64::min);
        FastBounds {
            r: score.r,
            r_abs: score.r_abs,
            v_max,
            factor_sum: factor.iter().sum::<f64>() * (1.0 + factor.len() as f64 * U),
            factor_norm2: factor.iter().map(|f| f * f).sum::<f64>().sqrt()
                * (1.0 + factor.len() as f64 * U),
            min_row_mass,
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
    use ndarray::Array2;

    fn rng(seed: u64) -> impl FnMut() -> f64 {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        }
    }

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

    #[test]
    fn score_bound_dominates_every_score() {
        let (d, nq, nk) = (6, 17, 23);
        let glen = nq + nk - 1;
        let mut u = rng(7);
        let q = Array2::from_shape_fn((nq, d), |_| u());
        let k = Array2::from_shape_fn((nk, d), |_| 2.0 * u());
        // Rotary-like blocks on (0,1), (2,3) plus a scattered 1x2 block on row 4.
        let support = vec![
            (0, 0),
            (0, 1),
            (1, 0),
            (1, 1),
            (2, 2),
            (2, 3),
            (3, 2),
            (3, 3),
            (4, 5),
            (4, 4),
        ];
        let seqs = Array2::from_shape_fn((support.len(), glen), |_| u());
        let factor: Vec<f64> = (0..glen)
            .map(|g| if g % 3 == 0 { 0.0 } else { 1.0 })
            .collect();
        let wn = WNorms::new(d, &support, seqs.view(), &factor).unwrap();
        assert_eq!(wn.blocks.len(), 3);
        let b = wn.bound(&support, q.view(), k.view(), 0.7);
        let mut max_m: f64 = 0.0;
        for i in 0..nq {
            for j in 0..nk {
                let g = j + nq - 1 - i;
                if factor[g] > 0.0 {
                    let m: f64 = support
                        .iter()
                        .enumerate()
                        .map(|(s, &(a, c))| q[[i, a]] * seqs[[s, g]] * k[[j, c]])
                        .sum();
                    max_m = max_m.max((0.7 * m).abs());
                }
            }
        }
        assert!(max_m <= b.r && b.r <= b.r_abs && b.r <= b.spectral && b.r <= b.blocks);
        // Exact 2x2 singular value: a rotation has norm 1.
        let (c, s) = (0.3f64.cos(), 0.3f64.sin());
        assert!((spectral_bound(&[c, s, -s, c], 2, 2) - 1.0).abs() < 1e-15);
        assert!(matches!(
            bound_r(
                q.view(),
                k.view(),
                1.0,
                &[(6, 0)],
                seqs.slice(ndarray::s![..1, ..]),
                &factor
            ),
            Err(Error::Value(_))
        ));
    }
}
