//! Plans the fast backward ([`crate::fast::toeplitz::backward`]) over every `(batch, head)` of a call;
//! [`super::backward_run`] runs the plan.
//!
//! As for the forward ([`crate::plan::forward`]), heads sharing a `w` table and a bias table form a
//! group with one certified plan (for the worst bounds among its heads) and one
//! [`BackwardKernel`]. Groups run one after another. Without dw/dbias the heads of a group run
//! in parallel; with them they run one after another, each adding its diagonal correlations into
//! the group's accumulator, which is inverted and contracted with the kernels once per group
//! (dw and dbias are sums over heads, so one contraction serves them all). Kernel spectra are
//! looked up in, and kept by, the bounded kernel cache ([`crate::fast::cache`]) across calls.
//!
//! Error budgets: a gradient that sums over heads adds their errors, so each head gets
//! `eps / m` with `m` the number of heads adding into one entry: 1 for dq, the GQA group size
//! for dk and dv, the number of heads sharing a table for dw and dbias. The call's certificate
//! reports the sums.

use crate::arch::Real;
use crate::error::{Error, Result};
use crate::fast::grad_bounds::{magnitudes, FactorStats, GradBounds, PSums};
use crate::fast::lowrank::{lowrank_backward_plan, lowrank_psums, rotate};
use crate::fast::toeplitz::backward_plan;
use crate::fast::{
    BackwardPlan, BackwardRequest, FastBounds, FastLimits, FastShape, Grad5, GradContract,
    LowRankGrad, Want,
};
use crate::plan::forward::{check_underflow, factor, head_f64, max_norm, sequences, w_table};
use crate::plan::{count_plan, lowrank_of, refuse, Refusal, Route};
use crate::poly::WNorms;
use crate::poly::{Polynomial, U};
use crate::position::{Bias, LogFactor, Position};
use crate::problem::Problem;
use ndarray::{Array2, ArrayView3, ArrayView4};
use rayon::prelude::*;

/// One group of heads sharing a kernel, with its certified plan.
#[derive(Clone, Debug)]
pub struct FastBackwardGroup {
    /// Flattened `b * hq + h` of the heads.
    pub heads: Vec<usize>,
    pub w_table: usize,
    pub bias_table: usize,
    pub plan: BackwardPlan,
    /// Per head (in the order of `heads`): its bounds on the column/diagonal sums of `P`.
    pub psums: Vec<PSums>,
}

/// The fast backward's plan for a whole call.
#[derive(Clone, Debug)]
pub struct FastBackwardCall {
    pub support: Vec<(usize, usize)>,
    pub groups: Vec<FastBackwardGroup>,
    pub want: Want,
    /// Heads adding into one entry of each gradient.
    pub multiplicity: Grad5,
    /// Predicted flops: shared kernel work once per group, the rest once per head.
    pub flops: f64,
    /// Peak bytes.
    pub working_bytes: usize,
    /// What `eps` bounds: each gradient's error, or its error relative to `scale`.
    pub contract: GradContract,
    /// Certified bounds on each gradient's magnitude for the call (`>= max |G|`, sums over
    /// heads): the scales of the relative contract.
    pub scale: Grad5,
    /// The a-priori certified error of each gradient for the call (sums over heads).
    pub certified: Grad5,
    pub approximation: Grad5,
    pub rounding: Grad5,
    /// True when some group relies on its heads' data-dependent rounding bounds.
    pub deferred: bool,
    /// Set by the caller when the plan was made from the very arrays it runs on (a handle
    /// keyed by them): the low-rank heads then skip the check against the plan's bounds.
    pub data_checked: bool,
    /// Every route considered and not taken, with the reason.
    pub refused: Vec<Refusal>,
}

impl FastBackwardCall {
    /// The plan of the group with the highest degree (what a report shows).
    pub fn representative(&self) -> Option<&BackwardPlan> {
        self.groups
            .iter()
            .map(|g| &g.plan)
            .max_by_key(|p| (p.poly.degree, p.counts.n_pairs))
    }
}

