//! The few-query forward ("decode"): at most [`MAX_ROWS`] query rows per head, as in a
//! generation loop against a KV cache.
//!
//! The GEMM path of [`super::forward`] packs every key and value of the call into panels and pads
//! each head's queries to a micro-tile of `MR` rows: with one query row per head that is nearly
//! all of its time. Here a unit of work is one span of keys and a block of kv heads, each with the
//! `G = group x n_q` query rows of that kv head (the query heads of a GQA group share each key
//! as it is read). For each of its heads and each chunk of [`CHUNK`] keys a unit
//!
//! * rotates the keys with a table of `(cos, sin)` (`w=None`: reads them in place), or, for
//!   `BlockW`, applies to them each query row's `W_δ` (2x2 blocks read from `w`'s rows: `δ`
//!   falls by one per key),
//! * scores them against every row with dot products and adds the log-factor (bias, masks),
//! * updates each row's online softmax (`m`, `l`, as in [`super::forward`]),
//! * and adds `P V`, reading `v` in place.
//!
//! The units run in parallel (flash-decoding: a kv head's spans too) and a kv head's spans are
//! merged by their maxima and sums: `O = Σ_s e^{m_s - m} o_s / Σ_s e^{m_s - m} l_s`,
//! `lse = m + ln Σ_s e^{m_s - m} l_s`. Small calls ([`runs_serial`]) run on the calling thread
//! alone, as one unit.
//! When asked, the finiteness check of `k` and `v` rides along: the pass reads every key and
//! value row some query can see, and only those rows can change the result.

use super::kernel::{self, round_up};
use super::Shared;
use crate::arch::lanes::{Lanes, LanesTask};
use crate::arch::Real;
use crate::error::Result;
use crate::position::Position;
use crate::problem::Control;
use ndarray::{s, Array3, Array4, ArrayView4};
use num_traits::{Float, One, Zero};
use rayon::prelude::*;

/// Query rows per head up to which the decode path runs (the GEMM path pads to `MR` >= 12).
pub(crate) const MAX_ROWS: usize = 4;
/// Keys per chunk: scores, rotated keys and their table stay in L1.
const CHUNK: usize = 64;
/// The shortest span of keys a unit takes when a call has too few kv heads to fill the threads
/// (a quarter of it when the keys are rotated).
const MIN_SPAN: usize = 512;
/// The largest rotation table of one unit (cos and sin of its span of keys): in L2.
const TABLE_BYTES: usize = 256 << 10;
/// Rows ahead that the key rotation prefetches.
const PF_ROWS: usize = 16;

/// Prefetches the cache lines of a row of `n` elements at `p` (a hint: any address is safe).
#[inline(always)]
fn prefetch_row<T>(p: *const T, n: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let bytes = n * std::mem::size_of::<T>();
        let mut off = 0;
        while off < bytes {
            // SAFETY: prefetching never faults.
            unsafe { _mm_prefetch::<_MM_HINT_T0>((p as *const i8).wrapping_add(off)) };
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, n);
}

/// Row padding of the packed queries and rotated keys (a multiple of every `Lanes::W`).
const PAD: usize = 16;

/// Whether a forward call takes the decode path: at most [`MAX_ROWS`] query rows per head, and
/// `w` rotary (or `None`) or 2x2 blocks on disjoint pairs (`BlockW`).
pub(crate) fn applies<T>(nq: usize, pos: &Position<'_, T>) -> bool {
    nq <= MAX_ROWS
        && match pos {
            Position::Rotary(_) => true,
            Position::Sparse(sp) => block_layout(&sp.support).is_some(),
        }
}

/// The pairs `(p, r)` of a support made of 2x2 blocks (in BlockW's order: values `4m..4m + 4`
/// are `W[p,p], W[p,r], W[r,p], W[r,r]`) on pairs that share no lane.
fn block_layout(support: &[(usize, usize)]) -> Option<Vec<(usize, usize)>> {
    let pairs = super::sparse::block_pairs(support)?;
    let mut lanes: Vec<usize> = pairs.iter().flat_map(|&(p, r)| [p, r]).collect();
    lanes.sort_unstable();
    lanes.windows(2).all(|x| x[0] != x[1]).then_some(pairs)
}

