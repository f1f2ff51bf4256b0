//! The fast backward for RoPE without Toeplitz products: the low-rank feature map of
//! [`super::lowrank`], differentiated.
//!
//! With `x_i = scale f² R(p_i θ) q_i`, `y_j = R(p'_j θ) k_j` and `M_ij = x_i · y_j`, the
//! approximate forward is `Ã_ij = p(M_ij) = Φq(x_i) · Φk(y_j)` over the visible pairs,
//! `l̃ = Ã 1`, `Õ = Ã V / l̃`. As in [`super::backward`], the gradient of `Σ dO ∘ Õ` with respect
//! to `Ã_ij` is `G_ij = a_i · b_j` with `a = [dO / l̃, -D / l̃]`, `D_i = dO_i · Õ_i`, `b = [V, 1]`.
//! Since `∇_x p(x · y) = J_Φq(x)^T Φk(y)` and `∇_y p(x · y) = J_Φk(y)^T Φq(x)`:
//!
//! ```text
//! dx_i = J_Φq(x_i)^T S_i a_i,      S_i = Σ_{j visible to i} Φk(y_j) b_j^T      (r x (dv+1))
//! dy_j = J_Φk(y_j)^T T_j b_j,      T_j = Σ_{i that see j} Φq(x_i) a_i^T
//! dV_j = T_j[:, :dv]^T Φk(y_j),    dq_i = scale f² R(p_i θ)^T dx_i,   dk_j = R(p'_j θ)^T dy_j.
//! ```
//!
//! `S` is the forward's own running state (so pass 1 is the forward plus `z = S a_i` and one
//! reverse sweep through the monomial products per row); `T` is a suffix sum over query rows
//! (pass 2, key blocks in reverse). With a causal mask, the pairs a block sees only in part go
//! through `p(M)` and `p'(M)` themselves on diagonal blocks ([`block_rows`]: 32 to 256 rows), as in the forward. Time
//! `O((nq + nk) r (dv + 1))` (about three forwards), memory `O(block r + r dv)` besides the
//! inputs, `a` and the outputs. It is the exact gradient of the approximate forward
//! [`super::lowrank::lowrank_head`] computes (up to rounding).
//!
//! # Certificate
//!
//! **Approximation** (distance to the true gradient): that of [`super::backward_certify`],
//! unchanged — it only depends on `p` being within `ρ` of `exp` and `p'` within `ρ'` on
//! `[-R, R]`, not on how `Ã` is evaluated.
//!
//! **Rounding** (f64). Let `R₂ >= Kx Ky`, `Kx >= max|x_i|`, `Ky >= max|k_j|` (2-norms), `η =
//! 2u (ψ_max + 8)` the relative error of each computed rotated vector (angles up to `ψ_max`), `R₂'
//! = R₂ (1+η)²`, and `P_k = Σ_t |c_t| t!/(t-k)! R₂'^{t-k}` (`k = 0, 1, 2`). Per visible pair the
//! computed `x̂ · ŷ` (explicit on diagonal blocks, implicit in the features) is within
//! `δM = R₂ (γ_{d+2} + (1+η)² - 1)` of `M`. Every quantity is a sum of at most
//! `N = nq + nk + r + 2g + 2 block + d + dv + 32` rounded products whose absolute values add up
//! to at most the "absolute" version of the quantity (`|Φq| · |Φk| <= P_0` per pair, `|∂_l Φq| ·
//! |Φk| <= P_1 Ky`, `|Φq| · |∂_l Φk| <= P_1 Kx`), so its rounding is at most `γ_N` times that. With
//! `λ_i` the number of keys row `i` sees, `l̃_i >= λ_i L`, `L = (1-ρ) e^{-R}`, the forward's entry
//! error `E = γ_N P_0 + P_1 δM` (per key), `e_l = E/(L-E) + 2u` (relative error of `1/l̂`),
//! `e_O = 2EV/(L-E) + 2uV` (of `Ô`), `V = max|v|`, `D_1 >= max ||dO_i||_1`, `D_∞ >= max|dO|`:
//!
//! * `l̃_i Σ_c |â_ic| |b_jc| <= AB = D_1 (2V + e_O)(1 + γ_dv)(1 + e_l)`, and the computed `â`
//!   differs from `a` by `l̃_i Σ_c |â_ic - a_ic| |b_jc| <= Δa = 1.01 (2 D_1 V e_l + D_1 e_O +
//!   γ_dv D_1 (V + e_O))`;
//! * `|dx̂_il - dx_il| <= [γ_N AB P_1 + Δa P_1 + 2 D_1 V (P_2 δM + P_1 η)] Ky (1+η) / L`
//!   (summing over the `λ_i` visible keys, `λ_i / l̃_i <= 1/L`), `|dx_il| <= AB P_1 Ky / L`;
//! * the same for `dy_jl` with `Kx` and `H = Σ_i 1/λ_i >= max_j Σ_{i sees j} 1/λ_i` in place of
//!   `1` (the rows that see key `j`: all of them, or a suffix with a causal mask);
//! * `|dV̂_jc - dV_jc| <= 1.01 D_∞ [(γ_N (1 + e_l) + e_l) P_0 + P_1 δM] H / L`;
//! * rotating back (a pair's 2-norm is at most `√2` times its largest entry):
//!   `|dq̂ - dq| <= |scale| f² √2 ((1+η) err_dx + η |dx|)`, `|dk̂ - dk| <= √2 ((1+η) err_dy + η |dy|)`.
//!
//! With a cotangent for `lse` (`|dlse_i| <= L_m`), `d lse_i / d Ã_ij = 1/l̃_i` puts `dlse_i` into
//! the last entry of `a_i` (`(dlse_i - D_i)/l̃_i`): the approximation bounds hold with `Γ + L_m`
//! ([`GradBounds::with_dlse`]), `AB` gains `L_m (1 + e_l)`, `Δa` gains `1.01 L_m e_l`, and the
//! `2 D_1 V` in front of the score perturbations becomes `2 D_1 V + L_m`.
//!
//! All first order in quantities held below `1/4` (`E <= L/4`, `η <= 10^-3`), hence the `1.01`
//! factors; otherwise the bound is `inf`. `H <= nq/nk` without a mask, `1 + ln(nq)` or so with
//! one (computed in closed form by [`inverse_mass_sum`]).

