//! Exact forward: online softmax over key tiles.
//!
//! Per query row, with running max `m`, running sum `l` and accumulator `o`, each key tile does
//! `m' = max(m, max_j S_ij)`, `P_ij = exp(S_ij - m')`, `l = l e^{m-m'} + Σ_j P_ij`,
//! `o = o e^{m-m'} + P V`. At the end `O = o / l`, `lse = m + ln l`; a row that saw no visible
//! key keeps `l = 0` and returns `O = 0`, `lse = -inf`.
//!
//! A unit of work is a block of `bq` query rows of one head; it walks the key tiles, and within
//! a tile its strips of `MR` rows: scores of the strip (a row of micro-tiles), the softmax update
//! of its rows, and `P V` into the block's accumulator, while the tile's keys and values stay in
//! L2 for the next strip. Causal and window masks skip every key outside a strip's visible range.

use super::kernel::Epilogue;
use super::kernel::{self, round_up};
use super::{column_panels, decode, sparse, Shared};
use crate::arch::lanes::{Lanes, LanesTask};
use crate::arch::Real;
use crate::error::{Error, Result};
use crate::position::{Bias, Position};
use crate::problem::{Control, Problem};
use ndarray::{Array3, Array4, ArrayView4};
use num_traits::{Float, One, Zero};
use rayon::prelude::*;

/// Checks that the arrays agree with `prob`.
pub(crate) fn check_shapes<T: Real>(
    prob: &Problem,
    q: &ArrayView4<'_, T>,
    k: &ArrayView4<'_, T>,
    v: &ArrayView4<'_, T>,
) -> Result<()> {
    prob.validate()?;
    let want = [
        ("q", q.dim(), (prob.batch, prob.hq, prob.nq, prob.d)),
        ("k", k.dim(), (prob.batch, prob.hk, prob.nk, prob.d)),
        ("v", v.dim(), (prob.batch, prob.hk, prob.nk, prob.dv)),
    ];
    for (name, got, exp) in want {
        if got != exp {
            return Err(Error::Value(format!(
                "{name}: expected shape {exp:?}, got {got:?}"
            )));
        }
    }
    Ok(())
}

/// `(out, lse)` of shapes `(batch, hq, nq, dv)` and `(batch, hq, nq)`.
pub fn attention_forward<'a, T: Real>(
    prob: &Problem,
    pos: &Position<'a, T>,
    bias: Option<&Bias<'a, T>>,
    q: ArrayView4<'_, T>,
    k: ArrayView4<'_, T>,
    v: ArrayView4<'_, T>,
    ctl: &Control,
) -> Result<(Array4<T>, Array3<T>)> {
    attention_forward_checked(prob, pos, bias, q, k, v, ctl, false)
}

