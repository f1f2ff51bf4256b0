//! The backward pass of the fast method (DESIGN.md §5.6): the gradient of the approximate forward,
//! by differentiating its expansion, in the same FFT machinery as [`super::forward`].
//!
//! # The products
//!
//! With `Ã_ij = p(M_ij) F_ij = Σ_{(α,β)} q_i^α C_αβ(δ_ij) k_j^β`, `l̃ = Ã 1`, `Õ = Ã V / l̃` and
//! `D_i = dO_i·Õ_i`, the gradient of `Σ dO ∘ Õ` with respect to `Ã_ij` is the rank-`(dv+1)` matrix
//!
//! ```text
//! G_ij = (dO_i·v_j - D_i) / l̃_i = Σ_c a_ic b_jc,   a = [dO / l̃, -D / l̃],   b = [V, 1].
//! ```
//!
//! Every gradient is then a contraction of `G` with a derivative of the expansion:
//!
//! * **dq** (`∂q^α/∂q[l] = α_l q^{α-e_l}`): `dq_i[l] = Σ_c a_ic Y_c,l,i`,
//!   `Y_c,l = Σ_α α_l q^{α-e_l} ∘ z_α,c` with `z_α,c = Σ_β T[C_αβ](k^β ∘ b_c)` — exactly the
//!   per-α inverse FFTs of the forward. **Pass 1** is the forward over the columns of `[V, 1]`
//!   (it also yields `l̃`, `Õ`, hence `a`; the caller's `out`/`lse` are not needed), contracting
//!   each `z_α,c` with `q^α` (numerators) and with `α_l q^{α-e_l}` (dq). `q^{α-e_l}` is itself one
//!   of the `α` monomials, so nothing new is stored.
//! * **dk, dv**: `dV_jc = Σ_β k_j^β w_β,c,j` and `dk_j[l] = Σ_c b_jc Σ_β β_l k_j^{β-e_l} w_β,c,j`
//!   with `w_β,c = Σ_α T[C_αβ]^T (q^α ∘ a_c)`. **Pass 2** runs the transposed products: the
//!   input spectra are `conj(FFT(q^α ∘ a_c))`, so the *same* kernel spectra `Ĉ_αβ` (of
//!   `rev(C)`) give the correlation `Σ_i r[i + L] x_i` whose entry `L = nk-1-j` is
//!   `(T^T x)_j` (no wrap-around for FFT lengths `>= nq + nk - 1`); spectra are summed per `β`.
//! * **dw, dbias**: `db(g) = Σ_p C_p(g) H_p(g)` and
//!   `dW_s(g) = scale Σ_{p'} C'_{p'}(g) H_{(α'+e_{l1_s}, β'+e_{l2_s})}(g)`, where
//!   `H_αβ(g) = Σ_c Σ_{j-i+nq-1=g} (q^α a_c)_i (k^β b_c)_j` are diagonal correlations (one inverse
//!   FFT per pair, of `Σ_c conj(FFT(q^α a_c)) ⊙ FFT(k^β b_c)`, accumulated over the columns *and
//!   over every head sharing the kernel*) and `C'` are the kernels of the expansion of `p'`
//!   (`∂/∂w_s` of `p(M)` is `p'(M) scale q[l1] k[l2]`, and `q^{α'} q[l1] = q^{α'+e_{l1}}`): no
//!   division by `w_s`, and entries with `w_s = 0` get their gradient. Contractions run over
//!   blocks of diagonals, recomputing `C_p(g)` and `C'_{p'}(g)` there, so only the correlation
//!   spectra (the size of the kernel spectra) are held.
//!
//! The result is the exact gradient of the approximate forward up to rounding; its distance to
//! the true gradient and the rounding are certified per head before any FFT runs
//! ([`super::backward_certify`]). Cost: two forward-sized passes (`2 (n_α + n_β)(dv+1)` FFTs and
//! `2 n_pairs (dv+1)` spectrum products per frequency), plus, for dw/dbias, `n_β (dv+1)` FFTs and
//! `n_pairs (dv+1)` products per head and `n_pairs` inverse FFTs per group.

use super::backward_certify::{
    approximation_errors, apriori_terms, data_terms, derivative_coeffs, derivative_rho,
    rounding_errors, FactorStats, Grad5, GradBounds, GradEps, KernelNorms, MonomialNorms, PSums,
    RoundingTerms, Want, GRAD_NAMES,
};
use super::blocks::{
    scatter, spectrum_blocks, stage2_dispatch, try_filled, Block, Stage2, BLOCK, ZERO_BLOCK,
};
use super::bounds::{max_abs, row_masses, FastBounds};
use super::certify::{fft_flops, fft_relative_error, snap_radius, BetaNorms, FastShape, PairNorms};
use super::expansion::{term_count, Expansion, ExpansionCounts};
use super::{FastLimits, HeadProblem};
use crate::error::{Error, Result};
use crate::poly::{
    certify as certify_poly, chebyshev, taylor, PolyKind, Polynomial, WNorms, MAX_DEGREE, U,
};
use crate::toeplitz::{fft_len, ToeplitzPlan, ToeplitzPlanner, C64};
use ndarray::{Array1, Array2, ArrayView2};
use rayon::prelude::*;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

/// What a backward plan needs to know about a call (or one group of heads sharing a kernel).
#[derive(Clone, Debug)]
pub struct BackwardRequest<'a> {
    pub shape: FastShape,
    pub support: &'a [(usize, usize)],
    /// Worst forward bounds over the heads (`R`, `R_abs`, `max|v|`, factor statistics).
    pub bounds: FastBounds,
    /// Worst gradient bounds over the heads.
    pub grad: GradBounds,
    pub fstats: FactorStats,
    /// Worst bounds on the column and diagonal sums of `P` over the heads.
    pub psums: PSums,
    /// Per-head error budget of each gradient.
    pub eps: GradEps,
    pub want: Want,
    /// Relative rounding of the results' dtype (`2^-24` for float32, 0 for float64).
    pub out_rel: f64,
    /// Heads whose correlations are accumulated together (dw/dbias rounding).
    pub heads: usize,
}

/// A certified plan for the fast backward (plain data).
#[derive(Clone, Debug, PartialEq)]
pub struct BackwardPlan {
    pub shape: FastShape,
    pub bounds: FastBounds,
    pub grad: GradBounds,
    pub fstats: FactorStats,
    pub psums: PSums,
    pub poly: Polynomial,
    /// `"taylor"`, `"chebyshev"` or `"integrated-chebyshev"` (see [`integrated_chebyshev`]).
    pub family: &'static str,
    /// Verified relative error of `p'` against `exp` on `[-R, R]`.
    pub rho_d: f64,
    pub counts: ExpansionCounts,
    /// The expansion of `p'` (dw only).
    pub d_counts: Option<ExpansionCounts>,
    pub want: Want,
    pub fft_len: usize,
    /// Columns of `[V, 1]` (and of `a`) processed together.
    pub column_tile: usize,
    /// Predicted flops of one head plus the shared kernel work.
    pub flops: f64,
    /// The shared part of `flops` (kernel spectra, correlation inverse FFTs, contractions).
    pub kernel_flops: f64,
    /// Peak bytes of one head plus the shared buffers.
    pub working_bytes: usize,
    /// Bytes of the shared buffers (kernel spectra, correlation accumulators).
    pub kernel_bytes: usize,
    pub eps: GradEps,
    pub out_rel: f64,
    pub heads: usize,
    pub approximation: Grad5,
    /// The a-priori rounding bound (each head is certified from its own norms, never larger).
    pub rounding: Grad5,
    /// float32 rounding of the results.
    pub output: Grad5,
    pub certified: Grad5,
    /// True when the a-priori certificate exceeds `eps` and the plan relies on each head's
    /// data-dependent rounding bound (approximation within `15/16` of each budget).
    pub deferred: bool,
}

impl BackwardPlan {
    /// A plain-text summary of why a gradient failed its budget.
    fn over_message(&self, c: &GradCertificate, what: &str) -> Option<String> {
        c.certified.over(&self.eps, 1.0, self.want).map(|i| {
            format!(
                "fast backward: {what} error bound of {} is {:.3e} (approximation {:.3e}, rounding {:.3e}, \
                 output dtype rounding {:.3e}), above its budget {:.3e}",
                GRAD_NAMES[i],
                c.certified.to_array()[i],
                c.approximation.to_array()[i],
                c.rounding.to_array()[i],
                c.output.to_array()[i],
                self.eps.to_array()[i]
            )
        })
    }
}

fn threads() -> usize {
    rayon::current_num_threads()
}

/// `(shared bytes, kernel spectra bytes, fixed per-head bytes, per-column bytes)`.
fn memory(
    shape: &FastShape,
    ns: usize,
    c: &ExpansionCounts,
    n: usize,
    want: Want,
) -> (usize, usize, usize, usize) {
    let FastShape { nq, nk, d, dv } = *shape;
    let glen = nq + nk - 1;
    let cols = dv + 1;
    let th = threads();
    let mul = |a: usize, b: usize| a.saturating_mul(b);
    let kernel = mul(mul(c.n_pairs, spectrum_blocks(n) * BLOCK), 16);
    let hacc = if want.dw || want.db { kernel } else { 0 };
    // seqs copy, factor, dw/db outputs, the contraction's per-thread chunk buffers.
    let shared = kernel
        .saturating_add(hacc)
        .saturating_add(mul(8, mul(2 * ns + 4, glen)))
        .saturating_add(mul(th, mul(8 * (ns + 4), 4096)));
    let fixed = [
        mul(8, mul(c.n_alpha, nq).saturating_add(mul(c.n_beta, nk))), // monomials
        mul(8, mul(mul(cols, d + 2), nq + nk)),                       // Y, E, numerators, a, dV
        mul(8, mul(nq + nk, d + dv + 1)),                             // outputs
        mul(th, mul(56, n).saturating_add(mul(8, nq.max(nk)))),       // FFT scratch
    ]
    .iter()
    .fold(0usize, |a, &b| a.saturating_add(b));
    let spectra_per_col = c.n_alpha + c.n_beta + if want.dw || want.db { c.n_beta } else { 0 };
    let per_col = mul(spectra_per_col, n / 2 + 1 + th * BLOCK).saturating_mul(16);
    (shared, kernel, fixed, per_col)
}

