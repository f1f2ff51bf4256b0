//! The rounding part of the Toeplitz route's backward certificate (the approximation part, shared
//! with the low-rank route, is [`crate::fast::grad_bounds`]).
//!
//! # Rounding
//!
//! Every product runs through FFTs in f64. Per unit input column, [`super::certify`]'s normwise
//! model gives a global bound `E` on each numerator/denominator entry of the forward pass
//! (`Σ_j Ã_ij x_j`), `E_Y` on each entry of the dq products `Σ_j ∂Ã_ij/∂q_i[l] x_j` (the same
//! estimate with `q^α` replaced by `α_l q^{α-e_l}`), `E_TV` and `E_TK` on the transposed products
//! `Σ_i Ã_ij x_i` and `Σ_i ∂Ã_ij/∂k_j[l] x_i` (kernel and query monomials swap roles), and, per
//! `(α, β)` pair, `errH_p` on the diagonal correlations `H_p(g) = Σ_c Σ_{diag g} (q^α a_c)_i
//! (k^β b_c)_j` that `dW` and `db` contract with kernels. With `L = (1-ρ) e^{-R} min mass` the
//! smallest denominator, `e_O = 2EV/(L-E)` the rounding of `Õ`, and the inputs of the transposed
//! pass `a_c = dO_c / l̂`, `a_dv = -D̂ / l̂` perturbed by at most `θ ||dO_i||_1 / l̃_i` with
//! `θ = 2VE/(L-E) + (e_O + dv u V) L/(L-E)`, first-order propagation gives (all `× 1.01`)
//!
//! ```text
//! dq:  ||dO||_1 (2 V E_Y + c_q e_O L)/(L-E) + c_q Γ (1+κ/2) E/(L-E) + (dv+8) u c_q ||dO||_1 (2V+e_O) L/(L-E)
//! dv:  max|dO| (1+κ) colP E/(L-E) + E_TV max|dO| /(L-E)
//! dk:  c_k θ ||dO||_1 colP + E_TK AB + (dv+4) u c_k colP L AB
//! dw:  θ ||dO||_1 (1+ρ')/(1-ρ) QK diagP + scale Σ_{p'} ||C'_{p'}||_∞ errH_{p'+s} + arith
//! db:  θ ||dO||_1 (1+ρ)/(1-ρ) diagP + Σ_p ||C_p||_∞ errH_p + arith
//! ```
//!
//! with `c_q = (1+ρ')/(1-ρ) K_w`, `c_k = (1+ρ')/(1-ρ) Q_w`,
//! `AB = (V Σ_c max|dO_c| + ||dO||_1 (V + e_O))/(L-E) >= Σ_c max|b_c| max|a_c|`,
//! `errH_p = AB [(2ε_f + (4 + 2 n_cols) u) ||q^α||_2 ||k^β||_2 + ε_f min(||q^α||_1 ||k^β||_2,
//! ||q^α||_2 ||k^β||_1)]` and `arith = (n_pairs + 2g + 8 + terms/pair) u AB min(nq, nk) Pabs'`
//! the rounding of the kernel contractions (`Pabs' = scale QK Σ t|c_t| R_abs^{t-1}` for dw,
//! `Σ |c_t| R_abs^t` for db). The head's certificate uses the measured norms of its monomials
//! and kernels ([`data_terms`]); the plan's a-priori one replaces them by
//! `Σ_t |c_t| R_abs^t`-type bounds ([`apriori_terms`]). float32 results add `2^-24` times a
//! bound on each gradient's magnitude.

use crate::fast::bounds::FastBounds;
use crate::fast::common::{fft_relative_error, ExpansionCounts};
use crate::fast::grad::{Grad5, Want};
use crate::fast::grad_bounds::{abs_derivative_eval, abs_eval, FactorStats, GradBounds, PSums};
use crate::fast::toeplitz::certify::{BetaNorms, PairNorms};
use crate::fast::toeplitz::expansion::Expansion;
use crate::poly::U;

