//! The error guarantee of the fast backward ([`crate::fast::toeplitz::backward`], [`crate::fast::lowrank`]): what it computes, how far that
//! is from the true gradient, and how much floating-point rounding adds.
//!
//! # What is computed
//!
//! The fast backward returns the gradient of the *approximate* forward
//! `Õ = P̃ V`, `P̃ = Ã / l̃`, `Ã = p(M) ∘ F`, `l̃ = Ã 1` (the forward of [`crate::fast::toeplitz::forward`] for the
//! backward's own polynomial `p`), evaluated with FFTs. In exact arithmetic, with
//! `G̃_ij = dO_i·(v_j - Õ_i) / l̃_i` (the gradient of `Σ dO∘Õ` with respect to `Ã_ij`):
//!
//! ```text
//! dṼ = P̃^T dO,   dq̃_i = Σ_j G̃_ij ∂Ã_ij/∂q_i,   dk̃_j = Σ_i G̃_ij ∂Ã_ij/∂k_j,
//! dW̃_s(δ) = Σ_{i-j=δ} G̃_ij ∂Ã_ij/∂w_s(δ),      db̃(δ) = Σ_{i-j=δ} G̃_ij Ã_ij,
//! ```
//!
//! and `∂Ã_ij/∂q_i = p'(M_ij) F_ij scale W_δ k_j` etc.: the true gradient's formulas
//! (docs/DESIGN.md §5.6) with `e^M` replaced by `p(M)` in `P` and by `p'(M)` in `dS`.
//!
//! # Distance to the true gradient (approximation error)
//!
//! Let `|p(x) - e^x| <= ρ e^x` and `|p'(x) - e^x| <= ρ' e^x` on `[-R, R]` (both verified by
//! [`crate::poly::certify`]), `R >= max |M_ij|` over visible pairs. Then `Ã_ij = A_ij (1 + ε_ij)`,
//! `p'(M_ij) F_ij = A_ij (1 + ε'_ij)` with `|ε| <= ρ`, `|ε'| <= ρ'`, and `l̃_i / l_i ∈ [1-ρ, 1+ρ]`,
//! so with `κ = 2ρ/(1-ρ)` and `κ' = (ρ+ρ')/(1-ρ)`:
//!
//! * `P̃_ij = P_ij (1 + η_ij)`, `|η| <= κ`;
//! * `Õ_ic - O_ic = Σ_j (P̃_ij - P_ij)(v_jc - m_c)` for any `m_c` (both rows sum to 1); with
//!   `m_c` the midrange of column `c`, `|Õ_ic - O_ic| <= κ range_c / 2`;
//! * with `g_ij = dO_i·(v_j - O_i)`, `|g_ij| <= Γ_i = min(Σ_c |dO_ic| range_c, 2 |dO_i|_2
//!   max_j |v_j - m|_2)` (`O_i` lies in the convex hull of the `v_j`; `m` the midrange), the true
//!   `dS_ij = P_ij g_ij` and the approximate `dS̃_ij = P_ij (1 + η'_ij) g̃_ij` (`|η'| <= κ'`,
//!   `g̃_ij = g_ij + dO_i·(O_i - Õ_i)`) differ by at most `σ P_ij Γ_i`,
//!   `σ = κ' + (1 + κ') κ/2`; for `db` (which uses `p`, not `p'`) by `σ_b P_ij Γ_i`,
//!   `σ_b = κ + (1 + κ) κ/2`.
//!
//! Summing over the row (`Σ_j P_ij = 1`), the column, or the diagonal of `P`:
//!
//! ```text
//! |dq̃ - dq| <= σ Γ K_w,          |dk̃ - dk| <= σ Γ Q_w colP,      |dṼ - dV| <= κ max|dO| colP,
//! |dW̃_s - dW_s| <= σ Γ QK diagP,  |db̃ - db| <= σ_b Γ diagP,
//! ```
//!
//! where `K_w >= scale max |(W_δ k_j)_l|`, `Q_w >= scale max |(W_δ^T q_i)_l|`,
//! `QK = scale max_s max|q[:,l1_s]| max|k[:,l2_s]|` (all from [`GradBounds`]), and
//! `colP >= max_j Σ_i P_ij`, `diagP >= max_g Σ_{i-j on g} P_ij` ([`PSums`]). Per head they come
//! from its data in `O(|S| N log N)` ([`PSums::from_data`]): the tangent of `exp` at the row's
//! `F`-weighted mean score (Jensen) bounds `l_i` from below, the chord of `exp` on `[-R, R]`
//! bounds `e^{M_ij}` from above by `cosh R + M_ij sinh(R)/R`, and the sums of that over columns
//! and diagonals are Toeplitz products. For typical data this gives `colP ≈ cosh R` instead of
//! the data-free `e^{2R} max_j Σ_i F_ij/mass_i` ([`PSums::from_factor`], used for plans from
//! shapes alone) — about 5x at `R = 1`.
//!
//! The gradient side of `σ` is dominated by `ρ'`: differentiating costs about one degree. The
//! plan therefore also tries `p = 1 + ∫_0^x q` with `q` the Chebyshev economization of degree
//! `g - 1` ([`crate::poly::integrated_chebyshev`]), whose `σ` is 3-4x smaller than that of the
//! economized `p` at equal degree. In practice (R = 1, eps = 1e-3, unit-range data) the backward
//! then needs one degree more than the forward (docs/DESIGN.md §5.6's "about 20x further").