/// `p = 1 + ∫_0^x q` with `q` the degree-`g-1` Chebyshev economization of `e^x` on `[-r, r]`:
/// `p' = q` is then near-minimax, and `|p - e^x| = |∫_0^x (q - e^t) dt| <= ρ' |e^x - 1|`, so `p`
/// stays close too. The gradient certificate is dominated by `ρ'` (through `dS`), which this
/// family makes 3-4x smaller than the economization of `p` itself at equal degree.
pub fn integrated_chebyshev(r: f64, degree: usize) -> Result<Polynomial> {
    if degree == 0 {
        return taylor(r, 0);
    }
    let q = chebyshev(r, degree - 1)?;
    let mut coeffs = Vec::with_capacity(degree + 1);
    coeffs.push(1.0);
    coeffs.extend(q.coeffs.iter().enumerate().map(|(t, c)| c / (t + 1) as f64));
    let rho = certify_poly(&coeffs, r);
    Ok(Polynomial {
        kind: PolyKind::Chebyshev,
        degree,
        coeffs,
        rho,
        r,
    })
}

/// The plan for a given polynomial (no `eps` test): counts, cost, memory, certificate.
fn plan_for(
    req: &BackwardRequest,
    poly: &Polynomial,
    family: &'static str,
    limits: &FastLimits,
) -> Result<BackwardPlan> {
    let shape = req.shape;
    let FastShape { nq, nk, dv, .. } = shape;
    if nq == 0 || nk == 0 || nq > 1 << 40 || nk > 1 << 40 {
        return Err(Error::Value(format!(
            "fast backward plan: expected 1 <= nq, nk <= 2^40, got ({nq}, {nk})"
        )));
    }
    let want = req.want;
    let ns = req.support.len();
    let e = Expansion::build(
        req.support,
        shape.d,
        &poly.coeffs,
        1.0,
        true,
        limits.max_terms,
    )?;
    let counts = e.counts();
    let d_counts = if want.dw && poly.degree > 0 {
        let dc = derivative_coeffs(&poly.coeffs);
        Some(Expansion::build(req.support, shape.d, &dc, 1.0, true, limits.max_terms)?.counts())
    } else {
        None
    };
    let rho_d = derivative_rho(&poly.coeffs, req.bounds.r);
    let glen = nq + nk - 1;
    let n = fft_len(glen);
    let cols = dv + 1;
    let (shared, kernel_bytes, fixed, per_col) = memory(&shape, ns, &counts, n, want);
    let min_bytes = shared.saturating_add(fixed).saturating_add(per_col);
    let column_tile = match limits.max_working_bytes.checked_sub(min_bytes) {
        Some(spare) => {
            let fit = 1 + spare / per_col.max(1);
            let balanced = kernel_bytes.div_ceil(per_col.max(1)).max(4);
            let tile = fit.min(balanced).min(cols);
            cols.div_ceil(cols.div_ceil(tile))
        }
        None => 0,
    };
    let working_bytes = shared
        .saturating_add(fixed)
        .saturating_add(per_col.saturating_mul(column_tile.max(1)));

    let g = poly.degree as f64;
    let fft = fft_flops(n);
    let (na, nb, np) = (
        counts.n_alpha as f64,
        counts.n_beta as f64,
        counts.n_pairs as f64,
    );
    let (nqf, nkf, glf, cf, df) = (
        nq as f64,
        nk as f64,
        glen as f64,
        cols as f64,
        shape.d as f64,
    );
    let h = (n / 2 + 1) as f64;
    let mut kernel_flops = np * fft + counts.terms as f64 * glf * (g + 2.0);
    let hacc = want.dw || want.db;
    if hacc {
        kernel_flops += np * fft;
    }
    if want.db {
        kernel_flops += counts.terms as f64 * glf * (g + 2.0) + 2.0 * np * glf;
    }
    if let Some(dc) = &d_counts {
        kernel_flops +=
            2.0 * dc.terms as f64 * glf * (g + 1.0) + 2.0 * ns as f64 * dc.n_pairs as f64 * glf;
    }
    let pass = (na + nb) * cf * fft + np * cf * h * 8.0;
    let mut head_flops = 2.0 * pass
        + cf * (2.0 * na * nqf * (1.0 + df) + 2.0 * nb * nkf * (1.0 + df))
        + (na * nqf + nb * nkf) * g.max(1.0);
    if hacc {
        head_flops += nb * cf * fft + np * cf * h * 8.0;
    }

    let (approx, mag) = approximation_errors(poly.rho, rho_d, &req.grad, &req.psums);
    let terms = apriori_terms(
        &poly.coeffs,
        &req.bounds,
        &req.grad,
        &req.fstats,
        &counts,
        d_counts.as_ref(),
        nq,
        nk,
        n,
        cols * req.heads.max(1),
        want,
    );
    let rounding = rounding_errors(
        &terms,
        poly.rho,
        rho_d,
        req.bounds.r,
        &req.bounds,
        &req.grad,
        &req.psums,
        dv,
    )
    .masked(want);
    let approx = approx.masked(want);
    let output = mag
        .plus(req.eps)
        .zip(mag, |a, _| a * req.out_rel)
        .masked(want);
    let certified = approx.plus(rounding).plus(output);
    Ok(BackwardPlan {
        shape,
        bounds: req.bounds,
        grad: req.grad,
        fstats: req.fstats,
        psums: req.psums,
        poly: poly.clone(),
        family,
        rho_d,
        counts,
        d_counts,
        want,
        fft_len: n,
        column_tile,
        flops: kernel_flops + head_flops,
        kernel_flops,
        working_bytes,
        kernel_bytes: shared,
        eps: req.eps,
        out_rel: req.out_rel,
        heads: req.heads.max(1),
        approximation: approx,
        rounding,
        output,
        certified,
        deferred: false,
    })
}

fn memory_refusal(plan: &BackwardPlan, limits: &FastLimits) -> Error {
    Error::Approximation(format!(
        "fast backward: degree {} needs at least {:.3} GB ({} kernel spectra of {} frequencies{}, plus \
         {} spectra per column) but max_working_bytes is {:.3} GB",
        plan.poly.degree,
        plan.working_bytes as f64 / 1e9,
        plan.counts.n_pairs,
        plan.fft_len / 2 + 1,
        if plan.want.dw || plan.want.db {
            " and as many correlation spectra"
        } else {
            ""
        },
        plan.counts.n_alpha + plan.counts.n_beta,
        limits.max_working_bytes as f64 / 1e9
    ))
}

/// The least-degree plan whose certificate meets every wanted gradient's budget, or
/// `Error::Approximation` with the reason. With `forced`, that polynomial only (a test hook:
/// a fixed polynomial makes the approximate forward a fixed function of its inputs).
///
/// A degree is accepted when its a-priori certificate fits every budget, or when every
/// approximation error fits `15/16` of its budget and the cancellation floor of the forward
/// (as in [`super::fast_plan`]) fits `1/16` of the smallest: each head is then certified by its
/// data-dependent rounding bound before its FFTs run.
pub fn backward_plan(
    req: &BackwardRequest,
    limits: &FastLimits,
    forced: Option<&Polynomial>,
) -> Result<BackwardPlan> {
    let budgets = req.eps.masked(req.want).to_array();
    if budgets.iter().any(|e| e.is_nan() || *e < 0.0) {
        return Err(Error::Value(format!(
            "eps: expected values >= 0, got {:?}",
            req.eps
        )));
    }
    if req.eps.over(&Grad5::splat(0.0), 1.0, req.want).is_none() {
        return Err(Error::Approximation(
            "fast backward: eps = 0 asks for exact gradients; the fast method is an approximation"
                .into(),
        ));
    }
    for (name, x) in [
        ("R", req.bounds.r),
        ("R_abs", req.bounds.r_abs),
        ("max |v|", req.bounds.v_max),
        ("max |dout|", req.grad.do_max),
    ] {
        if !x.is_finite() {
            return Err(Error::Value(format!(
                "{name}: expected a finite bound, got {x}"
            )));
        }
    }
    let min_eps = [
        req.eps.dq,
        req.eps.dk,
        req.eps.dv,
        if req.want.dw {
            req.eps.dw
        } else {
            f64::INFINITY
        },
        if req.want.db {
            req.eps.db
        } else {
            f64::INFINITY
        },
    ]
    .into_iter()
    .fold(f64::INFINITY, f64::min);
    let accept = |plan: &mut BackwardPlan| -> Option<String> {
        // Certified a priori: accepted as it is.
        plan.certified.over(&plan.eps, 1.0, plan.want)?;
        let approx_out = plan.approximation.plus(plan.output);
        if let Some(i) = approx_out.over(&plan.eps, 15.0 / 16.0, plan.want) {
            return Some(format!(
                "at degree {} the {} approximation bound (with the output rounding) is {:.3e}, above \
                 15/16 of its budget {:.3e} (R = {:.4}, relative errors of p and p': {:.3e}, {:.3e})",
                plan.poly.degree,
                GRAD_NAMES[i],
                approx_out.to_array()[i],
                plan.eps.to_array()[i],
                plan.bounds.r,
                plan.poly.rho,
                plan.rho_d
            ));
        }
        let floor = 2.0
            * plan.bounds.v_max.max(1.0)
            * fft_relative_error(plan.fft_len)
            * plan.poly.abs_eval(plan.bounds.r)
            * plan.bounds.r.exp()
            / (1.0 - plan.poly.rho);
        if floor > min_eps / 16.0 {
            return Some(format!(
                "at degree {} the rounding floor {floor:.3e} (a-priori rounding {:.3e}) leaves no room \
                 in eps = {min_eps:.3e}; double precision cannot certify it here",
                plan.poly.degree,
                plan.rounding.max_entry()
            ));
        }
        plan.deferred = true;
        None
    };
    if let Some(poly) = forced {
        if poly.r.is_nan() || poly.r < req.bounds.r {
            return Err(Error::Value(format!(
                "polynomial: certified on [-{}, {}], but the scores need R = {}",
                poly.r, poly.r, req.bounds.r
            )));
        }
        let family = match poly.kind {
            PolyKind::Taylor => "taylor",
            PolyKind::Chebyshev => "chebyshev",
        };
        let mut plan = plan_for(req, poly, family, limits)?;
        if let Some(why) = accept(&mut plan) {
            return Err(Error::Approximation(why));
        }
        if plan.column_tile == 0 {
            return Err(memory_refusal(&plan, limits));
        }
        return Ok(plan);
    }
    let max_degree = limits.max_degree.min(MAX_DEGREE);
    let mut why = String::from("no degree tried");
    for degree in 0..=max_degree {
        let count = term_count(req.support.len(), degree);
        if count > limits.max_terms as f64 {
            why = format!(
                "degree {degree} would need C({}, {degree}) = {count:.3e} terms, more than the limit of {}",
                req.support.len() + degree,
                limits.max_terms
            );
            break;
        }
        let (mut floor_hit, mut tried) = (0, 0);
        let r = req.bounds.r;
        // Chebyshev families on the snapped radius first (shared kernel spectra across calls,
        // see `fast_plan`), then on R itself.
        let snapped = snap_radius(r);
        for which in 0..5 {
            let (poly, family) = match which {
                0 => (taylor(r, degree)?, "taylor"),
                1 => (
                    integrated_chebyshev(snapped, degree)?,
                    "integrated-chebyshev",
                ),
                2 => (chebyshev(snapped, degree)?, "chebyshev"),
                3 if snapped != r => (integrated_chebyshev(r, degree)?, "integrated-chebyshev"),
                4 if snapped != r => (chebyshev(r, degree)?, "chebyshev"),
                _ => continue,
            };
            tried += 1;
            // Cheap screen before enumerating the expansion.
            let rho_d = derivative_rho(&poly.coeffs, r);
            let (approx, _) = approximation_errors(poly.rho, rho_d, &req.grad, &req.psums);
            if let Some(i) = approx.over(&req.eps, 15.0 / 16.0, req.want) {
                why = format!(
                    "at degree {degree} the {} approximation bound is {:.3e}, above 15/16 of its budget \
                     {:.3e} (R = {:.4}, relative errors of p and p': {:.3e}, {:.3e})",
                    GRAD_NAMES[i],
                    approx.to_array()[i],
                    req.eps.to_array()[i],
                    req.bounds.r,
                    poly.rho,
                    rho_d
                );
                continue;
            }
            let mut plan = plan_for(req, &poly, family, limits)?;
            match accept(&mut plan) {
                None => {
                    if plan.column_tile == 0 {
                        return Err(memory_refusal(&plan, limits));
                    }
                    return Ok(plan);
                }
                Some(w) => {
                    if w.contains("floor") {
                        floor_hit += 1;
                    }
                    why = w;
                }
            }
        }
        if floor_hit == tried {
            break;
        }
    }
    Err(Error::Approximation(format!(
        "fast backward cannot certify the gradients to eps: {why}"
    )))
}