/// Unit roundoff of the result dtype (0 for f64: the f64 results are returned as they are).
pub(super) fn out_rel<T: Real>() -> f64 {
    if std::mem::size_of::<T>() >= 8 {
        0.0
    } else {
        T::epsilon().f64() / 2.0
    }
}

/// What is wanted for this call: dw only for a stored W, dbias only with a bias.
pub fn want_for<T>(pos: &Position<'_, T>, bias: Option<&Bias<'_, T>>, dw: bool, db: bool) -> Want {
    Want {
        dw: dw && matches!(pos, Position::Sparse(_)),
        db: db && bias.is_some(),
    }
}

/// Bounds for a plan made from shape alone: scores `|M_ij| <= r`, `|v| <= v_max`, `|dout| <= 1`,
/// and (a prediction, not a certificate) `|q|` and `|W_δ k|` balanced, so that
/// `scale max|(W_δ k)_l| <= sqrt(scale r)` and likewise for `W_δ^T q`.
fn given_bounds(
    prob: &Problem,
    fac: &[f64],
    fstats: &FactorStats,
    r: f64,
    v_max: f64,
) -> Result<(FastBounds, GradBounds, PSums)> {
    if !(r.is_finite() && r >= 0.0 && v_max.is_finite() && v_max >= 0.0) {
        return Err(Error::Value(format!(
            "bound_r, v_max: expected finite values >= 0, got {r} and {v_max}"
        )));
    }
    let score = crate::poly::ScoreBound {
        r,
        r_abs: r,
        spectral: r,
        blocks: r,
    };
    let fb = FastBounds::from_parts(score, v_max, prob.nq, prob.nk, fac);
    let side = (prob.scale.abs() * r).sqrt();
    let gb = GradBounds {
        kw: side,
        qw: side,
        qk: r,
        rq: side,
        rk: side,
        ..GradBounds::default()
    }
    .unit_dout(prob.dv, v_max);
    Ok((fb, gb, PSums::from_factor(fstats, r)))
}

