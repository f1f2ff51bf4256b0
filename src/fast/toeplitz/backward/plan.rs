//! Planning the fast backward: the polynomial, its certificate before any FFT runs, and the
//! working set (see the parent module for the products and `fast::grad_bounds`, `toeplitz::backward_certify` for the bounds).

use crate::error::{Error, Result};
use crate::fast::common::{fft_flops, fft_relative_error, ExpansionCounts, FastLimits, FastShape};
use crate::fast::grad::{Grad5, Want, GRAD_NAMES};
use crate::fast::grad_bounds::{approximation_errors, derivative_coeffs, derivative_rho};
use crate::fast::plans::{BackwardPlan, BackwardRequest};
use crate::fast::toeplitz::backward_certify::{apriori_terms, rounding_errors};
use crate::fast::toeplitz::blocks::{spectrum_blocks, BLOCK};
use crate::fast::toeplitz::certify::snap_radius;
use crate::fast::toeplitz::expansion::{term_count, Expansion};
use crate::poly::{search_degree, Family, Pick, PolyKind, Polynomial, Verdict};
use crate::toeplitz::fft_len;

pub(super) fn threads() -> usize {
    rayon::current_num_threads()
}

/// `(shared bytes, kernel spectra bytes, fixed per-head bytes, per-column bytes)`.
pub(super) fn memory(
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

/// The plan for a given polynomial (no `eps` test): counts, cost, memory, certificate.
pub(super) fn plan_for(
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
        lowrank: None,
    })
}

pub(super) fn memory_refusal(plan: &BackwardPlan, limits: &FastLimits) -> Error {
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
/// (as in [`crate::fast::toeplitz::fast_plan`]) fits `1/16` of the smallest: each head is then certified by its
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
    let r = req.bounds.r;
    // Chebyshev families on the snapped radius first (shared kernel spectra across calls, see
    // `fast_plan`), then on R itself.
    let snapped = snap_radius(r);
    let mut tries = vec![
        (Family::Taylor, r),
        (Family::IntegratedChebyshev, snapped),
        (Family::Chebyshev, snapped),
    ];
    if snapped != r {
        tries.extend([(Family::IntegratedChebyshev, r), (Family::Chebyshev, r)]);
    }
    let admit = |degree: usize| {
        let count = term_count(req.support.len(), degree);
        (count > limits.max_terms as f64).then(|| {
            format!(
                "degree {degree} would need C({}, {degree}) = {count:.3e} terms, more than the limit of {}",
                req.support.len() + degree,
                limits.max_terms
            )
        })
    };
    let judge = |degree: usize, poly: Polynomial, family: &'static str| {
        // Cheap screen before enumerating the expansion.
        let rho_d = derivative_rho(&poly.coeffs, r);
        let (approx, _) = approximation_errors(poly.rho, rho_d, &req.grad, &req.psums);
        if let Some(i) = approx.over(&req.eps, 15.0 / 16.0, req.want) {
            return Ok(Verdict::Reject {
                why: format!(
                    "at degree {degree} the {} approximation bound is {:.3e}, above 15/16 of its budget \
                     {:.3e} (R = {:.4}, relative errors of p and p': {:.3e}, {:.3e})",
                    GRAD_NAMES[i],
                    approx.to_array()[i],
                    req.eps.to_array()[i],
                    req.bounds.r,
                    poly.rho,
                    rho_d
                ),
                hopeless: false,
            });
        }
        let mut plan = plan_for(req, &poly, family, limits)?;
        Ok(match accept(&mut plan) {
            None => {
                if plan.column_tile == 0 {
                    return Err(memory_refusal(&plan, limits));
                }
                Verdict::Accept(plan)
            }
            Some(why) => Verdict::Reject {
                hopeless: why.contains("floor"),
                why,
            },
        })
    };
    search_degree(limits.max_degree, &tries, Pick::First, admit, judge)?.map_err(|why| {
        Error::Approximation(format!(
            "fast backward cannot certify the gradients to eps: {why}"
        ))
    })
}
