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
//! A unit of work is a chunk of key blocks of one `(batch, kv head)`, over every query head of
//! its group (GQA shares the K/V tiles). dK and dV of a chunk belong to it alone; its dq, dW and
//! db contributions are partial sums, reduced in unit order (deterministic for a given unit
//! split) in waves whose size bounds the memory of the partials.

use super::forward::check_shapes;
use super::{Shared, BK, BQ};
use crate::error::{Error, Result};
use crate::position::{Bias, Position};
use crate::problem::{Control, Problem};
use crate::real::{gemm_rm, gemm_tn, Real};
use ndarray::{Array2, Array3, Array4, ArrayView3, ArrayView4};
use rayon::prelude::*;

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

/// Bytes of partial results held at once.
const WAVE_BUDGET: usize = 256 << 20;

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
    let sparse = match pos {
        Position::Sparse(sp) => Some(sp),
        Position::Rotary(_) => None,
    };
    let want_dw = inp.want_dw && sparse.is_some();
    let want_db = inp.want_dbias && bias.is_some();
    let glen = prob.glen();
    let ns = sparse.map_or(0, |sp| sp.support.len());
    let mut dw_acc: Vec<Vec<f64>> = match sparse {
        Some(sp) if want_dw => vec![Vec::new(); sp.values.dim().0],
        _ => Vec::new(),
    };
    let mut db_acc: Vec<Vec<f64>> = match bias {
        Some(b) if want_db => vec![Vec::new(); b.values.dim().0],
        _ => Vec::new(),
    };
    if nq > 0 && nk > 0 && dv > 0 && d > 0 && prob.batch * prob.hq > 0 {
        let sh = Shared::new(prob, pos, bias, &k);
        let ctx = Ctx::new(&sh, &q, v.view(), inp);
        // Key chunks: enough units to keep every thread busy at batch 1, one head.
        let heads = prob.batch * prob.hk;
        let nkb = nk.div_ceil(BK);
        let per_head = (4 * inp.threads.max(1)).div_ceil(heads).clamp(1, nkb);
        let chunk = BK * nkb.div_ceil(per_head);
        let units: Vec<(usize, usize)> = (0..heads)
            .flat_map(|kvh| (0..nk.div_ceil(chunk)).map(move |c| (kvh, c * chunk)))
            .collect();
        let elt = std::mem::size_of::<T>();
        let per_unit = elt
            * (prob.group() * nq * d
                + chunk * (d + dv)
                + prob.group() * (ns * want_dw as usize + want_db as usize) * (nq + chunk));
        let wave = (WAVE_BUDGET / per_unit.max(1)).clamp(1, 4 * inp.threads.max(1));
        for units in units.chunks(wave) {
            let parts: Vec<UnitGrad<T>> = units
                .par_iter()
                .map(|&(kvh, jc0)| ctx.unit(kvh, jc0, chunk.min(nk - jc0), want_dw, want_db, ctl))
                .collect();
            ctl.check()?;
            for part in parts {
                reduce_unit(prob, &mut g, &mut dw_acc, &mut db_acc, part, sparse, bias);
            }
        }
        if let Position::Rotary(r) = pos {
            let mult = prob.scale * r.factor;
            if let Some(all) = g.dq.as_slice_mut() {
                all.par_chunks_mut(nq * d)
                    .for_each(|rows| r.rotate_back(rows, d, prob.q_offset, mult));
            }
        }
    }
    if let Some(sp) = sparse.filter(|_| want_dw) {
        let (nw, rows, _) = sp.values.dim();
        let half = (rows as i64 - 1) / 2;
        let mut dw = Array3::zeros((nw, rows, ns));
        for (t, acc) in dw_acc.iter().enumerate().filter(|(_, a)| !a.is_empty()) {
            for g_i in 0..glen {
                let row = prob.delta(g_i) + half;
                if (0..rows as i64).contains(&row) {
                    for s in 0..ns {
                        dw[[t, row as usize, s]] = T::of(acc[s * glen + g_i]);
                    }
                }
            }
        }
        g.dw = Some(dw);
    }
    if let Some(b) = bias.filter(|_| want_db) {
        let (nb, rows) = b.values.dim();
        let half = (rows as i64 - 1) / 2;
        let mut db = Array2::zeros((nb, rows));
        for (t, acc) in db_acc.iter().enumerate().filter(|(_, a)| !a.is_empty()) {
            for (g_i, &x) in acc.iter().enumerate() {
                let row = prob.delta(g_i) + half;
                if (0..rows as i64).contains(&row) {
                    db[[t, row as usize]] = T::of(x);
                }
            }
        }
        g.dbias = Some(db);
    }
    Ok(g)
}

