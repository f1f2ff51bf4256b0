//! Planning the low-rank route, forward and backward: the polynomial (the least certified degree,
//! [`crate::poly::choose_degree`]), the rounding certificate and the cost.

use super::band::Geometry;
use super::certificate::{feature_count, lowrank_grad_rounding, rounding_error, rounding_parts};
use super::forward::{forward_block, BLOCK};
use crate::error::{Error, Result};
use crate::fast::bounds::FastBounds;
use crate::fast::common::{ExpansionCounts, FastLimits, FastShape, MAX_CHUNKS};
use crate::fast::grad::{GradCertificate, Want};
use crate::fast::grad_bounds::{approximation_errors, derivative_rho};
use crate::fast::plans::{BackwardPlan, BackwardRequest, Band, FastPlan, LowRank, LowRankGrad};
use crate::poly::{search_degree, Family, Pick, Polynomial, Verdict, U};

/// A certified low-rank plan for `shape` with `bounds` (`R`, `max|v|`), or the reason there is
/// none: the least degree whose polynomial error plus rounding meets `eps`, within
/// `limits.max_terms` features.
pub fn lowrank_plan(
    shape: FastShape,
    bounds: &FastBounds,
    lr: LowRank,
    eps: f64,
    limits: &FastLimits,
) -> Result<FastPlan> {
    if eps.is_nan() || eps <= 0.0 {
        return Err(Error::Approximation(
            "fast method: eps = 0 asks for exact results".into(),
        ));
    }
    let (r, v) = (bounds.r, bounds.v_max);
    let admit = |degree: usize| {
        let feats = feature_count(shape.d, degree);
        (feats > limits.max_terms as f64).then(|| {
            format!(
                "degree {degree} needs C({} + {degree}, {degree}) = {feats:.3e} features, more \
                 than the limit of {}",
                shape.d, limits.max_terms
            )
        })
    };
    let judge = |degree: usize, poly: Polynomial, _: &'static str| -> Result<Verdict<FastPlan>> {
        if poly.rho.is_nan() || poly.rho >= 1.0 {
            return Ok(Verdict::Skip);
        }
        let feats = feature_count(shape.d, degree);
        let band = &lr.band;
        // the weights e^{-s|δ|} are within e^{±η} of e^{b(δ)} (up to the tail)
        let rho = (1.0 + poly.rho) * band.bias_eta.exp() - 1.0;
        let (tail, tail_rel) = tail_error(band, shape, r, poly.rho, v);
        let approximation = v * 2.0 * rho / (1.0 - rho) + tail;
        // what the bias table alone costs, whatever the degree: no higher degree can help
        let eta = band.bias_eta.exp_m1();
        let table_floor = v * 2.0 * eta / (1.0 - eta) + tail;
        if table_floor >= eps {
            return Ok(Verdict::Reject {
                why: format!(
                    "the bias table is off the ALiBi form -s|δ| by {:.3e} (a float32 call \
                     rounds it to float32), which alone costs {table_floor:.3e} >= eps = \
                     {eps:.3e} at any degree",
                    band.bias_eta
                ),
                hopeless: true,
            });
        }
        let rounding = rounding_error(&poly, shape, r, &lr, v);
        let certified = approximation + rounding;
        if certified <= eps {
            let blk = forward_block(feats, shape.d, degree, shape.dv);
            let (flops, working_bytes) = lowrank_cost(shape, &lr, feats as usize, degree, blk);
            if working_bytes > limits.max_working_bytes {
                return Ok(Verdict::Reject {
                    why: format!(
                        "degree {degree} needs {:.3} GB of block states, more than \
                         max_working_bytes = {:.3} GB",
                        working_bytes as f64 / 1e9,
                        limits.max_working_bytes as f64 / 1e9
                    ),
                    hopeless: true,
                });
            }
            let feats = feats as usize;
            let (e, l) = rounding_parts(&poly, shape, r, &lr);
            // |ln l̃ - ln l| <= -ln(1-ρ); the computed denominator is off by a factor within
            // 1 ± E/(L-E); the logarithm adds a few units of rounding
            let lse_error = -(1.0 - rho).ln() + 2.0 * e / (l - e) + tail_rel + 64.0 * U;
            return Ok(Verdict::Accept(FastPlan {
                shape,
                bounds: *bounds,
                poly,
                counts: ExpansionCounts {
                    terms: feats,
                    n_alpha: feats,
                    n_beta: feats,
                    n_pairs: feats,
                    max_betas_per_alpha: 1,
                    max_terms_per_pair: 1,
                },
                fft_len: 0,
                column_tile: shape.dv + 1,
                flops,
                kernel_flops: 0.0,
                working_bytes,
                kernel_bytes: 0,
                eps,
                approximation_error: approximation,
                rounding_error: rounding,
                certified_error: certified,
                certified_lse_error: lse_error,
                lowrank: Some(lr),
            }));
        }
        Ok(Verdict::Reject {
            why: format!(
                "degree {degree} ({} features) certifies only {certified:.3e} > eps = {eps:.3e}",
                feats as usize
            ),
            hopeless: false,
        })
    };
    let tries = [(Family::TaylorOrChebyshev, r)];
    search_degree(limits.max_degree, &tries, Pick::First, admit, judge)?.map_err(|why| {
        Error::Approximation(format!("fast method (low-rank): cannot certify eps: {why}"))
    })
}

