//! Runs the fast method over every `(batch, head)` of a call.
//!
//! The kernel spectra `Ĉ_αβ` of the fast method depend on the position matrices, the scale, the
//! mask/bias factor and the shape, not on q, k or v. Heads that share a `w` table and a bias
//! table form a group: one certified plan (for the largest bounds among the group's heads), one
//! [`FastKernel`], applied to each head. Groups run one after another so that at most one set of
//! kernel spectra is built at a time; the heads of a group run in parallel. Kernel spectra are
//! looked up in, and kept by, the bounded kernel cache ([`crate::fast::cache`]) across calls;
//! the certificate stays the call's own (each group's plan, each head's data).

use crate::arch::Real;
use crate::error::{Error, Result};
use crate::fast::bounds::FactorStats;
use crate::fast::cache::{self, KernelKey};
use crate::fast::lowrank::{lowrank_head_into, lowrank_plan, rotate_pair};
use crate::fast::{
    fast_plan, FastBounds, FastKernel, FastLimits, FastPlan, FastShape, FastSpectra, LowRank,
};
use crate::plan::{count_plan, lowrank_of, refuse, Refusal, Route};
use crate::poly::{ScoreBound, WNorms};
use crate::position::{Bias, LogFactor, Position};
use crate::problem::{Control, Problem};
use crate::profile::{self, Phase};
use ndarray::{Array2, Array3, Array4, ArrayView4};
use rayon::prelude::*;

/// One group of heads sharing a kernel, with its certified plan.
#[derive(Clone, Debug)]
pub struct FastGroup {
    /// Flattened `b * hq + h` of the heads.
    pub heads: Vec<usize>,
    pub w_table: usize,
    pub bias_table: usize,
    pub plan: FastPlan,
    /// The W norms the plan's score bounds were read from (the run checks each head with them).
    pub norms: WNorms,
}

/// The fast method's plan for a whole call.
#[derive(Clone, Debug)]
pub struct FastCall {
    pub support: Vec<(usize, usize)>,
    pub groups: Vec<FastGroup>,
    /// Predicted flops: kernel spectra once per group, the rest once per head.
    pub flops: f64,
    /// Peak bytes: the largest group's kernel spectra plus one head's working set per thread.
    pub working_bytes: usize,
    /// The largest certified error over the groups.
    pub certified_error: f64,
    pub certified_lse_error: f64,
    /// Every route considered and not taken, with the reason.
    pub refused: Vec<Refusal>,
    /// The bounds were read from the very arrays [`run_fast`] is given (set by a caller that
    /// guarantees it: the binding, for a plan made and run on the same arrays within one
    /// `attention` call), so the low-rank route need not read them again. `false` from the
    /// planner: every head is checked against the plan's bounds before it runs.
    pub data_checked: bool,
}

impl FastCall {
    /// The plan of the group with the highest degree (what a report shows).
    pub fn representative(&self) -> Option<&FastPlan> {
        self.groups
            .iter()
            .map(|g| &g.plan)
            .max_by_key(|p| (p.poly.degree, p.counts.n_pairs))
    }
}

/// The support and its diagonal sequences (f64, `|S| x glen`) of `w` table `t`.
pub(crate) fn sequences<T: Real>(
    prob: &Problem,
    pos: &Position<'_, T>,
    t: usize,
) -> (Vec<(usize, usize)>, Array2<f64>) {
    match pos {
        Position::Rotary(r) => r.as_sparse(prob),
        Position::Sparse(sp) => {
            let glen = prob.glen();
            let flat = sp.diagonals(t, prob);
            let seqs =
                Array2::from_shape_fn((sp.support.len(), glen), |(s, g)| flat[s * glen + g].f64());
            (sp.support.clone(), seqs)
        }
    }
}

/// `exp(b(δ(g)))`, 0 where masked, for bias table `t`.
pub(crate) fn factor<T: Real>(logf: &LogFactor<T>, t: usize) -> Vec<f64> {
    logf.seqs[t].par_iter().map(|&x| x.f64().exp()).collect()
}

