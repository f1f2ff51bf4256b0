//! Runs a planned fast backward ([`super::backward::FastBackwardCall`]) over its groups of heads:
//! the kernel of each group from the kernel cache, the heads of a group in parallel (one after
//! another with dw/dbias), and each head certified from its own data.

use crate::arch::Real;
use crate::error::{Error, Result};
use crate::exact::backward::Grads;
use crate::fast::cache::{self, KernelKey};
use crate::fast::grad_bounds::{approximation_errors, GradBounds};
use crate::fast::lowrank::{lowrank_backward_head, lowrank_grad_rounding};
use crate::fast::lowrank::{rotate, rotate_back};
use crate::fast::toeplitz::{backward_pair_chunk, BackwardKernel, BackwardSpectra};
use crate::fast::FastLimits;
use crate::fast::Grad5;
use crate::fast::LowRankGrad;
use crate::plan::forward::{factor, head_f64, max_norm, sequences};
use crate::poly::WNorms;
use crate::position::{Bias, LogFactor, Position};
use crate::problem::{Control, Problem};
use crate::profile::{self, Phase};
use ndarray::{Array2, Array3, Array4, ArrayView3, ArrayView4};
use rayon::prelude::*;

use super::backward::{check_dlse, group_bytes, FastBackwardCall, FastBackwardGroup};

/// The group's kernel: its spectra from the kernel cache ([`crate::fast::cache`]) or built
/// (and cached), paired with the group's own plan; the cache is held within the call's memory
/// budget as in [`crate::plan::forward`].
fn cached_kernel(
    g: &FastBackwardGroup,
    prob: &Problem,
    support: &[(usize, usize)],
    seqs: ndarray::ArrayView2<f64>,
    fac: &[f64],
    limits: &FastLimits,
    serial: bool,
) -> Result<BackwardKernel> {
    let threads = rayon::current_num_threads().max(1);
    let budget = limits.max_working_bytes.saturating_mul(threads);
    let working = group_bytes(&g.plan, g.heads.len(), threads, serial);
    let coeffs = &g.plan.poly.coeffs;
    let with_dw = g.plan.want.dw;
    // Streamed spectra are cached under their own kind, as what they hold (no spectra).
    let streamed = backward_pair_chunk(&g.plan, support.len()).is_some();
    let kind = match (with_dw, streamed) {
        (true, false) => "backward+dw",
        (false, false) => "backward",
        (true, true) => "backward+dw-streamed",
        (false, true) => "backward-streamed",
    };
    let key = KernelKey::new(
        kind, prob.nq, prob.nk, prob.d, support, prob.scale, coeffs, seqs, fac,
    );
    let cache = cache::global();
    cache.make_room(budget.saturating_sub(working), &key);
    let held = budget.saturating_sub(working - g.plan.kernel_bytes.min(working));
    let make = if streamed {
        BackwardSpectra::build_streamed
    } else {
        BackwardSpectra::build
    };
    let spectra = cache.get_or_build(key, held, || {
        let s = make(
            coeffs,
            (prob.nq, prob.nk, prob.d),
            with_dw,
            support,
            seqs,
            fac,
            prob.scale,
            limits.max_terms,
        )?;
        let bytes = s.bytes();
        Ok((s, bytes))
    })?;
    BackwardKernel::with_spectra(&g.plan, spectra)
}