/// The certificate of one head's gradients.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct GradCertificate {
    pub approximation: Grad5,
    pub rounding: Grad5,
    pub output: Grad5,
    pub certified: Grad5,
}

/// What the fast backward did and what it guarantees (per head).
#[derive(Clone, Debug, PartialEq)]
pub struct BackwardReport {
    pub degree: usize,
    pub kind: PolyKind,
    pub r: f64,
    pub rho: f64,
    pub rho_d: f64,
    pub terms: usize,
    pub n_alpha: usize,
    pub n_beta: usize,
    pub n_pairs: usize,
    pub fft_len: usize,
    pub cert: GradCertificate,
}

/// One head's gradients (`dq`: `nq x d`, `dk`: `nk x d`, `dv`: `nk x dv`) and the approximate
/// forward they are the gradient of (`out`, `lse`).
#[derive(Clone, Debug)]
pub struct HeadGrads {
    pub dq: Array2<f64>,
    pub dk: Array2<f64>,
    pub dv: Array2<f64>,
    pub out: Array2<f64>,
    pub lse: Array1<f64>,
    pub cert: GradCertificate,
}

/// The correlation spectra `Σ_heads Σ_c conj(FFT(q^α a_c)) ⊙ FFT(k^β b_c)` of every pair,
/// `[block][pair]` like the kernel spectra; after [`BackwardKernel::finish`] inverts them, each
/// pair's blocks hold `H_p(g)` as reals (block `b` holds `g` in `64 b .. 64 b + 64`).
pub struct CorrelationAccumulator {
    blocks: Vec<Block>,
}

/// `(α or β index, multiplicity, index of the multi-index minus e_l)` per coordinate `l`.
type Minus = Vec<(usize, f64, usize)>;

/// What the fast backward's kernels depend on and nothing else: the polynomial's coefficients
/// (and, for dw, its derivative's expansion), the support, the diagonal sequences, the mask/bias
/// factor, the scale and `(nq, nk, d)` — not a plan's data-dependent bounds. Shared (`Arc`)
/// across calls through [`super::cache`]; a [`BackwardKernel`] pairs it with one call's plan.
pub struct BackwardSpectra {
    shape: (usize, usize, usize),
    coeffs: Vec<f64>,
    /// Built with the derivative's expansion (dw).
    with_dw: bool,
    toeplitz: ToeplitzPlan,
    expansion: Expansion,
    dexp: Option<Expansion>,
    terms: TermTable,
    dterms: Option<TermTable>,
    spectra: Vec<Block>,
    norms: Vec<PairNorms>,
    pair_inf: Vec<f64>,
    by_alpha: Vec<Vec<usize>>,
    by_beta: Vec<Vec<usize>>,
    alpha_minus: Vec<Minus>,
    beta_minus: Vec<Minus>,
    d_inf: Vec<f64>,
    links: Vec<usize>,
    d_max_terms: usize,
    support: Vec<(usize, usize)>,
    scale: f64,
    w_norms: WNorms,
    masses: Vec<f64>,
    seqs: Vec<f64>,
    factor: Vec<f64>,
    stats: FastBounds,
    fstats: FactorStats,
}

/// The per-call half of the fast backward: a call's certified plan and the (possibly cached,
/// shared) [`BackwardSpectra`] for its polynomial. Build once, apply to every head; each head is
/// checked against *this* plan's bounds and certified from its own data.
pub struct BackwardKernel {
    plan: BackwardPlan,
    s: Arc<BackwardSpectra>,
}

/// For each multi-index, `(l, μ_l, index of μ - e_l)` for every `l` with `μ_l > 0`.
fn minus_table(list: &[Vec<u16>]) -> Result<Vec<Minus>> {
    let index: HashMap<&[u16], usize> = list
        .iter()
        .enumerate()
        .map(|(i, m)| (m.as_slice(), i))
        .collect();
    list.iter()
        .map(|mu| {
            let mut out = Vec::new();
            for (l, &m) in mu.iter().enumerate() {
                if m > 0 {
                    let mut lower = mu.clone();
                    lower[l] -= 1;
                    let idx = *index.get(lower.as_slice()).ok_or_else(|| {
                        Error::Value("fast backward: expansion is missing a lower monomial".into())
                    })?;
                    out.push((l, m as f64, idx));
                }
            }
            Ok(out)
        })
        .collect()
}

/// Terms of an expansion regrouped by its pairs: `(γ_τ, [(s, m_s)])` per pair. Built by the same
/// enumeration as [`Expansion::build`], matched to the expansion's pairs through the
/// multi-indices `(α, β)` (so nothing depends on the expansion's internal order).
struct TermTable {
    pairs: Vec<Vec<Term>>,
}

/// `(γ_τ, [(s, m_s)])`.
type Term = (f64, Vec<(usize, u16)>);

impl TermTable {
    fn new(e: &Expansion, support: &[(usize, usize)], coeffs: &[f64], scale: f64) -> Result<Self> {
        let (ns, d, degree) = (support.len(), e.d, coeffs.len().saturating_sub(1));
        let a_ix: HashMap<&[u16], usize> = e
            .alphas
            .iter()
            .enumerate()
            .map(|(i, m)| (m.as_slice(), i))
            .collect();
        let b_ix: HashMap<&[u16], usize> = e
            .betas
            .iter()
            .enumerate()
            .map(|(i, m)| (m.as_slice(), i))
            .collect();
        let p_ix: HashMap<(usize, usize), usize> = e
            .pairs
            .iter()
            .enumerate()
            .map(|(p, pr)| ((pr.alpha, pr.beta), p))
            .collect();
        let mut fact = vec![1.0f64; degree + 1];
        for t in 1..=degree {
            fact[t] = fact[t - 1] * t as f64;
        }
        let mut pairs = vec![Vec::new(); e.pairs.len()];
        for t in 0..=degree {
            if ns == 0 && t > 0 {
                break;
            }
            let mut seq = vec![0usize; t];
            loop {
                let mut fs: Vec<(usize, u16)> = Vec::new();
                for &x in &seq {
                    match fs.last_mut() {
                        Some(last) if last.0 == x => last.1 += 1,
                        _ => fs.push((x, 1)),
                    }
                }
                let (mut alpha, mut beta) = (vec![0u16; d], vec![0u16; d]);
                let mut multinomial = fact[t];
                for &(x, m) in &fs {
                    alpha[support[x].0] += m;
                    beta[support[x].1] += m;
                    multinomial /= fact[m as usize];
                }
                let gamma = coeffs[t] * multinomial * scale.powi(t as i32);
                let p = a_ix
                    .get(alpha.as_slice())
                    .zip(b_ix.get(beta.as_slice()))
                    .and_then(|(&a, &b)| p_ix.get(&(a, b)))
                    .ok_or_else(|| Error::Value("fast backward: a term without its pair".into()))?;
                pairs[*p].push((gamma, fs));
                match (0..t).rev().find(|&i| seq[i] + 1 < ns) {
                    Some(i) => {
                        let v = seq[i] + 1;
                        seq[i..].iter_mut().for_each(|x| *x = v);
                    }
                    None => break,
                }
            }
        }
        Ok(TermTable { pairs })
    }