//! # What `eps` bounds
//!
//! Each bound above is a factor (`σ`, `κ`, `σ_b`) times a magnitude of the data, and the same
//! magnitudes bound the true gradients themselves ([`magnitudes`]: `S_dq = Γ K_w >= max |dq|`,
//! and so on). Under the relative contract
//! ([`GradContract::Relative`](crate::fast::GradContract), the default) a plan's budget for `G`
//! is `eps S_G`, which asks for `σ <= eps` whatever `d_v` or the scale of `dO`; under the
//! absolute one the budget is `eps` itself (docs/DESIGN.md §8.2).
//!
//! Gradients that sum over heads (`dk`, `dv` over the query heads of a GQA group, `dw` and
//! `dbias` over the heads sharing a table) add their heads' errors: under the absolute contract
//! the dispatcher gives each head `eps / multiplicity`
//! ([`GradContract::budgets`](crate::fast::GradContract::budgets)).
//!

use crate::error::Result;
use crate::fast::bounds::row_masses;
use crate::fast::common::fft_relative_error;
use crate::fast::grad::Grad5;
use crate::poly::{certify, norm2, WNorms, U};
use crate::toeplitz::ToeplitzPlanner;
use ndarray::{s, ArrayView2};
use rayon::prelude::*;

/// The data-dependent numbers of one head (or the worst over a group) that the gradient
/// certificate needs besides [`FastBounds`](crate::fast::bounds::FastBounds). See the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct GradBounds {
    /// `max |dO|`.
    pub do_max: f64,
    /// `max_i ||dO_i||_1`.
    pub do_l1: f64,
    /// `Σ_c max_i |dO_ic|`.
    pub do_colsum: f64,
    /// `Γ = max_i Σ_c |dO_ic| range_c(v)`.
    pub gamma: f64,
    /// `>= scale max |(W_δ k_j)_l|` over visible δ.
    pub kw: f64,
    /// `>= scale max |(W_δ^T q_i)_l|` over visible δ.
    pub qw: f64,
    /// `scale max_s max|q[:,l1_s]| max|k[:,l2_s]|`.
    pub qk: f64,
    /// `max_l scale Σ_{s: l1_s = l} max|w_s| max|k[:,l2_s]|` (sizes the dq monomials).
    pub rq: f64,
    /// `max_l scale Σ_{s: l2_s = l} max|w_s| max|q[:,l1_s]|` (sizes the dk monomials).
    pub rk: f64,
    /// `max |dlse|`, the cotangent of `lse` (0 without one; only the low-rank path takes it).
    pub dlse: f64,
}