/// Bytes of `k` and `v` below which a decode call is best run on the calling thread alone: waking
/// pool threads costs more than the work (see `src/python/runtime.rs`).
#[cfg_attr(not(feature = "python"), allow(dead_code))]
pub(crate) const SERIAL_BYTES: usize = 4 << 20;

/// Whether a forward call is a decode call small enough for [`SERIAL_BYTES`].
#[cfg_attr(not(feature = "python"), allow(dead_code))]
pub(crate) fn runs_serial<T>(prob: &crate::problem::Problem, pos: &Position<'_, T>) -> bool {
    let bytes = prob.batch * prob.hk * prob.nk * (prob.d + prob.dv) * std::mem::size_of::<T>();
    applies(prob.nq, pos) && bytes <= SERIAL_BYTES
}

/// The running softmax state of the rows of one kv head over one span: maxima, sums,
/// unnormalised outputs.
struct Partial<T> {
    m: Vec<T>,
    l: Vec<T>,
    o: Vec<T>,
}

/// The partial states of one unit's kv heads, and whether it saw a NaN or Inf in `k` or `v`.
struct UnitOut<T> {
    heads: Vec<Partial<T>>,
    bad_k: bool,
    bad_v: bool,
}

/// `(out, lse)` of a decode call into `out` and `lse` (zeros and `-inf` on entry). With
/// `check`, a NaN or Inf in a visible row of `k` or `v` is an error naming the array.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward<T: Real>(
    sh: &Shared<'_, '_, T>,
    q: &ArrayView4<'_, T>,
    k: &ArrayView4<'_, T>,
    v: &ArrayView4<'_, T>,
    ctl: &Control,
    check: bool,
    out: &mut Array4<T>,
    lse: &mut Array3<T>,
) -> Result<()> {
    let prob = sh.prob;
    let (nq, nk, d, dv) = (prob.nq, prob.nk, prob.d, prob.dv);
    let tf = Transform::of(sh);
    let identity = tf.identity;
    let group = prob.group();
    let rows = group * nq;
    let dp = round_up(d, PAD);
    let dvp = round_up(dv, PAD);
    let heads = prob.batch * prob.hk;
    // Queries of every kv head's group, scaled and rotated; w=None folds the keys' attention
    // factor into them too (its keys are read as they are).
    let extra = match sh.pos {
        Position::Rotary(r) if identity => T::of(r.factor),
        _ => T::one(),
    };
    let mut qs = vec![T::zero(); heads * rows * dp];
    let mut buf = Vec::new();
    for kvh in 0..heads {
        for hh in 0..group {
            let bh = (kvh / prob.hk) * prob.hq + (kvh % prob.hk) * group + hh;
            sh.pack_queries(q, bh, 0, nq, nq, dp, &mut buf);
            let at = (kvh * rows + hh * nq) * dp;
            for (x, &y) in qs[at..at + nq * dp].iter_mut().zip(&buf) {
                *x = y * extra;
            }
        }
    }
    // Units: spans of keys times blocks of kv heads, about 4 per thread. A unit builds the
    // rotation table of its span once for all of its heads (so a span's table stays within
    // TABLE_BYTES), and walks its heads one after the other.
    let target = if ctl.is_serial() {
        1
    } else {
        4 * rayon::current_num_threads().max(1)
    };
    let max_span = if identity {
        nk
    } else {
        (TABLE_BYTES / (2 * d * std::mem::size_of::<T>())).max(CHUNK) / CHUNK * CHUNK
    };
    // Rotating calls split the keys finer: each head block rebuilds its span's table.
    let min_span = if identity { MIN_SPAN } else { MIN_SPAN / 4 };
    let splits = target
        .min(nk.div_ceil(min_span))
        .max(nk.div_ceil(max_span))
        .max(1);
    let span = round_up(nk.div_ceil(splits), CHUNK);
    let splits = nk.div_ceil(span);
    let hblock = heads.div_ceil(target.div_ceil(splits).min(heads));
    let hblocks = heads.div_ceil(hblock);
    let unit_out = |unit: usize| {
        let (split, hb) = (unit / hblocks, unit % hblocks);
        let ja = split * span;
        let task = Span {
            sh,
            qs: &qs,
            k,
            v,
            heads: hb * hblock..heads.min((hb + 1) * hblock),
            ja,
            jb: nk.min(ja + span),
            tf: &tf,
            ctl,
            check,
        };
        T::with_lanes(sh.isa, task)
    };
    let units: Vec<UnitOut<T>> = if ctl.is_serial() {
        (0..splits * hblocks).map(unit_out).collect()
    } else {
        (0..splits * hblocks)
            .into_par_iter()
            .map(unit_out)
            .collect()
    };
    ctl.check()?;
    if check {
        if units.iter().any(|u| u.bad_k) {
            return Err(super::non_finite("k", k));
        }
        if units.iter().any(|u| u.bad_v) {
            return Err(super::non_finite("v", v));
        }
    }
    let (ninf, zero) = (T::neg_infinity(), T::zero());
    let mut acc = vec![zero; dv];
    for kvh in 0..heads {
        let (b, hk) = (kvh / prob.hk, kvh % prob.hk);
        let (hb, at) = (kvh / hblock, kvh % hblock);
        let ps: Vec<&Partial<T>> = (0..splits)
            .map(|sp| &units[sp * hblocks + hb].heads[at])
            .collect();
        for g in 0..rows {
            let (h, i) = (hk * group + g / nq, g % nq);
            let m = ps.iter().fold(ninf, |m, p| m.max(p.m[g]));
            if m == ninf {
                continue;
            }
            acc.iter_mut().for_each(|x| *x = zero);
            let mut l = zero;
            for p in &ps {
                if p.m[g] == ninf {
                    continue;
                }
                let a = (p.m[g] - m).exp();
                l = l + a * p.l[g];
                for (x, &y) in acc.iter_mut().zip(&p.o[g * dvp..]) {
                    *x = *x + a * y;
                }
            }
            let inv = T::one() / l;
            for (o, &x) in out.slice_mut(s![b, h, i, ..]).iter_mut().zip(&acc) {
                *o = x * inv;
            }
            lse[[b, h, i]] = m + l.ln();
        }
    }
    Ok(())
}