/// Refuses a bias so negative that `e^{b(δ)}` underflows to 0 on every key some row sees (a
/// finite `b <= -745`): the fast method would take the row for fully masked, where its softmax
/// is well defined (the exact method subtracts the row's maximum and serves it).
pub(crate) fn check_underflow<T: Real>(
    prob: &Problem,
    logf: &LogFactor<T>,
    t: usize,
    masses: &[f64],
) -> Result<()> {
    let (nq, nk) = (prob.nq, prob.nk);
    for (i, &m) in masses.iter().enumerate() {
        // row i covers the diagonals g in [nq - 1 - i, nq - 1 - i + nk)
        let g0 = nq - 1 - i;
        let sees = logf.visible_prefix[g0 + nk] > logf.visible_prefix[g0];
        if sees && m == 0.0 {
            let low = logf.seqs[t][g0..g0 + nk]
                .iter()
                .map(|x| x.f64())
                .filter(|x| x.is_finite())
                .fold(f64::NEG_INFINITY, f64::max);
            return Err(Error::Approximation(format!(
                "fast method: row {i} sees keys only through a bias of at most {low:e}, where \
                 e^bias underflows to 0; the exact method serves such rows"
            )));
        }
    }
    Ok(())
}

/// Head `(b, h)` of `x` as float64 (a view for float64 inputs: no copy).
pub(crate) fn head_f64<'a, T: Real>(
    x: &'a ArrayView4<'_, T>,
    b: usize,
    h: usize,
) -> ndarray::CowArray<'a, f64, ndarray::Ix2> {
    T::cow_f64(x.slice(ndarray::s![b, h, .., ..]))
}

pub(crate) fn w_table<T>(pos: &Position<'_, T>, bh: usize) -> usize {
    match pos {
        Position::Rotary(_) => 0,
        Position::Sparse(sp) => sp.index[bh],
    }
}

/// `max |x|` over every entry, by chunks in parallel when `x` is contiguous (a max is exact, so
/// the result does not depend on the chunking).
pub(crate) fn abs_max<T: Real>(x: ndarray::ArrayView2<T>) -> f64 {
    let fold = |m: f64, v: &T| m.max(v.f64().abs());
    // eight running maxima, so the loop vectorises
    let lanes = |c: &[T]| {
        let mut m = [0.0f64; 8];
        let mut it = c.chunks_exact(8);
        for v in it.by_ref() {
            for (m, v) in m.iter_mut().zip(v) {
                *m = m.max(v.f64().abs());
            }
        }
        it.remainder()
            .iter()
            .fold(m.iter().fold(0.0f64, |a, &b| a.max(b)), fold)
    };
    match x.as_slice() {
        Some(xs) => xs.par_chunks(1 << 15).map(lanes).reduce(|| 0.0, f64::max),
        None => x.iter().fold(0.0f64, fold),
    }
}

/// `max_i |x_i|` (2-norms of the rows).
pub(crate) fn max_norm(x: ndarray::ArrayView2<f64>) -> f64 {
    x.outer_iter()
        .map(|r| crate::poly::norm2(r.iter()))
        .fold(0.0, f64::max)
}

/// Where the data-dependent bounds of a plan come from.
pub enum BoundsFrom<'v, T> {
    /// Read from the inputs (what a computation needs: the certificate holds for this data).
    Data {
        q: ArrayView4<'v, T>,
        k: ArrayView4<'v, T>,
        v: ArrayView4<'v, T>,
    },
    /// Given by the caller (a prediction for inputs with `|M_ij| <= r` and `|v| <= v_max`).
    Given { r: f64, v_max: f64 },
}

/// Certified plans for every group of heads, or the reason the fast method cannot serve the call.
#[allow(clippy::too_many_arguments)]
pub fn plan_fast<'a, T: Real>(
    prob: &Problem,
    pos: &Position<'a, T>,
    bias: Option<&Bias<'a, T>>,
    q: ArrayView4<'_, T>,
    k: ArrayView4<'_, T>,
    v: ArrayView4<'_, T>,
    eps: f64,
    limits: &FastLimits,
    threads: usize,
    route: Route,
) -> Result<FastCall> {
    crate::exact::forward::check_shapes(prob, &q, &k, &v)?;
    plan_fast_from(
        prob,
        pos,
        bias,
        BoundsFrom::Data { q, k, v },
        eps,
        limits,
        threads,
        route,
    )
}

