//! Exact backward, FlashAttention-2's recompute scheme.
//!
//! With `P = A / l` recomputed per tile from `lse` (`P_ij = exp(S_ij - lse_i)`),
//! `D_i = Σ_c dO_ic O_ic` and `dS = P ∘ (dO V^T - D)`:
//!
//! ```text
//! dV_j  = Σ_i P_ij dO_i
//! dq_i  = scale Σ_j dS_ij W_δ k_j          dk_j = scale Σ_i dS_ij W_δ^T q_i
//! dW_δ  = scale Σ_{i-j=δ} dS_ij q_i k_j^T  (on the support)      db(δ) = Σ_{i-j=δ} dS_ij
//! ```
//!
//! A unit of work is a chunk of key tiles of one `(batch, kv head)`, over every query head of its
//! group (GQA shares the K/V tiles). Per key tile and query block it recomputes `P` and `dS`
//! (strip by strip, on the micro-kernel), then `dV += P^T dO` and, for rotary, `dK += dS^T Q̃`
//! and `dQ̃ += dS K̃`: five GEMMs. For sparse `W`, dq, dk and dW come from [`super::sparse`]'s
//! diagonal kernels. Long calls also split the queries into chunks: a unit is then a key chunk
//! against a query chunk. Its dq, dk, dv, dW and db are partial sums; units run in waves of one to
//! four per thread, and the partials of a wave are added to the gradients after it, in unit
//! order (deterministic for a given thread count).
//!
//! Memory beyond inputs and outputs is linear in n and small: queries and `dO` are packed (and
//! rotated) per tile, a unit packs the keys and values of its own key chunk, the query chunks
//! keep each unit's partials to a few MiB ([`PART_BUDGET`]), and long sparse-W calls build the
//! diagonal sequences per tile ([`super::sparse::segment`]).

use super::forward::check_shapes;
use super::kernel::round_up;
use super::sparse::{padded, PAD_L};
use super::Shared;
use crate::arch::Real;
use crate::error::{Error, Result};
use crate::position::{table_row, Bias, Position};
use crate::problem::{Control, Problem};
use ndarray::{Array2, Array3, Array4, ArrayView3, ArrayView4};
use rayon::prelude::*;

mod unit;

use unit::{Ctx, Unit, UnitGrad};

/// Gradients from [`attention_backward`]; `dw` is `(tables, 2L-1, |S|)` for sparse `W` when
/// asked for, `dbias` `(tables, 2L_b-1)` when a bias was given and asked for.
pub struct Grads<T> {
    pub dq: Array4<T>,
    pub dk: Array4<T>,
    pub dv: Array4<T>,
    pub dw: Option<Array3<T>>,
    pub dbias: Option<Array2<T>>,
}

/// What the backward reads besides q, k, v.
pub struct BackwardInputs<'a, T> {
    pub out: ArrayView4<'a, T>,
    pub lse: ArrayView3<'a, T>,
    pub dout: ArrayView4<'a, T>,
    pub want_dw: bool,
    pub want_dbias: bool,
    /// Threads the caller will run on: sets how finely key chunks are split.
    pub threads: usize,
}

/// Bytes of partial results held at once, at most.
const WAVE_BUDGET: usize = 256 << 20;

/// Bytes of partial results a wave may hold to run more than one unit per thread.
const WAVE_MEM: usize = 32 << 20;

/// Bytes of a unit's query-side partials (dq and the dW/db diagonals) above which the queries
/// are split into chunks.
const PART_BUDGET: usize = 8 << 20;

#[cfg(test)]
thread_local! {
    /// Tests: [`PART_BUDGET`] for calls made from this thread.
    pub static PART_BUDGET_OVERRIDE: std::cell::Cell<Option<usize>> =
        const { std::cell::Cell::new(None) };
}