/// Certified plans for every group of heads, or the reason the fast backward cannot serve the
/// call. `dout = None` plans for a unit `dout` (entries at most 1 in magnitude); `given =
/// Some((r, v_max))` plans from those bounds instead of the data (a prediction). `contract`
/// says what `eps` bounds ([`GradContract`]).
#[allow(clippy::too_many_arguments)]
pub fn plan_fast_backward<'a, T: Real>(
    prob: &Problem,
    pos: &Position<'a, T>,
    bias: Option<&Bias<'a, T>>,
    q: ArrayView4<'_, T>,
    k: ArrayView4<'_, T>,
    v: ArrayView4<'_, T>,
    dout: Option<ArrayView4<'_, T>>,
    dlse: Option<ArrayView3<'_, T>>,
    given: Option<(f64, f64)>,
    eps: f64,
    contract: GradContract,
    want: Want,
    limits: &FastLimits,
    threads: usize,
    forced: Option<&Polynomial>,
    route: Route,
) -> Result<FastBackwardCall> {
    count_plan();
    let _s = crate::profile::span(crate::profile::Phase::Plan);
    crate::exact::forward::check_shapes(prob, &q, &k, &v)?;
    pos.validate(prob)?;
    if let Some(b) = bias {
        b.validate(prob)?;
    }
    if eps.is_nan() || eps < 0.0 {
        return Err(Error::Value(format!(
            "eps: expected a value >= 0, got {eps}"
        )));
    }
    if let Some(d) = &dout {
        if d.dim() != (prob.batch, prob.hq, prob.nq, prob.dv) {
            return Err(Error::Value(format!(
                "dout: expected shape {:?}, got {:?}",
                (prob.batch, prob.hq, prob.nq, prob.dv),
                d.dim()
            )));
        }
    }
    if prob.nq == 0 || prob.nk == 0 || prob.batch * prob.hq == 0 {
        return Err(Error::Approximation(
            "fast backward: nothing to approximate (an empty axis)".into(),
        ));
    }
    let dlse_max = check_dlse(prob, dlse.as_ref())?;
    let want = want_for(pos, bias, want.dw, want.db);
    let heads_total = prob.batch * prob.hq;
    let count = |idx: &dyn Fn(usize) -> usize| -> usize {
        let mut counts = std::collections::HashMap::new();
        for bh in 0..heads_total {
            *counts.entry(idx(bh)).or_insert(0usize) += 1;
        }
        counts.values().copied().max().unwrap_or(1)
    };
    let multiplicity = Grad5 {
        dq: 1.0,
        dk: prob.group() as f64,
        dv: prob.group() as f64,
        dw: if want.dw {
            count(&|bh| w_table(pos, bh)) as f64
        } else {
            1.0
        },
        db: match bias {
            Some(b) if want.db => count(&|bh| b.index[bh]) as f64,
            _ => 1.0,
        },
    };
    let logf = LogFactor::new(prob, bias);
    let shape = FastShape {
        nq: prob.nq,
        nk: prob.nk,
        d: prob.d,
        dv: prob.dv,
    };
    let mut groups: Vec<(usize, usize, Vec<usize>)> = Vec::new();
    for bh in 0..heads_total {
        let key = (w_table(pos, bh), bias.map_or(0, |b| b.index[bh]));
        match groups.iter_mut().find(|g| (g.0, g.1) == key) {
            Some(g) => g.2.push(bh),
            None => groups.push((key.0, key.1, vec![bh])),
        }
    }
    let mut out = Vec::with_capacity(groups.len());
    let mut scale = Grad5::default();
    let mut support_all = Vec::new();
    let mut refused = Vec::new();
    for (wt, bt, heads) in groups {
        let (support, seqs) = sequences(prob, pos, wt);
        let fac = factor(&logf, bt);
        check_underflow(
            prob,
            &logf,
            bt,
            &crate::fast::bounds::row_masses(prob.nq, prob.nk, &fac),
        )?;
        let norms = WNorms::new(prob.d, &support, seqs.view(), &fac)?;
        let fstats = FactorStats::new(prob.nq, prob.nk, &fac)?;
        let want_diag = want.dw || want.db;
        // Rotary without bias or masking window: PSums by prefix sums of the rotated q and k
        let low_rot = match pos {
            Position::Rotary(rot) if !want_diag => {
                let b = bias.map(|b| (b, bt));
                let lr = lowrank_of(prob, pos, b, 0.0, route).ok();
                lr.filter(|lr| lr.band.is_plain()).map(|lr| {
                    (
                        rot,
                        prob.scale * rot.factor * rot.factor,
                        (lr.causal_shift, lr.psi_max),
                    )
                })
            }
            _ => None,
        };
        let bounds: Vec<(FastBounds, GradBounds, PSums)> = if let Some((r, vm)) = given {
            vec![given_bounds(prob, &fac, &fstats, r, vm)?]
        } else {
            heads
                .par_iter()
                .map(|&bh| {
                    let (b, h) = (bh / prob.hq, bh % prob.hq);
                    let kvh = h / prob.group();
                    let (qh, kh, vh) = (
                        head_f64(&q, b, h),
                        head_f64(&k, b, kvh),
                        head_f64(&v, b, kvh),
                    );
                    let vmax = vh.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                    let score = norms.bound(&support, qh.view(), kh.view(), prob.scale);
                    let fb = FastBounds::from_parts(score, vmax, prob.nq, prob.nk, &fac);
                    let gb = match &dout {
                        Some(d) => {
                            let dh = head_f64(d, b, h);
                            GradBounds::new(
                                &norms,
                                &support,
                                prob.scale,
                                qh.view(),
                                kh.view(),
                                vh.view(),
                                dh.view(),
                            )
                        }
                        None => {
                            let zero = Array2::<f64>::zeros((prob.nq, prob.dv));
                            GradBounds::new(
                                &norms,
                                &support,
                                prob.scale,
                                qh.view(),
                                kh.view(),
                                vh.view(),
                                zero.view(),
                            )
                            .unit_dout(prob.dv, vmax)
                        }
                    };
                    let ps = match low_rot {
                        // no bias, no masking window: the same bounds by prefix sums
                        Some((rot, mul, shift)) => {
                            let c = prob.q_offset - prob.k_offset;
                            let x = rotate(rot, qh.view(), c, mul);
                            let y = rotate(rot, kh.view(), 0, 1.0);
                            let kx =
                                prob.scale.abs() * rot.factor * rot.factor * max_norm(qh.view());
                            let eta = 2.0 * U * (shift.1 + 8.0);
                            let dm_rot = kx
                                * max_norm(kh.view())
                                * ((1.0 + eta).powi(2) - 1.0)
                                * (1.0 + 1e-9);
                            lowrank_psums(
                                x.view(),
                                y.view(),
                                fb.r,
                                shift.0,
                                dm_rot,
                                PSums::from_factor(&fstats, fb.r),
                            )
                        }
                        None => PSums::from_data(
                            qh.view(),
                            kh.view(),
                            prob.scale,
                            &support,
                            seqs.view(),
                            &fac,
                            fb.r,
                            &fstats,
                            want_diag,
                        )?,
                    };
                    let gb = match &dlse {
                        Some(g) => gb.with_dlse(
                            g.slice(ndarray::s![b, h, ..])
                                .iter()
                                .fold(0.0f64, |m, x| m.max(x.f64().abs())),
                        ),
                        None => gb,
                    };
                    Ok((fb, gb, ps))
                })
                .collect::<Result<Vec<_>>>()?
        };
        let worst = bounds.iter().skip(1).fold(bounds[0], |a, b| {
            (a.0.worst(&b.0), a.1.worst(&b.1), a.2.worst(&b.2))
        });
        let group_scale = magnitudes(&worst.1, &worst.2);
        let eps_head = contract.budgets(eps, multiplicity, group_scale);
        scale = scale.max(group_scale);
        // The low-rank path (Rotary / w=None without bias or masking window): its rounding
        // bound needs the largest rotated query and key norms.
        let lowrank = match pos {
            Position::Rotary(rot) => {
                let mul = prob.scale.abs() * rot.factor * rot.factor;
                let (kx, ky) = match given {
                    Some((r, _)) => (r.sqrt(), r.sqrt()),
                    None => heads
                        .iter()
                        .map(|&bh| {
                            let (b, h) = (bh / prob.hq, bh % prob.hq);
                            let kvh = h / prob.group();
                            let (qh, kh) = (head_f64(&q, b, h), head_f64(&k, b, kvh));
                            (mul * max_norm(qh.view()), max_norm(kh.view()))
                        })
                        .fold((0.0f64, 0.0f64), |a, b| (a.0.max(b.0), a.1.max(b.1))),
                };
                let r2 = if given.is_some() {
                    kx * ky
                } else {
                    kx * ky * (1.0 + 4.0 * U)
                };
                lowrank_of(prob, pos, bias.map(|b| (b, bt)), r2, route).map(|lr| LowRankGrad {
                    lr,
                    kx,
                    ky,
                    mul,
                })
            }
            _ => Err("needs Rotary or w=None (w is a general table)".to_string()),
        };
        let req = BackwardRequest {
            shape,
            support: &support,
            bounds: worst.0,
            grad: worst.1,
            fstats,
            psums: worst.2,
            eps: eps_head,
            want,
            out_rel: out_rel::<T>(),
            heads: if want.dw || want.db { heads.len() } else { 1 },
        };
        // The low-rank path when it applies and certifies: it is always cheaper than the
        // Toeplitz products (no kernel spectra, no FFTs; `r (dv+1)` work per row against their
        // `n_pairs (dv+1)` spectrum products per frequency), so the latter is planned only
        // when the former cannot serve the call.
        let low = lowrank.map(|lg| lowrank_backward_plan(&req, lg, limits, forced));
        if dlse_max > 0.0 && !matches!(low, Ok(Ok(_))) {
            let why = match low {
                Ok(Err(e)) => format!(": the low-rank path: {e}"),
                Err(why) => format!(": the low-rank path {why}"),
                Ok(Ok(_)) => unreachable!(),
            };
            return Err(Error::Approximation(format!(
                "fast backward: a cotangent for lse (dlse) is taken by the low-rank path only{why}"
            )));
        }
        let plan = match (route.allows("toeplitz"), low) {
            (_, Ok(Ok(l))) => {
                let why = if route == Route::LowRank {
                    "route='lowrank' was requested".to_string()
                } else {
                    "the low-rank route certifies and is cheaper: no kernel spectra, no FFTs"
                        .to_string()
                };
                refuse(&mut refused, "toeplitz", why);
                l
            }
            (true, Ok(Err(le))) => match backward_plan(&req, limits, forced) {
                Ok(t) => {
                    refuse(&mut refused, "lowrank", le.to_string());
                    t
                }
                Err(Error::Approximation(te)) => {
                    let msg = super::no_route("fast backward", eps, &le.to_string(), &te);
                    return Err(Error::Approximation(msg));
                }
                Err(e) => return Err(e),
            },
            (true, Err(why)) => {
                let t = backward_plan(&req, limits, forced)?;
                refuse(&mut refused, "lowrank", why);
                t
            }
            (false, Ok(Err(le))) => {
                return Err(Error::Approximation(format!(
                    "route='lowrank' was requested; the low-rank route: {le}"
                )))
            }
            (false, Err(why)) => {
                return Err(Error::Approximation(format!(
                    "route='lowrank' was requested; the low-rank route {why}"
                )))
            }
        };
        support_all = support;
        let psums = if given.is_some() {
            vec![worst.2; heads.len()]
        } else {
            bounds.iter().map(|b| b.2).collect()
        };
        out.push(FastBackwardGroup {
            heads,
            w_table: wt,
            bias_table: bt,
            plan,
            psums,
        });
    }
    let flops = out
        .iter()
        .map(|g| g.plan.kernel_flops + g.heads.len() as f64 * (g.plan.flops - g.plan.kernel_flops))
        .sum();
    let working_bytes = out
        .iter()
        .map(|g| group_bytes(&g.plan, g.heads.len(), threads, want.dw || want.db))
        .max()
        .unwrap_or(0);
    let fold = |f: &dyn Fn(&BackwardPlan) -> Grad5| {
        out.iter()
            .map(|g| f(&g.plan))
            .fold(Grad5::default(), |a, b| a.max(b))
            .zip(multiplicity, |e, m| e * m)
            .masked(want)
    };
    let certified = fold(&|p| p.certified);
    let approximation = fold(&|p| p.approximation);
    let rounding = fold(&|p| p.rounding);
    let deferred = out.iter().any(|g| g.plan.deferred);
    let scale = scale.zip(multiplicity, |s, m| s * m).masked(want);
    Ok(FastBackwardCall {
        support: support_all,
        groups: out,
        want,
        multiplicity,
        flops,
        working_bytes,
        contract,
        scale,
        certified,
        approximation,
        rounding,
        deferred,
        data_checked: false,
        refused,
    })
}

