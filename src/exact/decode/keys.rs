//! The keys of one decode chunk as the scores need them: how a key row is transformed
//! ([`Transform`]: rotary `(cos, sin)` tables, `BlockW`'s per-row tables from [`block_table`], or
//! in place), one kv head's keys with their transform ([`Keys`]), and the scores of the query rows
//! against a chunk of keys ([`score_rows`]). See the parent module.

use super::{block_layout, prefetch_row, CHUNK, PF_ROWS};
use crate::arch::lanes::Lanes;
use crate::arch::Real;
use crate::exact::Shared;
use crate::position::Position;

/// How a unit turns a key row into the vector its scores take the dot product with:
/// `x' = x ∘ c + x[partner] ∘ s` with per-position tables `c`, `s` (rotary: `cos`, `± sin`;
/// BlockW: the block's diagonal and off-diagonal entries), or `x` itself (`w=None`).
pub(crate) struct Transform {
    pub(super) identity: bool,
    /// BlockW's pairs (the tables come from `w`'s values per δ, see [`block_table`]).
    pub(super) blocks: Option<Vec<(usize, usize)>>,
    /// The lane distance of every pair: 1 interleaved, d/2 half, `None` for other layouts.
    pub(super) dist: Option<usize>,
    /// Each lane's partner (itself when it is in no pair).
    pub(super) partners: Vec<usize>,
}

impl Transform {
    pub(super) fn of<T: Real>(sh: &Shared<'_, '_, T>) -> Self {
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
pub(super) fn block_table<T: Real>(
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
    assert!(t < values.dim().0 && ns == 4 * pairs.len());
    assert!(c.len() >= cn * d && s.len() >= cn * d);
    let st = values.strides();
    let (s1, s2) = (st[1], st[2]);
    // SAFETY: only rows `row0 - jj` inside `0..rows` are read (checked per key below), entries
    // `< 4 pairs` of table `t` exist (asserted), and the offsets use the view's own strides;
    // `c`, `s` hold `cn d` entries.
    unsafe {
        let base = values.as_ptr().offset(t as isize * st[0]);
        for jj in 0..cn {
            let (cr, sr) = (c.as_mut_ptr().add(jj * d), s.as_mut_ptr().add(jj * d));
            // A chunk spans the keys some row of the unit sees, so a key may lie outside this
            // row's table (a δ the masks drop for it, which the table need not cover): its
            // transform is 0 and its score is masked by the log factor.
            let row = row0 as i128 - jj as i128;
            if !(0..rows as i128).contains(&row) {
                std::ptr::write_bytes(cr, 0, d);
                std::ptr::write_bytes(sr, 0, d);
                continue;
            }
            let x = base.offset(row as isize * s1);
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
pub(super) struct Keys<'k, 'x, 't, T> {
    pub(super) kh: &'k ndarray::ArrayView2<'x, T>,
    pub(super) kcont: bool,
    pub(super) ksr: isize,
    pub(super) dp: usize,
    pub(super) tf: &'t Transform,
    /// Lanes transformed a vector at a time (the rest lane by lane).
    pub(super) vec_rot: usize,
}

impl<T: Real> Keys<'_, '_, '_, T> {
    /// Keys `c0..c0 + cn` transformed into `kbuf` (rows of `dp`) with the table rows at
    /// `tc + jj d`, `ts + jj d` (`w=None`: copied). A NaN or Inf lane of a key gives a NaN or
    /// Inf lane of its transform (`x c` is NaN when `c = 0`), which the finiteness check reads
    /// from the scores.
    ///
    /// # Safety
    /// Rows `c0..c0 + cn` exist (and `j1 <= n_k`); `kbuf` holds `cn` rows of `dp`; the tables hold
    /// `cn` rows of `d` (unless `w=None`).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub(super) unsafe fn transform<L: Lanes<E = T>>(
        &self,
        c0: usize,
        cn: usize,
        j1: usize,
        kbuf: *mut T,
        tc: *const T,
        ts: *const T,
        rowbuf: &mut [T],
    ) {
        let (d, w) = (self.kh.ncols(), L::W);
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
                    put(p, x, y);
                    p += w;
                }
            }
            for c in p..d {
                let x = *src.add(c);
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
/// `sc[g CHUNK + jj]`.
///
/// # Safety
/// The query rows and key rows hold `dl` readable lanes (a multiple of `W`); `sc` holds the rows.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) unsafe fn score_rows<L: Lanes>(
    kp: *const L::E,
    kld: isize,
    cn: usize,
    qh: *const L::E,
    dp: usize,
    dl: usize,
    g_rows: std::ops::Range<usize>,
    sc: *mut L::E,
) {
    let (w, z0) = (L::W, L::zero());
    for jj in 0..cn {
        let kr = kp.offset(jj as isize * kld);
        for g in g_rows.clone() {
            let qr = qh.add(g * dp);
            let (mut a0, mut a1) = (z0, z0);
            let mut p = 0;
            while p + 2 * w <= dl {
                a0 = L::fma(L::load(qr.add(p)), L::load(kr.add(p)), a0);
                a1 = L::fma(L::load(qr.add(p + w)), L::load(kr.add(p + w)), a1);
                p += 2 * w;
            }
            if p < dl {
                a0 = L::fma(L::load(qr.add(p)), L::load(kr.add(p)), a0);
            }
            *sc.add(g * CHUNK + jj) = L::hsum(L::add(a0, a1));
        }
    }
}