/// Runs a planned fast backward: gradients like [`crate::exact::attention_backward`] (dw in the
/// `(tables, 2L-1, |S|)` layout, dbias in `(tables, 2L_b-1)`), and the certified error of each
/// gradient (sums over the heads adding into it, from each head's own certificate), with the
/// approximate forward `(out, lse)` the gradients belong to.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn run_fast_backward<'a, T: Real>(
    call: &FastBackwardCall,
    prob: &Problem,
    pos: &Position<'a, T>,
    bias: Option<&Bias<'a, T>>,
    q: ArrayView4<'_, T>,
    k: ArrayView4<'_, T>,
    v: ArrayView4<'_, T>,
    dout: ArrayView4<'_, T>,
    dlse: Option<ArrayView3<'_, T>>,
    limits: &FastLimits,
    ctl: &Control,
) -> Result<(Grads<T>, Array4<T>, Array3<T>, Grad5)> {
    let (nq, nk, d, dv) = (prob.nq, prob.nk, prob.d, prob.dv);
    if dout.dim() != (prob.batch, prob.hq, nq, dv) {
        return Err(Error::Value(format!(
            "dout: expected shape {:?}, got {:?}",
            (prob.batch, prob.hq, nq, dv),
            dout.dim()
        )));
    }
    let dlse_max = check_dlse(prob, dlse.as_ref())?;
    if dlse_max > 0.0 && call.groups.iter().any(|g| g.plan.lowrank.is_none()) {
        return Err(Error::Approximation(
            "fast backward: a cotangent for lse (dlse) is taken by the low-rank path only".into(),
        ));
    }
    let glen = prob.glen();
    let want = call.want;
    let mut dq = Array4::<T>::zeros((prob.batch, prob.hq, nq, d));
    let mut out = Array4::<T>::zeros((prob.batch, prob.hq, nq, dv));
    let mut lse = Array3::<T>::from_elem((prob.batch, prob.hq, nq), T::neg_infinity());
    // dk, dv summed over the query heads of each kv head, in f64, in head order.
    let mut dk64 = Array4::<f64>::zeros((prob.batch, prob.hk, nk, d));
    let mut dv64 = Array4::<f64>::zeros((prob.batch, prob.hk, nk, dv));
    let ns = call.support.len();
    let sparse = match pos {
        Position::Sparse(sp) => Some(sp),
        Position::Rotary(_) => None,
    };
    let mut dw_acc: Vec<Vec<f64>> = match sparse {
        Some(sp) if want.dw => vec![Vec::new(); sp.values.dim().0],
        _ => Vec::new(),
    };
    let mut db_acc: Vec<Vec<f64>> = match bias {
        Some(b) if want.db => vec![Vec::new(); b.values.dim().0],
        _ => Vec::new(),
    };
    // Per-entry certificates: dq per head, dk/dv per kv head, dw per table, db per table.
    let mut cert_dq = 0.0f64;
    let mut cert_kv = vec![(0.0f64, 0.0f64); prob.batch * prob.hk];
    let mut cert_w = vec![0.0f64; dw_acc.len()];
    let mut cert_b = vec![0.0f64; db_acc.len()];
    let logf = LogFactor::new(prob, bias);
    let serial = want.dw || want.db;
    for g in &call.groups {
        ctl.check()?;
        let (support, seqs) = sequences(prob, pos, g.w_table);
        let fac = factor(&logf, g.bias_table);
        let results: Vec<Result<(usize, crate::fast::HeadGrads)>> =
            if let (Some(lg), Position::Rotary(rot)) = (g.plan.lowrank, pos) {
                let norms = WNorms::new(prob.d, &support, seqs.view(), &fac)?;
                g.heads
                    .par_iter()
                    .enumerate()
                    .map(|(idx, &bh)| {
                        lowrank_one(
                            g,
                            idx,
                            bh,
                            lg,
                            rot,
                            &norms,
                            &support,
                            prob,
                            [&q, &k, &v, &dout],
                            dlse.as_ref(),
                            call.data_checked,
                            ctl,
                        )
                    })
                    .collect()
            } else {
                let kernel = cached_kernel(g, prob, &support, seqs.view(), &fac, limits, serial)?;
                let one =
                    |(idx, &bh): (usize, &usize),
                     corr: Option<&mut crate::fast::toeplitz::backward::CorrelationAccumulator>|
                     -> Result<(usize, crate::fast::HeadGrads)> {
                        ctl.check()?;
                        let (b, h) = (bh / prob.hq, bh % prob.hq);
                        let kvh = h / prob.group();
                        let (qh, kh) = (head_f64(&q, b, h), head_f64(&k, b, kvh));
                        let (vh, dh) = (head_f64(&v, b, kvh), head_f64(&dout, b, h));
                        let ps = g.psums.get(idx);
                        Ok((
                            bh,
                            kernel.apply(qh.view(), kh.view(), vh.view(), dh.view(), corr, ps)?,
                        ))
                    };
                if serial {
                    let mut corr = kernel.accumulator()?;
                    let r: Vec<_> = g
                        .heads
                        .iter()
                        .enumerate()
                        .map(|x| one(x, Some(&mut corr)))
                        .collect();
                    if r.iter().all(|x| x.is_ok()) {
                        let (dw, db) = kernel.finish(corr)?;
                        let cw: f64 = r.iter().flatten().map(|x| x.1.cert.certified.dw).sum();
                        let cb: f64 = r.iter().flatten().map(|x| x.1.cert.certified.db).sum();
                        if let Some(dw) = dw {
                            let acc = &mut dw_acc[g.w_table];
                            if acc.is_empty() {
                                acc.resize(ns * glen, 0.0);
                            }
                            acc.iter_mut().zip(dw.iter()).for_each(|(a, x)| *a += x);
                            cert_w[g.w_table] += cw;
                        }
                        if let Some(db) = db {
                            let acc = &mut db_acc[g.bias_table];
                            if acc.is_empty() {
                                acc.resize(glen, 0.0);
                            }
                            acc.iter_mut().zip(&db).for_each(|(a, x)| *a += x);
                            cert_b[g.bias_table] += cb;
                        }
                    }
                    r
                } else {
                    g.heads
                        .par_iter()
                        .enumerate()
                        .map(|x| one(x, None))
                        .collect()
                }
            };
        for r in results {
            let (bh, hg) = r?;
            let (b, h) = (bh / prob.hq, bh % prob.hq);
            let kvh = h / prob.group();
            dq.slice_mut(ndarray::s![b, h, .., ..])
                .zip_mut_with(&hg.dq, |x, &y| *x = T::of(y));
            out.slice_mut(ndarray::s![b, h, .., ..])
                .zip_mut_with(&hg.out, |x, &y| *x = T::of(y));
            lse.slice_mut(ndarray::s![b, h, ..])
                .zip_mut_with(&hg.lse, |x, &y| *x = T::of(y));
            dk64.slice_mut(ndarray::s![b, kvh, .., ..])
                .zip_mut_with(&hg.dk, |x, &y| *x += y);
            dv64.slice_mut(ndarray::s![b, kvh, .., ..])
                .zip_mut_with(&hg.dv, |x, &y| *x += y);
            let c = hg.cert.certified;
            cert_dq = cert_dq.max(c.dq);
            let e = &mut cert_kv[b * prob.hk + kvh];
            e.0 += c.dk;
            e.1 += c.dv;
        }
    }
    let mut grads = Grads {
        dq,
        dk: dk64.mapv(T::of),
        dv: dv64.mapv(T::of),
        dw: None,
        dbias: None,
    };
    if let Some(sp) = sparse.filter(|_| want.dw) {
        let (nw, rows, _) = sp.values.dim();
        let half = (rows as i64 - 1) / 2;
        let mut dw = Array3::<T>::zeros((nw, rows, ns));
        for (t, acc) in dw_acc.iter().enumerate().filter(|(_, a)| !a.is_empty()) {
            for gi in 0..glen {
                let row = prob.delta(gi) + half;
                if (0..rows as i64).contains(&row) {
                    for s in 0..ns {
                        dw[[t, row as usize, s]] = T::of(acc[s * glen + gi]);
                    }
                }
            }
        }
        grads.dw = Some(dw);
    }
    if let Some(b) = bias.filter(|_| want.db) {
        let (nb, rows) = b.values.dim();
        let half = (rows as i64 - 1) / 2;
        let mut db = Array2::<T>::zeros((nb, rows));
        for (t, acc) in db_acc.iter().enumerate().filter(|(_, a)| !a.is_empty()) {
            for (gi, &x) in acc.iter().enumerate() {
                let row = prob.delta(gi) + half;
                if (0..rows as i64).contains(&row) {
                    db[[t, row as usize]] = T::of(x);
                }
            }
        }
        grads.dbias = Some(db);
    }
    let cert = Grad5 {
        dq: cert_dq,
        dk: cert_kv.iter().map(|x| x.0).fold(0.0, f64::max),
        dv: cert_kv.iter().map(|x| x.1).fold(0.0, f64::max),
        dw: cert_w.iter().copied().fold(0.0, f64::max),
        db: cert_b.iter().copied().fold(0.0, f64::max),
    };
    Ok((grads, out, lse, cert))
}