#[allow(clippy::too_many_arguments)]
pub fn attention_backward<'a, T: Real>(
    prob: &Problem,
    pos: &Position<'a, T>,
    bias: Option<&Bias<'a, T>>,
    q: ArrayView4<'_, T>,
    k: ArrayView4<'_, T>,
    v: ArrayView4<'_, T>,
    inp: &BackwardInputs<'_, T>,
    ctl: &Control,
) -> Result<Grads<T>> {
    check_shapes(prob, &q, &k, &v)?;
    pos.validate(prob)?;
    if let Some(b) = bias {
        b.validate(prob)?;
    }
    let (nq, nk, d, dv) = (prob.nq, prob.nk, prob.d, prob.dv);
    let o_shape = (prob.batch, prob.hq, nq, dv);
    if inp.out.dim() != o_shape || inp.dout.dim() != o_shape {
        return Err(Error::Value(format!(
            "out/dout: expected shape {o_shape:?}, got {:?} and {:?}",
            inp.out.dim(),
            inp.dout.dim()
        )));
    }
    if inp.lse.dim() != (prob.batch, prob.hq, nq) {
        return Err(Error::Value(format!(
            "lse: expected shape {:?}, got {:?}",
            (prob.batch, prob.hq, nq),
            inp.lse.dim()
        )));
    }
    let mut g = Grads {
        dq: Array4::zeros((prob.batch, prob.hq, nq, d)),
        dk: Array4::zeros((prob.batch, prob.hk, nk, d)),
        dv: Array4::zeros((prob.batch, prob.hk, nk, dv)),
        dw: None,
        dbias: None,
    };
    let sparse_w = match pos {
        Position::Sparse(sp) => Some(sp),
        Position::Rotary(_) => None,
    };
    let want_dw = inp.want_dw && sparse_w.is_some();
    let want_db = inp.want_dbias && bias.is_some();
    let ns = sparse_w.map_or(0, |sp| sp.support.len());
    // dW accumulates in the output itself, `(tables, 2L-1, |S|)`.
    let mut dw: Option<Array3<T>> = match sparse_w {
        Some(sp) if want_dw => Some(Array3::zeros(sp.values.dim())),
        _ => None,
    };
    let mut db_acc: Vec<Vec<f64>> = match bias {
        Some(b) if want_db => vec![Vec::new(); b.values.dim().0],
        _ => Vec::new(),
    };
    if nq > 0 && nk > 0 && dv > 0 && d > 0 && prob.batch * prob.hq > 0 {
        let mut sh = Shared::new(prob, pos, bias, true);
        if sparse_w.is_some() {
            // The diagonal kernels read k^T of the whole head; rotary units pack their chunk.
            sh.pack_keys(&k);
        }
        let ctx = Ctx::new(&sh, &q, &k, &v, inp);
        let (bq, bk) = (sh.tiles.bq, sh.tiles.bk);
        // Key chunks: enough units to keep every thread busy at batch 1, one head.
        let heads = prob.batch * prob.hk;
        let nkb = nk.div_ceil(bk);
        let per_head = (4 * inp.threads.max(1)).div_ceil(heads).clamp(1, nkb);
        let mut chunk = bk * nkb.div_ceil(per_head);
        // Query chunks: all queries unless a unit's dq and dW/db partials would outgrow
        // PART_BUDGET; then key chunks of at most 4096 keys too.
        let elt = std::mem::size_of::<T>();
        let per_row = elt * prob.group() * (d + ns * want_dw as usize + want_db as usize);
        #[cfg(test)]
        let part_budget = PART_BUDGET_OVERRIDE
            .with(|b| b.get())
            .unwrap_or(PART_BUDGET);
        #[cfg(not(test))]
        let part_budget = PART_BUDGET;
        let qchunk = if nq * per_row <= part_budget {
            nq
        } else {
            chunk = chunk.min(round_up(4096, bk));
            (part_budget / per_row / bq).max(1) * bq
        };
        let units: Vec<(usize, usize, usize)> = (0..heads)
            .flat_map(|kvh| {
                (0..nk.div_ceil(chunk)).flat_map(move |c| {
                    (0..nq.div_ceil(qchunk)).map(move |qc| (kvh, c * chunk, qc * qchunk))
                })
            })
            .filter(|&(_, jc0, ic0)| {
                let (g_lo, g_hi) =
                    sh.tile_diagonals(ic0, qchunk.min(nq - ic0), jc0, chunk.min(nk - jc0));
                sh.logf.any_visible(g_lo, g_hi)
            })
            .collect();
        // A unit's partials, held until its wave is reduced. Waves of up to 4 units per thread
        // while they hold at most WAVE_MEM (fewer barriers, which matter when another process
        // takes a core), and at least one per thread.
        let held = elt * chunk * (d + dv + ns * want_dw as usize) + qchunk * per_row;
        let threads = inp.threads.max(1);
        // A whole number of units per thread: a wave of 5 units on 2 threads keeps one thread
        // idle for a third of it (measured: 1.71x instead of 1.86x on 2 threads at n = 4096).
        let wave = (WAVE_MEM / held.max(1))
            .clamp(threads, 4 * threads)
            .min((WAVE_BUDGET / held.max(1)).max(1));
        let wave = if wave >= threads {
            wave / threads * threads
        } else {
            wave
        };
        for units in units.chunks(wave) {
            let parts: Vec<UnitGrad<T>> = units
                .par_iter()
                .map(|&(kvh, jc0, ic0)| {
                    let task = Unit {
                        ctx: &ctx,
                        kvh,
                        jc0,
                        rows: chunk.min(nk - jc0),
                        ic0,
                        nqc: qchunk.min(nq - ic0),
                        want_dw,
                        want_db,
                        ctl,
                    };
                    T::with_lanes(sh.isa, task)
                })
                .collect();
            ctl.check()?;
            for part in parts {
                reduce_unit(prob, &mut g, dw.as_mut(), &mut db_acc, part, ns);
            }
        }
        if let (Position::Rotary(r), Some(rot)) = (pos, &sh.rot) {
            let mult = prob.scale * r.factor;
            if let Some(all) = g.dq.as_slice_mut() {
                all.par_chunks_mut(nq * d)
                    .for_each(|rows| rot.rotate(rows, d, nq, prob.q_offset, mult, true));
            }
        }
    }
    g.dw = dw;
    if let Some(b) = bias.filter(|_| want_db) {
        let (nb, rows) = b.values.dim();
        let half = (rows as i64 - 1) / 2;
        let mut db = Array2::zeros((nb, rows));
        for (t, acc) in db_acc.iter().enumerate().filter(|(_, a)| !a.is_empty()) {
            for (g_i, &x) in acc.iter().enumerate() {
                if let Some(row) = table_row(prob.delta(g_i), half, rows) {
                    db[[t, row]] = T::of(x);
                }
            }
        }
        g.dbias = Some(db);
    }
    // A gradient that is not finite from finite inputs: an intermediate overflowed (e.g.
    // `scale q = inf` times `dS = 0` in dK); one read of the gradients (`O(output)`), the inputs
    // read only then (`lse = -inf` marks a row without keys).
    let finite = |x: Option<ndarray::ArrayViewD<'_, T>>| x.is_none_or(|x| super::all_finite(&x));
    let grads_finite = finite(Some(g.dq.view().into_dyn()))
        && finite(Some(g.dk.view().into_dyn()))
        && finite(Some(g.dv.view().into_dyn()))
        && finite(g.dw.as_ref().map(|x| x.view().into_dyn()))
        && finite(g.dbias.as_ref().map(|x| x.view().into_dyn()));
    if !grads_finite
        && super::inputs_finite(prob, pos, bias, &[&q, &k, &v, &inp.out, &inp.dout])
        && inp
            .lse
            .iter()
            .all(|&x| x.is_finite() || x == T::neg_infinity())
    {
        return Err(super::overflow_error::<T>("dq, dk, dv, dw, dbias"));
    }
    Ok(g)
}

