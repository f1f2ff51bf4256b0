//! One unit of the exact backward (see the parent module): a chunk of key tiles of one
//! `(batch, kv head)` against a chunk of queries of every head of its group; per key tile and
//! query block it recomputes `P` and `dS` and runs the five GEMMs (or, for sparse `W`, the
//! diagonal kernels), returning the unit's partial gradients.

use super::BackwardInputs;
use crate::arch::lanes::{Lanes, LanesTask};
use crate::arch::Real;
use crate::exact::kernel::Epilogue;
use crate::exact::kernel::{self, round_up};
use crate::exact::sparse::{self, padded, PAD_L};
use crate::exact::{key_panels, rotated_key_panels, Shared};
use crate::position::Position;
use crate::problem::Control;
use ndarray::ArrayView4;
use num_traits::{Float, Zero};
use rayon::prelude::*;

/// One unit's partial contributions: `dq` the group's rows `ic0..ic0 + nqc` (`group x nqc x
/// d`), `dk`/`dv` rows `jc0..jc0 + rows`, `dw`/`db` `(table, values over g in g0..g0+len,
/// padded)`.
pub(super) struct UnitGrad<T> {
    pub(super) kvh: usize,
    pub(super) jc0: usize,
    pub(super) ic0: usize,
    pub(super) dq: Vec<T>,
    pub(super) dk: Vec<T>,
    pub(super) dv: Vec<T>,
    pub(super) g0: usize,
    pub(super) glen_u: usize,
    pub(super) dw: Vec<(usize, Vec<T>)>,
    pub(super) db: Vec<(usize, Vec<T>)>,
}

/// Per-call state of the backward: the inputs and `D`.
pub(super) struct Ctx<'s, 'a, 'p, 'i, T> {
    pub(super) sh: &'s Shared<'a, 'p, T>,
    pub(super) inp: &'s BackwardInputs<'i, T>,
    pub(super) q: ArrayView4<'s, T>,
    pub(super) k: ArrayView4<'s, T>,
    pub(super) v: ArrayView4<'s, T>,
    /// Per query head: `D_i`.
    pub(super) dvec: Vec<Vec<T>>,
    pub(super) dp: usize,
    pub(super) dvp: usize,
}

impl<'s, 'a, 'p, 'i, T: Real> Ctx<'s, 'a, 'p, 'i, T> {
    pub(super) fn new(
        sh: &'s Shared<'a, 'p, T>,
        q: &'s ArrayView4<'_, T>,
        k: &'s ArrayView4<'_, T>,
        v: &'s ArrayView4<'_, T>,
        inp: &'s BackwardInputs<'i, T>,
    ) -> Self {
        let prob = sh.prob;
        let (d, dv) = (prob.d, prob.dv);
        let t = sh.tiles;
        let (dp, dvp) = (round_up(d, t.nr), round_up(dv, t.nr));
        let heads = prob.batch * prob.hq;
        let dvec = (0..heads)
            .into_par_iter()
            .map(|bh| {
                let (b, h) = (bh / prob.hq, bh % prob.hq);
                let o = inp.out.slice(ndarray::s![b, h, .., ..]);
                let d_o = inp.dout.slice(ndarray::s![b, h, .., ..]);
                o.outer_iter()
                    .zip(d_o.outer_iter())
                    .map(|(x, y)| match (x.as_slice(), y.as_slice()) {
                        (Some(x), Some(y)) => {
                            T::of(x.iter().zip(y).map(|(&a, &b)| a.f64() * b.f64()).sum())
                        }
                        _ => T::of(
                            x.iter()
                                .zip(y.iter())
                                .map(|(&a, &b)| a.f64() * b.f64())
                                .sum(),
                        ),
                    })
                    .collect()
            })
            .collect();
        Self {
            sh,
            inp,
            q: q.view(),
            k: k.view(),
            v: v.view(),
            dvec,
            dp,
            dvp,
        }
    }
}

/// Keys `jc0..jc0+rows` of flattened kv head `kvh`, against queries `ic0..ic0+nqc` of every
/// head of its group.
pub(super) struct Unit<'c, 's, 'a, 'p, 'i, T> {
    pub(super) ctx: &'c Ctx<'s, 'a, 'p, 'i, T>,
    pub(super) kvh: usize,
    pub(super) jc0: usize,
    pub(super) rows: usize,
    pub(super) ic0: usize,
    pub(super) nqc: usize,
    pub(super) want_dw: bool,
    pub(super) want_db: bool,
    pub(super) ctl: &'c Control,
}