    /// The kernel `C_p(g) = factor[g] Σ_τ γ_τ Π_s w_s(g)^{m_s}` for the diagonals
    /// `g0 .. g0 + out.len()`, with `w_s(g) = seqs[s * stride + g]` and `factor` indexed from
    /// `g0`; returns `Σ_g Σ_τ |γ_τ c_τ(g)|`. Powers by repeated products over cache-sized chunks
    /// (`|τ| <= degree` roundings per term, as `powi`).
    #[allow(clippy::too_many_arguments)]
    fn kernel(
        &self,
        p: usize,
        seqs: &[f64],
        stride: usize,
        g0: usize,
        factor: &[f64],
        out: &mut [f64],
        tmp: &mut [f64],
    ) -> f64 {
        const CH: usize = 1024;
        let len = out.len();
        let mut mass = 0.0;
        out.iter_mut().for_each(|x| *x = 0.0);
        for c0 in (0..len).step_by(CH) {
            let c1 = (c0 + CH).min(len);
            let o = &mut out[c0..c1];
            let t = &mut tmp[..c1 - c0];
            for (gamma, fs) in &self.pairs[p] {
                t.iter_mut()
                    .zip(&factor[c0..c1])
                    .for_each(|(x, f)| *x = gamma * f);
                for &(x, m) in fs {
                    let w = &seqs[x * stride + g0 + c0..x * stride + g0 + c1];
                    for _ in 0..m {
                        t.iter_mut().zip(w).for_each(|(a, b)| *a *= b);
                    }
                }
                mass += t.iter().map(|x| x.abs()).sum::<f64>();
                o.iter_mut().zip(t.iter()).for_each(|(a, b)| *a += b);
            }
        }
        mass
    }
}

impl BackwardSpectra {
    /// Expands the polynomial `coeffs` (and, with `with_dw`, its derivative) over `support` and
    /// computes the kernel spectra for `nq x nk` heads of dimension `d`.
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        coeffs: &[f64],
        (nq, nk, d): (usize, usize, usize),
        with_dw: bool,
        support: &[(usize, usize)],
        seqs: ArrayView2<f64>,
        factor: &[f64],
        scale: f64,
        max_terms: usize,
    ) -> Result<Self> {
        let (stats, fstats) = backward_factor_stats(nq, nk, support, seqs, factor, scale)?;
        let glen = nq + nk - 1;
        let w_norms = WNorms::new(d, support, seqs, factor)?;
        let masses = row_masses(nq, nk, factor);
        let expansion = Expansion::build(support, d, coeffs, scale, true, max_terms)?;
        let terms = TermTable::new(&expansion, support, coeffs, scale)?;
        let toeplitz = ToeplitzPlanner::new().plan(nq, nk)?;
        let (nblk, np) = (spectrum_blocks(toeplitz.fft_len()), expansion.pairs.len());
        let seqs_c: Vec<f64> = seqs.iter().copied().collect();
        let mut spectra = try_filled(nblk.saturating_mul(np), ZERO_BLOCK, "kernel spectra")?;
        let up = 1.0 + (glen + 2) as f64 * U;
        // Kernels and their spectra, in parallel over pairs (fixed per-pair work, so the result
        // does not depend on the thread count); scattered into blocks in batches.
        let mut norms = Vec::with_capacity(np);
        let mut pair_inf = Vec::with_capacity(np);
        let batch = 4 * threads().max(1);
        for p0 in (0..np).step_by(batch) {
            let p1 = (p0 + batch).min(np);
            let part: Vec<Result<(Vec<C64>, PairNorms, f64)>> = (p0..p1)
                .into_par_iter()
                .map_init(
                    || (toeplitz.make_scratch(), vec![0.0; glen], vec![0.0; glen]),
                    |(ws, kern, tmp), p| {
                        let mass = terms.kernel(p, &seqs_c, glen, 0, factor, kern, tmp);
                        let l1 = kern.iter().map(|x| x.abs()).sum::<f64>();
                        let l2 = kern.iter().map(|x| x * x).sum::<f64>().sqrt();
                        let inf = max_abs(kern.iter());
                        let mut spec = vec![C64::new(0.0, 0.0); toeplitz.spectrum_len()];
                        toeplitz.kernel_spectrum(kern, &mut spec, ws)?;
                        Ok((spec, [l1 * up, l2 * up, mass * up], inf * up))
                    },
                )
                .collect();
            for (i, r) in part.into_iter().enumerate() {
                let (spec, nrm, inf) = r?;
                scatter(std::slice::from_ref(&spec), &mut spectra[p0 + i..], np);
                norms.push(nrm);
                pair_inf.push(inf);
            }
        }
        let (na, nb) = (expansion.alphas.len(), expansion.betas.len());
        let mut by_alpha = vec![Vec::new(); na];
        let mut by_beta = vec![Vec::new(); nb];
        for (p, pr) in expansion.pairs.iter().enumerate() {
            by_alpha[pr.alpha].push(p);
            by_beta[pr.beta].push(p);
        }
        let alpha_minus = minus_table(&expansion.alphas)?;
        let beta_minus = minus_table(&expansion.betas)?;
        let (mut dexp, mut d_inf, mut links, mut d_max_terms) = (None, Vec::new(), Vec::new(), 0);
        let mut dterms = None;
        if with_dw && coeffs.len() > 1 {
            let dc = derivative_coeffs(coeffs);
            let de = Expansion::build(support, d, &dc, scale, true, max_terms)?;
            let dt = TermTable::new(&de, support, &dc, scale)?;
            let a_ix: HashMap<&[u16], usize> = expansion
                .alphas
                .iter()
                .enumerate()
                .map(|(i, m)| (m.as_slice(), i))
                .collect();
            let b_ix: HashMap<&[u16], usize> = expansion
                .betas
                .iter()
                .enumerate()
                .map(|(i, m)| (m.as_slice(), i))
                .collect();
            let pair_ix: HashMap<(usize, usize), usize> = expansion
                .pairs
                .iter()
                .enumerate()
                .map(|(p, pr)| ((pr.alpha, pr.beta), p))
                .collect();
            let ns = support.len();
            links = vec![0usize; de.pairs.len() * ns];
            for (pd, pr) in de.pairs.iter().enumerate() {
                for (s, &(l1, l2)) in support.iter().enumerate() {
                    let mut a = de.alphas[pr.alpha].clone();
                    let mut b = de.betas[pr.beta].clone();
                    a[l1] += 1;
                    b[l2] += 1;
                    let p = a_ix
                        .get(a.as_slice())
                        .zip(b_ix.get(b.as_slice()))
                        .and_then(|(&ai, &bi)| pair_ix.get(&(ai, bi)))
                        .ok_or_else(|| {
                            Error::Value("fast backward: derivative pair without a parent".into())
                        })?;
                    links[pd * ns + s] = *p;
                }
            }
            d_inf = (0..de.pairs.len())
                .into_par_iter()
                .map_init(
                    || (vec![0.0; glen], vec![0.0; glen]),
                    |(kern, tmp), pd| {
                        dt.kernel(pd, &seqs_c, glen, 0, factor, kern, tmp);
                        max_abs(kern.iter()) * up
                    },
                )
                .collect();
            d_max_terms = de.counts().max_terms_per_pair;
            dexp = Some(de);
            dterms = Some(dt);
        }
        Ok(BackwardSpectra {
            shape: (nq, nk, d),
            coeffs: coeffs.to_vec(),
            with_dw,
            toeplitz,
            expansion,
            dexp,
            terms,
            dterms,
            spectra,
            norms,
            pair_inf,
            by_alpha,
            by_beta,
            alpha_minus,
            beta_minus,
            d_inf,
            links,
            d_max_terms,
            support: support.to_vec(),
            scale,
            w_norms,
            masses,
            seqs: seqs_c,
            factor: factor.to_vec(),
            stats,
            fstats,
        })
    }

    /// Bytes held (kernel spectra, norms, the copies of the sequences and the factor, the FFT
    /// plan's buffers, the expansions' tables).
    pub fn bytes(&self) -> usize {
        let idx = |l: &[Vec<u16>]| l.iter().map(|m| 24 + 2 * m.len()).sum::<usize>();
        let exp = |e: &Expansion| {
            idx(&e.alphas) + idx(&e.betas) + 64 * e.pairs.len() + 96 * e.counts().terms
        };
        let minus = |t: &[Minus]| t.iter().map(|m| 24 + 24 * m.len()).sum::<usize>();
        let table = |t: &TermTable| {
            t.pairs
                .iter()
                .map(|p| 24 + p.iter().map(|x| 40 + 16 * x.1.len()).sum::<usize>())
                .sum::<usize>()
        };
        std::mem::size_of::<Block>() * self.spectra.len()
            + 32 * self.norms.len()
            + 8 * (self.masses.len() + self.seqs.len() + self.factor.len())
            + 8 * (self.d_inf.len() + self.links.len())
            + 16 * self.toeplitz.fft_len()
            + exp(&self.expansion)
            + self.dexp.as_ref().map_or(0, exp)
            + table(&self.terms)
            + self.dterms.as_ref().map_or(0, table)
            + minus(&self.alpha_minus)
            + minus(&self.beta_minus)
            + 8 * (self.by_alpha.len() + self.by_beta.len() + self.norms.len())
    }
}

