//! Planning the fast backward: the polynomial, its certificate before any FFT runs, and the
//! working set (see the parent module for the products and `fast::grad_bounds`, `toeplitz::backward_certify` for the bounds).

use crate::error::{Error, Result};
use crate::fast::common::{
    fft_flops, fft_relative_error, spectrum_bytes, ExpansionCounts, FastLimits, FastShape,
};
use crate::fast::grad::{Grad5, Want, GRAD_NAMES};
use crate::fast::grad_bounds::{approximation_errors, derivative_coeffs, derivative_rho};
use crate::fast::plans::{BackwardPlan, BackwardRequest};
use crate::fast::toeplitz::backward_certify::{apriori_terms, rounding_errors};
use crate::fast::toeplitz::blocks::{spectrum_blocks, BLOCK};
use crate::fast::toeplitz::certify::{snap_radius, stream_layout, worker_bytes, StreamCost};
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

/// The layout a streamed backward is chosen from ([`stream_layout`]): the held layout's
/// shared buffers without the kernel spectra, the per-head buffers and one kernel worker per
/// thread are fixed; every column tile of each pass rebuilds every kernel spectrum, and every
/// chunk passes over the tile's accumulators and input spectra, in both passes.
fn stream_cost(
    shape: &FastShape,
    ns: usize,
    c: &ExpansionCounts,
    n: usize,
    want: Want,
    degree: usize,
) -> StreamCost {
    let (shared, kernel, fixed, per_col) = memory(shape, ns, c, n, want);
    let glen = shape.nq + shape.nk - 1;
    let rebuild =
        c.n_pairs as f64 * fft_flops(n) + c.terms as f64 * glen as f64 * (degree + 2) as f64;
    StreamCost {
        fixed: (shared - kernel)
            .saturating_add(fixed)
            .saturating_add(threads().saturating_mul(worker_bytes(n, glen))),
        per_col,
        per_pair: spectrum_bytes(n),
        n_pairs: c.n_pairs,
        cols: shape.dv + 1,
        recompute: 2.0 * rebuild,
        pass: 8.0 * (c.n_alpha + c.n_beta) as f64 * (n / 2 + 1) as f64,
    }
}

/// The pair chunk of a streamed backward plan (None when its kernel spectra are held): the
/// most pairs whose spectra fit the plan's working set beside its column tile, which is the
/// chunk [`plan_for`] chose. `ns` is the support's size.
pub fn backward_pair_chunk(plan: &BackwardPlan, ns: usize) -> Option<usize> {
    if plan.lowrank.is_some() || plan.counts.n_pairs < 2 {
        return None;
    }
    let (shared, _, fixed, per_col) =
        memory(&plan.shape, ns, &plan.counts, plan.fft_len, plan.want);
    let tile = plan.column_tile.max(1);
    let held = shared
        .saturating_add(fixed)
        .saturating_add(per_col.saturating_mul(tile));
    if plan.working_bytes >= held {
        return None;
    }
    let c = stream_cost(
        &plan.shape,
        ns,
        &plan.counts,
        plan.fft_len,
        plan.want,
        plan.poly.degree,
    );
    let spare = plan
        .working_bytes
        .saturating_sub(c.fixed)
        .saturating_sub(per_col.saturating_mul(tile));
    Some((spare / c.per_pair.max(1)).clamp(1, c.n_pairs - 1))
}

/// `plan` with its kernel spectra streamed `chunk` pairs at a time over tiles of `tile` columns
/// (the layout a tight memory limit gives, forced; tests only).
#[cfg(test)]
pub(crate) fn force_streaming(
    plan: &BackwardPlan,
    ns: usize,
    chunk: usize,
    tile: usize,
) -> BackwardPlan {
    let (shared, kernel, _, per_col) =
        memory(&plan.shape, ns, &plan.counts, plan.fft_len, plan.want);
    let c = stream_cost(
        &plan.shape,
        ns,
        &plan.counts,
        plan.fft_len,
        plan.want,
        plan.poly.degree,
    );
    let mut p = plan.clone();
    p.column_tile = tile;
    p.kernel_bytes = shared - kernel;
    p.working_bytes = c.fixed + per_col * tile + c.per_pair * chunk;
    assert_eq!(backward_pair_chunk(&p, ns), Some(chunk));
    p
}

/// The plan for a given polynomial (no `eps` test): counts, cost, memory, certificate. The
/// kernel spectra are held when they fit with one column, streamed otherwise
/// ([`backward_pair_chunk`]).
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
    let mut working_bytes = shared
        .saturating_add(fixed)
        .saturating_add(per_col.saturating_mul(column_tile.max(1)));
    let (mut column_tile, mut shared) = (column_tile, shared);

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
    if column_tile == 0 {
        // Streamed: the spectra's FFTs move from the shared work to every tile of every head.
        let cost = stream_cost(&shape, ns, &counts, n, want, poly.degree);
        shared -= kernel_bytes;
        kernel_flops -= np * fft;
        match stream_layout(limits.max_working_bytes, &cost) {
            Some(l) => {
                column_tile = l.tile;
                working_bytes = l.bytes;
                head_flops += l.flops;
            }
            // Refused: report the least working set, one column and one pair.
            None => {
                working_bytes = working_bytes.min(
                    cost.fixed
                        .saturating_add(per_col)
                        .saturating_add(cost.per_pair),
                )
            }
        }
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
        "fast backward: degree {} needs at least {:.3} GB ({} spectra of {} frequencies per column, \
         plus the {} kernel spectra streamed one at a time{}) but the memory limit (memory_limit \
         per thread) allows {:.3} GB; raise memory_limit or use the exact method",
        plan.poly.degree,
        plan.working_bytes as f64 / 1e9,
        plan.counts.n_alpha + plan.counts.n_beta,
        plan.fft_len / 2 + 1,
        plan.counts.n_pairs,
        if plan.want.dw || plan.want.db {
            ", and as many correlation spectra for dw/dbias, held whole"
        } else {
            ""
        },
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