use super::backward::{
    integrated_chebyshev, BackwardPlan, BackwardRequest, GradCertificate, HeadGrads,
};
use super::backward_certify::{
    approximation_errors, derivative_coeffs, derivative_rho, Grad5, GradBounds, PSums,
};
use super::certify::FastShape;
use super::expansion::ExpansionCounts;
use super::lowrank::{feature_count, gamma, with_ones, Features, LowRank, BLOCK};
use super::FastLimits;
use crate::error::{Error, Result};
use crate::poly::{chebyshev, taylor, Polynomial, MAX_DEGREE, U};
use crate::problem::Control;
use ndarray::{s, Array1, Array2, ArrayView1, ArrayView2, ArrayViewMut1, ArrayViewMut2, Axis};

/// One chunk of pass 1's outputs: `(chunk, a, out, lse, dx)` rows.
type Pass1Rows<'a> = (
    usize,
    ArrayViewMut2<'a, f64>,
    ArrayViewMut2<'a, f64>,
    ArrayViewMut1<'a, f64>,
    ArrayViewMut2<'a, f64>,
);
use rayon::prelude::*;

/// What a low-rank backward plan needs beyond [`BackwardPlan`]: the bounds of its rounding
/// certificate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LowRankGrad {
    /// The forward's parameters (`r2 >= kx ky`, `psi_max`, causal shift).
    pub lr: LowRank,
    /// `>= max_i |x_i|` (2-norms of the rotated, scaled queries: `|scale| f² max|q_i|`).
    pub kx: f64,
    /// `>= max_j |k_j|`.
    pub ky: f64,
    /// `|scale| f²` (the chain rule from `x` back to `q`).
    pub mul: f64,
}

/// `H >= max_j Σ_{i that see j} 1/λ_i` (`λ_i` the keys row `i` sees): `nq/nk` without a mask;
/// with a causal shift `c` the rows that see key 0 see every key a later row sees, so `H = Σ_i
/// 1/λ_i` over the rows that see anything, with `Σ_{λ=lo}^{hi} 1/λ <= ln((hi + 1/2)/(lo - 1/2))`.
pub fn inverse_mass_sum(nq: usize, nk: usize, causal_shift: Option<i64>) -> f64 {
    if nq == 0 || nk == 0 {
        return 0.0;
    }
    let h = match causal_shift {
        None => nq as f64 / nk as f64,
        Some(c) => {
            let (nq, nk, c) = (nq as i128, nk as i128, c as i128);
            let a = (-c).clamp(0, nq); // first row that sees a key
            let s = (nk - c - 1).clamp(a, nq); // first row that sees every key
            let mut h = (nq - s) as f64 / nk as f64;
            if s > a {
                let (lo, hi) = ((a + c + 1) as f64, (s + c) as f64);
                h += ((hi + 0.5) / (lo - 0.5)).ln();
            }
            h
        }
    };
    h * (1.0 + 1e-12) + 4.0 * U
}

/// [`PSums::from_data`] for the low-rank case (no bias; every visible pair has factor 1), in
/// `O((nq + nk) d)` instead of `O(|S| N log N)`: with `x`, `y` the rotated queries and keys
/// (`M_ij = x_i · y_j` up to `dm_rot` from the rounding of the rotation), the row sums
/// `Σ_{j visible} M_ij = x_i · Σ_{j < λ_i} y_j` are prefix sums and the column sums
/// `Σ_{i sees j} M_ij / L_i = y_j · Σ_{i sees j} x_i / L_i` suffix sums. Same bounds as
/// [`PSums::from_data`] (Jensen below, the chord of `exp` above), never larger than `fallback`.
pub fn lowrank_psums(
    x: ArrayView2<f64>,
    y: ArrayView2<f64>,
    r: f64,
    causal_shift: Option<i64>,
    dm_rot: f64,
    fallback: PSums,
) -> PSums {
    let (nq, nk, d) = (x.nrows(), y.nrows(), x.ncols());
    if nq == 0 || nk == 0 || !r.is_finite() {
        return fallback;
    }
    let visible = |i: usize| -> usize {
        match causal_shift {
            None => nk,
            Some(c) => (i as i64 + c + 1).clamp(0, nk as i64) as usize,
        }
    };
    let gs = gamma((nq.max(nk) + d + 8) as f64);
    // prefix sums of y and |y| (row m: keys 0..m)
    let mut ypre = Array2::<f64>::zeros((nk + 1, d));
    let mut yabs = Array2::<f64>::zeros((nk + 1, d));
    for j in 0..nk {
        for l in 0..d {
            ypre[[j + 1, l]] = ypre[[j, l]] + y[[j, l]];
            yabs[[j + 1, l]] = yabs[[j, l]] + y[[j, l]].abs();
        }
    }
    let (cr, sr) = (
        r.cosh() * (1.0 + 4.0 * U),
        if r > 0.0 {
            r.sinh() / r * (1.0 + 4.0 * U)
        } else {
            1.0
        },
    );
    // upper bounds on 1/l_i (0 for rows that see nothing)
    let inv_l: Vec<f64> = (0..nq)
        .map(|i| {
            let lam = visible(i);
            if lam == 0 {
                return 0.0;
            }
            let m = lam as f64;
            let (mut sv, mut sa) = (0.0, 0.0);
            for l in 0..d {
                sv += x[[i, l]] * ypre[[lam, l]];
                sa += x[[i, l]].abs() * yabs[[lam, l]];
            }
            let se = gs * sa + m * dm_rot;
            let base = (-r).exp() * m * (1.0 - 8.0 * U);
            let c = (sv / m).clamp(-r, r);
            let inner = m * (1.0 - c) + sv - se - 8.0 * U * (sa + (m * (1.0 - c)).abs());
            let jensen = c.exp() * inner * (1.0 - 8.0 * U);
            (1.0 / base.max(jensen)) * (1.0 + 4.0 * U)
        })
        .collect();
    // suffix sums over the rows that see key j: rows i >= j - c (all rows without a mask)
    let first_row = |j: usize| -> usize {
        match causal_shift {
            None => 0,
            Some(c) => (j as i64 - c).clamp(0, nq as i64) as usize,
        }
    };
    let mut t0 = vec![0.0; nq + 1];
    let mut xs = Array2::<f64>::zeros((nq + 1, d));
    let mut xa = Array2::<f64>::zeros((nq + 1, d));
    for i in (0..nq).rev() {
        t0[i] = t0[i + 1] + inv_l[i];
        for l in 0..d {
            xs[[i, l]] = xs[[i + 1, l]] + x[[i, l]] * inv_l[i];
            xa[[i, l]] = xa[[i + 1, l]] + (x[[i, l]] * inv_l[i]).abs();
        }
    }
    let mut col = 0.0f64;
    for j in 0..nk {
        let i0 = first_row(j);
        let s0 = t0[i0] * (1.0 + gs);
        let (mut s1, mut a1) = (0.0, 0.0);
        for l in 0..d {
            s1 += y[[j, l]] * xs[[i0, l]];
            a1 += (y[[j, l]] * xa[[i0, l]]).abs();
        }
        let e1 = gs * a1 + dm_rot * s0;
        col = col.max(cr * s0 + sr * (s1 + e1));
    }
    PSums {
        col: (col * (1.0 + 8.0 * U)).min(fallback.col),
        diag: fallback.diag,
    }
}