/// [`plan_fast`] with the bounds from `from`.
#[allow(clippy::too_many_arguments)]
pub fn plan_fast_from<'a, T: Real>(
    prob: &Problem,
    pos: &Position<'a, T>,
    bias: Option<&Bias<'a, T>>,
    from: BoundsFrom<'_, T>,
    eps: f64,
    limits: &FastLimits,
    threads: usize,
    route: Route,
) -> Result<FastCall> {
    count_plan();
    let _s = profile::span(Phase::Plan);
    prob.validate()?;
    pos.validate(prob)?;
    if let Some(b) = bias {
        b.validate(prob)?;
    }
    if prob.nq == 0 || prob.nk == 0 || prob.batch * prob.hq == 0 {
        return Err(Error::Approximation(
            "fast method: nothing to approximate (an empty axis)".into(),
        ));
    }
    let logf = LogFactor::new(prob, bias);
    let shape = FastShape {
        nq: prob.nq,
        nk: prob.nk,
        d: prob.d,
        dv: prob.dv,
    };
    // Group heads by (w table, bias table), in order of first appearance.
    let mut groups: Vec<(usize, usize, Vec<usize>)> = Vec::new();
    for bh in 0..prob.batch * prob.hq {
        let key = (w_table(pos, bh), bias.map_or(0, |b| b.index[bh]));
        match groups.iter_mut().find(|g| (g.0, g.1) == key) {
            Some(g) => g.2.push(bh),
            None => groups.push((key.0, key.1, vec![bh])),
        }
    }
    let mut out = Vec::with_capacity(groups.len());
    let mut support_all = Vec::new();
    let mut refused = Vec::new();
    for (wt, bt, heads) in groups {
        let fac = factor(&logf, bt);
        let masses = crate::fast::bounds::row_masses(prob.nq, prob.nk, &fac);
        check_underflow(prob, &logf, bt, &masses)?;
        let stats = FactorStats::from_masses(&fac, &masses);
        // RoPE's norms need no table of W (a general W's come from its diagonals).
        let (support, norms) = match pos {
            Position::Rotary(rot) => (rot.support(), rot.norms(prob, &fac)?),
            Position::Sparse(_) => {
                let (support, seqs) = sequences(prob, pos, wt);
                let norms = WNorms::new(prob.d, &support, seqs.view(), &fac)?;
                (support, norms)
            }
        };
        let factor2 = match pos {
            Position::Rotary(r) => r.factor * r.factor,
            Position::Sparse(_) => 0.0,
        };
        let (bounds, r2s): (Vec<FastBounds>, Vec<f64>) = match &from {
            BoundsFrom::Data { q, k, v } => heads
                .par_iter()
                .map(|&bh| {
                    let (b, h) = (bh / prob.hq, bh % prob.hq);
                    let kvh = h / prob.group();
                    let (qh, kh) = (head_f64(q, b, h), head_f64(k, b, kvh));
                    let vmax = abs_max(v.slice(ndarray::s![b, kvh, .., ..]));
                    let score = norms.bound(&support, qh.view(), kh.view(), prob.scale);
                    let r2 = prob.scale.abs() * factor2 * max_norm(qh.view()) * max_norm(kh.view());
                    (FastBounds::with_factor(score, vmax, &stats), r2)
                })
                .unzip(),
            BoundsFrom::Given { r, v_max } => {
                if !(r.is_finite() && *r >= 0.0 && v_max.is_finite() && *v_max >= 0.0) {
                    return Err(Error::Value(format!(
                        "bound_r, v_max: expected finite values >= 0, got {r} and {v_max}"
                    )));
                }
                let score = ScoreBound {
                    r: *r,
                    r_abs: *r,
                    spectral: *r,
                    blocks: *r,
                };
                (
                    vec![FastBounds::with_factor(score, *v_max, &stats)],
                    vec![*r],
                )
            }
        };
        let worst = bounds.iter().skip(1).fold(bounds[0], |a, b| a.worst(b));
        let r2 = r2s.iter().fold(0.0f64, |a, &b| a.max(b));
        let plan = choose(
            shape,
            &support,
            &worst,
            lowrank_of(prob, pos, bias.map(|b| (b, bt)), r2, route),
            heads.len() as f64,
            eps,
            limits,
            route,
            &mut refused,
        )?;
        support_all = support;
        out.push(FastGroup {
            heads,
            w_table: wt,
            bias_table: bt,
            plan,
            norms,
        });
    }
    let flops = out
        .iter()
        .map(|g| g.plan.kernel_flops + g.heads.len() as f64 * (g.plan.flops - g.plan.kernel_flops))
        .sum();
    let working_bytes = out
        .iter()
        .map(|g| group_bytes(&g.plan, g.heads.len(), threads))
        .max()
        .unwrap_or(0);
    let certified_error = out
        .iter()
        .map(|g| g.plan.certified_error)
        .fold(0.0, f64::max);
    let certified_lse_error = out
        .iter()
        .map(|g| g.plan.certified_lse_error)
        .fold(0.0, f64::max);
    Ok(FastCall {
        support: support_all,
        groups: out,
        flops,
        working_bytes,
        certified_error,
        certified_lse_error,
        refused,
        data_checked: false,
    })
}