/// The output error from the tail of an ALiBi band (pairs with `s|δ| > τ`, each weighing at
/// most `t_w` in the table and in the decay; [`Band`]), and its relative share of a
/// denominator: with `t = n_k (2 + ρ) e^R t_w` and every visible row's true denominator at least
/// `l = e^{-R-η} m_min`, the output moves by at most `2 t V / (l - t)`.
fn tail_error(band: &Band, shape: FastShape, r: f64, rho: f64, v: f64) -> (f64, f64) {
    if band.tail_weight == 0.0 {
        return (0.0, 0.0);
    }
    let t = shape.nk as f64 * (2.0 + rho) * r.exp() * band.tail_weight;
    let l = (-r - band.bias_eta).exp() * band.min_mass;
    if l.is_nan() || t.is_nan() || l <= t {
        return (f64::INFINITY, f64::INFINITY);
    }
    (2.0 * t * v / (l - t), t / (l - t))
}

fn r_us_of(feats: f64) -> usize {
    feats.min(1e15) as usize
}

/// Predicted flops and working bytes of the low-rank forward with `feats` features and query
/// blocks of `blk` rows.
fn lowrank_cost(
    shape: FastShape,
    lr: &LowRank,
    feats: usize,
    degree: usize,
    blk: usize,
) -> (f64, usize) {
    let (nq, nk, d, dv) = (shape.nq, shape.nk, shape.d, shape.dv);
    let rows = BLOCK.min(nq.max(1));
    let cols = dv + 1;
    let (f, c) = (feats as f64, cols as f64);
    let tile = 2.0 * d as f64 + 2.0 * degree as f64 + 2.0 * c;
    if lr.band.is_plain() {
        // features (q and k), the state and its products, the diagonal blocks
        let mut flops = 4.0 * (nq + nk) as f64 * f + 2.0 * (nq + nk) as f64 * f * c;
        if lr.causal_shift.is_some() {
            flops += nq as f64 * blk as f64 * tile;
        }
        // per chunk in flight (at most 8): block buffers and its prefix state; the numerators
        let chunks = 8usize.min(nq.div_ceil(4 * BLOCK)).max(1);
        let bytes = 8 * chunks * (2 * rows * feats + 2 * feats * cols + rows * BLOCK + rows * cols)
            + 8 * (nq + nk) * d
            + 16 * nq * cols;
        return (flops, bytes);
    }
    let geo = Geometry::new(&lr.band, lr.causal_shift.is_some(), nq, nk, blk);
    let (past, future) = geo.sides();
    let sides = past as usize + future as usize;
    let bounded = |full: bool, side: bool| side && full;
    let (bp, bf) = geo.bounded();
    // the block states of each side, and their second running sum when the side is bounded
    let arrays = sides + bounded(bp, past) as usize + bounded(bf, future) as usize;
    let s = sides as f64;
    let flops = 4.0 * (nq + nk) as f64 * f
        + 2.0 * (nq + nk) as f64 * f * c * s
        + 4.0 * geo.nkb as f64 * f * c * arrays as f64
        + nq as f64 * (geo.partial_tiles() * blk) as f64 * tile;
    let threads = MAX_CHUNKS;
    let bytes = 8usize
        .saturating_mul(arrays.max(1))
        .saturating_mul(geo.nkb)
        .saturating_mul(feats)
        .saturating_mul(cols)
        .saturating_add(
            8 * threads * (2 * blk * feats + 2 * feats * cols + 2 * blk * blk + blk * cols),
        )
        .saturating_add(8 * geo.max_table_delta())
        .saturating_add(8 * (nq + nk) * d + 16 * nq * cols);
    (flops, bytes)
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
    // a band's weights e^{-s|δ|} are within e^{±η} of e^{b(δ)}: p and p' times them are within
    // (1 + ρ) e^η - 1 of exp times e^b; the tail's share of any row moves a gradient by at most
    // 4 times its relative mass (the first order of renormalising P)
    let band = lg.lr.band;
    let widen = |rho: f64| (1.0 + rho) * band.bias_eta.exp() - 1.0;
    let (approx, mag) = approximation_errors(widen(poly.rho), widen(rho_d), &req.grad, &req.psums);
    let (_, tail_rel) = tail_error(&band, shape, req.bounds.r, poly.rho, req.bounds.v_max);
    let approx = approx.zip(mag, |a, m| a + 4.0 * tail_rel * m);
    let rounding =
        lowrank_grad_rounding(poly, shape, req.bounds.r, req.bounds.v_max, &req.grad, &lg);
    let want = Want::default();
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
    let mut working_bytes_band = None;
    if lg.lr.causal_shift.is_some() {
        let blk = block_rows(feats, d, poly.degree, dv) as f64;
        flops += (nqf + nkf) * blk * (4.0 * d as f64 + 2.0 * g + 4.0 * cols + 10.0);
    }
    let rows = BLOCK.min(nq.max(nk).max(1));
    let r_us = feats.min(1e15) as usize;
    if !band.is_plain() {
        // pass 1 is the banded forward plus the same products again for the gradients;
        // pass 2 the banded forward over the transposed band, twice
        let blk = block_rows(feats, d, poly.degree, dv);
        let (fwd_flops, states) = lowrank_cost(shape, &lg.lr, r_us_of(feats), poly.degree, blk);
        flops = 2.5 * fwd_flops;
        let inputs = 8 * (nq + nk) * (2 * d + dv + 2) + 8 * nq * (dv + 1);
        working_bytes_band = Some(states.saturating_add(inputs));
    }
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
    let working_bytes = working_bytes_band.unwrap_or(working_bytes);
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
    let admit = |degree: usize| {
        let feats = feature_count(req.shape.d, degree);
        (feats > limits.max_terms as f64).then(|| {
            format!(
                "degree {degree} needs C({} + {degree}, {degree}) = {feats:.3e} features, more \
                 than the limit of {}",
                req.shape.d, limits.max_terms
            )
        })
    };
    let judge = |degree: usize, poly: Polynomial, family: &'static str| {
        if poly.rho.is_nan() || poly.rho >= 1.0 {
            return Ok(Verdict::Skip);
        }
        let plan = plan_for(req, &poly, family, lg);
        Ok(
            match plan.over_message(&cert_of(&plan), &format!("at degree {degree}, the")) {
                None => Verdict::Accept(plan),
                Some(why) => Verdict::Reject {
                    why,
                    hopeless: false,
                },
            },
        )
    };
    // Of the families that certify at the least degree, the one with the most room (the largest
    // margin under the worst budget).
    let worst = |p: &BackwardPlan| {
        p.certified
            .zip(p.eps, |c, e| c / e)
            .masked(want)
            .max_entry()
    };
    let tries = [
        (Family::IntegratedChebyshev, r),
        (Family::Chebyshev, r),
        (Family::Taylor, r),
    ];
    let plan = search_degree(
        limits.max_degree,
        &tries,
        Pick::Smallest(&worst),
        admit,
        judge,
    )?
    .map_err(|why| {
        Error::Approximation(format!(
            "fast backward (low-rank) cannot certify the gradients to eps: {why}"
        ))
    })?;
    if plan.working_bytes > limits.max_working_bytes {
        return Err(Error::Approximation(format!(
            "fast backward (low-rank): degree {} needs {:.3} GB, but \
             max_working_bytes is {:.3} GB",
            plan.poly.degree,
            plan.working_bytes as f64 / 1e9,
            limits.max_working_bytes as f64 / 1e9
        )));
    }
    Ok(plan)
}
