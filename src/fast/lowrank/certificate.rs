//! The rounding certificates of the low-rank route: the forward's (see the parent module's
//! "Certificate") and the backward's, below.
//!
//! # Backward certificate
//!
//! **Approximation** (distance to the true gradient): that of [`crate::fast::grad_bounds`],
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

use super::forward::BLOCK;
use crate::fast::common::FastShape;
use crate::fast::grad::Grad5;
use crate::fast::grad_bounds::{GradBounds, PSums};
use crate::fast::plans::{Band, LowRank, LowRankGrad};
use crate::poly::{Polynomial, U};
use ndarray::{Array2, ArrayView2};

/// `C(d + g, g)`, as f64 (no overflow for large `d`).
pub fn feature_count(d: usize, g: usize) -> f64 {
    (1..=g).fold(1.0, |acc, t| acc * (d + t) as f64 / t as f64)
}

/// `γ_n = n u / (1 - n u)`.
pub(crate) fn gamma(n: f64) -> f64 {
    let nu = n * U;
    if nu >= 0.5 {
        f64::INFINITY
    } else {
        nu / (1.0 - nu)
    }
}

/// `P(x) = Σ |c_t| x^t` and `P'(x) = Σ t |c_t| x^(t-1)` for `x >= 0`.
pub(crate) fn abs_evals(coeffs: &[f64], x: f64) -> (f64, f64) {
    let p = coeffs.iter().rev().fold(0.0, |acc, c| acc * x + c.abs());
    let dp = coeffs
        .iter()
        .enumerate()
        .skip(1)
        .rev()
        .fold(0.0, |acc, (t, c)| acc * x + t as f64 * c.abs());
    (p, dp)
}

/// `(E, L)` of the module docs for `poly`: each numerator/denominator entry is off by at most
/// `n_vis E max|v|` (resp. `n_vis E`), and every denominator is at least `n_vis L`.
pub(super) fn rounding_parts(
    poly: &Polynomial,
    shape: FastShape,
    r: f64,
    lr: &LowRank,
) -> (f64, f64) {
    let g = poly.degree;
    let feats = feature_count(shape.d, g);
    let mut n = shape.nk as f64 + feats + (2 * g + BLOCK + shape.d + 16) as f64;
    if !lr.band.is_plain() {
        n += band_terms(shape);
    }
    let r2 = lr.r2 * (1.0 + 1e-9);
    let (p_abs, dp_abs) = abs_evals(&poly.coeffs, r2);
    let dm = r2 * (gamma((shape.d + 2) as f64) + 2.0 * U * (lr.psi_max + 6.0));
    let e = gamma(n) * p_abs + dp_abs * dm;
    let l = (1.0 - poly.rho) * (-r).exp();
    (e, l)
}

/// The extra rounded terms of a banded sum: up to five direct tiles, the block states' running
/// sums (one product and one sum per block, either way), and the weights `e^{-s x}`: each `exp`
/// is off by at most `(s x + 2) u` relatively, `s x <= 745` before it underflows, at most four
/// per term.
fn band_terms(shape: FastShape) -> f64 {
    (4 * BLOCK) as f64 + 2.0 * ((shape.nq.max(shape.nk)) as f64 / 32.0 + 2.0) + 4.0 * 747.0 + 8.0
}