/// One group's route: the cheaper of the routes that `route` allows and that certify `eps`
/// (flops for the group's heads: the Toeplitz kernel spectra once, the rest per head), each
/// other route recorded in `refused` with its reason.
#[allow(clippy::too_many_arguments)]
fn choose(
    shape: FastShape,
    support: &[(usize, usize)],
    worst: &FastBounds,
    lowrank: std::result::Result<LowRank, String>,
    heads: f64,
    eps: f64,
    limits: &FastLimits,
    route: Route,
    refused: &mut Vec<Refusal>,
) -> Result<FastPlan> {
    let low = lowrank.map(|lr| lowrank_plan(shape, worst, lr, eps, limits));
    let toeplitz = route
        .allows("toeplitz")
        .then(|| fast_plan(shape, support, worst, eps, limits));
    let total = |p: &FastPlan| p.kernel_flops + heads * (p.flops - p.kernel_flops);
    match (toeplitz, low) {
        (Some(Ok(t)), Ok(Ok(l))) => {
            let (ft, fl) = (total(&t), total(&l));
            if fl <= ft {
                let why = format!("predicted {ft:.3e} flop against the low-rank route's {fl:.3e}");
                refuse(refused, "toeplitz", why);
                Ok(l)
            } else {
                let why = format!("predicted {fl:.3e} flop against the Toeplitz route's {ft:.3e}");
                refuse(refused, "lowrank", why);
                Ok(t)
            }
        }
        (Some(Err(te)), Ok(Ok(l))) => {
            refuse(refused, "toeplitz", te.to_string());
            Ok(l)
        }
        (Some(Ok(t)), Ok(Err(le))) => {
            refuse(refused, "lowrank", le.to_string());
            Ok(t)
        }
        (Some(Ok(t)), Err(why)) => {
            refuse(refused, "lowrank", why);
            Ok(t)
        }
        (None, Ok(Ok(l))) => {
            refuse(refused, "toeplitz", "route='lowrank' was requested".into());
            Ok(l)
        }
        (Some(Err(te)), Err(why)) => Err(approximation(
            format!("{te}; the low-rank route: {why}"),
            te,
        )),
        (Some(Err(te)), Ok(Err(le))) => {
            let msg = super::no_route("fast", eps, &le.to_string(), &te.to_string());
            Err(approximation(msg, te))
        }
        (None, Ok(Err(le))) => Err(approximation(
            format!("route='lowrank' was requested; the low-rank route: {le}"),
            le,
        )),
        (None, Err(why)) => Err(Error::Approximation(format!(
            "route='lowrank' was requested; the low-rank route {why}"
        ))),
    }
}