impl GradBounds {
    /// Reads the bounds of one head: `q` (`nq x d`), `k` (`nk x d`), `v` (`nk x dv`),
    /// `dout` (`nq x dv`); `norms` from the W sequences and mask of the call.
    pub fn new(
        norms: &WNorms,
        support: &[(usize, usize)],
        scale: f64,
        q: ArrayView2<f64>,
        k: ArrayView2<f64>,
        v: ArrayView2<f64>,
        dout: ArrayView2<f64>,
    ) -> Self {
        let d = q.ncols();
        let scale = scale.abs();
        // column maxima and ranges in one pass over the rows (the arrays are row-major: a pass
        // per column would read every cache line once per column)
        let col_max = |x: &ArrayView2<f64>| -> Vec<f64> {
            let mut m = vec![0.0f64; x.ncols()];
            for row in x.rows() {
                m.iter_mut().zip(row).for_each(|(a, v)| *a = a.max(v.abs()));
            }
            m
        };
        let qmax = col_max(&q);
        let kmax = col_max(&k);
        let restricted = |x: &ArrayView2<f64>, coords: &[usize]| -> f64 {
            x.rows().into_iter().fold(0.0f64, |m, row| {
                m.max(norm2(coords.iter().map(|&l| &row[l])))
            })
        };
        let (mut rq_l, mut rk_l) = (vec![0.0f64; d], vec![0.0f64; d]);
        let mut qk = 0.0f64;
        for (&(a, b), &w) in support.iter().zip(&norms.entry_max) {
            rq_l[a] += scale * w * kmax[b];
            rk_l[b] += scale * w * qmax[a];
            qk = qk.max(scale * qmax[a] * kmax[b]);
        }
        let (mut sq_l, mut sk_l) = (vec![f64::INFINITY; d], vec![f64::INFINITY; d]);
        for (rows, cols, w) in &norms.blocks {
            let kn = scale * w * restricted(&k, cols);
            let qn = scale * w * restricted(&q, rows);
            rows.iter().for_each(|&l| sq_l[l] = sq_l[l].min(kn));
            cols.iter().for_each(|&l| sk_l[l] = sk_l[l].min(qn));
        }
        let kw = (0..d).map(|l| rq_l[l].min(sq_l[l])).fold(0.0, f64::max);
        let qw = (0..d).map(|l| rk_l[l].min(sk_l[l])).fold(0.0, f64::max);
        let dv = v.ncols();
        // v and dout are the large inputs (n x dv): each is read in parallel blocks of rows,
        // v twice (its column ranges, then the distances to their midrange), dout once.
        const ROWS: usize = 2048;
        let blocks = |x: &ArrayView2<'_, f64>| -> Vec<(usize, usize)> {
            (0..x.nrows())
                .step_by(ROWS)
                .map(|r0| (r0, (r0 + ROWS).min(x.nrows())))
                .collect()
        };
        let (hi, lo) = blocks(&v)
            .into_par_iter()
            .map(|(r0, r1)| {
                let (mut hi, mut lo) = (vec![f64::NEG_INFINITY; dv], vec![f64::INFINITY; dv]);
                for row in v.slice(s![r0..r1, ..]).rows() {
                    for ((h, l), &x) in hi.iter_mut().zip(lo.iter_mut()).zip(row) {
                        *h = h.max(x);
                        *l = l.min(x);
                    }
                }
                (hi, lo)
            })
            .reduce(
                || (vec![f64::NEG_INFINITY; dv], vec![f64::INFINITY; dv]),
                |(mut h1, mut l1), (h2, l2)| {
                    h1.iter_mut().zip(h2).for_each(|(a, b)| *a = a.max(b));
                    l1.iter_mut().zip(l2).for_each(|(a, b)| *a = a.min(b));
                    (h1, l1)
                },
            );
        let range: Vec<f64> = hi
            .iter()
            .zip(&lo)
            .map(|(&h, &l)| if h >= l { h - l } else { 0.0 })
            .collect();
        // |g_ij| = |dO_i·(v_j - O_i)| with O_i in the convex hull of the v_j: at most
        // Σ_c |dO_ic| range_c (a box) and at most 2 |dO_i|_2 max_j |v_j - m|_2 (a ball about the
        // midrange m); Γ takes the smaller per row.
        let mid: Vec<f64> = hi.iter().zip(&lo).map(|(&h, &l)| 0.5 * (h + l)).collect();
        let rho_v = blocks(&v)
            .into_par_iter()
            .map(|(r0, r1)| {
                let mut centred = vec![0.0f64; dv];
                v.slice(s![r0..r1, ..])
                    .rows()
                    .into_iter()
                    .map(|row| {
                        centred
                            .iter_mut()
                            .zip(row.iter().zip(&mid))
                            .for_each(|(c, (&x, &m))| *c = x - m);
                        norm2(centred.iter())
                    })
                    .fold(0.0f64, f64::max)
            })
            .reduce(|| 0.0, f64::max);
        let (do_l1, gamma, colmax) = blocks(&dout)
            .into_par_iter()
            .map(|(r0, r1)| {
                let (mut do_l1, mut gamma) = (0.0f64, 0.0f64);
                let mut colmax = vec![0.0f64; dv];
                for row in dout.slice(s![r0..r1, ..]).rows() {
                    let (mut l1, mut g, mut l2) = (0.0, 0.0, 0.0);
                    for (c, &x) in row.iter().enumerate() {
                        let a = x.abs();
                        l1 += a;
                        l2 += a * a;
                        g += a * range[c];
                        colmax[c] = colmax[c].max(a);
                    }
                    do_l1 = do_l1.max(l1);
                    gamma = gamma.max(g.min(2.0 * l2.sqrt() * rho_v));
                }
                (do_l1, gamma, colmax)
            })
            .reduce(
                || (0.0, 0.0, vec![0.0f64; dv]),
                |(a1, g1, mut c1), (a2, g2, c2)| {
                    c1.iter_mut().zip(c2).for_each(|(a, b)| *a = a.max(b));
                    (a1.max(a2), g1.max(g2), c1)
                },
            );
        let do_max = colmax.iter().fold(0.0f64, |m, &x| m.max(x));
        let slack = 1.0 + 64.0 * U * (support.len() + dv + 4) as f64;
        GradBounds {
            do_max,
            do_l1: do_l1 * slack,
            do_colsum: colmax.iter().sum::<f64>() * slack,
            gamma: gamma * slack,
            kw: kw * slack,
            qw: qw * slack,
            qk: qk * slack,
            rq: rq_l.iter().fold(0.0, |m: f64, &x| m.max(x)) * slack,
            rk: rk_l.iter().fold(0.0, |m: f64, &x| m.max(x)) * slack,
            dlse: 0.0,
        }
    }

    /// With a cotangent for `lse` (`max|dlse| = m`): `d lse_i / d Ã_ij = 1 / l̃_i`, so `G_ij`
    /// gains `dlse_i / l̃_i` and `|g_ij| <= Γ_i + |dlse_i|` (the approximation bounds hold with
    /// `Γ + m`).
    pub fn with_dlse(&self, m: f64) -> GradBounds {
        GradBounds {
            gamma: self.gamma + m * (1.0 + 4.0 * U),
            dlse: m,
            ..*self
        }
    }

    /// The element-wise worst of two bounds (one plan for several heads).
    pub fn worst(&self, o: &GradBounds) -> GradBounds {
        GradBounds {
            do_max: self.do_max.max(o.do_max),
            do_l1: self.do_l1.max(o.do_l1),
            do_colsum: self.do_colsum.max(o.do_colsum),
            gamma: self.gamma.max(o.gamma),
            kw: self.kw.max(o.kw),
            qw: self.qw.max(o.qw),
            qk: self.qk.max(o.qk),
            rq: self.rq.max(o.rq),
            rk: self.rk.max(o.rk),
            dlse: self.dlse.max(o.dlse),
        }
    }

    /// Every bound of `self` within those of `plan`.
    pub fn within(&self, plan: &GradBounds) -> bool {
        self.do_max <= plan.do_max
            && self.do_l1 <= plan.do_l1
            && self.do_colsum <= plan.do_colsum
            && self.gamma <= plan.gamma
            && self.kw <= plan.kw
            && self.qw <= plan.qw
            && self.qk <= plan.qk
            && self.rq <= plan.rq
            && self.rk <= plan.rk
            && self.dlse <= plan.dlse
    }

    /// Bounds for a unit `dout` (every entry at most 1 in magnitude), for plans made before
    /// `dout` is known: `Γ <= Σ_c range_c <= 2 dv max|v|`.
    pub fn unit_dout(&self, dv: usize, v_max: f64) -> GradBounds {
        let dvf = dv as f64;
        GradBounds {
            do_max: 1.0,
            do_l1: dvf,
            do_colsum: dvf,
            gamma: 2.0 * dvf * v_max,
            ..*self
        }
    }
}