/// [`attention_forward`], and with `check_kv` an error naming `k` or `v` when a row of it that
/// some query can see holds a NaN or an Inf (the decode path checks as it reads, see
/// `exact::decode`; the GEMM path scans those rows first).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_checked<'a, T: Real>(
    prob: &Problem,
    pos: &Position<'a, T>,
    bias: Option<&Bias<'a, T>>,
    q: ArrayView4<'_, T>,
    k: ArrayView4<'_, T>,
    v: ArrayView4<'_, T>,
    ctl: &Control,
    check_kv: bool,
) -> Result<(Array4<T>, Array3<T>)> {
    check_shapes(prob, &q, &k, &v)?;
    pos.validate(prob)?;
    if let Some(b) = bias {
        b.validate(prob)?;
    }
    let (nq, dv) = (prob.nq, prob.dv);
    let mut out = Array4::<T>::zeros((prob.batch, prob.hq, nq, dv));
    let mut lse = Array3::<T>::from_elem((prob.batch, prob.hq, nq), T::neg_infinity());
    if nq == 0 || prob.nk == 0 || prob.batch * prob.hq == 0 {
        return Ok((out, lse));
    }
    if dv == 0 {
        // `lse` does not depend on `v`, but the kernels' chunks and value panels need d_v > 0:
        // run with one column of zeros and keep only `lse` (`out` has no entries).
        let one = Problem {
            dv: 1,
            ..prob.clone()
        };
        let zeros = Array4::<T>::zeros((prob.batch, prob.hk, prob.nk, 1));
        let (_, lse) =
            attention_forward_checked(&one, pos, bias, q, k, zeros.view(), ctl, check_kv)?;
        return Ok((out, lse));
    }
    let decoding = decode::applies(nq, pos);
    let mut sh = Shared::new_with(prob, pos, bias, false, !decoding);
    if decoding {
        decode::forward(&sh, &q, &k, &v, ctl, check_kv, &mut out, &mut lse)?;
        super::check_forward_result(&sh, &[&q, &k, &v], &out, &lse)?;
        return Ok((out, lse));
    }
    // A small call (`Control::serial`, see `runs_serial`) runs on the calling thread alone.
    let serial = ctl.is_serial();
    if check_kv {
        if let Some((j0, j1)) = sh.visible_keys(0, nq, 0, prob.nk, 1) {
            super::check_rows_of("k", &k, j0, j1, serial)?;
            super::check_rows_of("v", &v, j0, j1, serial)?;
        }
    }
    sh.pack_keys_of(&k, serial);
    let nr = sh.tiles.nr;
    // The `B` operand of `P V`: each head of `v` itself when its rows are contiguous and a
    // multiple of NR long (row stride dv, tile step NR), else column panels (NR, n_k NR).
    let direct = dv % nr == 0;
    let value_panels = |kvh: usize| {
        let vh = v.slice(ndarray::s![kvh / prob.hk, kvh % prob.hk, .., ..]);
        match vh.as_slice() {
            Some(_) if direct => None,
            _ => Some(column_panels(vh, nr)),
        }
    };
    let kv_heads = 0..prob.batch * prob.hk;
    let values: Vec<Option<Vec<T>>> = if serial {
        kv_heads.map(value_panels).collect()
    } else {
        kv_heads.into_par_iter().map(value_panels).collect()
    };
    let bq = sh.tiles.bq;
    let (Some(out_s), Some(lse_s)) = (out.as_slice_mut(), lse.as_slice_mut()) else {
        return Err(Error::Value("internal: output not contiguous".into()));
    };
    // Units: blocks of `bq` query rows of one head, with their rows of `out` and `lse`.
    let units: Vec<(usize, usize, &mut [T], &mut [T])> = out_s
        .chunks_mut(nq * dv)
        .zip(lse_s.chunks_mut(nq))
        .enumerate()
        .flat_map(|(bh, (o_head, l_head))| {
            o_head
                .chunks_mut(bq * dv)
                .zip(l_head.chunks_mut(bq))
                .enumerate()
                .map(move |(qb, (o, l))| (bh, qb * bq, o, l))
        })
        .collect();
    let sh = &sh;
    let run_unit = |(bh, i0, out, lse): (usize, usize, &mut [T], &mut [T])| {
        let kvh = sh.kv_head(bh);
        let (vals, vrs, vstep) = match &values[kvh] {
            Some(panels) => (&panels[..], nr, prob.nk * nr),
            None => {
                let vh = v.slice_move(ndarray::s![kvh / prob.hk, kvh % prob.hk, .., ..]);
                (vh.to_slice().expect("contiguous"), dv, nr)
            }
        };
        let unit = Block {
            sh,
            vals,
            vrs,
            vstep,
            q: &q,
            bh,
            i0,
            out,
            lse,
            ctl,
        };
        T::with_lanes(sh.isa, unit)
    };
    if serial {
        units.into_iter().for_each(run_unit);
    } else {
        units.into_par_iter().for_each(run_unit);
    }
    ctl.check()?;
    super::check_forward_result(sh, &[&q, &k, &v], &out, &lse)?;
    Ok((out, lse))
}