/// One unit's contributions. `dw`/`db` hold `(table, values over g in g0..g0+len)`.
struct UnitGrad<T> {
    kvh: usize,
    jc0: usize,
    dk: Vec<T>,
    dv: Vec<T>,
    dq: Vec<T>,
    g0: usize,
    dw: Vec<(usize, Vec<T>)>,
    db: Vec<(usize, Vec<T>)>,
}

fn reduce_unit<T: Real>(
    prob: &Problem,
    g: &mut Grads<T>,
    dw_acc: &mut [Vec<f64>],
    db_acc: &mut [Vec<f64>],
    part: UnitGrad<T>,
    sparse: Option<&crate::position::SparseW<'_, T>>,
    _bias: Option<&Bias<'_, T>>,
) {
    let (nq, d, dv, glen) = (prob.nq, prob.d, prob.dv, prob.glen());
    let (b, hk) = (part.kvh / prob.hk, part.kvh % prob.hk);
    let rows = part.dk.len() / d;
    let mut dk =
        g.dk.slice_mut(ndarray::s![b, hk, part.jc0..part.jc0 + rows, ..]);
    dk.iter_mut().zip(&part.dk).for_each(|(x, &y)| *x = y);
    let mut dvv =
        g.dv.slice_mut(ndarray::s![b, hk, part.jc0..part.jc0 + rows, ..]);
    dvv.iter_mut().zip(&part.dv).for_each(|(x, &y)| *x = y);
    let grp = prob.group();
    for hg in 0..grp {
        let mut dq = g.dq.slice_mut(ndarray::s![b, hk * grp + hg, .., ..]);
        let src = &part.dq[hg * nq * d..(hg + 1) * nq * d];
        dq.iter_mut().zip(src).for_each(|(x, &y)| *x = *x + y);
    }
    let ns = sparse.map_or(0, |sp| sp.support.len());
    for (t, buf) in part.dw {
        let acc = &mut dw_acc[t];
        if acc.is_empty() {
            acc.resize(ns * glen, 0.0);
        }
        let len = buf.len() / ns.max(1);
        for s in 0..ns {
            for (o, &x) in acc[s * glen + part.g0..s * glen + part.g0 + len]
                .iter_mut()
                .zip(&buf[s * len..(s + 1) * len])
            {
                *o += x.f64();
            }
        }
    }
    for (t, buf) in part.db {
        let acc = &mut db_acc[t];
        if acc.is_empty() {
            acc.resize(glen, 0.0);
        }
        for (o, &x) in acc[part.g0..part.g0 + buf.len()].iter_mut().zip(&buf) {
            *o += x.f64();
        }
    }
    let _ = dv;
}

/// Per-call state of the backward: packed queries, `D`, `lse`.
struct Ctx<'s, 'a, 'p, 'i, T> {
    sh: &'s Shared<'a, 'p, T>,
    v: ArrayView4<'s, T>,
    inp: &'s BackwardInputs<'i, T>,
    qpack: Vec<Vec<T>>,
    dvec: Vec<Vec<T>>,
}

impl<'s, 'a, 'p, 'i, T: Real> Ctx<'s, 'a, 'p, 'i, T> {
    fn new(
        sh: &'s Shared<'a, 'p, T>,
        q: &ArrayView4<'_, T>,
        v: ArrayView4<'s, T>,
        inp: &'s BackwardInputs<'i, T>,
    ) -> Self {
        let prob = sh.prob;
        let heads = prob.batch * prob.hq;
        let qpack = (0..heads)
            .into_par_iter()
            .map(|bh| {
                let mut buf = Vec::with_capacity(prob.nq * prob.d);
                super::pack_queries(prob, sh.pos, q, bh, 0, prob.nq, &mut buf);
                buf
            })
            .collect();
        let dvec = (0..heads)
            .into_par_iter()
            .map(|bh| {
                let (b, h) = (bh / prob.hq, bh % prob.hq);
                (0..prob.nq)
                    .map(|i| {
                        let o = inp.out.slice(ndarray::s![b, h, i, ..]);
                        let d_o = inp.dout.slice(ndarray::s![b, h, i, ..]);
                        T::of(
                            o.iter()
                                .zip(d_o.iter())
                                .map(|(&x, &y)| x.f64() * y.f64())
                                .sum(),
                        )
                    })
                    .collect()
            })
            .collect();
        Self {
            sh,
            v,
            inp,
            qpack,
            dvec,
        }
    }