/// `(P_0, P_1, P_2)`: `Σ_t |c_t| t!/(t-k)! x^{t-k}` for `x >= 0`.
fn abs_evals3(coeffs: &[f64], x: f64) -> (f64, f64, f64) {
    let (mut p0, mut p1, mut p2) = (0.0, 0.0, 0.0);
    for (t, c) in coeffs.iter().enumerate() {
        let (c, tf, ti) = (c.abs(), t as f64, t as i32);
        p0 += c * x.powi(ti);
        if t >= 1 {
            p1 += tf * c * x.powi(ti - 1);
        }
        if t >= 2 {
            p2 += tf * (tf - 1.0) * c * x.powi(ti - 2);
        }
    }
    (p0, p1, p2)
}

/// The rounding share of each gradient's certificate (module docs); `inf` where it cannot be
/// bounded. `r` is the score bound `R`, `v_max = max|v|`.
pub fn lowrank_grad_rounding(
    poly: &Polynomial,
    shape: FastShape,
    r: f64,
    v_max: f64,
    gb: &GradBounds,
    lg: &LowRankGrad,
) -> Grad5 {
    let FastShape { nq, nk, d, dv } = shape;
    if nq == 0 || nk == 0 {
        return Grad5::default();
    }
    let g = poly.degree;
    let feats = feature_count(d, g);
    let n = (nq + nk + 2 * g + 2 * BLOCK + d + dv + 32) as f64 + feats;
    let eta = 2.0 * U * (lg.lr.psi_max + 8.0);
    let r2 = lg.lr.r2.max(lg.kx * lg.ky) * (1.0 + 1e-9);
    let grow = (1.0 + eta) * (1.0 + eta);
    let (p0, p1, p2) = abs_evals3(&poly.coeffs, r2 * grow);
    let dm = r2 * (gamma((d + 2) as f64) + grow - 1.0);
    let gn = gamma(n);
    let e = gn * p0 + p1 * dm;
    let l = (1.0 - poly.rho) * (-r).exp();
    if poly.rho.is_nan() || poly.rho >= 1.0 || e.is_nan() || e > 0.25 * l || eta > 1e-3 || gn > 1e-3
    {
        return Grad5::splat(f64::INFINITY);
    }
    let v = v_max;
    let (d1, dinf, lm) = (gb.do_l1, gb.do_max, gb.dlse);
    let el = e / (l - e) + 2.0 * U;
    let eo = 2.0 * e * v / (l - e) + 2.0 * U * v;
    let gdv = gamma(dv as f64 + 1.0);
    let ab = (d1 * (2.0 * v + eo) * (1.0 + gdv) + lm) * (1.0 + el);
    let da = 1.01 * (2.0 * d1 * v * el + d1 * eo + gdv * d1 * (v + eo) + lm * el);
    let per = (gn * ab * p1 + da * p1 + (2.0 * d1 * v + lm) * (p2 * dm + p1 * eta)) / l;
    let h = inverse_mass_sum(nq, nk, lg.lr.causal_shift);
    let (kx, ky) = (lg.kx * (1.0 + eta), lg.ky * (1.0 + eta));
    let sq2 = std::f64::consts::SQRT_2;
    let dx_err = per * ky;
    let dx_mag = ab * p1 * ky / l;
    let dy_err = per * kx * h;
    let dy_mag = ab * p1 * kx * h / l;
    let dv_err = 1.01 * dinf * ((gn * (1.0 + el) + el) * p0 + p1 * dm) * h / l;
    let out = Grad5 {
        dq: lg.mul * sq2 * ((1.0 + eta) * dx_err + eta * dx_mag),
        dk: sq2 * ((1.0 + eta) * dy_err + eta * dy_mag),
        dv: dv_err,
        dw: 0.0,
        db: 0.0,
    };
    out.zip(
        out,
        |a, _| if a.is_nan() { f64::INFINITY } else { 1.01 * a },
    )
}

/// Rows per block of the low-rank backward: with a causal mask each row also meets up to a
/// block of keys through `p(M)` and `p'(M)` directly, about `block (4d + 2g + 4(dv+1) + 10)`
/// flops against `r (6(dv+1) + 12)` through the states, so the block follows the balance of the
/// two (a multiple of 16 in `32..=BLOCK`).
pub fn block_rows(r: f64, d: usize, g: usize, dv: usize) -> usize {
    let cols = (dv + 1) as f64;
    let balance = r * (6.0 * cols + 12.0) / (4.0 * d as f64 + 2.0 * g as f64 + 4.0 * cols + 10.0);
    let b = (balance / 16.0).ceil() as usize * 16;
    b.clamp(32, BLOCK)
}