/// Kv heads `heads` (flattened over the batch), keys `ja..jb`.
struct Span<'s, 'a, 'p, 'x, T> {
    sh: &'s Shared<'a, 'p, T>,
    /// Every kv head's `G` query rows, `PAD`-padded (see [`forward`]).
    qs: &'s [T],
    k: &'s ArrayView4<'x, T>,
    v: &'s ArrayView4<'x, T>,
    heads: std::ops::Range<usize>,
    ja: usize,
    jb: usize,
    /// How keys are transformed before the dot products.
    tf: &'s Transform,
    ctl: &'s Control,
    check: bool,
}

impl<T: Real> LanesTask<T> for Span<'_, '_, '_, '_, T> {
    type Out = UnitOut<T>;
    #[inline(always)]
    fn run<L: Lanes<E = T>>(self) -> UnitOut<T> {
        span::<L>(self)
    }
}

#[inline(always)]
fn span<L: Lanes>(u: Span<'_, '_, '_, '_, L::E>) -> UnitOut<L::E> {
    let sh = u.sh;
    let prob = sh.prob;
    let (nq, d, dv) = (prob.nq, prob.d, prob.dv);
    let group = prob.group();
    let rows = group * nq;
    let (dp, dvp) = (round_up(d, PAD), round_up(dv, PAD));
    let (zero, one, ninf) = (L::E::zero(), L::E::one(), L::E::neg_infinity());
    let mut res = UnitOut {
        heads: (0..u.heads.len())
            .map(|_| Partial {
                m: vec![ninf; rows],
                l: vec![zero; rows],
                o: vec![zero; rows * dvp],
            })
            .collect(),
        bad_k: false,
        bad_v: false,
    };
    let Some((j0, j1)) = sh.visible_keys(0, nq, u.ja, u.jb - u.ja, 1) else {
        return res;
    };
    let tf = u.tf;
    let identity = tf.identity;
    let w = L::W;
    let (dl, dvl) = (round_up(d, w), round_up(dv, w));
    // Transform in registers: interleaved pairs (any d, whole vectors first), or half pairs with
    // d/2 a multiple of W; any other layout lane by lane.
    let vec_rot = match tf.dist {
        _ if identity => 0,
        Some(1) => d / w * w,
        Some(h) if h % w == 0 => d,
        _ => 0,
    };
    let mut kbuf = vec![zero; CHUNK * dp];
    let mut vbuf = vec![zero; CHUNK * dvp];
    // Rotary: the table of the unit's visible keys, shared by its heads. BlockW: a chunk's
    // table per query row (its δ and its head's blocks).
    let (mut tc, mut ts) = match (&tf.blocks, identity) {
        (_, true) => (Vec::new(), Vec::new()),
        (None, false) => (vec![zero; (j1 - j0) * d], vec![zero; (j1 - j0) * d]),
        (Some(_), false) => (vec![zero; CHUNK * d], vec![zero; CHUNK * d]),
    };
    let mut rowbuf = vec![zero; dp];
    let mut sc = vec![zero; rows * CHUNK];
    let (mut zk, mut zv) = (zero, zero);
    // SAFETY (this function): row pointers come from rows `j0..j1` of a head of `k`/`v`
    // (`visible_keys` keeps them below `n_k`) or from the chunk buffers (CHUNK rows of dp or
    // dvp); vector accesses of in-place rows stay below d (dv), which is then a multiple of W,
    // and of buffer rows below `dl <= dp` (`dvl <= dvp`); `sc` rows are CHUNK long and
    // `cnp <= CHUNK`; the query rows of a head are `rows x dp` in `qs`; table rows are d long.
    unsafe {
        let z0 = L::zero();
        let (mut zkv, mut zvv) = (z0, z0);
        if let (Position::Rotary(r), None, false) = (sh.pos, &tf.blocks, identity) {
            let rot = sh.rot.as_ref().expect("rotator of a rotary call");
            rot.table(
                prob.k_offset + j0 as i64,
                j1 - j0,
                r.factor,
                &mut tc,
                &mut ts,
            );
        }
        for (hi, kvh) in u.heads.clone().enumerate() {
            let part = &mut res.heads[hi];
            let (b, hk) = (kvh / prob.hk, kvh % prob.hk);
            let kh = u.k.slice(s![b, hk, .., ..]);
            let vh = u.v.slice(s![b, hk, .., ..]);
            let (ksr, vsr) = (kh.strides()[0], vh.strides()[0]);
            let kcont = kh.strides()[1] == 1 || d == 1;
            let vcont = vh.strides()[1] == 1 || dv == 1;
            let qh = u.qs.as_ptr().add(kvh * rows * dp);
            let keys = Keys {
                kh: &kh,
                kcont,
                ksr,
                dp,
                tf,
                vec_rot,
            };
            for c0 in (j0..j1).step_by(CHUNK) {
                if u.ctl.cancelled() {
                    return res;
                }
                let cn = CHUNK.min(j1 - c0);
                let cnp = round_up(cn, w);
                let lf_needed = sh.needs_log_factor(0, nq, c0, c0 + cn);
                match (&tf.blocks, sh.pos) {
                    (Some(pairs), Position::Sparse(spw)) => {
                        // BlockW: each row's δ (and head's table) transforms the keys; rows
                        // that follow one with the same table and position (the query heads of
                        // a GQA group sharing a table, one row each) reuse its keys.
                        let mut done: Option<(usize, usize)> = None;
                        for g in 0..rows {
                            let (hh, i) = (g / nq, g % nq);
                            let t = spw.index[b * prob.hq + hk * group + hh];
                            let half = (spw.values.dim().1 as i64 - 1) / 2;
                            let delta0 = prob.q_offset + i as i64 - prob.k_offset - c0 as i64;
                            if done != Some((t, i)) {
                                done = Some((t, i));
                                block_table(
                                    &spw.values,
                                    t,
                                    tf,
                                    pairs,
                                    delta0 + half,
                                    cn,
                                    d,
                                    &mut tc,
                                    &mut ts,
                                );
                                keys.transform::<L>(
                                    c0,
                                    cn,
                                    j1,
                                    kbuf.as_mut_ptr(),
                                    tc.as_ptr(),
                                    ts.as_ptr(),
                                    &mut rowbuf,
                                    &mut zkv,
                                    &mut zk,
                                );
                            }
                            score_rows::<L>(
                                kbuf.as_ptr(),
                                dp as isize,
                                cn,
                                qh,
                                dp,
                                dl,
                                g..g + 1,
                                sc.as_mut_ptr(),
                                None,
                            );
                        }
                    }
                    _ => {
                        // Rotary (or w=None): one transform of the keys for every row.
                        let kdirect = identity && kcont && d % w == 0;
                        let (kp, kld) = if kdirect {
                            (kh.as_ptr().offset(c0 as isize * ksr), ksr)
                        } else {
                            let at = (c0 - j0) * d;
                            let (tcp, tsp) = if identity {
                                (tc.as_ptr(), ts.as_ptr())
                            } else {
                                (tc.as_ptr().add(at), ts.as_ptr().add(at))
                            };
                            keys.transform::<L>(
                                c0,
                                cn,
                                j1,
                                kbuf.as_mut_ptr(),
                                tcp,
                                tsp,
                                &mut rowbuf,
                                &mut zkv,
                                &mut zk,
                            );
                            (kbuf.as_ptr(), dp as isize)
                        };
                        // In place, the keys are checked as the scores read them.
                        let check = (kdirect && u.check).then_some(&mut zkv);
                        score_rows::<L>(kp, kld, cn, qh, dp, dl, 0..rows, sc.as_mut_ptr(), check);
                    }
                }
                // Bias and masks.
                if lf_needed {
                    for g in 0..rows {
                        let bh = b * prob.hq + hk * group + g / nq;
                        let lf = sh.log_rows(bh, g % nq, c0)[0];
                        for (jj, x) in sc[g * CHUNK..g * CHUNK + cn].iter_mut().enumerate() {
                            *x = *x + *lf.add(jj);
                        }
                    }
                }
                // Online softmax: P in place of the scores.
                for g in 0..rows {
                    let row = sc.as_mut_ptr().add(g * CHUNK);
                    kernel::fill(row, cn, cnp, ninf);
                    let mx = kernel::row_max::<L>(row, cnp);
                    if mx == ninf {
                        kernel::fill(row, 0, cn, zero);
                        continue;
                    }
                    let (m_new, alpha) = if mx > part.m[g] {
                        (mx, (part.m[g] - mx).exp())
                    } else {
                        (part.m[g], one)
                    };
                    let sum = kernel::exp_shift_sum::<L>(row, cnp, m_new);
                    part.l[g] = part.l[g] * alpha + sum;
                    if alpha != one {
                        kernel::scale::<L>(part.o.as_mut_ptr().add(g * dvp), dvl, alpha);
                    }
                    part.m[g] = m_new;
                }
                // Values of the chunk: row jj at vp + jj vld (in place, or copied into vbuf).
                // In place, the values are checked as `P V` reads them (below).
                let vdirect = vcont && dv % w == 0;
                let vcheck = vdirect && u.check;
                let (vp, vld) = if vdirect {
                    (vh.as_ptr().offset(c0 as isize * vsr), vsr)
                } else {
                    for jj in 0..cn {
                        let dst = &mut vbuf[jj * dvp..jj * dvp + dv];
                        for (a, &x) in dst.iter_mut().zip(vh.row(c0 + jj).iter()) {
                            *a = x;
                            zv = zv + x * zero;
                        }
                    }
                    (vbuf.as_ptr(), dvp as isize)
                };
                // O += P V, four keys at a time.
                let op = part.o.as_mut_ptr();
                let mut jj = 0;
                while jj + 4 <= cn {
                    let v0 = vp.offset(jj as isize * vld);
                    let (v1, v2, v3) = (v0.offset(vld), v0.offset(2 * vld), v0.offset(3 * vld));
                    let mut p = 0;
                    while p < dvl {
                        let (x0, x1) = (L::load(v0.add(p)), L::load(v1.add(p)));
                        let (x2, x3) = (L::load(v2.add(p)), L::load(v3.add(p)));
                        if vcheck {
                            zvv =
                                L::fma(x3, z0, L::fma(x2, z0, L::fma(x1, z0, L::fma(x0, z0, zvv))));
                        }
                        for g in 0..rows {
                            let pr = sc.as_ptr().add(g * CHUNK + jj);
                            let o = op.add(g * dvp + p);
                            let mut a = L::fma(L::splat(*pr), x0, L::load(o));
                            a = L::fma(L::splat(*pr.add(1)), x1, a);
                            a = L::fma(L::splat(*pr.add(2)), x2, a);
                            a = L::fma(L::splat(*pr.add(3)), x3, a);
                            L::store(o, a);
                        }
                        p += w;
                    }
                    jj += 4;
                }
                while jj < cn {
                    let vr = vp.offset(jj as isize * vld);
                    let mut p = 0;
                    while p < dvl {
                        let x = L::load(vr.add(p));
                        if vcheck {
                            zvv = L::fma(x, z0, zvv);
                        }
                        for g in 0..rows {
                            let o = op.add(g * dvp + p);
                            L::store(o, L::fma(L::splat(sc[g * CHUNK + jj]), x, L::load(o)));
                        }
                        p += w;
                    }
                    jj += 1;
                }
            }
        }
        zk = zk + L::hsum(zkv);
        zv = zv + L::hsum(zvv);
    }
    res.bad_k |= zk.is_nan();
    res.bad_v |= zv.is_nan();
    res
}