impl<T: Real> LanesTask<T> for Unit<'_, '_, '_, '_, '_, T> {
    type Out = UnitGrad<T>;
    #[inline(always)]
    fn run<L: Lanes<E = T>>(self) -> UnitGrad<T> {
        backward_unit::<L>(self)
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

#[inline(always)]
fn backward_unit<L: Lanes>(u: Unit<'_, '_, '_, '_, '_, L::E>) -> UnitGrad<L::E> {
    let ctx = u.ctx;
    let sh = ctx.sh;
    let prob = sh.prob;
    let (nq, d, dv, grp) = (prob.nq, prob.d, prob.dv, prob.group());
    let t = sh.tiles;
    let (mr, nr, bq, bk) = (t.mr, t.nr, t.bq, t.bk);
    let (dp, dvp) = (ctx.dp, ctx.dvp);
    let (kvh, jc0, rows) = (u.kvh, u.jc0, u.rows);
    let (b, hk) = (kvh / prob.hk, kvh % prob.hk);
    let sparse_w = match sh.pos {
        Position::Sparse(sp) => Some(sp),
        Position::Rotary(_) => None,
    };
    let ns = sparse_w.map_or(0, |sp| sp.support.len());
    let (ic0, nqc) = (u.ic0, u.nqc);
    // The unit's diagonals: g0..g0 + glen_u.
    let g0 = jc0 + nq - ic0 - nqc;
    let glen_u = rows + nqc - 1;
    let zero = L::E::zero();
    let ninf = L::E::neg_infinity();
    // dK (rows padded for the micro-kernel) and dV of the chunk; sparse W accumulates dk
    // transposed and padded (d x padded(rows)) for its diagonal kernels.
    let rows_p = round_up(rows, bk) + mr;
    let mut dk = vec![zero; rows_p * dp];
    let mut dvacc = vec![zero; rows_p * dvp];
    let mut dkt = if sparse_w.is_some() {
        vec![zero; d * padded(rows)]
    } else {
        Vec::new()
    };
    // dq: the group's partial, rows ic0..ic0 + nqc, row stride d.
    let mut dq_part = vec![zero; grp * nqc * d];
    // Per tile: the block's queries (scaled, rotated), their transposed strips (sparse W),
    // dO, and the block's dq contributions (row stride dp).
    let mut qb: Vec<L::E> = Vec::with_capacity(bq * dp);
    let mut qtb: Vec<L::E> = Vec::new();
    let mut dob = vec![zero; bq * dvp];
    let mut dqb = vec![zero; bq * dp];
    let mut segbuf = Vec::new();
    let mut dws: Vec<(usize, Vec<L::E>)> = Vec::new();
    let mut dbs: Vec<(usize, Vec<L::E>)> = Vec::new();
    let ld = sparse::strip_stride(bk, nr);
    let tile_len = bq * ld + 2 * sparse::MARGIN;
    let mut pbuf = vec![zero; tile_len];
    let mut dsbuf = vec![zero; tile_len];
    // The chunk's keys: rotated key and column panels (rotary), and v as key panels.
    let kh = ctx.k.slice(ndarray::s![b, hk, jc0..jc0 + rows, ..]);
    let (kown, kcols) = match (sh.pos, &sh.rot) {
        (Position::Rotary(r), Some(rot)) => {
            rotated_key_panels(prob, rot, r.factor, kh, jc0, nr, true)
        }
        _ => (Vec::new(), Vec::new()),
    };
    // Key panels of the chunk, from key jc0 (rotary); k^T of the head (sparse).
    let keys = if sparse_w.is_some() {
        &sh.keys[kvh][..]
    } else {
        &kown[..]
    };
    let vkey = key_panels(ctx.v.slice(ndarray::s![b, hk, jc0..jc0 + rows, ..]), nr);
    for hg in 0..grp {
        let h = hk * grp + hg;
        let bh = b * prob.hq + h;
        let dw_slot = match sparse_w {
            Some(sp) if u.want_dw => Some(slot(&mut dws, sp.index[bh], ns * padded(glen_u))),
            _ => None,
        };
        let db_slot = match sh.bias {
            Some(bi) if u.want_db => Some(slot(&mut dbs, bi.index[bh], padded(glen_u))),
            _ => None,
        };
        let dvec = &ctx.dvec[bh];
        // Sparse W: the whole table's sequences, or (seg_tiles) those of each tile, below.
        let mut seqs = match sparse_w {
            Some(_) if sh.seg_tiles == 0 => sh.full_seqs(bh),
            _ => sparse::Seqs {
                ptr: std::ptr::null(),
                stride: 0,
                x0: 0,
            },
        };
        let lse = u.inp_lse(b, h);
        let dout = ctx.inp.dout.slice(ndarray::s![b, h, .., ..]);
        for tj in (jc0..jc0 + rows).step_by(bk) {
            let nbk = bk.min(jc0 + rows - tj);
            let kext = round_up(round_up(nbk, nr), mr);
            for i0 in (ic0..ic0 + nqc).step_by(bq) {
                if u.ctl.cancelled() {
                    return empty_grad(kvh);
                }
                let nb = bq.min(ic0 + nqc - i0);
                let (g_lo, g_hi) = sh.tile_diagonals(i0, nb, tj, nbk);
                if !sh.logf.any_visible(g_lo, g_hi) {
                    continue;
                }
                let nbp = round_up(nb, mr);
                if let Some(spw) = sparse_w.filter(|_| sh.seg_tiles > 0) {
                    // Every diagonal the tile's kernels read (from MR - 1 left of a strip, or 7
                    // before a row in tile_dk, to a register past the tile).
                    let x_lo = (PAD_L + tj + nq).saturating_sub(i0 + nbp + 64);
                    let x_hi = PAD_L + tj + round_up(nbk, nr) + nq - i0 + 128;
                    let t = spw.index[bh];
                    seqs = sparse::segment(prob, spw, t, x_lo, x_hi, &mut segbuf);
                }
                sh.pack_queries(&ctx.q, bh, i0, nb, nbp, dp, &mut qb);
                if sparse_w.is_some() {
                    sparse::transpose_strips_into(&qb, nbp, dp, d, mr, &mut qtb);
                }
                dob[..nbp * dvp].iter_mut().for_each(|x| *x = zero);
                for (r, row) in dout
                    .slice(ndarray::s![i0..i0 + nb, ..])
                    .outer_iter()
                    .enumerate()
                {
                    // (A contiguous row as a slice: the element-wise copy of the strided
                    // iterator was 2% of the backward.)
                    let dst = &mut dob[r * dvp..r * dvp + dv];
                    match row.as_slice() {
                        Some(src) => dst.copy_from_slice(src),
                        None => dst.iter_mut().zip(row.iter()).for_each(|(x, &y)| *x = y),
                    }
                }
                dqb[..nbp * dp].iter_mut().for_each(|x| *x = zero);
                let (qp, dop) = (&qb, &dob);
                if sparse_w.is_some() {
                    // The diagonal kernels read around each strip: start from zeros.
                    pbuf.iter_mut().for_each(|x| *x = zero);
                    dsbuf.iter_mut().for_each(|x| *x = zero);
                }
                // SAFETY: MARGIN < tile_len.
                let (pt, dst) = unsafe {
                    (
                        pbuf.as_mut_ptr().add(sparse::MARGIN),
                        dsbuf.as_mut_ptr().add(sparse::MARGIN),
                    )
                };
                for r0 in (0..round_up(nb, mr)).step_by(mr) {
                    let nrow = mr.min(nb - r0.min(nb));
                    let i = i0 + r0;
                    let vis = if nrow > 0 {
                        sh.visible_keys(i, nrow, tj, nbk, nr)
                    } else {
                        None
                    };
                    let Some((j0, j1)) = vis else {
                        if sparse_w.is_none() {
                            for r in 0..mr {
                                // SAFETY: rows r0..r0+mr of the tile buffers exist (bq is a
                                // multiple of mr) with ld >= kext + 2 nr + margins columns.
                                unsafe {
                                    kernel::fill(pt.add((r0 + r) * ld), 0, kext, zero);
                                    kernel::fill(dst.add((r0 + r) * ld), 0, kext, zero);
                                }
                            }
                        }
                        continue;
                    };
                    let (w, c0) = (j1 - j0, j0 - tj);
                    let wp = round_up(w, nr);
                    let lfr = sh
                        .needs_log_factor(i, nrow, j0, j1)
                        .then(|| sh.log_rows(bh, i, j0));
                    let neg_lse: [L::E; 12] = std::array::from_fn(|r| {
                        if r < nrow && lse[i + r] != ninf {
                            -lse[i + r]
                        } else {
                            ninf
                        }
                    });
                    let dd: [L::E; 12] =
                        std::array::from_fn(|r| if r < nrow { dvec[i + r] } else { zero });
                    // SAFETY: strips of `pbuf`/`dsbuf` have ld >= c0 + wp + margins; qb, dob
                    // and dqb have nbp >= r0 + mr rows; key panels (of the chunk for rotary)
                    // cover j0 + wp; the padded log-factor covers the strip.
                    unsafe {
                        let srow = pt.add(r0 * ld + c0);
                        let dsrow = dst.add(r0 * ld + c0);
                        if sparse_w.is_none() {
                            for r in 0..mr {
                                let (prow, drow) = (srow.add(r * ld), dsrow.add(r * ld));
                                kernel::fill(prow.sub(c0), 0, c0, zero);
                                kernel::fill(drow.sub(c0), 0, c0, zero);
                                kernel::fill(prow, wp, kext.saturating_sub(c0), zero);
                                kernel::fill(drow, wp, kext.saturating_sub(c0), zero);
                            }
                        }
                        let mut es = kernel::ExpShift::<L> {
                            lf: lfr,
                            w,
                            neg_lse,
                        };
                        match sparse_w {
                            // P = exp(Q̃ K̃^T + log-factor - lse)
                            None => kernel::strip::<L, _>(
                                wp,
                                d,
                                qp.as_ptr().add(r0 * dp),
                                dp,
                                1,
                                keys.as_ptr().add((j0 - jc0) * d),
                                nr,
                                d * nr,
                                srow,
                                ld,
                                &mut es,
                            ),
                            Some(spw) => {
                                let q = qtb.as_ptr().add(r0 * d);
                                sparse::scores::<L>(sh, spw, seqs, bh, q, i, j0, w, srow, ld);
                                for r in 0..mr {
                                    let row = srow.add(r * ld);
                                    for col in (0..wp).step_by(L::W) {
                                        let p = es.apply(r, col, L::load(row.add(col)));
                                        L::store(row.add(col), p);
                                    }
                                    // The diagonal kernel spilled scores around the strip: P
                                    // must be zero outside it for the dV GEMM.
                                    kernel::fill(row.sub(mr - 1), 0, mr - 1, zero);
                                    kernel::fill(row, wp, wp + nr + mr, zero);
                                }
                            }
                        }
                        // dS = P ∘ (dO V^T - D)
                        let mut sg = kernel::SoftmaxGrad::<L> { p: srow, ld, d: dd };
                        kernel::strip::<L, _>(
                            wp,
                            dv,
                            dop.as_ptr().add(r0 * dvp),
                            dvp,
                            1,
                            vkey.as_ptr().add((j0 - jc0) * dv),
                            nr,
                            dv * nr,
                            dsrow,
                            ld,
                            &mut sg,
                        );
                        if let Some(k) = db_slot {
                            let buf = &mut dbs[k].1;
                            for r in 0..nrow {
                                let base = PAD_L + j0 + nq - 1 - (i + r) - g0;
                                kernel::add_assign::<L>(
                                    buf.as_mut_ptr().add(base),
                                    dsrow.add(r * ld),
                                    w,
                                );
                            }
                        }
                        match sparse_w {
                            // dQ̃ += dS K̃ over the visible keys.
                            None => kernel::strip::<L, _>(
                                dp,
                                w,
                                dsrow,
                                ld,
                                1,
                                kcols.as_ptr().add((j0 - jc0) * nr),
                                nr,
                                rows * nr,
                                dqb.as_mut_ptr().add(r0 * dp),
                                dp,
                                &mut kernel::Accumulate,
                            ),
                            Some(spw) => {
                                let out = sparse::GradOut {
                                    dq: dqb.as_mut_ptr().add(r0 * dp),
                                    ldq: dp,
                                    dkt: std::ptr::null_mut(),
                                    ldk: 0,
                                    dw: dw_slot.map(|k| {
                                        dws[k].1.as_mut_ptr().add(PAD_L + j0 + nq - 1 - i - g0)
                                    }),
                                    ldw: padded(glen_u),
                                };
                                let q = qtb.as_ptr().add(r0 * d);
                                sparse::strip_grads::<L>(
                                    sh, spw, seqs, bh, q, i, j0, w, dsrow, ld, &out,
                                );
                            }
                        }
                    }
                }
                // SAFETY: the tile buffers hold nb rows of kext <= ld columns (zero outside
                // the visible strips); dK/dV have rows_p >= tj - jc0 + kext rows.
                unsafe {
                    for jr in (0..kext).step_by(mr) {
                        let row = tj - jc0 + jr;
                        // dV += P^T dO
                        kernel::strip::<L, _>(
                            dvp,
                            nb,
                            pt.add(jr),
                            1,
                            ld,
                            dop.as_ptr(),
                            dvp,
                            nr,
                            dvacc.as_mut_ptr().add(row * dvp),
                            dvp,
                            &mut kernel::Accumulate,
                        );
                        if sparse_w.is_none() {
                            // dK̃ += dS^T Q̃
                            kernel::strip::<L, _>(
                                dp,
                                nb,
                                dst.add(jr),
                                1,
                                ld,
                                qp.as_ptr(),
                                dp,
                                nr,
                                dk.as_mut_ptr().add(row * dp),
                                dp,
                                &mut kernel::Accumulate,
                            );
                        }
                    }
                    if let Some(spw) = sparse_w {
                        let out = sparse::GradOut {
                            dq: std::ptr::null_mut(),
                            ldq: 0,
                            dkt: dkt.as_mut_ptr().add(PAD_L + tj - jc0),
                            ldk: padded(rows),
                            dw: None,
                            ldw: 0,
                        };
                        sparse::tile_dk::<L>(
                            sh,
                            spw,
                            seqs,
                            qp.as_ptr(),
                            dp,
                            i0,
                            nb,
                            tj,
                            round_up(nbk, nr),
                            dst,
                            ld,
                            &out,
                        );
                    }
                }
                let at = (hg * nqc + i0 - ic0) * d;
                let dst = &mut dq_part[at..at + nb * d];
                for (row, src) in dst.chunks_exact_mut(d).zip(dqb.chunks_exact(dp)) {
                    row.iter_mut().zip(src).for_each(|(x, &y)| *x = *x + y);
                }
            }
        }
    }
    let mut out_dk = vec![zero; rows * d];
    let mut out_dv = vec![zero; rows * dv];
    for j in 0..rows {
        out_dv[j * dv..(j + 1) * dv].copy_from_slice(&dvacc[j * dvp..j * dvp + dv]);
    }
    match (sh.pos, &sh.rot) {
        (Position::Rotary(r), Some(rot)) => {
            for j in 0..rows {
                out_dk[j * d..(j + 1) * d].copy_from_slice(&dk[j * dp..j * dp + d]);
            }
            rot.rotate(
                &mut out_dk,
                d,
                rows,
                prob.k_offset + jc0 as i64,
                r.factor,
                true,
            );
        }
        _ => {
            let stride = padded(rows);
            for l in 0..d {
                for j in 0..rows {
                    out_dk[j * d + l] = dkt[l * stride + PAD_L + j];
                }
            }
        }
    }
    UnitGrad {
        kvh,
        jc0,
        ic0,
        dq: dq_part,
        dk: out_dk,
        dv: out_dv,
        g0,
        glen_u,
        dw: dws,
        db: dbs,
    }
}

fn empty_grad<T>(kvh: usize) -> UnitGrad<T> {
    UnitGrad {
        kvh,
        jc0: 0,
        ic0: 0,
        dq: Vec::new(),
        dk: Vec::new(),
        dv: Vec::new(),
        g0: 0,
        glen_u: 0,
        dw: Vec::new(),
        db: Vec::new(),
    }
}

impl<T: Real> Unit<'_, '_, '_, '_, '_, T> {
    fn inp_lse(&self, b: usize, h: usize) -> ndarray::ArrayView1<'_, T> {
        self.ctx.inp.lse.slice_move(ndarray::s![b, h, ..])
    }
}