/// Checks the inputs of a backward kernel; returns the factor's statistics.
fn backward_factor_stats(
    nq: usize,
    nk: usize,
    support: &[(usize, usize)],
    seqs: ArrayView2<f64>,
    factor: &[f64],
    scale: f64,
) -> Result<(FastBounds, FactorStats)> {
    if nq == 0 || nk == 0 {
        return Err(Error::Value(format!(
            "fast backward kernel: expected nq, nk >= 1, got ({nq}, {nk})"
        )));
    }
    let glen = nq + nk - 1;
    if factor.len() != glen || factor.iter().any(|f| !(f.is_finite() && *f >= 0.0)) {
        return Err(Error::Value(format!(
            "factor: expected {glen} finite values >= 0, got {} values",
            factor.len()
        )));
    }
    if seqs.shape() != [support.len(), glen] || seqs.iter().any(|x| !x.is_finite()) {
        return Err(Error::Value(format!(
            "seqs: expected finite values of shape ({}, {glen}), got {:?}",
            support.len(),
            seqs.shape()
        )));
    }
    if !scale.is_finite() {
        return Err(Error::Value(format!(
            "scale: expected a finite value, got {scale}"
        )));
    }
    let zero = crate::poly::ScoreBound {
        r: 0.0,
        r_abs: 0.0,
        spectral: 0.0,
        blocks: 0.0,
    };
    let stats = FastBounds::from_parts(zero, 0.0, nq, nk, factor);
    Ok((stats, FactorStats::new(nq, nk, factor)?))
}

/// Refuses a mask/bias factor outside the bounds `plan` certified.
fn check_backward_factor(
    plan: &BackwardPlan,
    stats: &FastBounds,
    fstats: &FactorStats,
) -> Result<()> {
    let pb = &plan.bounds;
    if stats.factor_sum > pb.factor_sum
        || stats.factor_norm2 > pb.factor_norm2
        || stats.min_row_mass < pb.min_row_mass
        || !fstats.within(&plan.fstats)
    {
        return Err(Error::Approximation(
            "fast backward kernel: the mask/bias factor is outside the bounds its plan certified"
                .into(),
        ));
    }
    Ok(())
}

impl BackwardKernel {
    /// Expands `plan.poly` (and `p'` for dw) over `support` and computes the kernel spectra.
    /// `seqs` (`|S| x glen`) and `factor` must be those the plan's bounds came from.
    pub fn new(
        plan: &BackwardPlan,
        support: &[(usize, usize)],
        seqs: ArrayView2<f64>,
        factor: &[f64],
        scale: f64,
        limits: &FastLimits,
    ) -> Result<Self> {
        let FastShape { nq, nk, d, .. } = plan.shape;
        // The cheap checks first, so a mismatched factor is refused before any FFT.
        let (stats, fstats) = backward_factor_stats(nq, nk, support, seqs, factor, scale)?;
        check_backward_factor(plan, &stats, &fstats)?;
        let s = BackwardSpectra::build(
            &plan.poly.coeffs,
            (nq, nk, d),
            plan.want.dw,
            support,
            seqs,
            factor,
            scale,
            limits.max_terms,
        )?;
        Self::with_spectra(plan, Arc::new(s))
    }

    /// Pairs `plan` with spectra built for its polynomial, shape and dw-ness (e.g. from the
    /// cache); refuses others, or a mask/bias factor outside the plan's bounds.
    pub fn with_spectra(plan: &BackwardPlan, s: Arc<BackwardSpectra>) -> Result<Self> {
        let FastShape { nq, nk, d, .. } = plan.shape;
        let same_poly = s.coeffs.len() == plan.poly.coeffs.len()
            && s.coeffs
                .iter()
                .zip(&plan.poly.coeffs)
                .all(|(a, b)| a.to_bits() == b.to_bits());
        if s.shape != (nq, nk, d) || !same_poly || s.with_dw != plan.want.dw {
            return Err(Error::Value(
                "fast backward kernel: spectra of another polynomial, shape or gradient set than \
                 the plan's"
                    .into(),
            ));
        }
        check_backward_factor(plan, &s.stats, &s.fstats)?;
        Ok(BackwardKernel {
            plan: plan.clone(),
            s,
        })
    }

    /// The spectra this kernel applies (shared with the cache and other calls).
    pub fn spectra(&self) -> &Arc<BackwardSpectra> {
        &self.s
    }

    pub fn plan(&self) -> &BackwardPlan {
        &self.plan
    }

    pub fn expansion(&self) -> &Expansion {
        &self.s.expansion
    }

    pub fn report(&self, cert: GradCertificate) -> BackwardReport {
        let p = &self.plan;
        let c = &p.counts;
        BackwardReport {
            degree: p.poly.degree,
            kind: p.poly.kind,
            r: p.poly.r,
            rho: p.poly.rho,
            rho_d: p.rho_d,
            terms: c.terms,
            n_alpha: c.n_alpha,
            n_beta: c.n_beta,
            n_pairs: c.n_pairs,
            fft_len: self.s.toeplitz.fft_len(),
            cert,
        }
    }

    /// A zeroed correlation accumulator (for dw/dbias), shared by the heads of this kernel.
    pub fn accumulator(&self) -> Result<CorrelationAccumulator> {
        let n = spectrum_blocks(self.s.toeplitz.fft_len()) * self.s.expansion.pairs.len();
        Ok(CorrelationAccumulator {
            blocks: try_filled(n, ZERO_BLOCK, "correlation spectra")?,
        })
    }

    /// The head's own bounds and certificate, from the norms of its data, before any FFT.
    #[allow(clippy::too_many_arguments)]
    fn certify(
        &self,
        q: ArrayView2<f64>,
        k: ArrayView2<f64>,
        v: ArrayView2<f64>,
        dout: ArrayView2<f64>,
        qa: &[f64],
        kb: &[f64],
        psums: Option<&PSums>,
    ) -> Result<GradCertificate> {
        let FastShape { nq, nk, dv, .. } = self.plan.shape;
        let head = self.s.w_norms.bound(&self.s.support, q, k, self.s.scale);
        let v_max = max_abs(v.iter());
        let pb = &self.plan.bounds;
        let gb = GradBounds::new(
            &self.s.w_norms,
            &self.s.support,
            self.s.scale,
            q,
            k,
            v,
            dout,
        );
        let ps = match psums {
            Some(p) => *p,
            None => {
                let seqs =
                    ArrayView2::from_shape((self.s.support.len(), nq + nk - 1), &self.s.seqs)
                        .map_err(|e| Error::Value(format!("seqs: {e}")))?;
                let want = self.plan.want;
                PSums::from_data(
                    q,
                    k,
                    self.s.scale,
                    &self.s.support,
                    seqs,
                    &self.s.factor,
                    self.plan.bounds.r,
                    &self.plan.fstats,
                    want.dw || want.db,
                )?
            }
        };
        if head.r > pb.r
            || head.r_abs > pb.r_abs
            || v_max > pb.v_max
            || !gb.within(&self.plan.grad)
            || !ps.within(&self.plan.psums)
        {
            return Err(Error::Approximation(format!(
                "fast backward: this head (R = {:.4}, max|v| = {:.4}, max|dout| = {:.4}) exceeds the \
                 bounds its plan certified (R = {:.4}, max|v| = {:.4}, max|dout| = {:.4})",
                head.r, v_max, gb.do_max, pb.r, pb.v_max, self.plan.grad.do_max
            )));
        }
        let up_q = 1.0 + (nq + 2) as f64 * U;
        let up_k = 1.0 + (nk + 2) as f64 * U;
        let norms3 = |r: &[f64], up: f64| -> BetaNorms {
            let l1 = r.iter().map(|x| x.abs()).sum::<f64>() * up;
            let l2 = r.iter().map(|x| x * x).sum::<f64>().sqrt() * up;
            [l1, l2, max_abs(r.iter())]
        };
        let q_norms: Vec<BetaNorms> = qa.par_chunks_exact(nq).map(|r| norms3(r, up_q)).collect();
        let k_norms: Vec<BetaNorms> = kb.par_chunks_exact(nk).map(|r| norms3(r, up_k)).collect();
        let q_max: Vec<f64> = q_norms.iter().map(|x| x[2]).collect();
        let d = self.plan.shape.d;
        let minus_max = |table: &[Minus], norms: &[BetaNorms]| -> Vec<Vec<f64>> {
            let mut out = vec![vec![0.0; table.len()]; d];
            for (mu, entries) in table.iter().enumerate() {
                for &(l, m, idx) in entries {
                    out[l][mu] = m * norms[idx][2] * (1.0 + 2.0 * U);
                }
            }
            out
        };
        let dq_max = minus_max(&self.s.alpha_minus, &q_norms);
        let dk_max = minus_max(&self.s.beta_minus, &k_norms);
        let kn = KernelNorms {
            e: &self.s.expansion,
            pair_norms: &self.s.norms,
            pair_inf: &self.s.pair_inf,
            by_alpha: &self.s.by_alpha,
            by_beta: &self.s.by_beta,
            d_inf: &self.s.d_inf,
            links: &self.s.links,
            d_pairs: self.s.dexp.as_ref().map_or(0, |e| e.pairs.len()),
            d_max_terms: self.s.d_max_terms,
            ns: self.s.support.len(),
            fft_len: self.s.toeplitz.fft_len(),
            nq,
            nk,
            scale: self.s.scale,
            h_terms: (dv + 1) * self.plan.heads,
        };
        let mn = MonomialNorms {
            q_max: &q_max,
            q_norms: &q_norms,
            k_norms: &k_norms,
            dq_max: &dq_max,
            dk_max: &dk_max,
        };
        let want = self.plan.want;
        let terms: RoundingTerms =
            data_terms(&kn, &mn, &self.plan.poly.coeffs, head.r_abs, &gb, want);
        let fb = FastBounds {
            r: head.r,
            r_abs: head.r_abs,
            v_max,
            ..*pb
        };
        let (rho, rho_d) = (self.plan.poly.rho, self.plan.rho_d);
        let (approx, mag) = approximation_errors(rho, rho_d, &gb, &ps);
        let rounding = rounding_errors(&terms, rho, rho_d, head.r, &fb, &gb, &ps, dv).masked(want);
        let approx = approx.masked(want);
        // Both the head's and the plan's certificates are valid: keep the smaller per gradient.
        let approx = approx.zip(self.plan.approximation, f64::min);
        let rounding = rounding.zip(self.plan.rounding, f64::min);
        let output = mag
            .plus(self.plan.eps)
            .zip(mag, |a, _| a * self.plan.out_rel)
            .masked(want)
            .zip(self.plan.output, f64::min);
        let certified = approx.plus(rounding).plus(output);
        let cert = GradCertificate {
            approximation: approx,
            rounding,
            output,
            certified,
        };
        if let Some(msg) = self.plan.over_message(&cert, "this head's") {
            return Err(Error::Approximation(format!(
                "{msg}; double precision cannot certify it here"
            )));
        }
        Ok(cert)
    }