/// `msg` as an [`Error::Approximation`], unless `e` is another kind of error (kept as it is).
fn approximation(msg: String, e: Error) -> Error {
    match e {
        Error::Approximation(_) => Error::Approximation(msg),
        other => other,
    }
}

/// The peak bytes of one group: its shared kernel spectra (none when streamed) plus one head's
/// working set (with its chunk of spectra when streamed) per thread.
fn group_bytes(plan: &FastPlan, heads: usize, threads: usize) -> usize {
    let shared = plan.shared_bytes();
    let per_head = plan.working_bytes.saturating_sub(shared);
    shared.saturating_add(per_head.saturating_mul(threads.min(heads).max(1)))
}

/// The group's kernel: its spectra from the kernel cache ([`crate::fast::cache`]) or built
/// (and cached), paired with the group's own plan. The call's memory budget
/// (`max_working_bytes` per thread) bounds what the cache holds during the call: other entries
/// are evicted until they and the group's working set fit, and a new kernel is kept only if it
/// still fits. Streamed spectra are cached under their own kind, as what they hold (the
/// expansion, norms, masses and the sequences they are rebuilt from), never as full spectra.
fn cached_kernel(
    g: &FastGroup,
    prob: &Problem,
    support: &[(usize, usize)],
    seqs: ndarray::ArrayView2<f64>,
    fac: &[f64],
    limits: &FastLimits,
) -> Result<FastKernel> {
    let threads = rayon::current_num_threads().max(1);
    let budget = limits.max_working_bytes.saturating_mul(threads);
    let working = group_bytes(&g.plan, g.heads.len(), threads);
    let coeffs = &g.plan.poly.coeffs;
    let streamed = g.plan.streamed();
    let kind = if streamed {
        "forward-streamed"
    } else {
        "forward"
    };
    let key = KernelKey::new(
        kind, prob.nq, prob.nk, prob.d, support, prob.scale, coeffs, seqs, fac,
    );
    let cache = cache::global();
    cache.make_room(budget.saturating_sub(working), &key);
    let held = budget.saturating_sub(working - g.plan.shared_bytes().min(working));
    let make = if streamed {
        FastSpectra::build_streamed
    } else {
        FastSpectra::build
    };
    let spectra = cache.get_or_build(key, held, || {
        let s = make(
            coeffs,
            (prob.nq, prob.nk, prob.d),
            support,
            seqs,
            fac,
            prob.scale,
            limits.max_terms,
            true,
        )?;
        let bytes = s.bytes();
        Ok((s, bytes))
    })?;
    FastKernel::with_spectra(&g.plan, spectra)
}