/// The plan for one polynomial (no `eps` test).
fn plan_for(
    req: &BackwardRequest,
    poly: &Polynomial,
    family: &'static str,
    lg: LowRankGrad,
) -> BackwardPlan {
    let shape = req.shape;
    let FastShape { nq, nk, d, dv } = shape;
    let feats = feature_count(d, poly.degree);
    let rho_d = derivative_rho(&poly.coeffs, req.bounds.r);
    let (approx, mag) = approximation_errors(poly.rho, rho_d, &req.grad, &req.psums);
    let rounding =
        lowrank_grad_rounding(poly, shape, req.bounds.r, req.bounds.v_max, &req.grad, &lg);
    let want = super::backward_certify::Want::default();
    let approx = approx.masked(want);
    let output = mag
        .plus(req.eps)
        .zip(mag, |a, _| a * req.out_rel)
        .masked(want);
    let certified = approx.plus(rounding).plus(output);
    let (r, cols) = (feats, (dv + 1) as f64);
    let (nqf, nkf) = (nq as f64, nk as f64);
    let g = poly.degree as f64;
    // pass 1: features, Φq S, z = a S^T, reverse sweep, the key state; pass 2: features again,
    // the row state T, Φk T, T b, reverse sweep
    let mut flops = r * (nqf + nkf) * (6.0 * cols + 12.0);
    if lg.lr.causal_shift.is_some() {
        let blk = block_rows(feats, d, poly.degree, dv) as f64;
        flops += (nqf + nkf) * blk * (4.0 * d as f64 + 2.0 * g + 4.0 * cols + 10.0);
    }
    let rows = BLOCK.min(nq.max(nk).max(1));
    let r_us = feats.min(1e15) as usize;
    let working_bytes = 8usize.saturating_mul(
        (nq + nk)
            .saturating_mul(2 * d + dv + 2)
            .saturating_add(nq.saturating_mul(dv + 1))
            .saturating_add(
                // per chunk in flight (at most MAX_CHUNKS): block buffers and its state
                rows.saturating_mul(r_us)
                    .saturating_mul(4)
                    .saturating_add(r_us.saturating_mul(dv + 1).saturating_mul(2))
                    .saturating_add(rows.saturating_mul(BLOCK).saturating_mul(4))
                    .saturating_mul(MAX_CHUNKS),
            ),
    );
    BackwardPlan {
        shape,
        bounds: req.bounds,
        grad: req.grad,
        fstats: req.fstats,
        psums: req.psums,
        poly: poly.clone(),
        family,
        rho_d,
        counts: ExpansionCounts {
            terms: r_us,
            n_alpha: r_us,
            n_beta: r_us,
            n_pairs: r_us,
            max_betas_per_alpha: 1,
            max_terms_per_pair: 1,
        },
        d_counts: None,
        want,
        fft_len: 0,
        column_tile: dv + 1,
        flops,
        kernel_flops: 0.0,
        working_bytes,
        kernel_bytes: 0,
        eps: req.eps,
        out_rel: req.out_rel,
        heads: req.heads.max(1),
        approximation: approx,
        rounding,
        output,
        certified,
        deferred: false,
        lowrank: Some(lg),
    }
}

/// The plan's a-priori certificate.
pub fn cert_of(plan: &BackwardPlan) -> GradCertificate {
    GradCertificate {
        approximation: plan.approximation,
        rounding: plan.rounding,
        output: plan.output,
        certified: plan.certified,
    }
}

/// The least-degree certified low-rank backward plan (dq, dk, dv within their budgets), or the
/// reason there is none. `forced` plans that polynomial only (a test hook).
pub fn lowrank_backward_plan(
    req: &BackwardRequest,
    lg: LowRankGrad,
    limits: &FastLimits,
    forced: Option<&Polynomial>,
) -> Result<BackwardPlan> {
    if req.want.dw || req.want.db {
        return Err(Error::Approximation(
            "fast backward (low-rank): serves no dw or dbias".into(),
        ));
    }
    let want = req.want;
    let eps = req.eps;
    if [eps.dq, eps.dk, eps.dv]
        .iter()
        .any(|e| e.is_nan() || *e <= 0.0)
    {
        return Err(Error::Approximation(
            "fast backward: eps = 0 asks for exact gradients; the fast method is an approximation"
                .into(),
        ));
    }
    if let Some(poly) = forced {
        if poly.r.is_nan() || poly.r < req.bounds.r {
            return Err(Error::Value(format!(
                "polynomial: certified on [-{}, {}], but the scores need R = {}",
                poly.r, poly.r, req.bounds.r
            )));
        }
        let family = match poly.kind {
            crate::poly::PolyKind::Taylor => "taylor",
            crate::poly::PolyKind::Chebyshev => "chebyshev",
        };
        let plan = plan_for(req, poly, family, lg);
        if let Some(msg) = plan.over_message(&cert_of(&plan), "the") {
            return Err(Error::Approximation(msg));
        }
        return Ok(plan);
    }
    let r = req.bounds.r;
    let max_degree = limits.max_degree.min(MAX_DEGREE);
    let mut why = String::from("no degree tried");
    for degree in 0..=max_degree {
        let feats = feature_count(req.shape.d, degree);
        if feats > limits.max_terms as f64 {
            why = format!(
                "degree {degree} needs C({} + {degree}, {degree}) = {feats:.3e} features, more \
                 than the limit of {}",
                req.shape.d, limits.max_terms
            );
            break;
        }
        let mut best: Option<BackwardPlan> = None;
        for which in 0..3 {
            let (poly, family) = match which {
                0 => (integrated_chebyshev(r, degree)?, "integrated-chebyshev"),
                1 => (chebyshev(r, degree)?, "chebyshev"),
                _ => (taylor(r, degree)?, "taylor"),
            };
            if poly.rho.is_nan() || poly.rho >= 1.0 {
                continue;
            }
            let plan = plan_for(req, &poly, family, lg);
            match plan.over_message(&cert_of(&plan), &format!("at degree {degree}, the")) {
                None => {
                    let worst = |p: &BackwardPlan| {
                        p.certified
                            .zip(p.eps, |c, e| c / e)
                            .masked(want)
                            .max_entry()
                    };
                    if best.as_ref().is_none_or(|b| worst(&plan) < worst(b)) {
                        best = Some(plan);
                    }
                }
                Some(w) => why = w,
            }
        }
        if let Some(plan) = best {
            if plan.working_bytes > limits.max_working_bytes {
                return Err(Error::Approximation(format!(
                    "fast backward (low-rank): degree {degree} needs {:.3} GB, but \
                     max_working_bytes is {:.3} GB",
                    plan.working_bytes as f64 / 1e9,
                    limits.max_working_bytes as f64 / 1e9
                )));
            }
            return Ok(plan);
        }
    }
    Err(Error::Approximation(format!(
        "fast backward (low-rank) cannot certify the gradients to eps: {why}"
    )))
}

