//! Scores of a strip for sparse `W`: `S_ij = Σ_s (scale q_i[l1_s]) w_s(g_ij) k_j[l2_s]` with
//! `g_ij = j - i + n_q - 1`.
//!
//! The kernel walks a strip of `MR` rows along its diagonals rather than its rows: a register of
//! `W` consecutive diagonals `g` meets row `r` at `W` consecutive keys, shifted by one per row.
//! So one load of each support sequence serves every row of the strip, each row loads its keys
//! (shifted) and broadcasts its query element, and the `MR` accumulators stay in registers over
//! the whole support. Row `r` of the strip then covers columns `u - (MR-1) + r`, which runs
//! `MR - 1` columns left of the strip and past its right end: the strip buffer has margins, and
//! the sequences and `k^T` rows have zero padding ([`PAD_L`], [`PAD_R`]).
//!
//! When the support is 2x2 blocks (BlockW: entries `(p,p), (p,r), (r,p), (r,r)` of each pair
//! consecutive), the four entries of a block share their key loads:
//! `S += q_p (w_pp k_p + w_pr k_r) + q_r (w_rp k_p + w_rr k_r)`, six operations per block and row.

use super::kernel::round_up;
use super::Shared;
use crate::arch::lanes::Lanes;
use crate::arch::Real;
use crate::position::SparseW;
use crate::problem::Problem;
use ndarray::ArrayView2;
use rayon::prelude::*;

/// Zeros before each padded sequence (at least the largest `MR - 1`).
pub const PAD_L: usize = 16;
/// Zeros after each padded sequence (at least the widest register plus `MR`).
pub const PAD_R: usize = 64;
/// Columns of margin left of each strip row.
pub const MARGIN: usize = 16;
/// Support blocks per pass of the diagonal kernels (memory streams per pass: six per block).
const PAIR_GROUP: usize = 8;

/// Runs `$body` for `$row` = 0, 1, ... `$mr - 1` (`$mr` <= 12, a constant), unrolled in the
/// source. A plain `for row in 0..MR` is not always unrolled by LLVM when the body is large (a
/// register window per row): it then indexes the accumulator array by a run-time row, which
/// keeps the array on the stack, and picks each row's window through a jump table (measured:
/// the BlockW scores kernel spent most of its time on stack traffic and the jump).
macro_rules! unroll_rows {
    ($mr:expr, |$row:ident| $body:block) => {
        unroll_rows!(@ $mr, $row, $body, 0 1 2 3 4 5 6 7 8 9 10 11)
    };
    (@ $mr:expr, $row:ident, $body:block, $($r:literal)*) => {
        $(
            if $r < $mr {
                let $row: usize = $r;
                $body
            }
        )*
    };
}

/// Row stride of a score strip of `bk` keys (room for the margins).
pub const fn strip_stride(bk: usize, nr: usize) -> usize {
    bk + 2 * nr + 2 * MARGIN
}

/// Stride of the padded sequences of `n` elements.
pub const fn padded(n: usize) -> usize {
    PAD_L + n + PAD_R
}

/// The pairs `(p, r)` when the support is 2x2 blocks in BlockW's order.
pub fn block_pairs(support: &[(usize, usize)]) -> Option<Vec<(usize, usize)>> {
    if support.is_empty() || !support.len().is_multiple_of(4) {
        return None;
    }
    support
        .chunks_exact(4)
        .map(|c| {
            let (p, r) = (c[0].0, c[3].0);
            (p != r && c == [(p, p), (p, r), (r, p), (r, r)]).then_some((p, r))
        })
        .collect()
}

/// Bytes of one table's padded sequences above which a forward builds them per block of key
/// tiles instead ([`segment`]): keeps the memory of long calls small (within noise at n = 16K,
/// d = 64 in a loaded check, where the build is about 1/500 of the scoring work per element).
pub const TABLE_BYTES: usize = 32 << 20;

/// Key tiles per segment of the sequences in a segmented forward.
pub const SEG_TILES: usize = 8;