/// Sums of `P` along columns and diagonals, up to the factor `e^{2R}` (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct FactorStats {
    /// `>= max_j Σ_i F_ij / mass_i`.
    pub col: f64,
    /// `>= max_g F(g) Σ_{i on diagonal g} 1 / mass_i`.
    pub diag: f64,
    /// `max_g F(g)`.
    pub fmax: f64,
}

impl FactorStats {
    /// From the mask/bias factor (`nq + nk - 1` diagonals): one Toeplitz product by FFT (with its
    /// rounding bound added) and prefix sums.
    pub fn new(nq: usize, nk: usize, factor: &[f64]) -> Result<Self> {
        if nq == 0 || nk == 0 {
            return Ok(FactorStats::default());
        }
        let masses = row_masses(nq, nk, factor);
        let x: Vec<f64> = masses
            .iter()
            .map(|&m| {
                if m > 0.0 {
                    (1.0 / m) * (1.0 + 2.0 * U)
                } else {
                    0.0
                }
            })
            .collect();
        let plan = ToeplitzPlanner::new().plan(nq, nk)?;
        let col = plan.matvec_transposed(factor, &x, &mut plan.make_scratch())?;
        let eps_f = fft_relative_error(plan.fft_len());
        let (f1, f2) = (
            factor.iter().sum::<f64>(),
            factor.iter().map(|f| f * f).sum::<f64>().sqrt(),
        );
        let (x1, x2) = (
            x.iter().sum::<f64>(),
            x.iter().map(|f| f * f).sum::<f64>().sqrt(),
        );
        let slack = 1.01 * (eps_f * f2 * x1 + (2.0 * eps_f + 5.0 * U) * f1 * x2);
        let col_max = col.iter().fold(0.0f64, |m, &c| m.max(c)) * (1.0 + 4.0 * U) + slack;
        // Diagonal g holds rows max(0, nq-1-g) ..= min(nq-1, nq-1-g+nk-1).
        let mut prefix = Vec::with_capacity(nq + 1);
        prefix.push(0.0);
        let mut acc = 0.0;
        for xi in &x {
            acc += xi;
            prefix.push(acc);
        }
        let pslack = (2 * nq + 4) as f64 * U * acc;
        let mut diag = 0.0f64;
        for (g, &f) in factor.iter().enumerate() {
            if f > 0.0 {
                let lo = (nq - 1).saturating_sub(g);
                let hi = (nq - 1).min(nq + nk - 2 - g);
                if hi + 1 > lo {
                    let s = (prefix[hi + 1] - prefix[lo]).max(0.0) + pslack;
                    diag = diag.max(f * s * (1.0 + 4.0 * U));
                }
            }
        }
        let fmax = factor.iter().fold(0.0f64, |m, &f| m.max(f));
        Ok(FactorStats {
            col: col_max,
            diag,
            fmax,
        })
    }