    /// One head: `q` (`nq x d`), `k` (`nk x d`), `v` (`nk x dv`), `dout` (`nq x dv`). With dw or
    /// dbias wanted, `corr` must be the kernel's [`CorrelationAccumulator`] (shared by the heads,
    /// applied one after another), and [`BackwardKernel::finish`] turns it into dw and dbias.
    /// `psums`: the head's [`PSums`] if already computed (else computed here).
    pub fn apply(
        &self,
        q: ArrayView2<f64>,
        k: ArrayView2<f64>,
        v: ArrayView2<f64>,
        dout: ArrayView2<f64>,
        corr: Option<&mut CorrelationAccumulator>,
        psums: Option<&PSums>,
    ) -> Result<HeadGrads> {
        let FastShape { nq, nk, d, dv } = self.plan.shape;
        for (name, x, rows, cols) in [
            ("q", &q, nq, d),
            ("k", &k, nk, d),
            ("v", &v, nk, dv),
            ("dout", &dout, nq, dv),
        ] {
            if x.shape() != [rows, cols] {
                return Err(Error::Value(format!(
                    "{name}: expected shape ({rows}, {cols}), got {:?}",
                    x.shape()
                )));
            }
            if x.iter().any(|y| !y.is_finite()) {
                return Err(Error::Value(format!(
                    "{name}: expected finite values, got inf or nan"
                )));
            }
        }
        let want = self.plan.want;
        if (want.dw || want.db) != corr.is_some() {
            return Err(Error::Value(
                "fast backward: a correlation accumulator is needed exactly when dw or dbias is wanted"
                    .into(),
            ));
        }
        let e = &self.s.expansion;
        let (qa, kb) = (
            Expansion::monomials(&e.alphas, q),
            Expansion::monomials(&e.betas, k),
        );
        let not_contiguous = || Error::Value("monomials: expected a contiguous array".into());
        let (qa, kb) = (
            qa.as_slice().ok_or_else(not_contiguous)?,
            kb.as_slice().ok_or_else(not_contiguous)?,
        );
        let cert = self.certify(q, k, v, dout, qa, kb, psums)?;
        let cols = dv + 1;
        // b = [V, 1], column-major.
        let mut bt = vec![1.0; cols * nk];
        for (j, row) in v.rows().into_iter().enumerate() {
            for c in 0..dv {
                bt[c * nk + j] = row[c];
            }
        }
        // Spectra buffers shared by the two passes (pass 1: key spectra in `nb_buf`, per-α
        // accumulators in `na_buf`; pass 2: query spectra in `na_buf`, per-β accumulators in
        // `nb_buf`), so fresh pages are faulted in once.
        let h = self.s.toeplitz.spectrum_len();
        let tile = self.plan.column_tile.clamp(1, cols);
        let zero = C64::new(0.0, 0.0);
        let (na, nb) = (e.alphas.len(), e.betas.len());
        let mut na_buf = try_filled(h.saturating_mul(na).saturating_mul(tile), zero, "spectra")?;
        let mut nb_buf = try_filled(h.saturating_mul(nb).saturating_mul(tile), zero, "spectra")?;
        // Pass 1: numerators (cols x nq) and the dq products Y (cols x d x nq).
        let (numer, y) = self.pass1(qa, kb, &bt, &mut nb_buf, &mut na_buf)?;
        let mut out = Array2::<f64>::zeros((nq, dv));
        let mut lse = Array1::<f64>::from_elem(nq, f64::NEG_INFINITY);
        let mut at = vec![0.0; cols * nq];
        let mut dq = Array2::<f64>::zeros((nq, d));
        for i in 0..nq {
            if self.s.masses[i] <= 0.0 {
                continue; // no visible key: no gradient flows through this row
            }
            let den = numer[dv * nq + i];
            if !(den.is_finite() && den > 0.0) {
                return Err(Error::Approximation(format!(
                    "fast backward: row {i} has denominator {den:e} despite the certificate; \
                     use the exact method"
                )));
            }
            let mut dsum = 0.0;
            for c in 0..dv {
                let o = numer[c * nq + i] / den;
                out[[i, c]] = o;
                dsum += dout[[i, c]] * o;
                at[c * nq + i] = dout[[i, c]] / den;
            }
            at[dv * nq + i] = -dsum / den;
            lse[i] = den.ln();
            for l in 0..d {
                let mut s = 0.0;
                for c in 0..cols {
                    s += at[c * nq + i] * y[(c * d + l) * nq + i];
                }
                dq[[i, l]] = s;
            }
        }
        drop(y);
        // Pass 2: dV (dv x nk), the dk products E (cols x d x nk), the correlations.
        let (dvt, et) = self.pass2(qa, kb, &at, &bt, corr, &mut na_buf, &mut nb_buf)?;
        let mut dk = Array2::<f64>::zeros((nk, d));
        let mut dvv = Array2::<f64>::zeros((nk, dv));
        for j in 0..nk {
            for l in 0..d {
                let mut s = 0.0;
                for c in 0..cols {
                    s += bt[c * nk + j] * et[(c * d + l) * nk + j];
                }
                dk[[j, l]] = s;
            }
            for c in 0..dv {
                dvv[[j, c]] = dvt[c * nk + j];
            }
        }
        Ok(HeadGrads {
            dq,
            dk,
            dv: dvv,
            out,
            lse,
            cert,
        })
    }

    /// Frequency-block groups for the block stages: a few per thread for load balance.
    fn block_groups(&self) -> (usize, usize) {
        let nblk = spectrum_blocks(self.s.toeplitz.fft_len());
        ((4 * threads()).clamp(1, nblk), nblk)
    }

    /// Pass 1 (the forward over `[V, 1]`): `(numerators cols x nq, Y cols x d x nq)`.
    fn pass1(
        &self,
        qa: &[f64],
        kb: &[f64],
        bt: &[f64],
        xs: &mut [C64],
        acc: &mut [C64],
    ) -> Result<(Vec<f64>, Vec<f64>)> {
        let FastShape { nq, nk, d, dv } = self.plan.shape;
        let e = &self.s.expansion;
        let (na, nb) = (e.alphas.len(), e.betas.len());
        let tp = &self.s.toeplitz;
        let h = tp.spectrum_len();
        let cols = dv + 1;
        let tile = self.plan.column_tile.clamp(1, cols);
        let mut numer = try_filled(cols * nq, 0.0, "numerators")?;
        let mut y = try_filled(cols * d * nq, 0.0, "dq products")?;
        let (groups, nblk) = self.block_groups();
        let group = |g: usize| g * nblk / groups..(g + 1) * nblk / groups;
        for c0 in (0..cols).step_by(tile) {
            let cb = tile.min(cols - c0);
            // (1) X̂_β,c = FFT(k^β ∘ b_c).
            xs[..cb * nb * h]
                .par_chunks_mut(h)
                .enumerate()
                .try_for_each_init(
                    || (tp.make_scratch(), vec![0.0; nk]),
                    |(ws, prod), (idx, spec)| {
                        let (c, beta) = (idx / nb, idx % nb);
                        let kbeta = &kb[beta * nk..(beta + 1) * nk];
                        let x = &bt[(c0 + c) * nk..(c0 + c + 1) * nk];
                        prod.iter_mut()
                            .zip(kbeta.iter().zip(x))
                            .for_each(|(p, (a, b))| *p = a * b);
                        tp.forward(prod, spec, ws)
                    },
                )?;
            // (2) Â_α,c = Σ_β Ĉ_αβ X̂_β,c (the forward's block stage).
            let st = Stage2 {
                e,
                spectra: &self.s.spectra,
                xs,
                h,
                tile,
                cb,
            };
            let parts = split_by_groups(&mut acc[..cb * na * h], h, groups, nblk);
            parts.into_par_iter().enumerate().for_each(|(g, mut out)| {
                let mut xl = vec![ZERO_BLOCK; nb * tile];
                let mut al = vec![ZERO_BLOCK; na * tile];
                stage2_dispatch(&st, group(g), &mut out, &mut xl, &mut al);
            });
            // (3) N_c += q^α z_α,c, Y_c,l += α_l q^{α-e_l} z_α,c, α in order.
            numer[c0 * nq..(c0 + cb) * nq]
                .par_chunks_mut(nq)
                .zip(y[c0 * d * nq..(c0 + cb) * d * nq].par_chunks_mut(d * nq))
                .zip(acc[..cb * na * h].par_chunks_mut(na * h))
                .try_for_each_init(
                    || tp.make_scratch(),
                    |ws, ((dst, ydst), specs)| {
                        for (alpha, spec) in specs.chunks_exact_mut(h).enumerate() {
                            let z = tp.inverse_product(spec, ws)?;
                            let qalpha = &qa[alpha * nq..(alpha + 1) * nq];
                            for ((o, zi), qi) in dst.iter_mut().zip(z).zip(qalpha) {
                                *o += qi * zi;
                            }
                            for &(l, m, idx) in &self.s.alpha_minus[alpha] {
                                let qm = &qa[idx * nq..(idx + 1) * nq];
                                for ((o, zi), qi) in
                                    ydst[l * nq..(l + 1) * nq].iter_mut().zip(z).zip(qm)
                                {
                                    *o += m * qi * zi;
                                }
                            }
                        }
                        Ok::<(), Error>(())
                    },
                )?;
        }
        Ok((numer, y))
    }