    /// Keys `jc0..jc0+rows` of flattened kv head `kvh`, against every query of its group.
    fn unit(
        &self,
        kvh: usize,
        jc0: usize,
        rows: usize,
        want_dw: bool,
        want_db: bool,
        ctl: &Control,
    ) -> UnitGrad<T> {
        let sh = self.sh;
        let prob = sh.prob;
        let (nq, nk, d, dv, grp) = (prob.nq, prob.nk, prob.d, prob.dv, prob.group());
        let (b, hk) = (kvh / prob.hk, kvh % prob.hk);
        let sparse = match sh.pos {
            Position::Sparse(sp) => Some(sp),
            Position::Rotary(_) => None,
        };
        let ns = sparse.map_or(0, |sp| sp.support.len());
        let glen = prob.glen();
        let g0 = jc0;
        let glen_u = (rows + nq - 1).min(glen - g0);
        let mut u = UnitGrad {
            kvh,
            jc0,
            dk: vec![T::zero(); rows * d],
            dv: vec![T::zero(); rows * dv],
            dq: vec![T::zero(); grp * nq * d],
            g0,
            dw: Vec::new(),
            db: Vec::new(),
        };
        // Sparse W accumulates dk transposed (d x rows) so its inner loops run over keys.
        let mut dkt = if sparse.is_some() {
            vec![T::zero(); d * rows]
        } else {
            Vec::new()
        };
        let vh = self.v.slice(ndarray::s![b, hk, .., ..]);
        let (vrs, vcs) = (vh.strides()[0], vh.strides()[1]);
        let keys = &sh.keys[kvh];
        let mut s = vec![T::zero(); BQ * BK];
        let mut ds = vec![T::zero(); BQ * BK];
        let scale = T::of(prob.scale);
        for hg in 0..grp {
            let h = hk * grp + hg;
            let bh = b * prob.hq + h;
            let dw_slot = if want_dw {
                let t = sparse.map_or(0, |sp| sp.index[bh]);
                Some(slot(&mut u.dw, t, ns * glen_u))
            } else {
                None
            };
            let db_slot = match sh.bias {
                Some(bi) if want_db => Some(slot(&mut u.db, bi.index[bh], glen_u)),
                _ => None,
            };
            let qp = &self.qpack[bh];
            let lse = self.inp.lse.slice(ndarray::s![b, h, ..]);
            let dvec = &self.dvec[bh];
            let dout = self.inp.dout.slice(ndarray::s![b, h, .., ..]);
            let (ors, ocs) = (dout.strides()[0], dout.strides()[1]);
            for j0 in (jc0..jc0 + rows).step_by(BK) {
                let nbk = BK.min(jc0 + rows - j0);
                for i0 in (0..nq).step_by(BQ) {
                    if ctl.cancelled() {
                        return u;
                    }
                    let nb = BQ.min(nq - i0);
                    let (g_lo, g_hi) = sh.tile_diagonals(i0, nb, j0, nbk);
                    if !sh.logf.any_visible(g_lo, g_hi) {
                        continue;
                    }
                    let qb = &qp[i0 * d..(i0 + nb) * d];
                    sh.tile_scores(bh, kvh, qb, i0, nb, j0, nbk, &mut s);
                    for i in 0..nb {
                        let l = lse[i0 + i];
                        let row = &mut s[i * nbk..(i + 1) * nbk];
                        if l == T::neg_infinity() {
                            row.iter_mut().for_each(|x| *x = T::zero());
                        } else {
                            crate::simd::exp_shift_sum(row, l);
                        }
                    }
                    // SAFETY: every pointer below addresses rows i0..i0+nb of dout and
                    // j0..j0+nbk of v (in range), and distinct local buffers.
                    unsafe {
                        let op = dout.as_ptr().offset(i0 as isize * ors);
                        let vp = vh.as_ptr().offset(j0 as isize * vrs);
                        // dP = dO V^T
                        T::gemm(
                            nb,
                            dv,
                            nbk,
                            T::one(),
                            op,
                            ors,
                            ocs,
                            vp,
                            vcs,
                            vrs,
                            T::zero(),
                            ds.as_mut_ptr(),
                            nbk as isize,
                            1,
                        );
                        // dV += P^T dO
                        let dvp = u.dv.as_mut_ptr().add((j0 - jc0) * dv);
                        T::gemm(
                            nbk,
                            nb,
                            dv,
                            T::one(),
                            s.as_ptr(),
                            1,
                            nbk as isize,
                            op,
                            ors,
                            ocs,
                            T::one(),
                            dvp,
                            dv as isize,
                            1,
                        );
                    }
                    for i in 0..nb {
                        let di = dvec[i0 + i];
                        let (prow, drow) =
                            (&s[i * nbk..(i + 1) * nbk], &mut ds[i * nbk..(i + 1) * nbk]);
                        crate::simd::softmax_grad(drow, prow, di);
                    }
                    let dq = &mut u.dq[hg * nq * d..(hg + 1) * nq * d];
                    match sparse {
                        None => {
                            // dQ̃ += dS K̃,  dK̃ += dS^T Q̃
                            gemm_rm(
                                nb,
                                nbk,
                                d,
                                T::one(),
                                &ds,
                                nbk,
                                &keys[j0 * d..],
                                d,
                                false,
                                T::one(),
                                &mut dq[i0 * d..],
                                d,
                            );
                            gemm_tn(
                                nbk,
                                nb,
                                d,
                                T::one(),
                                &ds,
                                nbk,
                                qb,
                                d,
                                T::one(),
                                &mut u.dk[(j0 - jc0) * d..],
                                d,
                            );
                        }
                        Some(sp) => {
                            let table = &sh.tables[sp.index[bh]];
                            let dwbuf = dw_slot.map(|k| &mut u.dw[k].1);
                            sparse_tile_grads(
                                prob, sp, table, keys, qb, &ds, i0, nb, j0, nbk, jc0, rows, g0,
                                glen_u, scale, dq, &mut dkt, dwbuf,
                            );
                        }
                    }
                    if let Some(kslot) = db_slot {
                        let buf = &mut u.db[kslot].1;
                        for i in 0..nb {
                            let base = j0 + nq - 1 - (i0 + i) - g0;
                            for (o, &x) in buf[base..base + nbk]
                                .iter_mut()
                                .zip(&ds[i * nbk..(i + 1) * nbk])
                            {
                                *o = *o + x;
                            }
                        }
                    }
                }
            }
        }
        match sh.pos {
            Position::Rotary(r) => {
                r.rotate_back(&mut u.dk, d, prob.k_offset + jc0 as i64, r.factor)
            }
            Position::Sparse(_) => {
                for l in 0..d {
                    for j in 0..rows {
                        u.dk[j * d + l] = dkt[l * rows + j];
                    }
                }
            }
        }
        let _ = nk;
        u
    }
}