/// `p'` evaluated by Horner.
fn derivative(coeffs: &[f64]) -> impl Fn(f64) -> f64 {
    let dc = derivative_coeffs(coeffs);
    move |x| dc.iter().rev().fold(0.0, |acc, &c| acc * x + c)
}

/// One head through the low-rank backward, in rotated coordinates: `x` (`nq x d`) and `y`
/// (`nk x d`) from [`super::lowrank::rotate`], `v` (`nk x dv`), `dout` (`nq x dv`). Returns
/// `dx`, `dy` (the gradients with respect to `x` and `y`; [`super::lowrank::rotate_back`] turns
/// them into `dq`, `dk`), `dv`, and the approximate forward `(out, lse)`, in a [`HeadGrads`]
/// whose `cert` is left at its default.
pub fn lowrank_backward_head(
    plan: &BackwardPlan,
    x: ArrayView2<f64>,
    y: ArrayView2<f64>,
    v: ArrayView2<f64>,
    dout: ArrayView2<f64>,
    dlse: Option<ArrayView1<f64>>,
    ctl: &Control,
) -> Result<HeadGrads> {
    let lg = plan
        .lowrank
        .ok_or_else(|| Error::Value("lowrank_backward_head: not a low-rank plan".into()))?;
    let (nq, nk, d, dv) = (x.nrows(), y.nrows(), x.ncols(), v.ncols());
    for (name, a, rows, cols) in [
        ("x", &x, nq, d),
        ("y", &y, nk, d),
        ("v", &v, nk, dv),
        ("dout", &dout, nq, dv),
    ] {
        if a.dim() != (rows, cols) {
            return Err(Error::Value(format!(
                "{name}: expected shape ({rows}, {cols}), got {:?}",
                a.dim()
            )));
        }
    }
    if let Some(g) = &dlse {
        if g.len() != nq {
            return Err(Error::Value(format!(
                "dlse: expected shape ({nq},), got ({},)",
                g.len()
            )));
        }
    }
    let poly = &plan.poly;
    let dp = derivative(&poly.coeffs);
    let feats = Features::new(d, poly);
    let r = feats.len();
    let blk = block_rows(r as f64, d, poly.degree, dv);
    let wv = Array1::from(feats.weight.clone());
    let cols = dv + 1;
    let b = with_ones(v);
    let shift = lg.lr.causal_shift;
    let visible = |i: usize| -> usize {
        match shift {
            None => nk,
            Some(c) => (i as i64 + c + 1).clamp(0, nk as i64) as usize,
        }
    };
    let sees = |i: usize, j: usize| -> bool { shift.is_none_or(|c| j as i64 <= i as i64 + c) };

    let first_full = |k1: usize| -> usize {
        match shift {
            None => 0,
            Some(c) => (k1 as i64 - 1 - c).clamp(0, nq as i64) as usize,
        }
    };
    let first_seen = |k0: usize| -> usize {
        match shift {
            None => 0,
            Some(c) => (k0 as i64 - c).clamp(0, nq as i64) as usize,
        }
    };
    let zero = Array2::<f64>::zeros((r, cols));
    // Σ_{j in [a, b)} Φk(y_j) b_j^T (and, in pass 2, Σ_{i in [a, b)} Φq(x_i) a_i^T)
    let key_state = |a: usize, b_: usize| feats.state(y, b.view(), false, a..b_, blk, ctl);

    // Pass 1: chunks of query blocks in parallel, each from the prefix state S of the keys its
    // first block sees in full; within a chunk, blocks in order (S grows by the keys between).
    let qchunks = chunk_ranges(nq, blk);
    let kbounds: Vec<usize> = qchunks.iter().map(|&(i0, _)| visible(i0)).collect();
    let pieces = range_sums(&consecutive(&kbounds), nk, blk, &zero, &key_state)?;
    let prefix = scan(pieces, &zero, false);
    let mut a_all = Array2::<f64>::zeros((nq, cols));
    let mut out = Array2::<f64>::zeros((nq, dv));
    let mut lse = Array1::<f64>::from_elem(nq, f64::NEG_INFINITY);
    let mut dx = Array2::<f64>::zeros((nq, d));
    let pass1 = |(c, mut a_ch, mut out, mut lse, mut dx): Pass1Rows| -> Result<()> {
        let (c0, c1) = qchunks[c];
        let mut state = prefix[c].clone();
        let mut in_state = kbounds[c];
        for i0 in (c0..c1).step_by(blk) {
            ctl.check()?;
            let i1 = (i0 + blk).min(c1);
            let (full, last) = (visible(i0), visible(i1 - 1));
            if in_state < full {
                state += &key_state(in_state, full)?;
                in_state = full;
            }
            let xb = x.slice(s![i0..i1, ..]);
            let mono = feats.fill(xb, false);
            let phi = &mono * &wv;
            let mut acc = phi.dot(&state);
            let partial = (last > full).then(|| {
                let yp = y.slice(s![full..last, ..]);
                let m = xb.dot(&yp.t());
                let pm = Array2::from_shape_fn(m.dim(), |(a, j)| {
                    if sees(i0 + a, full + j) {
                        poly.eval(m[[a, j]])
                    } else {
                        0.0
                    }
                });
                acc += &pm.dot(&b.slice(s![full..last, ..]));
                m
            });
            for a in 0..i1 - i0 {
                let (i, o) = (i0 + a, i0 + a - c0);
                if visible(i) == 0 {
                    continue; // no visible key: no gradient flows through this row
                }
                let den = acc[[a, dv]];
                if !(den.is_finite() && den > 0.0) {
                    return Err(Error::Approximation(format!(
                        "fast backward (low-rank): row {i} has denominator {den:e} despite the \
                         certificate; use the exact method"
                    )));
                }
                let mut dsum = 0.0;
                for col in 0..dv {
                    let val = acc[[a, col]] / den;
                    out[[o, col]] = val;
                    dsum += dout[[i, col]] * val;
                    a_ch[[o, col]] = dout[[i, col]] / den;
                }
                // d lse_i / d Ã_ij = 1 / l̃_i: the cotangent of lse joins -D_i
                let g = dlse.as_ref().map_or(0.0, |g| g[i]);
                a_ch[[o, dv]] = (g - dsum) / den;
                lse[o] = den.ln();
            }
            let ab = a_ch.slice(s![i0 - c0..i1 - c0, ..]);
            let mut coef = ab.dot(&state.t());
            coef *= &wv;
            let mut gx = feats.backprop(xb, mono.view(), coef.view());
            if let Some(m) = partial {
                let yp = y.slice(s![full..last, ..]);
                let gm = ab.dot(&b.slice(s![full..last, ..]).t());
                let dpm = Array2::from_shape_fn(m.dim(), |(a, j)| {
                    if sees(i0 + a, full + j) {
                        dp(m[[a, j]]) * gm[[a, j]]
                    } else {
                        0.0
                    }
                });
                gx += &dpm.dot(&yp);
            }
            dx.slice_mut(s![i0 - c0..i1 - c0, ..]).assign(&gx);
        }
        Ok(())
    };
    let per = chunk_len(nq, blk);
    let jobs: Vec<Pass1Rows> = a_all
        .axis_chunks_iter_mut(Axis(0), per)
        .zip(out.axis_chunks_iter_mut(Axis(0), per))
        .zip(lse.axis_chunks_iter_mut(Axis(0), per))
        .zip(dx.axis_chunks_iter_mut(Axis(0), per))
        .enumerate()
        .map(|(c, (((a, o), l), g))| (c, a, o, l, g))
        .collect();
    jobs.into_par_iter().map(pass1).collect::<Result<()>>()?;

    // Pass 2: chunks of key blocks in parallel, each from the suffix state T of the query rows
    // that see its last block in full; within a chunk, blocks in reverse (T grows downwards).
    let a_all = a_all.view();
    let row_state = |a: usize, b_: usize| feats.state(x, a_all, true, a..b_, blk, ctl);
    let kchunks = chunk_ranges(nk, blk);
    let rbounds: Vec<usize> = kchunks.iter().map(|&(_, k1)| first_full(k1)).collect();
    // rows [rbounds[c], rbounds[c+1]) (and [last, nq)) as pieces; T_c sums the pieces from c on
    let mut row_ranges: Vec<(usize, usize)> = rbounds
        .iter()
        .zip(rbounds.iter().skip(1).chain(std::iter::once(&nq)))
        .map(|(&lo, &hi)| (lo, hi))
        .collect();
    if row_ranges.is_empty() {
        row_ranges.push((nq, nq));
    }
    let pieces = range_sums(&row_ranges, nq, blk, &zero, &row_state)?;
    let suffix = scan(pieces, &zero, true);
    let mut dy = Array2::<f64>::zeros((nk, d));
    let mut dvv = Array2::<f64>::zeros((nk, dv));
    let pass2 =
        |(c, mut dy, mut dvv): (usize, ArrayViewMut2<f64>, ArrayViewMut2<f64>)| -> Result<()> {
            let (c0, c1) = kchunks[c];
            let mut t = suffix[c].clone();
            let mut t_from = rbounds[c];
            let rows = c1 - c0;
            let nblocks = rows.div_ceil(blk);
            for kb in (0..nblocks).rev() {
                ctl.check()?;
                let (k0, k1) = (c0 + kb * blk, (c0 + (kb + 1) * blk).min(c1));
                let ff = first_full(k1);
                if t_from > ff {
                    t += &row_state(ff, t_from)?;
                    t_from = ff;
                }
                let yb = y.slice(s![k0..k1, ..]);
                let bb = b.slice(s![k0..k1, ..]);
                let mono = feats.fill(yb, false);
                let mut dvb = mono.dot(&t.slice(s![.., ..dv]));
                let coef = bb.dot(&t.t());
                let mut gy = feats.backprop(yb, mono.view(), coef.view());
                let p0 = first_seen(k0).min(ff);
                if ff > p0 {
                    let xp = x.slice(s![p0..ff, ..]);
                    let ap = a_all.slice(s![p0..ff, ..]);
                    let m = xp.dot(&yb.t());
                    let gm = ap.dot(&bb.t());
                    let mut pm = Array2::<f64>::zeros(m.dim());
                    let mut dpm = Array2::<f64>::zeros(m.dim());
                    for ((a, j), &mv) in m.indexed_iter() {
                        if sees(p0 + a, k0 + j) {
                            pm[[a, j]] = poly.eval(mv);
                            dpm[[a, j]] = dp(mv) * gm[[a, j]];
                        }
                    }
                    dvb += &pm.t().dot(&ap.slice(s![.., ..dv]));
                    gy += &dpm.t().dot(&xp);
                }
                dy.slice_mut(s![k0 - c0..k1 - c0, ..]).assign(&gy);
                dvv.slice_mut(s![k0 - c0..k1 - c0, ..]).assign(&dvb);
            }
            Ok(())
        };
    let per = chunk_len(nk, blk);
    let jobs: Vec<(usize, ArrayViewMut2<f64>, ArrayViewMut2<f64>)> = dy
        .axis_chunks_iter_mut(Axis(0), per)
        .zip(dvv.axis_chunks_iter_mut(Axis(0), per))
        .enumerate()
        .map(|(c, (g, v))| (c, g, v))
        .collect();
    jobs.into_par_iter().map(pass2).collect::<Result<()>>()?;
    Ok(HeadGrads {
        dq: dx,
        dk: dy,
        dv: dvv,
        out,
        lse,
        cert: Default::default(),
    })
}