/// The per-unit-column FFT rounding terms of one head (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct RoundingTerms {
    pub e: f64,
    pub e_y: f64,
    pub e_tv: f64,
    pub e_tk: f64,
    /// `max_s scale Σ_{p'} ||C'_{p'}||_∞ errH_{p'+s}` divided by `AB`.
    pub w_fft: f64,
    /// `Σ_p ||C_p||_∞ errH_p` divided by `AB`.
    pub b_fft: f64,
    /// `min(nq, nk) Pabs'` for the dw contraction, and `min(nq, nk) Pabs` for db.
    pub w_arith: f64,
    pub b_arith: f64,
    /// Number of `u`s in the contraction rounding of dw and db.
    pub w_units: f64,
    pub b_units: f64,
}

/// The rounding share of each gradient's certificate from the per-unit-column terms.
#[allow(clippy::too_many_arguments)]
pub fn rounding_errors(
    t: &RoundingTerms,
    rho: f64,
    rho_d: f64,
    r: f64,
    fb: &FastBounds,
    gb: &GradBounds,
    ps: &PSums,
    dv: usize,
) -> Grad5 {
    if fb.min_row_mass == f64::INFINITY {
        return Grad5::default(); // no visible row: every gradient is exactly 0
    }
    let l = (1.0 - rho) * (-r).exp() * fb.min_row_mass;
    let e = t.e;
    if rho.is_nan() || rho >= 1.0 || e.is_nan() || e >= 0.5 * l {
        return Grad5::splat(f64::INFINITY);
    }
    let v = fb.v_max;
    let le = l - e;
    let e_o = 2.0 * e * v / le;
    let kappa = 2.0 * rho / (1.0 - rho);
    let (cp, dp) = (ps.col, ps.diag);
    let dvf = dv as f64;
    let cq = (1.0 + rho_d) / (1.0 - rho) * gb.kw;
    let ck = (1.0 + rho_d) / (1.0 - rho) * gb.qw;
    let theta = 2.0 * v * e / le + (e_o + dvf * U * v) * l / le;
    let ab = (v * gb.do_colsum + gb.do_l1 * (v + e_o)) / le;
    let dq = gb.do_l1 * (2.0 * v * t.e_y + cq * e_o * l) / le
        + cq * gb.gamma * (1.0 + kappa / 2.0) * e / le
        + (dvf + 8.0) * U * cq * gb.do_l1 * (2.0 * v + e_o) * l / le;
    let dvv = gb.do_max * (1.0 + kappa) * cp * e / le + t.e_tv * gb.do_max / le;
    let dk = ck * theta * gb.do_l1 * cp + t.e_tk * ab + (dvf + 4.0) * U * ck * cp * l * ab;
    let dw = theta * gb.do_l1 * (1.0 + rho_d) / (1.0 - rho) * gb.qk * dp
        + ab * t.w_fft
        + t.w_units * U * ab * t.w_arith;
    let db = theta * gb.do_l1 * (1.0 + rho) / (1.0 - rho) * dp
        + ab * t.b_fft
        + t.b_units * U * ab * t.b_arith;
    let out = Grad5 {
        dq,
        dk,
        dv: dvv,
        dw,
        db,
    };
    out.zip(
        out,
        |a, _| if a.is_nan() { f64::INFINITY } else { 1.01 * a },
    )
}

/// Norms of the monomials of one head, for [`data_terms`].
pub struct MonomialNorms<'a> {
    /// Per `α`: `max |q^α|`.
    pub q_max: &'a [f64],
    /// Per `α`: `||q^α||_1, ||q^α||_2, max|q^α|`.
    pub q_norms: &'a [BetaNorms],
    /// Per `β`: `||k^β||_1, ||k^β||_2, max|k^β|`.
    pub k_norms: &'a [BetaNorms],
    /// Per `l`, per `α`: `α_l max|q^{α-e_l}|` (0 when `α_l = 0`).
    pub dq_max: &'a [Vec<f64>],
    /// Per `l`, per `β`: `β_l max|k^{β-e_l}|`.
    pub dk_max: &'a [Vec<f64>],
}