    pub fn worst(&self, o: &FactorStats) -> FactorStats {
        FactorStats {
            col: self.col.max(o.col),
            diag: self.diag.max(o.diag),
            fmax: self.fmax.max(o.fmax),
        }
    }

    pub fn within(&self, plan: &FactorStats) -> bool {
        self.col <= plan.col && self.diag <= plan.diag && self.fmax <= plan.fmax
    }
}

/// Upper bounds on the column and diagonal sums of the true `P = A / l` over visible pairs:
/// `col >= max_j Σ_i P_ij`, `diag >= max_g Σ_{i-j: g} P_ij` (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct PSums {
    pub col: f64,
    pub diag: f64,
}

impl PSums {
    /// From the mask/bias factor alone: `P_ij <= e^{2R} F_ij / mass_i`.
    pub fn from_factor(fs: &FactorStats, r: f64) -> Self {
        let e2r = (2.0 * r).exp() * (1.0 + 8.0 * U);
        PSums {
            col: e2r * fs.col,
            diag: e2r * fs.diag,
        }
    }

    /// From one head's data, in `O(|S| N log N)`: Jensen's inequality with the tangent of `exp`
    /// at the row's `F`-weighted mean score `c_i` gives `l_i >= L_i = e^{c_i} (mass_i (1 - c_i)
    /// + Σ_j F_ij M_ij)` (valid for any `c_i`; at least `e^{-R} mass_i`), and the chord of `exp`
    /// on `[-R, R]` gives `e^{M} <= cosh R + M sinh(R)/R`; so
    /// `Σ_i P_ij <= Σ_i F_ij (cosh R + M_ij sinh(R)/R) / L_i` and the same along diagonals. The
    /// sums `Σ_j F_ij M_ij`, `Σ_i F_ij M_ij / L_i` and `Σ_{diag} M_ij / L_i` are `|S|` Toeplitz
    /// products each (FFT, with their normwise rounding bounds added). Never larger than
    /// [`PSums::from_factor`] (the smaller of the two is kept).
    #[allow(clippy::too_many_arguments)]
    pub fn from_data(
        q: ArrayView2<f64>,
        k: ArrayView2<f64>,
        scale: f64,
        support: &[(usize, usize)],
        seqs: ArrayView2<f64>,
        factor: &[f64],
        r: f64,
        fs: &FactorStats,
        want_diag: bool,
    ) -> Result<Self> {
        let fallback = PSums::from_factor(fs, r);
        let (nq, nk) = (q.nrows(), k.nrows());
        if nq == 0 || nk == 0 || !r.is_finite() {
            return Ok(fallback);
        }
        let glen = nq + nk - 1;
        let tp = ToeplitzPlanner::new().plan(nq, nk)?;
        let eps_f = fft_relative_error(tp.fft_len());
        let mut ws = tp.make_scratch();
        let n1 = |x: &[f64]| x.iter().map(|v| v.abs()).sum::<f64>();
        let n2 = |x: &[f64]| x.iter().map(|v| v * v).sum::<f64>().sqrt();
        // Normwise error of one FFT Toeplitz product (toeplitz::certify's model, one pair).
        let prod_err = |c: &[f64], y: &[f64]| {
            1.01 * (eps_f * n2(c) * n1(y) + (2.0 * eps_f + 5.0 * U) * n1(c) * n2(y))
        };
        let sc = scale.abs();
        let ns = support.len();
        let d = q.ncols();
        let kcol: Vec<Vec<f64>> = (0..d).map(|l| k.column(l).to_vec()).collect();
        let qcol: Vec<Vec<f64>> = (0..d).map(|l| q.column(l).to_vec()).collect();
        let fw: Vec<Vec<f64>> = (0..ns)
            .map(|s| factor.iter().zip(seqs.row(s)).map(|(f, w)| f * w).collect())
            .collect();
        let units = (ns + 6) as f64 * U;
        // S_i = Σ_j F_ij M_ij and its error bound.
        let (mut sv, mut se, mut sa) = (vec![0.0; nq], vec![0.0; nq], vec![0.0; nq]);
        for (s, &(l1, l2)) in support.iter().enumerate() {
            let z = tp.matvec(&fw[s], &kcol[l2], &mut ws)?;
            let e = prod_err(&fw[s], &kcol[l2]);
            for i in 0..nq {
                let qi = qcol[l1][i];
                sv[i] += scale * qi * z[i];
                se[i] += sc * qi.abs() * e;
                sa[i] += sc * (qi * z[i]).abs();
            }
        }
        // Row masses: lower bounds (row_masses) and upper bounds (prefix sums plus slack).
        let lo = row_masses(nq, nk, factor);
        let mut prefix = Vec::with_capacity(glen + 1);
        prefix.push(0.0);
        let mut acc = 0.0;
        for f in factor {
            acc += f;
            prefix.push(acc);
        }
        let slack = (2 * glen + 2) as f64 * U * acc;
        let (cr, sr) = (
            r.cosh() * (1.0 + 4.0 * U),
            if r > 0.0 {
                r.sinh() / r * (1.0 + 4.0 * U)
            } else {
                1.0
            },
        );
        let x: Vec<f64> = (0..nq)
            .map(|i| {
                if lo[i] <= 0.0 {
                    return 0.0;
                }
                let g0 = nq - 1 - i;
                let hi = prefix[g0 + nk] - prefix[g0] + slack;
                let base = (-r).exp() * lo[i] * (1.0 - 8.0 * U);
                let c = (sv[i] / hi).clamp(-r, r);
                let m = if c <= 1.0 { lo[i] } else { hi };
                let inner = m * (1.0 - c) + sv[i] - se[i] - units * (sa[i] + (m * (1.0 - c)).abs());
                let jensen = c.exp() * inner * (1.0 - 8.0 * U);
                (1.0 / base.max(jensen)) * (1.0 + 4.0 * U)
            })
            .collect();
        // Column sums.
        let t0 = tp.matvec_transposed(factor, &x, &mut ws)?;
        let e0 = prod_err(factor, &x);
        let (mut t1, mut e1) = (vec![0.0; nk], 0.0);
        for (s, &(l1, l2)) in support.iter().enumerate() {
            let qx: Vec<f64> = qcol[l1].iter().zip(&x).map(|(a, b)| a * b).collect();
            let z = tp.matvec_transposed(&fw[s], &qx, &mut ws)?;
            let kmax = kcol[l2].iter().fold(0.0f64, |m, v| m.max(v.abs()));
            e1 += sc * kmax * prod_err(&fw[s], &qx);
            for j in 0..nk {
                t1[j] += scale * kcol[l2][j] * z[j];
            }
            // The summation's rounding, relative to the magnitudes.
            e1 += units * sc * kmax * z.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        }
        let col = (0..nk)
            .map(|j| cr * (t0[j] + e0) + sr * (t1[j] + e1))
            .fold(0.0f64, f64::max)
            * (1.0 + 8.0 * U);
        let mut out = PSums {
            col: col.min(fallback.col),
            diag: fallback.diag,
        };
        if want_diag {
            // Σ_{i on g} x_i by prefix sums; Σ_{diag g} M_ij x_i = scale Σ_s w_s(g) diagsum(q x, k).
            let mut px = Vec::with_capacity(nq + 1);
            px.push(0.0);
            let mut a = 0.0;
            for xi in &x {
                a += xi;
                px.push(a);
            }
            let pslack = (2 * nq + 4) as f64 * U * a;
            let mut dm = vec![0.0; glen];
            let mut de = vec![0.0; glen];
            for (s, &(l1, l2)) in support.iter().enumerate() {
                let qx: Vec<f64> = qcol[l1].iter().zip(&x).map(|(a, b)| a * b).collect();
                let z = tp.diagonal_sums(&qx, &kcol[l2], &mut ws)?;
                let (a1, a2, b1, b2) = (n1(&qx), n2(&qx), n1(&kcol[l2]), n2(&kcol[l2]));
                let e = 1.01 * ((3.0 * eps_f + 5.0 * U) * a2 * b2 + eps_f * (a1 * b2).min(a2 * b1));
                let zmax = z.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                for g in 0..glen {
                    let w = seqs[[s, g]];
                    dm[g] += scale * w * z[g];
                    de[g] += sc * w.abs() * (e + units * zmax);
                }
            }
            let mut diag = 0.0f64;
            for (g, &f) in factor.iter().enumerate() {
                if f > 0.0 {
                    let ilo = (nq - 1).saturating_sub(g);
                    let ihi = (nq - 1).min(nq + nk - 2 - g);
                    if ihi + 1 > ilo {
                        let xs = (px[ihi + 1] - px[ilo]).max(0.0) + pslack;
                        diag = diag.max(f * (cr * xs + sr * (dm[g] + de[g])));
                    }
                }
            }
            out.diag = (diag * (1.0 + 8.0 * U)).min(fallback.diag);
        }
        Ok(out)
    }