/// One head of a low-rank group: checks that the head is within the bounds its plan certified,
/// rotates, runs [`lowrank_backward_head`], rotates the gradients back, and certifies the head
/// from its own bounds (never looser than the plan's). With `data_checked` (the plan was made
/// from these very arrays) the check is skipped and the head carries its plan's certificate.
#[allow(clippy::too_many_arguments)]
fn lowrank_one<T: Real>(
    g: &FastBackwardGroup,
    idx: usize,
    bh: usize,
    lg: LowRankGrad,
    rot: &crate::position::RotaryW,
    norms: &WNorms,
    support: &[(usize, usize)],
    prob: &Problem,
    arrays: [&ArrayView4<'_, T>; 4],
    dlse: Option<&ArrayView3<'_, T>>,
    data_checked: bool,
    ctl: &Control,
) -> Result<(usize, crate::fast::HeadGrads)> {
    ctl.check()?;
    let [q, k, v, dout] = arrays;
    let plan = &g.plan;
    let check = profile::span(Phase::Check);
    let (b, h) = (bh / prob.hq, bh % prob.hq);
    let kvh = h / prob.group();
    let (qh, kh) = (head_f64(q, b, h), head_f64(k, b, kvh));
    let (vh, dh) = (head_f64(v, b, kvh), head_f64(dout, b, h));
    let gh: Option<ndarray::Array1<f64>> =
        dlse.map(|g| g.slice(ndarray::s![b, h, ..]).mapv(|x| x.f64()));
    let own = if data_checked {
        None
    } else {
        Some(own_certificate(
            g,
            idx,
            lg,
            norms,
            support,
            prob,
            [qh.view(), kh.view(), vh.view(), dh.view()],
            gh.as_ref(),
        )?)
    };
    drop(check);
    let c = prob.q_offset - prob.k_offset;
    let mul = prob.scale * rot.factor * rot.factor;
    let (x, y) = profile::time(Phase::Rotate, || {
        (
            rotate(rot, qh.view(), c, mul),
            rotate(rot, kh.view(), 0, 1.0),
        )
    });
    let mut hg = lowrank_backward_head(
        plan,
        x.view(),
        y.view(),
        vh.view(),
        dh.view(),
        gh.as_ref().map(|g| g.view()),
        ctl,
    )?;
    let rotate_span = profile::span(Phase::Rotate);
    hg.dq = rotate_back(rot, hg.dq.view(), c, mul);
    hg.dk = rotate_back(rot, hg.dk.view(), 0, 1.0);
    drop(rotate_span);
    hg.cert = own.unwrap_or_else(|| crate::fast::lowrank::cert_of(plan));
    if let Some(msg) = plan.over_message(&hg.cert, "this head's") {
        return Err(Error::Approximation(msg));
    }
    Ok((bh, hg))
}

/// The certificate of one head of a low-rank group from its own bounds (each part no looser
/// than the plan's), or the refusal of a head outside the bounds its plan certified.
#[allow(clippy::too_many_arguments)]
fn own_certificate(
    g: &FastBackwardGroup,
    idx: usize,
    lg: LowRankGrad,
    norms: &WNorms,
    support: &[(usize, usize)],
    prob: &Problem,
    [qh, kh, vh, dh]: [ndarray::ArrayView2<'_, f64>; 4],
    gh: Option<&ndarray::Array1<f64>>,
) -> Result<crate::fast::GradCertificate> {
    let plan = &g.plan;
    let score = norms.bound(support, qh, kh, prob.scale);
    let vmax = vh.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let (kx, ky) = (lg.mul * max_norm(qh), max_norm(kh));
    let gb = GradBounds::new(norms, support, prob.scale, qh, kh, vh, dh);
    let gb = match gh {
        Some(g) => gb.with_dlse(g.iter().fold(0.0f64, |m, x| m.max(x.abs()))),
        None => gb,
    };
    let ps = g.psums.get(idx).copied().unwrap_or(plan.psums);
    if score.r > plan.bounds.r
        || vmax > plan.bounds.v_max
        || kx > lg.kx
        || ky > lg.ky
        || !gb.within(&plan.grad)
        || !ps.within(&plan.psums)
    {
        return Err(Error::Approximation(format!(
            "fast backward (low-rank): this head (R = {:.4}, max|v| = {:.4}, max|dout| = {:.4}) \
             exceeds the bounds its plan certified (R = {:.4}, max|v| = {:.4}, max|dout| = {:.4})",
            score.r, vmax, gb.do_max, plan.bounds.r, plan.bounds.v_max, plan.grad.do_max
        )));
    }
    let own = LowRankGrad {
        kx,
        ky,
        lr: crate::fast::LowRank {
            r2: kx * ky,
            ..lg.lr
        },
        ..lg
    };
    let (rho, rho_d) = (plan.poly.rho, plan.rho_d);
    let (approx, mag) = approximation_errors(rho, rho_d, &gb, &ps);
    let rounding = lowrank_grad_rounding(&plan.poly, plan.shape, score.r, vmax, &gb, &own);
    let want = plan.want;
    let approx = approx.masked(want).zip(plan.approximation, f64::min);
    let rounding = rounding.masked(want).zip(plan.rounding, f64::min);
    let output = mag
        .plus(plan.eps)
        .zip(mag, |a, _| a * plan.out_rel)
        .masked(want)
        .zip(plan.output, f64::min);
    let certified = approx.plus(rounding).plus(output);
    Ok(crate::fast::GradCertificate {
        approximation: approx,
        rounding,
        output,
        certified,
    })
}