/// How a unit turns a key row into the vector its scores take the dot product with:
/// `x' = x ∘ c + x[partner] ∘ s` with per-position tables `c`, `s` (rotary: `cos`, `± sin`;
/// BlockW: the block's diagonal and off-diagonal entries), or `x` itself (`w=None`).
pub(crate) struct Transform {
    identity: bool,
    /// BlockW's pairs (the tables come from `w`'s values per δ, see [`block_table`]).
    blocks: Option<Vec<(usize, usize)>>,
    /// The lane distance of every pair: 1 interleaved, d/2 half, `None` for other layouts.
    dist: Option<usize>,
    /// Each lane's partner (itself when it is in no pair).
    partners: Vec<usize>,
}

impl Transform {
    fn of<T: Real>(sh: &Shared<'_, '_, T>) -> Self {
        match sh.pos {
            Position::Rotary(_) => {
                let rot = sh.rot.as_ref().expect("rotator of a rotary call");
                Self {
                    identity: rot.is_identity(),
                    blocks: None,
                    dist: rot.pair_distance(),
                    partners: rot.partners(),
                }
            }
            Position::Sparse(sp) => {
                let d = sh.prob.d;
                let pairs = block_layout(&sp.support).expect("decode::applies checked the blocks");
                let mut partners: Vec<usize> = (0..d).collect();
                for &(p, r) in &pairs {
                    partners[p] = r;
                    partners[r] = p;
                }
                let h = d / 2;
                let dist = if pairs.len() != h {
                    None
                } else if pairs
                    .iter()
                    .enumerate()
                    .all(|(m, &p)| p == (2 * m, 2 * m + 1))
                {
                    Some(1)
                } else if pairs.iter().enumerate().all(|(m, &p)| p == (m, m + h)) {
                    Some(h)
                } else {
                    None
                };
                Self {
                    identity: false,
                    blocks: Some(pairs),
                    dist,
                    partners,
                }
            }
        }
    }
}