    pub fn worst(&self, o: &PSums) -> PSums {
        PSums {
            col: self.col.max(o.col),
            diag: self.diag.max(o.diag),
        }
    }

    pub fn within(&self, plan: &PSums) -> bool {
        self.col <= plan.col && self.diag <= plan.diag
    }
}

/// `ρ'`: relative error of `p'` against `e^x` on `[-r, r]` (`1` or more for degree 0).
pub fn derivative_rho(coeffs: &[f64], r: f64) -> f64 {
    let d = derivative_coeffs(coeffs);
    certify(&d, r)
}

/// `Σ_t |c_t| x^t` for `x >= 0`.
pub fn abs_eval(coeffs: &[f64], x: f64) -> f64 {
    coeffs
        .iter()
        .rev()
        .fold(0.0, |acc, &c| acc * x.abs() + c.abs())
}

/// Coefficients of `p'` (`[0]` for a constant).
pub fn derivative_coeffs(coeffs: &[f64]) -> Vec<f64> {
    if coeffs.len() <= 1 {
        return vec![0.0];
    }
    (1..coeffs.len()).map(|t| t as f64 * coeffs[t]).collect()
}

/// `Σ_t t |c_t| x^{t-1}` for `x >= 0`.
pub fn abs_derivative_eval(coeffs: &[f64], x: f64) -> f64 {
    let d = derivative_coeffs(coeffs);
    d.iter().rev().fold(0.0, |acc, &c| acc * x.abs() + c.abs())
}