/// `H >= max_j Σ_{i sees j} w_ij / m_i` for a band (`w_ij = e^{-s|δ_ij|}`, `m_i = Σ_j w_ij`):
/// [`inverse_mass_sum`]'s role when pairs weigh differently. `1/m_i` is bounded above in closed
/// form (geometric sums); the sum over rows by two upper bounds, the smaller taken per key:
/// the decayed sums over every row on the visible side(s) ignoring the window (running sums,
/// no subtraction), and, with a window, the plain sum of `1/m_i` over the window's rows (prefix
/// sums; their difference is off by at most `2γ_n` of the total, added). `O(nq + nk)`.
pub fn band_inverse_mass(nq: usize, nk: usize, band: &Band, causal: bool) -> f64 {
    if nq == 0 || nk == 0 {
        return 0.0;
    }
    let s = band.slope;
    let (mut lo, mut hi) = (i64::MIN / 4, i64::MAX / 4);
    if let Some((left, right)) = band.window {
        lo = -right;
        hi = left;
    }
    if causal {
        lo = lo.max(0);
    }
    let c = band.shift;
    let (nqi, nki) = (nq as i64, nk as i64);
    // Σ_{k=k0}^{k1} λ^k, from below
    let geo = |k0: i64, k1: i64| -> f64 {
        if k1 < k0 {
            return 0.0;
        }
        let m = (k1 - k0 + 1) as f64;
        if s == 0.0 {
            m
        } else {
            (-s * k0 as f64).exp() * ((-s * m).exp_m1() / (-s).exp_m1())
        }
    };
    let u: Vec<f64> = (0..nqi)
        .map(|i| {
            let (a, b) = (lo.max(i + c - (nki - 1)), hi.min(i + c));
            if a > b {
                return 0.0;
            }
            let neg = geo((-b).max(1), -a);
            let pos = geo(a.max(0), b);
            let m = (neg + pos) * (1.0 - 64.0 * U);
            if m > 0.0 {
                (1.0 / m) * (1.0 + 4.0 * U)
            } else {
                f64::INFINITY
            }
        })
        .collect();
    let total: f64 = u.iter().sum();
    let n = (nq + nk) as f64;
    let mut bound = vec![total * (1.0 + gamma(n)); nk];
    // decayed sums over the rows, t = i + c: A_j = Σ_{t >= j} λ^{t-j} U_t, B_j = Σ_{t < j}
    // λ^{j-t} U_t, run over the rows (x = t - c) and carried beyond them by one power of λ
    if s > 0.0 {
        let lam = (-s).exp() * (1.0 + 4.0 * U);
        let pow = |k: i64| (-s * k as f64).exp() * (1.0 + 4.0 * U);
        let mut a = vec![0.0; nq + 1];
        for x in (0..nq).rev() {
            a[x] = u[x] + lam * a[x + 1];
        }
        let mut b = vec![0.0; nq + 1];
        for x in 1..=nq {
            b[x] = lam * (b[x - 1] + u[x - 1]);
        }
        let grow = 1.0 + gamma(2.0 * n + 8.0);
        for (j, bj) in bound.iter_mut().enumerate() {
            let x = j as i64 - c;
            let (past, future) = if x < 0 {
                (pow(-x) * a[0], 0.0)
            } else if x <= nqi {
                (a[x as usize], b[x as usize])
            } else {
                (0.0, pow(x - nqi) * b[nq])
            };
            let h = past + if causal { 0.0 } else { future };
            *bj = bj.min(h * grow);
        }
    }
    if band.window.is_some() {
        let mut pre = vec![0.0; nq + 1];
        for i in 0..nq {
            pre[i + 1] = pre[i] + u[i];
        }
        let slack = 2.0 * gamma(n) * total;
        for (j, bj) in bound.iter_mut().enumerate() {
            // rows with lo <= i + c - j <= hi
            let r0 = (j as i64 + lo - c).clamp(0, nqi) as usize;
            let r1 = (j as i64 + hi - c + 1).clamp(0, nqi) as usize;
            let h = if r1 > r0 { pre[r1] - pre[r0] } else { 0.0 };
            *bj = bj.min(h * (1.0 + gamma(n)) + slack);
        }
    }
    bound.iter().fold(0.0f64, |m, &b| m.max(b)) * (1.0 + 1e-12) + 4.0 * U
}

/// The rounding share of the certificate for `poly` (see the module docs); `inf` when the
/// denominators cannot be bounded away from 0.
pub fn rounding_error(poly: &Polynomial, shape: FastShape, r: f64, lr: &LowRank, v: f64) -> f64 {
    let (e, l) = rounding_parts(poly, shape, r, lr);
    if e.is_nan() || e >= l {
        return f64::INFINITY;
    }
    2.0 * e * v / (l - e) + 2.0 * U * v
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
    let mut n = (nq + nk + 2 * g + 2 * BLOCK + d + dv + 32) as f64 + feats;
    let band = &lg.lr.band;
    if !band.is_plain() {
        n += 2.0 * band_terms(shape);
    }
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
    let h = if band.is_plain() {
        inverse_mass_sum(nq, nk, lg.lr.causal_shift)
    } else {
        band_inverse_mass(nq, nk, band, lg.lr.causal_shift.is_some())
    };
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