/// BlockW's tables for keys `j = c0 + jj` (`jj < cn`) of one query row: `row0` is the values row
/// of `jj = 0` (`δ + L - 1`; `δ` falls by one per key). `c[p] = W[p,p]`, `s[p] = W[p,r]`,
/// `c[r] = W[r,r]`, `s[r] = W[r,p]`; lanes in no pair stay 0.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn block_table<T: Real>(
    values: &ndarray::ArrayView3<'_, T>,
    t: usize,
    tf: &Transform,
    pairs: &[(usize, usize)],
    row0: i64,
    cn: usize,
    d: usize,
    c: &mut [T],
    s: &mut [T],
) {
    let (_, rows, ns) = values.dim();
    assert!(
        t < values.dim().0 && row0 < rows as i64 && row0 + 1 >= cn as i64 && ns == 4 * pairs.len()
    );
    assert!(c.len() >= cn * d && s.len() >= cn * d);
    let st = values.strides();
    let (s1, s2) = (st[1], st[2]);
    // SAFETY: rows `row0 - jj` (jj < cn) and entries `< 4 pairs` of table `t` exist (asserted),
    // and the offsets use the view's own strides; `c`, `s` hold `cn d` entries.
    unsafe {
        let base = values.as_ptr().offset(t as isize * st[0]);
        for jj in 0..cn {
            let x = base.offset((row0 - jj as i64) as isize * s1);
            let (cr, sr) = (c.as_mut_ptr().add(jj * d), s.as_mut_ptr().add(jj * d));
            let at = |e: usize| *x.offset(e as isize * s2);
            match tf.dist {
                Some(1) if s2 == 1 => {
                    for m in 0..pairs.len() {
                        let e = x.add(4 * m);
                        *cr.add(2 * m) = *e;
                        *sr.add(2 * m) = *e.add(1);
                        *sr.add(2 * m + 1) = *e.add(2);
                        *cr.add(2 * m + 1) = *e.add(3);
                    }
                }
                _ => {
                    for (m, &(p, r)) in pairs.iter().enumerate() {
                        *cr.add(p) = at(4 * m);
                        *sr.add(p) = at(4 * m + 1);
                        *sr.add(r) = at(4 * m + 2);
                        *cr.add(r) = at(4 * m + 3);
                    }
                }
            }
        }
    }
}