/// Runs a planned fast call: `(out, lse)` like [`crate::exact::attention_forward`].
#[allow(clippy::too_many_arguments)]
pub fn run_fast<'a, T: Real>(
    call: &FastCall,
    prob: &Problem,
    pos: &Position<'a, T>,
    bias: Option<&Bias<'a, T>>,
    q: ArrayView4<'_, T>,
    k: ArrayView4<'_, T>,
    v: ArrayView4<'_, T>,
    limits: &FastLimits,
    ctl: &Control,
) -> Result<(Array4<T>, Array3<T>)> {
    let (nq, dv) = (prob.nq, prob.dv);
    let mut out = Array4::<T>::zeros((prob.batch, prob.hq, nq, dv));
    let mut lse = Array3::<T>::from_elem((prob.batch, prob.hq, nq), T::neg_infinity());
    let logf = LogFactor::new(prob, bias);
    for g in &call.groups {
        ctl.check()?;
        if let (Some(lr), Position::Rotary(rot)) = (g.plan.lowrank, pos) {
            let (norms, support) = (&g.norms, &call.support);
            let c = prob.q_offset - prob.k_offset;
            // Each head writes its own slices of `out` and `lse` (disjoint views, in parallel).
            let bhs = prob.batch * prob.hq;
            let reshaped = |e| Error::Value(format!("fast output: {e}"));
            let mut out3 = out
                .view_mut()
                .into_shape_with_order((bhs, nq, dv))
                .map_err(reshaped)?;
            let mut lse2 = lse
                .view_mut()
                .into_shape_with_order((bhs, nq))
                .map_err(reshaped)?;
            let mut views: Vec<_> = out3
                .outer_iter_mut()
                .zip(lse2.outer_iter_mut())
                .map(Some)
                .collect();
            let jobs: Vec<_> = g
                .heads
                .iter()
                .map(|&bh| (bh, views[bh].take().expect("each head once")))
                .collect();
            jobs.into_par_iter()
                .map(|(bh, (o, l))| {
                    ctl.check()?;
                    let check = profile::span(Phase::Check);
                    let (b, h) = (bh / prob.hq, bh % prob.hq);
                    let kvh = h / prob.group();
                    let (qh, kh) = (head_f64(&q, b, h), head_f64(&k, b, kvh));
                    let vh = head_f64(&v, b, kvh);
                    if !call.data_checked {
                        head_within(&g.plan, lr.r2, norms, support, rot, prob, &qh, &kh, &vh)?;
                    }
                    drop(check);
                    let (x, y) = profile::time(Phase::Rotate, || {
                        let mul = prob.scale * rot.factor * rot.factor;
                        rotate_pair(rot, qh.view(), kh.view(), c, mul)
                    });
                    lowrank_head_into(&g.plan, x.view(), y.view(), vh.view(), o, l, ctl).map(|_| ())
                })
                .collect::<Result<()>>()?;
            continue;
        }
        let (support, seqs) = sequences(prob, pos, g.w_table);
        let fac = factor(&logf, g.bias_table);
        let kernel = cached_kernel(g, prob, &support, seqs.view(), &fac, limits)?;
        let results: Vec<Result<(usize, crate::fast::FastOutput)>> = g
            .heads
            .par_iter()
            .map(|&bh| {
                ctl.check()?;
                let (b, h) = (bh / prob.hq, bh % prob.hq);
                let kvh = h / prob.group();
                let (qh, kh) = (head_f64(&q, b, h), head_f64(&k, b, kvh));
                let vh = head_f64(&v, b, kvh);
                Ok((bh, kernel.apply(qh.view(), kh.view(), vh.view())?))
            })
            .collect();
        scatter(prob, results, &mut out, &mut lse)?;
    }
    Ok((out, lse))
}

/// Refuses a head outside the bounds its low-rank plan certified (the certificate holds for
/// this head only within them).
#[allow(clippy::too_many_arguments)]
fn head_within(
    plan: &FastPlan,
    r2_plan: f64,
    norms: &WNorms,
    support: &[(usize, usize)],
    rot: &crate::position::RotaryW,
    prob: &Problem,
    qh: &ndarray::CowArray<f64, ndarray::Ix2>,
    kh: &ndarray::CowArray<f64, ndarray::Ix2>,
    vh: &ndarray::CowArray<f64, ndarray::Ix2>,
) -> Result<()> {
    let score = norms.bound(support, qh.view(), kh.view(), prob.scale);
    let vmax = abs_max(vh.view());
    let r2 = prob.scale.abs() * rot.factor * rot.factor * max_norm(qh.view()) * max_norm(kh.view());
    if score.r > plan.bounds.r || vmax > plan.bounds.v_max || r2 > r2_plan {
        return Err(Error::Approximation(
            "fast method (low-rank): a head is outside the bounds its plan certified".into(),
        ));
    }
    Ok(())
}

/// Per-head results into the call's `(out, lse)`, or the first error.
fn scatter<T: Real>(
    prob: &Problem,
    results: Vec<Result<(usize, crate::fast::FastOutput)>>,
    out: &mut Array4<T>,
    lse: &mut Array3<T>,
) -> Result<()> {
    for r in results {
        let (bh, fo) = r?;
        let (b, h) = (bh / prob.hq, bh % prob.hq);
        let mut o = out.slice_mut(ndarray::s![b, h, .., ..]);
        o.zip_mut_with(&fo.out, |x, &y| *x = T::of(y));
        let mut l = lse.slice_mut(ndarray::s![b, h, ..]);
        l.zip_mut_with(&fo.lse, |x, &y| *x = T::of(y));
    }
    Ok(())
}