/// At most this many chunks per pass (a function of the shape only: results are bitwise the same
/// for every thread count).
const MAX_CHUNKS: usize = 8;

/// Contiguous ranges of whole blocks covering `0..n`, at least 4 blocks each, at most
/// [`MAX_CHUNKS`] of them.
pub(crate) fn chunk_ranges(n: usize, blk: usize) -> Vec<(usize, usize)> {
    let per = chunk_len(n, blk);
    (0..n.div_ceil(per))
        .map(|c| (c * per, ((c + 1) * per).min(n)))
        .collect()
}

/// The rows of each chunk of [`chunk_ranges`] but the last.
pub(crate) fn chunk_len(n: usize, blk: usize) -> usize {
    let blk = blk.max(1);
    let nb = n.div_ceil(blk);
    let parts = (nb / 4).clamp(1, MAX_CHUNKS);
    nb.div_ceil(parts).max(1) * blk
}

/// `[(0, b_0), (b_0, b_1), ...]` for nondecreasing bounds `b`.
pub(crate) fn consecutive(bounds: &[usize]) -> Vec<(usize, usize)> {
    let mut prev = 0;
    bounds
        .iter()
        .map(|&b| {
            let r = (prev, b.max(prev));
            prev = b.max(prev);
            r
        })
        .collect()
}