/// One kv head's keys and how to transform them.
struct Keys<'k, 'x, 't, T> {
    kh: &'k ndarray::ArrayView2<'x, T>,
    kcont: bool,
    ksr: isize,
    dp: usize,
    tf: &'t Transform,
    /// Lanes transformed a vector at a time (the rest lane by lane).
    vec_rot: usize,
}

impl<T: Real> Keys<'_, '_, '_, T> {
    /// Keys `c0..c0 + cn` transformed into `kbuf` (rows of `dp`) with the table rows at
    /// `tc + jj d`, `ts + jj d` (`w=None`: copied); `zkv`/`zk` take `x * 0` of every key read.
    ///
    /// # Safety
    /// Rows `c0..c0 + cn` exist (and `j1 <= n_k`); `kbuf` holds `cn` rows of `dp`; the tables hold
    /// `cn` rows of `d` (unless `w=None`).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn transform<L: Lanes<E = T>>(
        &self,
        c0: usize,
        cn: usize,
        j1: usize,
        kbuf: *mut T,
        tc: *const T,
        ts: *const T,
        rowbuf: &mut [T],
        zkv: &mut L::V,
        zk: &mut T,
    ) {
        let (d, w, z0, zero) = (self.kh.ncols(), L::W, L::zero(), T::zero());
        let (tf, identity) = (self.tf, self.tf.identity);
        for jj in 0..cn {
            let dst = kbuf.add(jj * self.dp);
            // A row that is not contiguous is gathered into `rowbuf` first.
            let src = if self.kcont {
                self.kh.as_ptr().offset((c0 + jj) as isize * self.ksr)
            } else {
                for (c, &x) in self.kh.row(c0 + jj).iter().enumerate() {
                    rowbuf[c] = x;
                }
                rowbuf.as_ptr()
            };
            if self.kcont && c0 + jj + PF_ROWS < j1 {
                prefetch_row(src.wrapping_offset(PF_ROWS as isize * self.ksr), d);
            }
            let (tcr, tsr) = (tc.wrapping_add(jj * d), ts.wrapping_add(jj * d));
            // x' = x c + partner(x) s, a vector at a time.
            let put = |p: usize, x: L::V, y: L::V| {
                let t = L::mul(y, L::load(tsr.add(p)));
                L::store(dst.add(p), L::fma(x, L::load(tcr.add(p)), t));
            };
            let mut p = 0;
            if tf.dist == Some(1) {
                while p < self.vec_rot {
                    let x = L::load(src.add(p));
                    *zkv = L::fma(x, z0, *zkv);
                    put(p, x, L::swap_pairs(x));
                    p += w;
                }
            } else if let Some(hd) = tf.dist {
                while p < self.vec_rot {
                    let (x, y) = if p < hd {
                        (L::load(src.add(p)), L::load(src.add(p + hd)))
                    } else {
                        (L::load(src.add(p)), L::load(src.add(p - hd)))
                    };
                    *zkv = L::fma(x, z0, *zkv);
                    put(p, x, y);
                    p += w;
                }
            }
            for c in p..d {
                let x = *src.add(c);
                *zk = *zk + x * zero;
                *dst.add(c) = if identity {
                    x
                } else {
                    x * *tcr.add(c) + *src.add(tf.partners[c]) * *tsr.add(c)
                };
            }
        }
    }
}