/// The generic per-unit-column estimate of [`super::certify::data_rounding`], for products whose
/// outputs are indexed by `out` (multiplied by `out_max[out]`) and inputs by `inp`
/// (`in_norms[inp]`), with `groups[out]` the pairs contributing to output `out`.
#[allow(clippy::too_many_arguments)]
fn product_rounding(
    e: &Expansion,
    pair_norms: &[PairNorms],
    groups: &[Vec<usize>],
    pair_in: impl Fn(usize) -> usize,
    out_max: &[f64],
    in_norms: &[BetaNorms],
    n_out: usize,
    fft_len: usize,
) -> f64 {
    let eps_f = fft_relative_error(fft_len);
    let g = e.degree as f64;
    let mut total = 0.0;
    for (o, pairs) in groups.iter().enumerate() {
        if out_max[o] == 0.0 {
            continue;
        }
        let nb = pairs.len() as f64;
        let mut sum = 0.0;
        for &p in pairs {
            let [c1, c2, cabs] = pair_norms[p];
            let [k1, k2, kinf] = in_norms[pair_in(p)];
            let tp = e.terms_of_pair(p) as f64;
            sum += eps_f * c2 * k1
                + (2.0 * eps_f + (3.0 + 2.0 * nb) * U) * c1 * k2
                + ((g + 3.0 + tp) * U * cabs + (2.0 * g + 3.0 + n_out as f64) * U * c1) * kinf;
        }
        total += out_max[o] * sum;
    }
    1.01 * total
}

/// Everything of the expansion the data certificate needs, built with the kernel.
pub struct KernelNorms<'a> {
    pub e: &'a Expansion,
    /// Per pair: `||C||_1, ||C||_2`, term mass.
    pub pair_norms: &'a [PairNorms],
    /// Per pair: `||C||_∞`.
    pub pair_inf: &'a [f64],
    /// Pairs grouped by `α` and by `β`.
    pub by_alpha: &'a [Vec<usize>],
    pub by_beta: &'a [Vec<usize>],
    /// Derivative expansion (dw): per pair `p'`, `||C'_{p'}||_∞`, and `links[p' |S| + s]` the pair
    /// `(α'+e_{l1_s}, β'+e_{l2_s})` of the expansion.
    pub d_inf: &'a [f64],
    pub links: &'a [usize],
    pub d_pairs: usize,
    pub d_max_terms: usize,
    pub ns: usize,
    pub fft_len: usize,
    pub nq: usize,
    pub nk: usize,
    pub scale: f64,
    /// Number of `(head, column)` spectra accumulated into each correlation.
    pub h_terms: usize,
}

/// The rounding terms of one head from its measured norms.
pub fn data_terms(
    kn: &KernelNorms,
    m: &MonomialNorms,
    coeffs: &[f64],
    r_abs: f64,
    gb: &GradBounds,
    want: Want,
) -> RoundingTerms {
    let e = kn.e;
    let (na, nb) = (e.alphas.len(), e.betas.len());
    let n = kn.fft_len;
    let beta_of = |p: usize| e.pairs[p].beta;
    let alpha_of = |p: usize| e.pairs[p].alpha;
    let kmax: Vec<f64> = m.k_norms.iter().map(|x| x[2]).collect();
    let rt = |out_max: &[f64], transposed: bool| {
        if transposed {
            product_rounding(
                e,
                kn.pair_norms,
                kn.by_beta,
                alpha_of,
                out_max,
                m.q_norms,
                nb,
                n,
            )
        } else {
            product_rounding(
                e,
                kn.pair_norms,
                kn.by_alpha,
                beta_of,
                out_max,
                m.k_norms,
                na,
                n,
            )
        }
    };
    let e0 = rt(m.q_max, false);
    let e_y = m.dq_max.iter().map(|x| rt(x, false)).fold(0.0, f64::max);
    let e_tv = rt(&kmax, true);
    let e_tk = m.dk_max.iter().map(|x| rt(x, true)).fold(0.0, f64::max);
    let eps_f = fft_relative_error(n);
    let mut t = RoundingTerms {
        e: e0,
        e_y,
        e_tv,
        e_tk,
        ..Default::default()
    };
    if want.dw || want.db {
        let cu = (2.0 * eps_f + (4.0 + 2.0 * kn.h_terms as f64) * U) * 1.01;
        let err_h: Vec<f64> = e
            .pairs
            .iter()
            .map(|p| {
                let ([q1, q2, _], [k1, k2, _]) = (m.q_norms[p.alpha], m.k_norms[p.beta]);
                cu * q2 * k2 + eps_f * (q1 * k2).min(q2 * k1)
            })
            .collect();
        let mn = kn.nq.min(kn.nk) as f64;
        let g = e.degree as f64;
        if want.db {
            t.b_fft = kn
                .pair_inf
                .iter()
                .zip(&err_h)
                .map(|(c, h)| c * h)
                .sum::<f64>();
            t.b_arith = mn * abs_eval(coeffs, r_abs);
            let mt = e.counts().max_terms_per_pair as f64;
            t.b_units = e.pairs.len() as f64 + 2.0 * g + 8.0 + mt;
        }
        if want.dw && kn.d_pairs > 0 {
            let mut w = 0.0f64;
            for s in 0..kn.ns {
                let sum: f64 = (0..kn.d_pairs)
                    .map(|pd| kn.d_inf[pd] * err_h[kn.links[pd * kn.ns + s]])
                    .sum();
                w = w.max(sum);
            }
            t.w_fft = kn.scale.abs() * w;
            t.w_arith = mn * gb.qk * abs_derivative_eval(coeffs, r_abs);
            t.w_units = kn.d_pairs as f64 + 2.0 * g + 8.0 + kn.d_max_terms as f64;
        }
    }
    t
}

