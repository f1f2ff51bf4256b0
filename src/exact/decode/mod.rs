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

mod keys;

use keys::{block_table, score_rows, Keys, Transform};

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
    // SAFETY: (for the rest of this function) row pointers come from rows `j0..j1` of a head of `k`/`v`
    // (`visible_keys` keeps them below `n_k`) or from the chunk buffers (CHUNK rows of dp or
    // dvp); vector accesses of in-place rows stay below d (dv), which is then a multiple of W,
    // and of buffer rows below `dl <= dp` (`dvl <= dvp`); `sc` rows are CHUNK long and
    // `cnp <= CHUNK`; the query rows of a head are `rows x dp` in `qs`; table rows are d long.
    unsafe {
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
                            // grouped so no partial sum overflows: q_offset - k_offset and
                            // δ itself fit (`Problem::validate`), q_offset + i need not
                            // (fuzz/regressions/exact/crash-1a827c…)
                            let delta0 = (prob.q_offset - prob.k_offset) + (i as i64 - c0 as i64);
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
                            );
                            (kbuf.as_ptr(), dp as isize)
                        };
                        score_rows::<L>(kp, kld, cn, qh, dp, dl, 0..rows, sc.as_mut_ptr());
                    }
                }
                // The check of the keys reads the scores: with q finite, a NaN or Inf lane of a
                // key (or of its transform, see `Keys::transform`) makes its scores NaN or
                // Inf. A non-finite score from finite keys (an overflow) is told apart by a scan
                // of the chunk's keys, made only then.
                if u.check && !res.bad_k && !kernel::all_finite::<L>(sc.as_ptr(), cn) {
                    res.bad_k = kh.slice(s![c0..c0 + cn, ..]).iter().any(|x| !x.is_finite());
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
                let vdirect = vcont && dv % w == 0;
                let (vp, vld) = if vdirect {
                    (vh.as_ptr().offset(c0 as isize * vsr), vsr)
                } else {
                    for jj in 0..cn {
                        let dst = &mut vbuf[jj * dvp..jj * dvp + dv];
                        for (a, &x) in dst.iter_mut().zip(vh.row(c0 + jj).iter()) {
                            *a = x;
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
                        for g in 0..rows {
                            let o = op.add(g * dvp + p);
                            L::store(o, L::fma(L::splat(sc[g * CHUNK + jj]), x, L::load(o)));
                        }
                        p += w;
                    }
                    jj += 1;
                }
            }
            // The check of the values reads the outputs: `o += p v` with `p >= 0` finite turns
            // a NaN or Inf lane of a visible value into a NaN or Inf lane of `o` (`0 * Inf` is
            // NaN), and rescaling keeps it. An overflow from finite values is told apart by a
            // scan of the span's values, made only then.
            if u.check && !res.bad_v && !kernel::all_finite::<L>(part.o.as_ptr(), rows * dvp) {
                res.bad_v = vh.slice(s![j0..j1, ..]).iter().any(|x| !x.is_finite());
            }
        }
    }
    res
}