/// Estimated flops (`cost::exact_flops_bound`) up to which a GEMM-path forward runs on the
/// calling thread: handing a call to the pool and back costs two thread wake-ups, more than a
/// second core saves on so little work.
pub(crate) const SERIAL_FLOPS: f64 = 16e6;

/// Whether a forward call of `flops` (`plan::cost::exact_flops_bound`) is small enough to run on
/// the calling thread alone: a decode call within `decode::SERIAL_BYTES`, or a GEMM-path call
/// within [`SERIAL_FLOPS`].
#[cfg_attr(not(feature = "python"), allow(dead_code))]
pub(crate) fn runs_serial<T>(prob: &Problem, pos: &Position<'_, T>, flops: f64) -> bool {
    if decode::applies(prob.nq, pos) {
        decode::runs_serial(prob, pos)
    } else {
        flops <= SERIAL_FLOPS
    }
}

/// One query block of one head: rows `i0..i0 + lse.len()`.
struct Block<'s, 'a, 'p, 'q, 'o, T> {
    sh: &'s Shared<'a, 'p, T>,
    /// The `B` operand of `P V` (see `attention_forward`): row `j` at `j vrs`, tile `t` at
    /// `t vstep`.
    vals: &'s [T],
    vrs: usize,
    vstep: usize,
    q: &'s ArrayView4<'q, T>,
    bh: usize,
    i0: usize,
    out: &'o mut [T],
    lse: &'o mut [T],
    ctl: &'s Control,
}

impl<T: Real> LanesTask<T> for Block<'_, '_, '_, '_, '_, T> {
    type Out = ();
    #[inline(always)]
    fn run<L: Lanes<E = T>>(self) {
        forward_block::<L>(self)
    }
}