    /// Pass 2 (transposed products over the columns of `a`): `(dV dv x nk, E cols x d x nk)`;
    /// accumulates the correlation spectra when `corr` is given.
    #[allow(clippy::too_many_arguments)]
    fn pass2(
        &self,
        qa: &[f64],
        kb: &[f64],
        at: &[f64],
        bt: &[f64],
        mut corr: Option<&mut CorrelationAccumulator>,
        qs: &mut [C64],
        acc: &mut [C64],
    ) -> Result<(Vec<f64>, Vec<f64>)> {
        let FastShape { nq, nk, d, dv } = self.plan.shape;
        let e = &self.s.expansion;
        let (na, nb, np) = (e.alphas.len(), e.betas.len(), e.pairs.len());
        let tp = &self.s.toeplitz;
        let h = tp.spectrum_len();
        let cols = dv + 1;
        let tile = self.plan.column_tile.clamp(1, cols);
        let zero = C64::new(0.0, 0.0);
        let hacc = corr.is_some();
        let mut ks = if hacc {
            try_filled(
                h.saturating_mul(nb).saturating_mul(tile),
                zero,
                "key spectra",
            )?
        } else {
            Vec::new()
        };
        let mut dvt = try_filled(dv * nk, 0.0, "dv")?;
        let mut et = try_filled(cols * d * nk, 0.0, "dk products")?;
        let (groups, nblk) = self.block_groups();
        let group = |g: usize| g * nblk / groups..(g + 1) * nblk / groups;
        for c0 in (0..cols).step_by(tile) {
            let cb = tile.min(cols - c0);
            // (1) Q̂_α,c = conj(FFT(q^α ∘ a_c)); with correlations also X̂_β,c = FFT(k^β ∘ b_c).
            qs[..cb * na * h]
                .par_chunks_mut(h)
                .enumerate()
                .try_for_each_init(
                    || (tp.make_scratch(), vec![0.0; nq]),
                    |(ws, prod), (idx, spec)| {
                        let (c, alpha) = (idx / na, idx % na);
                        let qalpha = &qa[alpha * nq..(alpha + 1) * nq];
                        let x = &at[(c0 + c) * nq..(c0 + c + 1) * nq];
                        prod.iter_mut()
                            .zip(qalpha.iter().zip(x))
                            .for_each(|(p, (a, b))| *p = a * b);
                        tp.forward(prod, spec, ws)?;
                        spec.iter_mut().for_each(|z| z.im = -z.im);
                        Ok::<(), Error>(())
                    },
                )?;
            if hacc {
                ks[..cb * nb * h]
                    .par_chunks_mut(h)
                    .enumerate()
                    .try_for_each_init(
                        || (tp.make_scratch(), vec![0.0; nk]),
                        |(ws, prod), (idx, spec)| {
                            let (c, beta) = (idx / nb, idx % nb);
                            let kbeta = &kb[beta * nk..(beta + 1) * nk];
                            let x = &bt[(c0 + c) * nk..(c0 + c + 1) * nk];
                            prod.iter_mut()
                                .zip(kbeta.iter().zip(x))
                                .for_each(|(p, (a, b))| *p = a * b);
                            tp.forward(prod, spec, ws)
                        },
                    )?;
            }
            // (2) Ŵ_β,c = Σ_α Ĉ_αβ Q̂_α,c, and Ĥ_p += Σ_c Q̂_α,c X̂_β,c, by frequency blocks.
            let st = StageT {
                e,
                spectra: &self.s.spectra,
                qs,
                ks: if hacc { Some(&ks) } else { None },
                h,
                tile,
                cb,
            };
            let parts = split_by_groups(&mut acc[..cb * nb * h], h, groups, nblk);
            let hparts: Vec<Option<&mut [Block]>> = match corr.as_deref_mut() {
                Some(c) => {
                    let mut rest: &mut [Block] = &mut c.blocks;
                    let mut v = Vec::with_capacity(groups);
                    for g in 0..groups {
                        let r = group(g);
                        let (mine, others) = rest.split_at_mut((r.end - r.start) * np);
                        v.push(Some(mine));
                        rest = others;
                    }
                    v
                }
                None => (0..groups).map(|_| None).collect(),
            };
            parts
                .into_par_iter()
                .zip(hparts)
                .enumerate()
                .for_each(|(g, (mut out, hout))| {
                    let mut xl = vec![ZERO_BLOCK; na * tile];
                    let mut kl = if hacc {
                        vec![ZERO_BLOCK; nb * tile]
                    } else {
                        Vec::new()
                    };
                    let mut al = vec![ZERO_BLOCK; nb * tile];
                    stage_t_dispatch(&st, group(g), &mut out, hout, &mut xl, &mut kl, &mut al);
                });
            // (3) w_β,c = IFFT(Ŵ_β,c) read backwards; dV_c += k^β w, E_c,l += β_l k^{β-e_l} w.
            let mut dv_parts: Vec<&mut [f64]> = dvt.chunks_mut(nk).collect();
            dv_parts.push(&mut []); // the ones column has no dV
            let dv_parts: Vec<&mut [f64]> = dv_parts.into_iter().skip(c0).take(cb).collect();
            dv_parts
                .into_par_iter()
                .zip(et[c0 * d * nk..(c0 + cb) * d * nk].par_chunks_mut(d * nk))
                .zip(acc[..cb * nb * h].par_chunks_mut(nb * h))
                .try_for_each_init(
                    || (tp.make_scratch(), vec![0.0; nk]),
                    |(ws, wbuf), ((dst, edst), specs)| {
                        for (beta, spec) in specs.chunks_exact_mut(h).enumerate() {
                            let full = tp.inverse(spec, ws)?;
                            for (j, w) in wbuf.iter_mut().enumerate() {
                                *w = full[nk - 1 - j];
                            }
                            let kbeta = &kb[beta * nk..(beta + 1) * nk];
                            for ((o, wj), kj) in dst.iter_mut().zip(wbuf.iter()).zip(kbeta) {
                                *o += kj * wj;
                            }
                            for &(l, m, idx) in &self.s.beta_minus[beta] {
                                let km = &kb[idx * nk..(idx + 1) * nk];
                                for ((o, wj), kj) in edst[l * nk..(l + 1) * nk]
                                    .iter_mut()
                                    .zip(wbuf.iter())
                                    .zip(km)
                                {
                                    *o += m * kj * wj;
                                }
                            }
                        }
                        Ok::<(), Error>(())
                    },
                )?;
        }
        Ok((dvt, et))
    }

    /// Inverts the accumulated correlations and contracts them with the kernels: `dw`
    /// (`|S| x glen`, along the diagonals `g`) when wanted, and `dbias` (`glen`) when wanted.
    #[allow(clippy::type_complexity)]
    pub fn finish(
        &self,
        mut corr: CorrelationAccumulator,
    ) -> Result<(Option<Array2<f64>>, Option<Vec<f64>>)> {
        let FastShape { nq, nk, .. } = self.plan.shape;
        let glen = nq + nk - 1;
        let want = self.plan.want;
        let e = &self.s.expansion;
        let np = e.pairs.len();
        let tp = &self.s.toeplitz;
        let (n, h) = (tp.fft_len(), tp.spectrum_len());
        let nblk = spectrum_blocks(n);
        if corr.blocks.len() != nblk * np {
            return Err(Error::Value(
                "fast backward: correlation accumulator of another kernel".into(),
            ));
        }
        let inv_n = 1.0 / n as f64;
        let shift = n - (nq - 1); // H(g) = IFFT[(g - (nq-1)) mod N] / N
                                  // (1) Invert each pair's spectrum; store H_p(g) back in its blocks as reals.
        let batch = 4 * threads().max(1);
        for p0 in (0..np).step_by(batch) {
            let p1 = (p0 + batch).min(np);
            let blocks = &corr.blocks;
            let hs: Vec<Result<Vec<f64>>> = (p0..p1)
                .into_par_iter()
                .map_init(
                    || (tp.make_scratch(), vec![C64::new(0.0, 0.0); h]),
                    |(ws, spec), p| {
                        for (b, chunk) in spec.chunks_mut(BLOCK).enumerate() {
                            let blk = &blocks[b * np + p];
                            for (o, z) in chunk.iter_mut().enumerate() {
                                *z = C64::new(blk[o], blk[BLOCK + o]);
                            }
                        }
                        let full = tp.inverse(spec, ws)?;
                        Ok((0..glen).map(|g| full[(g + shift) % n] * inv_n).collect())
                    },
                )
                .collect();
            for (i, hv) in hs.into_iter().enumerate() {
                let hv = hv?;
                let p = p0 + i;
                for b in 0..nblk {
                    let blk = &mut corr.blocks[b * np + p];
                    for (o, x) in blk.iter_mut().enumerate() {
                        let g = b * 2 * BLOCK + o;
                        *x = if g < glen { hv[g] } else { 0.0 };
                    }
                }
            }
        }
        // (2) Contractions over chunks of diagonals (fixed chunks: thread-count independent).
        let ns = self.s.support.len();
        const CHUNK: usize = 64 * BLOCK; // diagonals per chunk, a whole number of blocks
        let chunks: Vec<Range<usize>> = (0..glen)
            .step_by(CHUNK)
            .map(|g0| g0..(g0 + CHUNK).min(glen))
            .collect();
        let blocks = &corr.blocks;
        let scale = self.s.scale;
        let parts: Vec<(Vec<f64>, Vec<f64>)> = chunks
            .par_iter()
            .map(|r| {
                let clen = r.len();
                let fac = &self.s.factor[r.clone()];
                let (mut kern, mut tmp) = (vec![0.0; clen], vec![0.0; clen]);
                let hp = |p: usize, dst: &mut Vec<f64>| {
                    dst.clear();
                    for b in r.start / (2 * BLOCK)..r.end.div_ceil(2 * BLOCK) {
                        dst.extend_from_slice(&blocks[b * np + p]);
                    }
                    dst.truncate(clen);
                };
                let mut hbuf = Vec::with_capacity(clen + 2 * BLOCK);
                let mut db = Vec::new();
                if want.db {
                    db = vec![0.0; clen];
                    for p in 0..np {
                        self.s.terms.kernel(
                            p,
                            &self.s.seqs,
                            glen,
                            r.start,
                            fac,
                            &mut kern,
                            &mut tmp,
                        );
                        hp(p, &mut hbuf);
                        for ((o, c), x) in db.iter_mut().zip(&kern).zip(&hbuf) {
                            *o += c * x;
                        }
                    }
                }
                let mut dw = Vec::new();
                if want.dw {
                    dw = vec![0.0; ns * clen];
                    if let (Some(de), Some(dt)) = (&self.s.dexp, &self.s.dterms) {
                        for pd in 0..de.pairs.len() {
                            dt.kernel(pd, &self.s.seqs, glen, r.start, fac, &mut kern, &mut tmp);
                            for s in 0..ns {
                                hp(self.s.links[pd * ns + s], &mut hbuf);
                                for ((o, c), x) in dw[s * clen..(s + 1) * clen]
                                    .iter_mut()
                                    .zip(&kern)
                                    .zip(&hbuf)
                                {
                                    *o += scale * c * x;
                                }
                            }
                        }
                    }
                }
                (dw, db)
            })
            .collect();
        let mut dw = want.dw.then(|| Array2::<f64>::zeros((ns, glen)));
        let mut db = want.db.then(|| vec![0.0; glen]);
        for (r, (pw, pb)) in chunks.iter().zip(parts) {
            let clen = r.len();
            if let Some(dw) = dw.as_mut() {
                for s in 0..ns {
                    for (g, x) in r.clone().zip(&pw[s * clen..(s + 1) * clen]) {
                        dw[[s, g]] = *x;
                    }
                }
            }
            if let Some(db) = db.as_mut() {
                db[r.clone()].copy_from_slice(&pb);
            }
        }
        Ok((dw, db))
    }
}