/// Scores of query rows `g_rows` (at `qh + g dp`) against keys at `kp + jj kld`, `jj < cn`, into
/// `sc[g CHUNK + jj]`; with `check`, the first row's pass also takes `x * 0` of every key lane.
///
/// # Safety
/// The query rows and key rows hold `dl` readable lanes (a multiple of `W`); `sc` holds the rows.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn score_rows<L: Lanes>(
    kp: *const L::E,
    kld: isize,
    cn: usize,
    qh: *const L::E,
    dp: usize,
    dl: usize,
    g_rows: std::ops::Range<usize>,
    sc: *mut L::E,
    mut check: Option<&mut L::V>,
) {
    let (w, z0) = (L::W, L::zero());
    let g_first = g_rows.start;
    for jj in 0..cn {
        let kr = kp.offset(jj as isize * kld);
        for g in g_rows.clone() {
            let qr = qh.add(g * dp);
            let (mut a0, mut a1) = (z0, z0);
            let mut p = 0;
            match check.as_deref_mut() {
                Some(z) if g == g_first => {
                    while p + 2 * w <= dl {
                        let (k0, k1) = (L::load(kr.add(p)), L::load(kr.add(p + w)));
                        *z = L::fma(k1, z0, L::fma(k0, z0, *z));
                        a0 = L::fma(L::load(qr.add(p)), k0, a0);
                        a1 = L::fma(L::load(qr.add(p + w)), k1, a1);
                        p += 2 * w;
                    }
                    if p < dl {
                        *z = L::fma(L::load(kr.add(p)), z0, *z);
                    }
                }
                _ => {
                    while p + 2 * w <= dl {
                        a0 = L::fma(L::load(qr.add(p)), L::load(kr.add(p)), a0);
                        a1 = L::fma(L::load(qr.add(p + w)), L::load(kr.add(p + w)), a1);
                        p += 2 * w;
                    }
                }
            }
            if p < dl {
                a0 = L::fma(L::load(qr.add(p)), L::load(kr.add(p)), a0);
            }
            *sc.add(g * CHUNK + jj) = L::hsum(L::add(a0, a1));
        }
    }
}