#[inline(always)]
fn forward_block<L: Lanes>(u: Block<'_, '_, '_, '_, '_, L::E>) {
    let sh = u.sh;
    let prob = sh.prob;
    let (nk, d, dv) = (prob.nk, prob.d, prob.dv);
    let t = sh.tiles;
    let (mr, nr, bk) = (t.mr, t.nr, t.bk);
    let nb = u.lse.len();
    let nbp = round_up(nb, mr);
    let dvp = round_up(dv, nr);
    let (i0, bh) = (u.i0, u.bh);
    let kvh = sh.kv_head(bh);
    let mut qb = Vec::new();
    sh.pack_queries(u.q, bh, i0, nb, nbp, d, &mut qb);
    let qt = match sh.pos {
        Position::Sparse(_) => sparse::transpose_strips(&qb, nbp, d, d, mr),
        Position::Rotary(_) => Vec::new(),
    };
    let zero = L::E::zero();
    let ninf = L::E::neg_infinity();
    let mut oacc = vec![zero; nbp * dvp];
    let mut m = vec![ninf; nbp];
    let mut l = vec![zero; nbp];
    let ld = sparse::strip_stride(bk, nr);
    // Row r of the strip starts at s[MARGIN + r ld] (sparse scores spill into the margins).
    let mut s = vec![zero; mr * ld + 2 * sparse::MARGIN];
    let keys = &sh.keys[kvh];
    // Sparse W: the sequences of the whole table, or (segmented) of the current tile, built
    // when its first strip is visible.
    let mut segbuf = Vec::new();
    let mut seqs = match sh.pos {
        Position::Sparse(_) if sh.seg_tiles == 0 => Some(sh.full_seqs(bh)),
        _ => None,
    };
    let mut seg_end = 0;
    for tj in (0..nk).step_by(bk) {
        if u.ctl.cancelled() {
            return;
        }
        let nbk = bk.min(nk - tj);
        for r0 in (0..nb).step_by(mr) {
            let rows = mr.min(nb - r0);
            let Some((j0, j1)) = sh.visible_keys(i0 + r0, rows, tj, nbk, nr) else {
                continue;
            };
            let w = j1 - j0;
            let wp = round_up(w, nr);
            // SAFETY: MARGIN < s.len().
            let sp = unsafe { s.as_mut_ptr().add(sparse::MARGIN) };
            let lf = sh
                .needs_log_factor(i0 + r0, rows, j0, j1)
                .then(|| sh.log_rows(bh, i0 + r0, j0));
            // SAFETY: (for this block) `qb` has nbp >= r0 + mr rows of d; key panels cover
            // j0..j0 + wp (j0 + wp <= round_up(nk, nr)); rows of `s` have ld >= wp + margins;
            // the padded log-factor covers every diagonal of the strip and `nr` more; oacc has
            // nbp rows of dvp; value column panels hold nk rows of nr.
            unsafe {
                // Scores, with the log-factor added, columns >= w at -inf, and the row maxima.
                let mut mm = kernel::MaskMax::<L>::new(lf, w);
                match sh.pos {
                    Position::Rotary(_) => kernel::strip::<L, _>(
                        wp,
                        d,
                        qb.as_ptr().add(r0 * d),
                        d,
                        1,
                        keys.as_ptr().add(j0 * d),
                        nr,
                        d * nr,
                        sp,
                        ld,
                        &mut mm,
                    ),
                    Position::Sparse(spw) => {
                        if sh.seg_tiles > 0 && tj >= seg_end {
                            // Every diagonal the block's strips read in the next tiles (the
                            // kernel reads from MR - 1 left of a strip to a register past it).
                            seg_end = nk.min(tj + sh.seg_tiles * bk);
                            let x_lo = (sparse::PAD_L + tj + prob.nq).saturating_sub(i0 + nbp + 64);
                            let x_hi = sparse::PAD_L + seg_end + prob.nq - i0 + 128;
                            let t = spw.index[bh];
                            seqs = Some(sparse::segment(prob, spw, t, x_lo, x_hi, &mut segbuf));
                        }
                        let seqs = seqs.expect("sequences of the table");
                        let q = qt.as_ptr().add(r0 * d);
                        sparse::scores::<L>(sh, spw, seqs, bh, q, i0 + r0, j0, w, sp, ld);
                        for r in 0..mr {
                            let row = sp.add(r * ld);
                            for col in (0..wp).step_by(L::W) {
                                L::store(row.add(col), mm.apply(r, col, L::load(row.add(col))));
                            }
                        }
                    }
                }
                for r in 0..mr {
                    let row = sp.add(r * ld);
                    let i = r0 + r;
                    let mx = mm.max(r);
                    if mx == ninf {
                        kernel::fill(row, 0, wp, zero);
                        continue;
                    }
                    let (m_new, alpha) = if mx > m[i] {
                        (mx, (m[i] - mx).exp())
                    } else {
                        (m[i], L::E::one())
                    };
                    let sum = kernel::exp_shift_sum::<L>(row, wp, m_new);
                    l[i] = l[i] * alpha + sum;
                    if alpha != L::E::one() {
                        kernel::scale::<L>(oacc.as_mut_ptr().add(i * dvp), dvp, alpha);
                    }
                    m[i] = m_new;
                }
                // O += P V over the visible keys.
                kernel::strip::<L, _>(
                    dvp,
                    w,
                    sp,
                    ld,
                    1,
                    u.vals.as_ptr().add(j0 * u.vrs),
                    u.vrs,
                    u.vstep,
                    oacc.as_mut_ptr().add(r0 * dvp),
                    dvp,
                    &mut kernel::Accumulate,
                );
            }
        }
    }
    for i in 0..nb {
        let row = &mut u.out[i * dv..(i + 1) * dv];
        if l[i] > zero {
            let inv = L::E::one() / l[i];
            for (o, &a) in row.iter_mut().zip(&oacc[i * dvp..]) {
                *o = a * inv;
            }
            u.lse[i] = m[i] + l[i].ln();
        } else {
            row.iter_mut().for_each(|x| *x = zero);
            u.lse[i] = ninf;
        }
    }
}