/// The a-priori rounding terms from bounds only (the plan's certificate): every monomial and
/// kernel norm replaced by `Σ_t |c_t| R_abs^t`-type bounds of the expanded terms.
#[allow(clippy::too_many_arguments)]
pub fn apriori_terms(
    coeffs: &[f64],
    fb: &FastBounds,
    gb: &GradBounds,
    fs: &FactorStats,
    counts: &ExpansionCounts,
    d_counts: Option<&ExpansionCounts>,
    nq: usize,
    nk: usize,
    fft_len: usize,
    cols: usize,
    want: Want,
) -> RoundingTerms {
    let eps_f = fft_relative_error(fft_len);
    let g = coeffs.len().saturating_sub(1);
    let p_abs = abs_eval(coeffs, fb.r_abs);
    let pd_abs = abs_derivative_eval(coeffs, fb.r_abs);
    let (f1, f2) = (fb.factor_sum, fb.factor_norm2);
    let (nqf, nkf) = (nq as f64, nk as f64);
    // Spectra summed before one inverse FFT: at most max(n_α, n_β) in either direction.
    let n_acc = counts.n_alpha.max(counts.n_beta) as f64;
    let base = |p: f64, n_in: f64, n_out: usize| {
        1.01 * p
            * (eps_f * f2 * n_in
                + (2.0 * eps_f + (3.0 + 2.0 * n_acc) * U) * f1 * n_in.sqrt()
                + (3 * g + 4 + n_out + counts.max_terms_per_pair) as f64 * U * f1)
    };
    let mut t = RoundingTerms {
        e: base(p_abs, nkf, counts.n_alpha),
        e_y: base(pd_abs * gb.rq, nkf, counts.n_alpha),
        e_tv: base(p_abs, nqf, counts.n_beta),
        e_tk: base(pd_abs * gb.rk, nqf, counts.n_beta),
        ..Default::default()
    };
    let cu = (2.0 * eps_f + (4.0 + 2.0 * cols as f64) * U) * 1.01;
    let h = cu * (nqf * nkf).sqrt() + eps_f * (nqf * nkf.sqrt()).min(nqf.sqrt() * nkf);
    let mn = nqf.min(nkf);
    if want.db {
        t.b_fft = p_abs * fs.fmax.max(1.0) * h;
        t.b_arith = mn * p_abs;
        t.b_units = counts.n_pairs as f64 + 2.0 * g as f64 + 8.0 + counts.max_terms_per_pair as f64;
    }
    if want.dw {
        if let Some(dc) = d_counts {
            t.w_fft = gb.qk * pd_abs * fs.fmax.max(1.0) * h;
            t.w_arith = mn * gb.qk * pd_abs;
            t.w_units = dc.n_pairs as f64 + 2.0 * g as f64 + 8.0 + dc.max_terms_per_pair as f64;
        }
    }
    t
}