fn reduce_unit<T: Real>(
    prob: &Problem,
    g: &mut Grads<T>,
    dw_out: Option<&mut Array3<T>>,
    db_acc: &mut [Vec<f64>],
    part: UnitGrad<T>,
    ns: usize,
) {
    let (nq, nk, d, dv, glen) = (prob.nq, prob.nk, prob.d, prob.dv, prob.glen());
    let grp = prob.group();
    let add = |dst: &mut [T], src: &[T]| {
        dst.iter_mut().zip(src).for_each(|(x, &y)| *x = *x + y);
    };
    // The gradients are fresh standard-layout arrays.
    let (b, hk) = (part.kvh / prob.hk, part.kvh % prob.hk);
    if let Some(dq) = g.dq.as_slice_mut() {
        let nqc = part.dq.len() / (grp * d).max(1);
        for hg in 0..grp {
            let head = b * prob.hq + hk * grp + hg;
            let at = (head * nq + part.ic0) * d;
            add(
                &mut dq[at..at + nqc * d],
                &part.dq[hg * nqc * d..(hg + 1) * nqc * d],
            );
        }
    }
    let kv_off = part.kvh * nk + part.jc0;
    if let (Some(dk), Some(dvs)) = (g.dk.as_slice_mut(), g.dv.as_slice_mut()) {
        add(&mut dk[kv_off * d..kv_off * d + part.dk.len()], &part.dk);
        add(&mut dvs[kv_off * dv..kv_off * dv + part.dv.len()], &part.dv);
    }
    let stride = padded(part.glen_u);
    if let Some(dw) = dw_out {
        let rows = dw.dim().1;
        let half = (rows as i64 - 1) / 2;
        for (t, buf) in &part.dw {
            for k in 0..part.glen_u {
                let Some(row) = table_row(prob.delta(part.g0 + k), half, rows) else {
                    continue;
                };
                let mut dst = dw.slice_mut(ndarray::s![*t, row, ..]);
                for (s, o) in dst.iter_mut().enumerate().take(ns) {
                    *o = *o + buf[s * stride + PAD_L + k];
                }
            }
        }
    }
    for (t, buf) in part.db {
        let acc = &mut db_acc[t];
        if acc.is_empty() {
            acc.resize(glen, 0.0);
        }
        let src = &buf[PAD_L..PAD_L + part.glen_u];
        for (o, &x) in acc[part.g0..part.g0 + part.glen_u].iter_mut().zip(src) {
            *o += x.f64();
        }
    }
}