/// Bounds on the magnitude of each true gradient, `S_G >= max |G|`, from the bounds of the data:
/// `|dS_ij| <= P_ij Γ_i` and the row, column and diagonal sums of `P` give
///
/// ```text
/// S_dq = Γ K_w,  S_dk = Γ Q_w colP,  S_dv = max|dO| colP,  S_dw = Γ QK diagP,  S_db = Γ diagP.
/// ```
///
/// They are the scales of the relative contract ([`GradContract::Relative`](crate::fast::GradContract::Relative)): the approximation
/// errors below are these times `σ`, `σ`, `κ`, `σ`, `σ_b`, so a relative budget asks for
/// `σ <= eps` whatever `d_v`, `dout`'s scale or the sums of `P` are.
pub fn magnitudes(gb: &GradBounds, ps: &PSums) -> Grad5 {
    let (cp, dp) = (ps.col, ps.diag);
    Grad5 {
        dq: gb.gamma * gb.kw,
        dk: gb.gamma * gb.qw * cp,
        dv: gb.do_max * cp,
        dw: gb.gamma * gb.qk * dp,
        db: gb.gamma * dp,
    }
}

/// The approximation errors (distance of the exact gradient of the approximate forward to the
/// true gradient), and bounds on each approximate gradient's magnitude (for float32 output
/// rounding).
pub fn approximation_errors(rho: f64, rho_d: f64, gb: &GradBounds, ps: &PSums) -> (Grad5, Grad5) {
    if !(rho < 1.0 && rho_d.is_finite()) || rho.is_nan() {
        return (Grad5::splat(f64::INFINITY), Grad5::splat(f64::INFINITY));
    }
    let kappa = 2.0 * rho / (1.0 - rho);
    let kappa_d = (rho + rho_d) / (1.0 - rho);
    let sigma = kappa_d + (1.0 + kappa_d) * kappa / 2.0;
    let sigma_b = kappa + (1.0 + kappa) * kappa / 2.0;
    let s = magnitudes(gb, ps);
    let approx = Grad5 {
        dq: sigma * s.dq,
        dk: sigma * s.dk,
        dv: kappa * s.dv,
        dw: sigma * s.dw,
        db: sigma_b * s.db,
    };
    let mu = (1.0 + kappa_d) * (1.0 + kappa / 2.0);
    let mag = Grad5 {
        dq: mu * s.dq,
        dk: mu * s.dk,
        dv: (1.0 + kappa) * s.dv,
        dw: mu * s.dw,
        db: (1.0 + kappa) * (1.0 + kappa / 2.0) * s.db,
    };
    (approx.zip(approx, |a, _| a * 1.001), mag)
}