/// The peak bytes of one group: its shared buffers plus one head's working set per head run
/// at once (one with dw/dbias, whose heads run one after another).
pub(super) fn group_bytes(
    plan: &BackwardPlan,
    heads: usize,
    threads: usize,
    serial: bool,
) -> usize {
    let per_head = plan.working_bytes.saturating_sub(plan.kernel_bytes);
    let par = if serial { 1 } else { threads.min(heads).max(1) };
    plan.kernel_bytes
        .saturating_add(per_head.saturating_mul(par))
}

/// `max |dlse|` after checking its shape `(batch, hq, nq)` and values (finite).
pub(super) fn check_dlse<T: Real>(prob: &Problem, dlse: Option<&ArrayView3<'_, T>>) -> Result<f64> {
    let Some(g) = dlse else {
        return Ok(0.0);
    };
    if g.dim() != (prob.batch, prob.hq, prob.nq) {
        return Err(Error::Value(format!(
            "dlse: expected shape {:?}, got {:?}",
            (prob.batch, prob.hq, prob.nq),
            g.dim()
        )));
    }
    let m = g.iter().fold(0.0f64, |m, x| m.max(x.f64().abs()));
    if !m.is_finite() {
        return Err(Error::Value(
            "dlse: expected finite values, got inf or nan".into(),
        ));
    }
    Ok(m)
}