/// `piece` summed over each range, the ranges cut into sub-ranges of whole blocks (about
/// `total / MAX_CHUNKS` rows) computed in parallel and added in order (deterministic).
pub(crate) fn range_sums(
    ranges: &[(usize, usize)],
    total: usize,
    blk: usize,
    zero: &Array2<f64>,
    piece: &(dyn Fn(usize, usize) -> Result<Array2<f64>> + Sync),
) -> Result<Vec<Array2<f64>>> {
    let step = (total.div_ceil(MAX_CHUNKS).div_ceil(blk).max(1)) * blk;
    let subs: Vec<(usize, usize, usize)> = ranges
        .iter()
        .enumerate()
        .flat_map(|(c, &(a, b))| {
            (a..b)
                .step_by(step)
                .map(move |s0| (c, s0, (s0 + step).min(b)))
        })
        .collect();
    let parts: Vec<Array2<f64>> = subs
        .par_iter()
        .map(|&(_, s0, s1)| piece(s0, s1))
        .collect::<Result<_>>()?;
    let mut out = vec![zero.clone(); ranges.len()];
    for (&(c, _, _), p) in subs.iter().zip(parts) {
        out[c] += &p;
    }
    Ok(out)
}

/// Running sums of `pieces` (inclusive), from the front or from the back.
pub(crate) fn scan(
    pieces: Vec<Array2<f64>>,
    zero: &Array2<f64>,
    from_back: bool,
) -> Vec<Array2<f64>> {
    let n = pieces.len();
    let mut out = vec![zero.clone(); n];
    let mut acc = zero.clone();
    let order: Vec<usize> = if from_back {
        (0..n).rev().collect()
    } else {
        (0..n).collect()
    };
    for i in order {
        acc += &pieces[i];
        out[i] = acc.clone();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fast::backward_certify::{FactorStats, PSums, Want};
    use crate::fast::lowrank::{rotate, rotate_back};
    use crate::fast::FastBounds;
    use crate::position::RotaryW;

    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        }
        fn mat(&mut self, r: usize, c: usize, s: f64) -> Array2<f64> {
            Array2::from_shape_fn((r, c), |_| s * self.next())
        }
    }

    fn request(shape: FastShape, shift: Option<i64>) -> (BackwardRequest<'static>, LowRankGrad) {
        let bounds = FastBounds {
            r: 1.5,
            r_abs: 1.5,
            v_max: 1.0,
            factor_sum: 1.0,
            factor_norm2: 1.0,
            min_row_mass: 1.0,
        };
        let grad = GradBounds {
            do_max: 1.0,
            do_l1: shape.dv as f64,
            do_colsum: shape.dv as f64,
            gamma: 2.0 * shape.dv as f64,
            kw: 1.5,
            qw: 1.5,
            qk: 1.5,
            rq: 1.5,
            rk: 1.5,
            dlse: 0.0,
        };
        let req = BackwardRequest {
            shape,
            support: &[],
            bounds,
            grad,
            fstats: FactorStats::default(),
            psums: PSums {
                col: 3.0,
                diag: 3.0,
            },
            eps: Grad5::splat(1e-6),
            want: Want::default(),
            out_rel: 0.0,
            heads: 1,
        };
        let lg = LowRankGrad {
            lr: LowRank {
                r2: 1.5,
                psi_max: 1000.0,
                causal_shift: shift,
            },
            kx: 1.5,
            ky: 1.0,
            mul: 0.5,
        };
        (req, lg)
    }

    /// The gradient of the approximate forward by its definition, `O(nq nk)`.
    #[allow(clippy::type_complexity)]
    fn naive(
        poly: &Polynomial,
        x: &Array2<f64>,
        y: &Array2<f64>,
        v: &Array2<f64>,
        dout: &Array2<f64>,
        dlse: &Array1<f64>,
        shift: Option<i64>,
    ) -> (Array2<f64>, Array2<f64>, Array2<f64>, Array2<f64>) {
        let (nq, nk, d, dv) = (x.nrows(), y.nrows(), x.ncols(), v.ncols());
        let dp = derivative(&poly.coeffs);
        let m = x.dot(&y.t());
        let vis = |i: usize, j: usize| shift.is_none_or(|c| j as i64 <= i as i64 + c);
        let mut out = Array2::zeros((nq, dv));
        let mut a = Array2::<f64>::zeros((nq, dv + 1));
        for i in 0..nq {
            let mut den = 0.0;
            let mut num = vec![0.0; dv];
            for j in (0..nk).filter(|&j| vis(i, j)) {
                let p = poly.eval(m[[i, j]]);
                den += p;
                for c in 0..dv {
                    num[c] += p * v[[j, c]];
                }
            }
            if den > 0.0 {
                let mut dsum = 0.0;
                for c in 0..dv {
                    out[[i, c]] = num[c] / den;
                    dsum += dout[[i, c]] * out[[i, c]];
                    a[[i, c]] = dout[[i, c]] / den;
                }
                a[[i, dv]] = (dlse[i] - dsum) / den;
            }
        }
        let (mut dx, mut dy, mut dvv) = (
            Array2::zeros((nq, d)),
            Array2::zeros((nk, d)),
            Array2::zeros((nk, dv)),
        );
        for i in 0..nq {
            for j in (0..nk).filter(|&j| vis(i, j)) {
                let mut gij = a[[i, dv]];
                for c in 0..dv {
                    gij += a[[i, c]] * v[[j, c]];
                }
                let g = gij * dp(m[[i, j]]);
                for l in 0..d {
                    dx[[i, l]] += g * y[[j, l]];
                    dy[[j, l]] += g * x[[i, l]];
                }
                let p = poly.eval(m[[i, j]]);
                for c in 0..dv {
                    dvv[[j, c]] += p * a[[i, c]];
                }
            }
        }
        (dx, dy, dvv, out)
    }

    #[test]
    fn lowrank_backward_matches_the_definition() {
        let mut g = Lcg(11);
        let (nq, nk, d, dv) = (600, 530, 4, 3);
        let x = g.mat(nq, d, 0.5);
        let y = g.mat(nk, d, 0.5);
        let v = g.mat(nk, dv, 1.0);
        let dout = g.mat(nq, dv, 1.0);
        let dlse = Array1::from_iter((0..nq).map(|_| 2.0 * g.next()));
        let no_dlse = Array1::<f64>::zeros(nq);
        let shape = FastShape { nq, nk, d, dv };
        let limits = FastLimits {
            max_degree: 12,
            max_terms: 5000,
            max_working_bytes: 1 << 30,
        };
        for (t, shift) in [None, Some(0), Some(-7), Some(300), Some(-700), Some(2000)]
            .into_iter()
            .enumerate()
        {
            let g_lse = if t % 2 == 1 { &dlse } else { &no_dlse };
            let (req, lg) = request(shape, shift);
            let plan = lowrank_backward_plan(&req, lg, &limits, None).unwrap();
            assert!(
                plan.certified.dq <= 1e-6 && plan.certified.dk <= 1e-6,
                "{plan:?}"
            );
            let got = lowrank_backward_head(
                &plan,
                x.view(),
                y.view(),
                v.view(),
                dout.view(),
                (t % 2 == 1).then(|| dlse.view()),
                &Control::new(),
            )
            .unwrap();
            let (dx, dy, dvv, out) = naive(&plan.poly, &x, &y, &v, &dout, g_lse, shift);
            let close = |a: &Array2<f64>, b: &Array2<f64>, what: &str| {
                let err = (a - b).iter().fold(0.0f64, |m, e| m.max(e.abs()));
                let mag = b.iter().fold(0.0f64, |m, e| m.max(e.abs()));
                assert!(
                    err <= 1e-11 * (1.0 + mag),
                    "{what} {shift:?}: {err:e} (max {mag:e})"
                );
            };
            close(&got.dq, &dx, "dx");
            close(&got.dk, &dy, "dy");
            close(&got.dv, &dvv, "dv");
            close(&got.out, &out, "out");
        }
    }

    #[test]
    fn rotate_back_is_the_transpose_of_rotate() {
        let mut g = Lcg(3);
        let rot = RotaryW {
            theta: vec![0.9, 0.05],
            factor: 1.1,
            pairs: vec![(0, 2), (1, 3)],
        };
        let (q, h) = (g.mat(9, 4, 1.0), g.mat(9, 4, 1.0));
        let a = (&rotate(&rot, q.view(), -3, 0.7) * &h).sum();
        let b = (&q * &rotate_back(&rot, h.view(), -3, 0.7)).sum();
        assert!((a - b).abs() < 1e-13, "{a} {b}");
    }

    #[test]
    fn inverse_mass_sum_bounds_the_sum() {
        for (nq, nk) in [(1, 1), (10, 10), (300, 200), (200, 300), (1000, 1000)] {
            for c in [None, Some(0), Some(-5), Some(7), Some(-250), Some(5000)] {
                let vis = |i: i64| match c {
                    None => nk as i64,
                    Some(c) => (i + c + 1).clamp(0, nk as i64),
                };
                let exact: f64 = (0..nq as i64)
                    .map(vis)
                    .filter(|&l| l > 0)
                    .map(|l| 1.0 / l as f64)
                    .sum();
                let h = inverse_mass_sum(nq, nk, c);
                assert!(
                    h >= exact && h <= exact * 1.2 + 0.5,
                    "{nq} {nk} {c:?}: {h} vs {exact}"
                );
            }
        }
    }

    #[test]
    fn lowrank_psums_bound_the_column_sums() {
        let mut g = Lcg(5);
        let (nq, nk, d) = (300, 280, 4);
        for (scale, shift) in [
            (0.4, None),
            (0.4, Some(0)),
            (1.0, Some(-20)),
            (1.0, Some(150)),
        ] {
            let x = g.mat(nq, d, scale);
            let y = g.mat(nk, d, scale);
            let m = x.dot(&y.t());
            let vis = |i: usize, j: usize| shift.is_none_or(|c: i64| j as i64 <= i as i64 + c);
            let r = m.iter().fold(0.0f64, |a, v| a.max(v.abs()));
            let mut col = vec![0.0; nk];
            for i in 0..nq {
                let l: f64 = (0..nk)
                    .filter(|&j| vis(i, j))
                    .map(|j| m[[i, j]].exp())
                    .sum();
                for j in (0..nk).filter(|&j| vis(i, j)) {
                    col[j] += m[[i, j]].exp() / l;
                }
            }
            let truth = col.iter().fold(0.0f64, |a, &b| a.max(b));
            let loose = PSums {
                col: 1e9,
                diag: 1e9,
            };
            let ps = lowrank_psums(x.view(), y.view(), r, shift, 0.0, loose);
            assert!(ps.col >= truth, "{shift:?}: {} < {truth}", ps.col);
            // the same bound as the FFT route (W = I: support (l, l), sequences of ones)
            let support: Vec<(usize, usize)> = (0..d).map(|l| (l, l)).collect();
            let glen = nq + nk - 1;
            let seqs = Array2::<f64>::ones((d, glen));
            let factor: Vec<f64> = (0..glen)
                .map(|gi| {
                    let delta = shift.unwrap_or(0) + nq as i64 - 1 - gi as i64;
                    if shift.is_none() || delta >= 0 {
                        1.0
                    } else {
                        0.0
                    }
                })
                .collect();
            let fs = FactorStats::new(nq, nk, &factor).unwrap();
            let fft = PSums::from_data(
                x.view(),
                y.view(),
                1.0,
                &support,
                seqs.view(),
                &factor,
                r,
                &fs,
                false,
            )
            .unwrap();
            assert!(fft.col >= truth);
            assert!(
                ps.col <= fft.col * (1.0 + 1e-9),
                "{shift:?}: {} vs {}",
                ps.col,
                fft.col
            );
        }
    }
}