#[cfg(test)]
thread_local! {
    /// Tests: when not 0, segment the tables of calls made from this thread whatever their
    /// size, this many key tiles per segment.
    pub static FORCE_SEGMENTS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Key tiles per segment when a call's tables are too large to build whole (see
/// [`TABLE_BYTES`]), else 0.
pub(crate) fn segment_tiles<T: Real>(prob: &Problem, sp: &SparseW<'_, T>) -> usize {
    #[cfg(test)]
    if FORCE_SEGMENTS.with(|f| f.get()) > 0 {
        return FORCE_SEGMENTS.with(|f| f.get());
    }
    let bytes = sp.support.len() * padded(prob.glen()) * std::mem::size_of::<T>();
    if bytes > TABLE_BYTES {
        SEG_TILES
    } else {
        0
    }
}

/// A window of the padded diagonal sequences of one table: padded index `x` (`PAD_L + g`) of
/// support entry `s` at `ptr[s * stride + x - x0]`.
#[derive(Clone, Copy)]
pub(crate) struct Seqs<E> {
    pub ptr: *const E,
    pub stride: usize,
    pub x0: usize,
}

/// Per-table diagonal sequences, each support entry padded: `out[s * padded(glen) + PAD_L + g]
/// = w_s(δ(g))`. Tables no head uses stay empty.
pub(crate) fn tables<T: Real>(prob: &Problem, sp: &SparseW<'_, T>) -> Vec<Vec<T>> {
    let stride = padded(prob.glen());
    let mut used = vec![false; sp.values.dim().0];
    sp.index.iter().for_each(|&w| used[w] = true);
    (0..used.len())
        .into_par_iter()
        .map(|w| {
            let mut out = Vec::new();
            if used[w] {
                segment(prob, sp, w, 0, stride, &mut out);
            }
            out
        })
        .collect()
}

/// Padded indices `x_lo..x_hi` of table `t`'s sequences (zero outside the table) into `buf`.
pub(crate) fn segment<T: Real>(
    prob: &Problem,
    sp: &SparseW<'_, T>,
    t: usize,
    x_lo: usize,
    x_hi: usize,
    buf: &mut Vec<T>,
) -> Seqs<T> {
    let len = x_hi - x_lo;
    buf.clear();
    buf.resize(sp.support.len() * len, T::zero());
    let table = sp.values.index_axis(ndarray::Axis(0), t);
    let (rows, ns) = table.dim();
    // In i128: δ(0) may be any i64 `validate` accepts (offsets near the i64 limits), and
    // `half + δ(0) + PAD_L` and the bounds below would overflow i64 there.
    let half = (rows as i128 - 1) / 2;
    // Padded index x reads table row r0 - x (δ falls by one per diagonal).
    let r0 = half + prob.delta(0) as i128 + PAD_L as i128;
    let lo = [x_lo as i128, PAD_L as i128, r0 - rows as i128 + 1]
        .into_iter()
        .max();
    let hi = [x_hi as i128, (PAD_L + prob.glen()) as i128, r0 + 1]
        .into_iter()
        .min();
    let (lo, hi) = (lo.unwrap_or(0), hi.unwrap_or(0));
    if lo >= hi {
        return seqs_of(buf, len, x_lo);
    }
    // x_lo <= lo < hi <= x_hi: both fit in usize; and for x in lo..hi, r0 - x is in 0..rows.
    let (lo, hi) = (lo as usize, hi as usize);
    let row_of = |x: usize| (r0 - x as i128) as usize;
    match table.as_slice() {
        Some(tab) => {
            // Blocks of 16 diagonals: 16 rows of the table in, 16 consecutive values per
            // sequence out.
            const XB: usize = 16;
            for xs in (lo..hi).step_by(XB) {
                let m = XB.min(hi - xs);
                let src: [&[T]; XB] = std::array::from_fn(|e| {
                    let r = row_of(xs + e.min(m - 1));
                    &tab[r * ns..(r + 1) * ns]
                });
                for (si, dst) in buf.chunks_exact_mut(len).enumerate() {
                    let dst = &mut dst[xs - x_lo..xs - x_lo + m];
                    for (e, o) in dst.iter_mut().enumerate() {
                        *o = src[e][si];
                    }
                }
            }
        }
        None => {
            for x in lo..hi {
                for (si, &y) in table.row(row_of(x)).iter().enumerate() {
                    buf[si * len + x - x_lo] = y;
                }
            }
        }
    }
    seqs_of(buf, len, x_lo)
}

fn seqs_of<T>(buf: &[T], stride: usize, x0: usize) -> Seqs<T> {
    Seqs {
        ptr: buf.as_ptr(),
        stride,
        x0,
    }
}

/// `x^T` (`x` is `n x m`) with each row padded: `out[c * padded(n) + PAD_L + j] = x[j, c]`.
pub(crate) fn padded_transpose<T: Real>(x: ArrayView2<'_, T>) -> Vec<T> {
    let (n, m) = x.dim();
    let stride = padded(n);
    let mut out = vec![T::zero(); m * stride];
    for (j, row) in x.outer_iter().enumerate() {
        for (c, &v) in row.iter().enumerate() {
            out[c * stride + PAD_L + j] = v;
        }
    }
    out
}

/// Scores of rows `i0..i0+MR` (scaled queries at `q`, transposed: row `r`, element `l` at
/// `q[l MR + r]`, see [`transpose_strips`]) against keys `j0..j0+w` into the strip at `s` (row
/// stride `ld`), for head `bh`.
///
/// # Safety
/// `s` must have `MARGIN` valid elements before it and `MR` rows of `ld >= w + 2 NR` after it;
/// `j0 + w <= n_k`; the keys and tables of `sh` are the padded layouts above.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) unsafe fn scores<L: Lanes>(
    sh: &Shared<'_, '_, L::E>,
    sp: &SparseW<'_, L::E>,
    seqs: Seqs<L::E>,
    bh: usize,
    q: *const L::E,
    i0: usize,
    j0: usize,
    w: usize,
    s: *mut L::E,
    ld: usize,
) {
    match L::MR {
        4 => scores_n::<L, 4>(sh, sp, seqs, bh, q, i0, j0, w, s, ld),
        6 => scores_n::<L, 6>(sh, sp, seqs, bh, q, i0, j0, w, s, ld),
        8 => scores_n::<L, 8>(sh, sp, seqs, bh, q, i0, j0, w, s, ld),
        12 => scores_n::<L, 12>(sh, sp, seqs, bh, q, i0, j0, w, s, ld),
        _ => unreachable!("micro-tile rows"),
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn scores_n<L: Lanes, const MR: usize>(
    sh: &Shared<'_, '_, L::E>,
    sp: &SparseW<'_, L::E>,
    seqs: Seqs<L::E>,
    bh: usize,
    q: *const L::E,
    i0: usize,
    j0: usize,
    w: usize,
    s: *mut L::E,
    ld: usize,
) {
    let prob = sh.prob;
    let nq = prob.nq;
    let gstride = seqs.stride;
    let kstride = padded(prob.nk);
    let table = seqs.ptr;
    let kt = sh.keys[sh.kv_head(bh)].as_ptr();
    // Diagonal of row 0 at column u - (MR - 1) is g0 + u; keys of row r start at j0 - (MR-1) + r.
    debug_assert!(PAD_L + j0 + nq - 1 - i0 - (MR - 1) >= seqs.x0);
    let g0 = PAD_L + j0 + nq - 1 - i0 - (MR - 1) - seqs.x0;
    let kbase = PAD_L + j0 - (MR - 1);
    let span = round_up(w + MR - 1, L::W);
    debug_assert!(g0 + span <= seqs.stride, "{g0} + {span} > {}", seqs.stride);
    // Column u - (MR - 1) + row of row `row`.
    let at = |u: usize, row: usize| s.add(row * ld + u + row).sub(MR - 1);
    // The support in groups, so that a pass over the strip reads a few dozen sequences (the
    // strip's partial sums go through memory between groups).
    let n_items = sh.blocks.as_ref().map_or(sp.support.len(), |p| p.len());
    let group = if sh.blocks.is_some() {
        PAIR_GROUP
    } else {
        4 * PAIR_GROUP
    };
    // At least one pass: with an empty support the scores are 0 and must still be written.
    for first in (0..n_items.max(1)).step_by(group) {
        let items = first..(first + group).min(n_items);
        let mut u = 0;
        while u < span {
            let mut acc = [L::zero(); MR];
            if first > 0 {
                unroll_rows!(MR, |row| {
                    acc[row] = L::load(at(u, row));
                });
            }
            match &sh.blocks {
                Some(pairs) => {
                    for m in items.clone() {
                        let (p, r) = pairs[m];
                        let seq = table.add(4 * m * gstride + g0 + u);
                        let wpp = L::load(seq);
                        let wpr = L::load(seq.add(gstride));
                        let wrp = L::load(seq.add(2 * gstride));
                        let wrr = L::load(seq.add(3 * gstride));
                        let kp = kt.add(p * kstride + kbase + u);
                        let kr = kt.add(r * kstride + kbase + u);
                        let (qp, qr) = (q.add(p * MR), q.add(r * MR));
                        let (kp0, kr0) = (L::load(kp), L::load(kr));
                        let (kp1, kr1) = if L::FAST_WINDOW {
                            (L::load(kp.add(L::W)), L::load(kr.add(L::W)))
                        } else {
                            (kp0, kr0)
                        };
                        unroll_rows!(MR, |row| {
                            // The keys of row `row` start `row` lanes further.
                            let (vp, vr) = if L::FAST_WINDOW {
                                (L::window(kp0, kp1, row), L::window(kr0, kr1, row))
                            } else {
                                (L::load(kp.add(row)), L::load(kr.add(row)))
                            };
                            let tp = L::fma(wpr, vr, L::mul(wpp, vp));
                            let tr = L::fma(wrr, vr, L::mul(wrp, vp));
                            let a = L::fma(L::splat(*qp.add(row)), tp, acc[row]);
                            acc[row] = L::fma(L::splat(*qr.add(row)), tr, a);
                        });
                    }
                }
                None => {
                    for si in items.clone() {
                        let (l1, l2) = sp.support[si];
                        let wv = L::load(table.add(si * gstride + g0 + u));
                        let kk = kt.add(l2 * kstride + kbase + u);
                        let ql = q.add(l1 * MR);
                        unroll_rows!(MR, |row| {
                            let t = L::mul(wv, L::load(kk.add(row)));
                            acc[row] = L::fma(L::splat(*ql.add(row)), t, acc[row]);
                        });
                    }
                }
            }
            unroll_rows!(MR, |row| {
                L::store(at(u, row), acc[row]);
            });
            u += L::W;
        }
    }
}

/// Where the gradient kernels write: dq rows (row stride `ldq`, `MR` rows), dk transposed
/// (`d` rows of stride `ldk`, at the strip's or tile's first key) and, optionally, dW per support
/// entry (stride `ldw`, at the diagonal of the first row and first key).
pub(crate) struct GradOut<E> {
    pub dq: *mut E,
    pub ldq: usize,
    pub dkt: *mut E,
    pub ldk: usize,
    pub dw: Option<*mut E>,
    pub ldw: usize,
}

/// dq and dW contributions of a strip of `MR` rows (queries transposed as for [`scores`]; `dS` at
/// `ds`, row stride `ld`, zero outside
/// the keys `j0..j0+w` for at least `MR` columns either side), walking diagonals as
/// [`scores`] does: per support block, `dq` accumulates in registers over the diagonals, `dW`
/// over the rows.
///
/// # Safety
/// As [`scores`]; `out.dq` has `MR` rows, `out.dw` is padded by `PAD_L`/`PAD_R`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) unsafe fn strip_grads<L: Lanes>(
    sh: &Shared<'_, '_, L::E>,
    sp: &SparseW<'_, L::E>,
    seqs: Seqs<L::E>,
    bh: usize,
    q: *const L::E,
    i0: usize,
    j0: usize,
    w: usize,
    ds: *const L::E,
    ld: usize,
    out: &GradOut<L::E>,
) {
    match L::MR {
        4 => strip_grads_n::<L, 4>(sh, sp, seqs, bh, q, i0, j0, w, ds, ld, out),
        6 => strip_grads_n::<L, 6>(sh, sp, seqs, bh, q, i0, j0, w, ds, ld, out),
        8 => strip_grads_n::<L, 8>(sh, sp, seqs, bh, q, i0, j0, w, ds, ld, out),
        12 => strip_grads_n::<L, 12>(sh, sp, seqs, bh, q, i0, j0, w, ds, ld, out),
        _ => unreachable!("micro-tile rows"),
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn strip_grads_n<L: Lanes, const MR: usize>(
    sh: &Shared<'_, '_, L::E>,
    sp: &SparseW<'_, L::E>,
    seqs: Seqs<L::E>,
    bh: usize,
    q: *const L::E,
    i0: usize,
    j0: usize,
    w: usize,
    ds: *const L::E,
    ld: usize,
    out: &GradOut<L::E>,
) {
    let prob = sh.prob;
    let nq = prob.nq;
    let scale = L::E::of(prob.scale);
    let gstride = seqs.stride;
    let kstride = padded(prob.nk);
    let table = seqs.ptr;
    let kt = sh.keys[sh.kv_head(bh)].as_ptr();
    debug_assert!(PAD_L + j0 + nq - 1 - i0 - (MR - 1) >= seqs.x0);
    let g0 = PAD_L + j0 + nq - 1 - i0 - (MR - 1) - seqs.x0;
    let kbase = PAD_L + j0 - (MR - 1);
    let span = round_up(w + MR - 1, L::W);
    debug_assert!(g0 + span <= seqs.stride, "{g0} + {span} > {}", seqs.stride);
    // dS of row r at column u - (MR - 1) + r, and dW at diagonal u - (MR - 1).
    let dsp = |u: usize, r: usize| ds.add(r * ld + u + r).sub(MR - 1);
    let dwp = |s: usize, u: usize| out.dw.map(|p| p.add(s * out.ldw + u).sub(MR - 1));
    let add_to = |p: *mut L::E, v: L::V| L::store(p, L::add(L::load(p), v));
    match &sh.blocks {
        Some(pairs) => {
            for (m, &(p, r)) in pairs.iter().enumerate() {
                let mut aqp = [L::zero(); MR];
                let mut aqr = [L::zero(); MR];
                let seq = table.add(4 * m * gstride + g0);
                let kp = kt.add(p * kstride + kbase);
                let kr = kt.add(r * kstride + kbase);
                let mut u = 0;
                while u < span {
                    let wpp = L::load(seq.add(u));
                    let wpr = L::load(seq.add(gstride + u));
                    let wrp = L::load(seq.add(2 * gstride + u));
                    let wrr = L::load(seq.add(3 * gstride + u));
                    let mut wacc = [L::zero(); 4];
                    // Keys of row `row` start `row` lanes further (see `scores_n`).
                    let (kp0, kr0) = (L::load(kp.add(u)), L::load(kr.add(u)));
                    let (kp1, kr1) = if L::FAST_WINDOW {
                        (L::load(kp.add(u + L::W)), L::load(kr.add(u + L::W)))
                    } else {
                        (kp0, kr0)
                    };
                    unroll_rows!(MR, |row| {
                        let x = L::load(dsp(u, row));
                        let (vp, vr) = if L::FAST_WINDOW {
                            (L::window(kp0, kp1, row), L::window(kr0, kr1, row))
                        } else {
                            (L::load(kp.add(u + row)), L::load(kr.add(u + row)))
                        };
                        let tp = L::fma(wpr, vr, L::mul(wpp, vp));
                        let tr = L::fma(wrr, vr, L::mul(wrp, vp));
                        aqp[row] = L::fma(x, tp, aqp[row]);
                        aqr[row] = L::fma(x, tr, aqr[row]);
                        if out.dw.is_some() {
                            let up = L::mul(x, L::splat(*q.add(p * MR + row)));
                            let ur = L::mul(x, L::splat(*q.add(r * MR + row)));
                            wacc[0] = L::fma(up, vp, wacc[0]);
                            wacc[1] = L::fma(up, vr, wacc[1]);
                            wacc[2] = L::fma(ur, vp, wacc[2]);
                            wacc[3] = L::fma(ur, vr, wacc[3]);
                        }
                    });
                    if out.dw.is_some() {
                        for (e, &a) in wacc.iter().enumerate() {
                            if let Some(ptr) = dwp(4 * m + e, u) {
                                add_to(ptr, a);
                            }
                        }
                    }
                    u += L::W;
                }
                unroll_rows!(MR, |row| {
                    let dq = out.dq.add(row * out.ldq);
                    *dq.add(p) = *dq.add(p) + scale * L::hsum(aqp[row]);
                    *dq.add(r) = *dq.add(r) + scale * L::hsum(aqr[row]);
                });
            }
        }
        None => {
            for (si, &(l1, l2)) in sp.support.iter().enumerate() {
                let mut aq = [L::zero(); MR];
                let seq = table.add(si * gstride + g0);
                let kk = kt.add(l2 * kstride + kbase);
                let mut u = 0;
                while u < span {
                    let wv = L::load(seq.add(u));
                    let mut wacc = L::zero();
                    unroll_rows!(MR, |row| {
                        let x = L::load(dsp(u, row));
                        let kv = L::load(kk.add(u + row));
                        aq[row] = L::fma(x, L::mul(wv, kv), aq[row]);
                        if out.dw.is_some() {
                            let up = L::mul(x, L::splat(*q.add(l1 * MR + row)));
                            wacc = L::fma(up, kv, wacc);
                        }
                    });
                    if let Some(ptr) = dwp(si, u) {
                        add_to(ptr, wacc);
                    }
                    u += L::W;
                }
                unroll_rows!(MR, |row| {
                    let dq = out.dq.add(row * out.ldq + l1);
                    *dq = *dq + scale * L::hsum(aq[row]);
                });
            }
        }
    }
}

/// dk contributions of a tile: rows `i0..i0+nb` (scaled queries `q`, stride `ldq`; `dS` at
/// `ds`, stride `ld`, zero outside the visible keys) against keys `j0..j0+kw` (`kw` a multiple
/// of `W`), into `out.dkt`. Per key register and support block the accumulators stay in
/// registers over every row: `dk_p += dS (w_pp q_p + w_rp q_r)`, `dk_r += dS (w_pr q_p + w_rr q_r)`.
///
/// # Safety
/// As [`strip_grads`], for `nb` rows and keys `j0..j0+kw` (within the padding of `out.dkt`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) unsafe fn tile_dk<L: Lanes>(
    sh: &Shared<'_, '_, L::E>,
    sp: &SparseW<'_, L::E>,
    seqs: Seqs<L::E>,
    q: *const L::E,
    d: usize,
    i0: usize,
    nb: usize,
    j0: usize,
    kw: usize,
    ds: *const L::E,
    ld: usize,
    out: &GradOut<L::E>,
) {
    let prob = sh.prob;
    let nq = prob.nq;
    let gstride = seqs.stride;
    let table = seqs.ptr;
    // Row i meets key j0 + c on diagonal g = j0 + c + nq - 1 - i.
    debug_assert!(PAD_L + j0 + nq - i0 >= seqs.x0 + nb + 8);
    debug_assert!(PAD_L + j0 + nq - i0 + kw + 2 * L::W <= seqs.x0 + seqs.stride);
    let gbase = PAD_L + j0 + nq - 1 - i0 - seqs.x0;
    let n_items = sh.blocks.as_ref().map_or(sp.support.len(), |p| p.len());
    let group = if sh.blocks.is_some() {
        PAIR_GROUP
    } else {
        4 * PAIR_GROUP
    };
    for first in (0..n_items).step_by(group) {
        let items = first..(first + group).min(n_items);
        let mut c = 0;
        while c < kw {
            match &sh.blocks {
                Some(pairs) => {
                    for m in items.clone() {
                        let (p, r) = pairs[m];
                        let seq = table.add(4 * m * gstride + gbase + c);
                        let (mut ap, mut ar) = (L::zero(), L::zero());
                        let mut i = 0;
                        if L::FAST_WINDOW {
                            // Rows i..i+8 read the sequences at offsets -i..-i-7: one pair of
                            // registers starting 7 before serves them all.
                            const G: usize = 8;
                            while i + G <= nb {
                                let s0 = seq.sub(i + G - 1);
                                let lo = [0, 1, 2, 3].map(|e| L::load(s0.add(e * gstride)));
                                let hi = [0, 1, 2, 3].map(|e| L::load(s0.add(e * gstride + L::W)));
                                for k in 0..G {
                                    let x = L::load(ds.add((i + k) * ld + c));
                                    let up = L::mul(x, L::splat(*q.add((i + k) * d + p)));
                                    let ur = L::mul(x, L::splat(*q.add((i + k) * d + r)));
                                    let wv = |e: usize| L::window(lo[e], hi[e], G - 1 - k);
                                    ap = L::fma(wv(0), up, ap);
                                    ap = L::fma(wv(2), ur, ap);
                                    ar = L::fma(wv(1), up, ar);
                                    ar = L::fma(wv(3), ur, ar);
                                }
                                i += G;
                            }
                        }
                        while i < nb {
                            let x = L::load(ds.add(i * ld + c));
                            let up = L::mul(x, L::splat(*q.add(i * d + p)));
                            let ur = L::mul(x, L::splat(*q.add(i * d + r)));
                            let s = seq.sub(i);
                            ap = L::fma(L::load(s), up, ap);
                            ap = L::fma(L::load(s.add(2 * gstride)), ur, ap);
                            ar = L::fma(L::load(s.add(gstride)), up, ar);
                            ar = L::fma(L::load(s.add(3 * gstride)), ur, ar);
                            i += 1;
                        }
                        let dp = out.dkt.add(p * out.ldk + c);
                        L::store(dp, L::add(L::load(dp), ap));
                        let dr = out.dkt.add(r * out.ldk + c);
                        L::store(dr, L::add(L::load(dr), ar));
                    }
                }
                None => {
                    for si in items.clone() {
                        let (l1, l2) = sp.support[si];
                        let seq = table.add(si * gstride + gbase + c);
                        let mut a = L::zero();
                        for i in 0..nb {
                            let x = L::load(ds.add(i * ld + c));
                            let up = L::mul(x, L::splat(*q.add(i * d + l1)));
                            a = L::fma(L::load(seq.sub(i)), up, a);
                        }
                        let dk = out.dkt.add(l2 * out.ldk + c);
                        L::store(dk, L::add(L::load(dk), a));
                    }
                }
            }
            c += L::W;
        }
    }
}

/// Rows `0..n` of `x` (row stride `ld`, `d` used columns, `n` a multiple of `mr`) as transposed
/// strips of `mr` rows: row `s mr + r`, element `l` at `out[(s d + l) mr + r]`.
pub(crate) fn transpose_strips<T: Real>(
    x: &[T],
    n: usize,
    ld: usize,
    d: usize,
    mr: usize,
) -> Vec<T> {
    let mut out = Vec::new();
    transpose_strips_into(x, n, ld, d, mr, &mut out);
    out
}

/// [`transpose_strips`] into `out` (resized to `n d`).
pub(crate) fn transpose_strips_into<T: Real>(
    x: &[T],
    n: usize,
    ld: usize,
    d: usize,
    mr: usize,
    out: &mut Vec<T>,
) {
    out.clear();
    out.resize(n * d, T::zero());
    for (i, row) in x.chunks(ld).take(n).enumerate() {
        let (s, r) = (i / mr, i % mr);
        for (l, &v) in row[..d].iter().enumerate() {
            out[(s * d + l) * mr + r] = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exact::backward::BackwardInputs;
    use crate::exact::{attention_backward, attention_forward};
    use crate::position::{Bias, Position};
    use crate::problem::Control;
    use crate::test_util::Rng;
    use ndarray::{Array2, Array3};

    /// fuzz/regressions/exact/crash-45bf7e…: at offsets near the i64 limits every diagonal of
    /// the call is masked (no table can cover it) and `δ(0) + half + PAD_L`, and the window
    /// bounds after it, overflowed i64. The table window is now empty, the forward gives
    /// fully-masked rows and the backward zero gradients; through the whole tables, the
    /// segmented build and the decode row.
    #[test]
    fn offsets_near_the_i64_limits_do_not_overflow_the_table_window() {
        let mut rng = Rng(45);
        let support = vec![(0, 0), (0, 1), (1, 0), (1, 1), (2, 1)];
        let rows = 2 * 20 - 1;
        let values = Array3::from_shape_fn((1, rows, support.len()), |_| rng.next());
        let bvals = Array2::from_shape_fn((1, rows), |_| rng.next());
        // δ(0) = i64::MAX - 2 (k_offset i64::MIN, as in the reproducer) and the last δ at
        // i64::MIN; a window keeps |δ| <= 2 only, so nothing is visible.
        for (q_offset, k_offset, nq) in [
            (-9, i64::MIN, 7),
            (i64::MIN + 8, 0, 7),
            (-3, i64::MIN, 1),
            (i64::MIN + 8, 0, 1),
        ] {
            let prob = Problem {
                batch: 1,
                hq: 2,
                hk: 1,
                nq,
                nk: 9,
                d: 3,
                dv: 2,
                scale: 0.5,
                causal: false,
                window: Some((2, 2)),
                q_offset,
                k_offset,
            };
            prob.validate().unwrap();
            let sp = SparseW {
                support: support.clone(),
                values: values.view(),
                index: vec![0; 2],
            };
            sp.validate(&prob).unwrap();
            let mut buf = Vec::new();
            let seqs = segment(&prob, &sp, 0, 0, padded(prob.glen()), &mut buf);
            assert_eq!(seqs.stride, padded(prob.glen()));
            assert!(buf.iter().all(|&x| x == 0.0));
            let pos = Position::Sparse(sp);
            let bias = Bias {
                values: bvals.view(),
                index: vec![0; 2],
            };
            let q = rng.array4((1, 2, nq, 3));
            let k = rng.array4((1, 1, 9, 3));
            let v = rng.array4((1, 1, 9, 2));
            let dout = rng.array4((1, 2, nq, 2));
            for seg in [0, 1] {
                FORCE_SEGMENTS.with(|f| f.set(seg));
                let ctl = Control::new();
                let (out, lse) =
                    attention_forward(&prob, &pos, Some(&bias), q.view(), k.view(), v.view(), &ctl)
                        .unwrap();
                assert!(out.iter().all(|&x| x == 0.0));
                assert!(lse.iter().all(|&x| x == f64::NEG_INFINITY));
                let inp = BackwardInputs {
                    out: out.view(),
                    lse: lse.view(),
                    dout: dout.view(),
                    want_dw: true,
                    want_dbias: true,
                    threads: 2,
                };
                let g = attention_backward(
                    &prob,
                    &pos,
                    Some(&bias),
                    q.view(),
                    k.view(),
                    v.view(),
                    &inp,
                    &ctl,
                )
                .unwrap();
                for a in [&g.dq, &g.dk, &g.dv] {
                    assert!(a.iter().all(|&x| x == 0.0));
                }
                assert!(g.dw.unwrap().iter().all(|&x| x == 0.0));
                assert!(g.dbias.unwrap().iter().all(|&x| x == 0.0));
            }
            FORCE_SEGMENTS.with(|f| f.set(0));
        }
    }
}