/// Splits `specs` (spectra of `h` frequencies each) into per-group pieces of frequency blocks.
fn split_by_groups(
    specs: &mut [C64],
    h: usize,
    groups: usize,
    nblk: usize,
) -> Vec<Vec<&mut [C64]>> {
    let group = |g: usize| g * nblk / groups..(g + 1) * nblk / groups;
    let mut parts: Vec<Vec<&mut [C64]>> = (0..groups).map(|_| Vec::new()).collect();
    for spec in specs.chunks_exact_mut(h) {
        let mut rest = spec;
        for (g, part) in parts.iter_mut().enumerate() {
            let r = group(g);
            let len = (r.end * BLOCK).min(h) - (r.start * BLOCK).min(h);
            let (mine, others) = rest.split_at_mut(len);
            part.push(mine);
            rest = others;
        }
    }
    parts
}

#[inline(always)]
fn mac(acc: &mut Block, s: &Block, x: &Block) {
    for f in 0..BLOCK {
        let (sr, si, xr, xi) = (s[f], s[BLOCK + f], x[f], x[BLOCK + f]);
        acc[f] += sr * xr - si * xi;
        acc[BLOCK + f] += sr * xi + si * xr;
    }
}

/// What the transposed block stage reads for one column tile.
struct StageT<'a> {
    e: &'a Expansion,
    spectra: &'a [Block],
    /// `conj(FFT(q^α ∘ a_c))`: spectrum `c * n_α + α`.
    qs: &'a [C64],
    /// `FFT(k^β ∘ b_c)`: spectrum `c * n_β + β` (correlations only).
    ks: Option<&'a [C64]>,
    h: usize,
    tile: usize,
    cb: usize,
}

fn load(src: &[C64], blk: &mut Block) {
    *blk = ZERO_BLOCK;
    for (o, z) in src.iter().enumerate() {
        blk[o] = z.re;
        blk[BLOCK + o] = z.im;
    }
}

/// For frequency blocks `blocks`: `Ŵ_β,c = Σ_{pairs (α,β)} Ĉ_αβ ⊙ Q̂_α,c` into
/// `out[c * n_β + β]`, and with correlations `Ĥ_p += Σ_c Q̂_α,c ⊙ X̂_β,c` into
/// `hout[(b - blocks.start) * n_pairs + p]`. Pairs are visited in their (α-sorted) order and
/// scattered to their β accumulator, so the kernel spectra stream in order.
#[inline(always)]
fn stage_t_blocks(
    st: &StageT,
    blocks: Range<usize>,
    out: &mut [&mut [C64]],
    mut hout: Option<&mut [Block]>,
    xl: &mut [Block],
    kl: &mut [Block],
    al: &mut [Block],
) {
    let (e, tile, cb, h) = (st.e, st.tile, st.cb, st.h);
    let (na, nb, np) = (e.alphas.len(), e.betas.len(), e.pairs.len());
    let first = blocks.start;
    for b in blocks {
        let (lo, hi) = (b * BLOCK, ((b + 1) * BLOCK).min(h));
        for alpha in 0..na {
            for c in 0..cb {
                let at = (c * na + alpha) * h;
                load(&st.qs[at + lo..at + hi], &mut xl[alpha * tile + c]);
            }
        }
        if let Some(ks) = st.ks {
            for beta in 0..nb {
                for c in 0..cb {
                    let at = (c * nb + beta) * h;
                    load(&ks[at + lo..at + hi], &mut kl[beta * tile + c]);
                }
            }
        }
        al.iter_mut().for_each(|x| *x = ZERO_BLOCK);
        let spec = &st.spectra[b * np..(b + 1) * np];
        for (p, pr) in e.pairs.iter().enumerate() {
            let (alpha, beta) = (pr.alpha, pr.beta);
            let s = &spec[p];
            let xs = &xl[alpha * tile..alpha * tile + cb];
            for (a, x) in al[beta * tile..beta * tile + cb].iter_mut().zip(xs) {
                mac(a, s, x);
            }
            if let Some(hb) = hout.as_deref_mut() {
                let dst = &mut hb[(b - first) * np + p];
                for (x, y) in xs.iter().zip(&kl[beta * tile..beta * tile + cb]) {
                    mac(dst, x, y);
                }
            }
        }
        for beta in 0..nb {
            for c in 0..cb {
                let blk = &al[beta * tile + c];
                let dst =
                    &mut out[c * nb + beta][(b - first) * BLOCK..(b - first) * BLOCK + hi - lo];
                for (o, z) in dst.iter_mut().enumerate() {
                    *z = C64::new(blk[o], blk[BLOCK + o]);
                }
            }
        }
    }
}

/// [`stage_t_blocks`] compiled for AVX2+FMA.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn stage_t_blocks_avx2(
    st: &StageT,
    blocks: Range<usize>,
    out: &mut [&mut [C64]],
    hout: Option<&mut [Block]>,
    xl: &mut [Block],
    kl: &mut [Block],
    al: &mut [Block],
) {
    stage_t_blocks(st, blocks, out, hout, xl, kl, al)
}

fn stage_t_dispatch(
    st: &StageT,
    blocks: Range<usize>,
    out: &mut [&mut [C64]],
    hout: Option<&mut [Block]>,
    xl: &mut [Block],
    kl: &mut [Block],
    al: &mut [Block],
) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::isa() != crate::simd::Isa::Baseline {
        // SAFETY: isa() reports AVX2 and FMA (AVX-512 machines have both).
        return unsafe { stage_t_blocks_avx2(st, blocks, out, hout, xl, kl, al) };
    }
    stage_t_blocks(st, blocks, out, hout, xl, kl, al)
}

/// Gradients of one head from [`fast_backward_head`]: `dw` along the diagonals (`|S| x glen`,
/// `dw[[s, g]] = ∂/∂ seqs[[s, g]]`), `dbias` along the diagonals (`glen`, the gradient with
/// respect to `b(δ(g))` where `factor = exp(b)`).
#[derive(Clone, Debug)]
pub struct FastGrads {
    pub dq: Array2<f64>,
    pub dk: Array2<f64>,
    pub dv: Array2<f64>,
    pub dw: Option<Array2<f64>>,
    pub dbias: Option<Vec<f64>>,
    pub out: Array2<f64>,
    pub lse: Array1<f64>,
    pub report: BackwardReport,
}

/// The fast backward for one head: bounds → certified plan → kernel → apply (→ finish). Every
/// gradient is certified to `eps`; `Error::Approximation` says why when it cannot be.
pub fn fast_backward_head(
    prob: &HeadProblem,
    dout: ArrayView2<f64>,
    eps: f64,
    want: Want,
    limits: &FastLimits,
    forced: Option<&Polynomial>,
) -> Result<FastGrads> {
    let bounds = FastBounds::from_problem(prob)?;
    let (nq, nk, d, dv) = (prob.nq(), prob.nk(), prob.d(), prob.dv());
    if dout.shape() != [nq, dv] {
        return Err(Error::Value(format!(
            "dout: expected shape ({nq}, {dv}), got {:?}",
            dout.shape()
        )));
    }
    if nq == 0 || nk == 0 {
        return Err(Error::Approximation(
            "fast backward: nothing to approximate (an empty axis)".into(),
        ));
    }
    let norms = WNorms::new(d, prob.support, prob.seqs, prob.factor)?;
    let grad = GradBounds::new(
        &norms,
        prob.support,
        prob.scale,
        prob.q,
        prob.k,
        prob.v,
        dout,
    );
    let fstats = FactorStats::new(nq, nk, prob.factor)?;
    let psums = PSums::from_data(
        prob.q,
        prob.k,
        prob.scale,
        prob.support,
        prob.seqs,
        prob.factor,
        bounds.r,
        &fstats,
        want.dw || want.db,
    )?;
    let req = BackwardRequest {
        shape: FastShape { nq, nk, d, dv },
        support: prob.support,
        bounds,
        grad,
        fstats,
        psums,
        eps: Grad5::splat(eps),
        want,
        out_rel: 0.0,
        heads: 1,
    };
    let plan = backward_plan(&req, limits, forced)?;
    let kernel = BackwardKernel::new(
        &plan,
        prob.support,
        prob.seqs,
        prob.factor,
        prob.scale,
        limits,
    )?;
    let mut corr = if want.dw || want.db {
        Some(kernel.accumulator()?)
    } else {
        None
    };
    let g = kernel.apply(prob.q, prob.k, prob.v, dout, corr.as_mut(), Some(&psums))?;
    let (dw, dbias) = match corr {
        Some(c) => kernel.finish(c)?,
        None => (None, None),
    };
    Ok(FastGrads {
        dq: g.dq,
        dk: g.dk,
        dv: g.dv,
        dw,
        dbias,
        out: g.out,
        lse: g.lse,
        report: kernel.report(g.cert),
    })
}