/// Index of the `(table, buffer)` slot for `t`, creating a zeroed one of `len` if needed.
fn slot<T: Real>(slots: &mut Vec<(usize, Vec<T>)>, t: usize, len: usize) -> usize {
    if let Some(k) = slots.iter().position(|(tt, _)| *tt == t) {
        return k;
    }
    slots.push((t, vec![T::zero(); len]));
    slots.len() - 1
}

/// dq, dk (transposed) and dW contributions of one tile for sparse `W`; `qb` holds `scale q`.
#[allow(clippy::too_many_arguments)]
fn sparse_tile_grads<T: Real>(
    prob: &Problem,
    sp: &crate::position::SparseW<'_, T>,
    table: &[T],
    kt: &[T],
    qb: &[T],
    ds: &[T],
    i0: usize,
    nb: usize,
    j0: usize,
    nbk: usize,
    jc0: usize,
    rows: usize,
    g0: usize,
    glen_u: usize,
    scale: T,
    dq: &mut [T],
    dkt: &mut [T],
    mut dw: Option<&mut Vec<T>>,
) {
    let (nq, nk, d, glen) = (prob.nq, prob.nk, prob.d, prob.glen());
    for (si, &(l1, l2)) in sp.support.iter().enumerate() {
        let seq = &table[si * glen..(si + 1) * glen];
        let krow = &kt[l2 * nk + j0..l2 * nk + j0 + nbk];
        let dkrow = &mut dkt[l2 * rows + (j0 - jc0)..l2 * rows + (j0 - jc0) + nbk];
        for i in 0..nb {
            let base = j0 + nq - 1 - (i0 + i);
            let w = &seq[base..base + nbk];
            let dsr = &ds[i * nbk..(i + 1) * nbk];
            let a = qb[i * d + l1];
            let acc = crate::simd::sparse_dq_dk(dsr, w, krow, dkrow, a);
            dq[(i0 + i) * d + l1] = dq[(i0 + i) * d + l1] + scale * acc;
            if let Some(buf) = dw.as_deref_mut() {
                let out = &mut buf[si * glen_u + base - g0..si * glen_u + base - g0 + nbk];
                for ((o, &x), &kv) in out.iter_mut().zip(dsr).zip(krow) {
                    *o = *o + a * x * kv;
                }
            }
        }
    }
}
