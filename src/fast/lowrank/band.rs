//! The banded low-rank forward: windows and ALiBi decays by block states (the parent module's
//! "Windows and ALiBi").
//!
//! Query rows run in blocks of `B`; key blocks are aligned to them (key block `t` holds the
//! keys `j` with `tB + c <= j < (t+1)B + c`), so the tile of query block `q` and key block `t`
//! spans `δ ∈ [uB - (B-1), uB + (B-1)]` with `u = q - t`, the same for every `q`. A tile is
//! *full* when every `δ` in it is visible and of one sign (`u >= 1`: the past, `u <= -1`: the
//! future), *partial* otherwise (the diagonal `u = 0` and the window's edges, at most five per
//! block), and empty beyond the window. Partial tiles go through `p(M)` directly, masked and
//! weighted by `λ^|δ|` (`λ = e^{-s}`). Full tiles go through block states: with `e_t`, `s_t`
//! the nominal last and first key of block `t`,
//!
//! ```text
//! P_t = Σ_{j in t} λ^{e_t - j} Φk(y_j) [v_j, 1]^T,     F_t = Σ_{j in t} λ^{j - s_t} Φk(y_j) [v_j, 1]^T,
//! row i0 + a:  λ^a Φq(x_i) Σ_{t past} λ^{(q-t)B - B + 1} P_t  +  λ^{B-1-a} Φq(x_i) Σ_{t future} λ^{(t-q)B - B + 1} F_t.
//! ```
//!
//! Every exponent is `>= 0`: no weight exceeds 1, whatever the slope. The full past tiles of
//! block `q` are the key blocks `[q - m, q - 1]` (`m` fixed by the window, or all of them), a
//! sliding range summed without subtraction: key blocks fall into segments of `m`, each with
//! its prefix and suffix sums, and a range of `m` blocks is one suffix plus one prefix (or one
//! of them alone at the ends). So each block costs `O(r (dv + 1))` beyond its own GEMMs, all
//! sums are of non-negative weights times terms, and query blocks are independent (run in
//! parallel; the same bits for any thread count).

use super::forward::Features;
use crate::error::{Error, Result};
use crate::fast::plans::Band;
use crate::problem::Control;
use crate::profile::{self, Phase};
use ndarray::linalg::general_mat_mul;
use ndarray::{s, Array2, ArrayView2};
use rayon::prelude::*;

/// Far beyond any `δ`: an unbounded side of the band.
const FAR: i64 = i64::MAX / 8;

/// The tile geometry of a banded call (see the module docs).
pub(crate) struct Geometry {
    b: i64,
    c: i64,
    nk: i64,
    /// Visible `δ` in `[lo, hi]` (`±FAR` when unbounded).
    lo: i64,
    hi: i64,
    /// Key block `kb` is relative block `t = kb + tmin`.
    tmin: i64,
    pub(crate) nkb: usize,
    /// Full past tiles `u in [1, up]`, partial past `u in [max(up + 1, 1), upp]`.
    up: i64,
    upp: i64,
    /// Full future tiles `-u in [1, uf]`, partial future `-u in [max(uf + 1, 1), ufp]`.
    uf: i64,
    ufp: i64,
}

impl Geometry {
    /// The geometry of the forward: rows are the `nq` queries, columns the `nk` keys.
    pub(crate) fn new(band: &Band, causal: bool, nq: usize, nk: usize, b: usize) -> Geometry {
        let (mut lo, mut hi) = (-FAR, FAR);
        if let Some((left, right)) = band.window {
            lo = -right;
            hi = left;
        }
        if causal {
            lo = lo.max(0);
        }
        Geometry::of(lo, hi, band.shift, nq, nk, b)
    }

    /// The same band seen from the columns: rows are the `nk` keys, columns the `nq` queries,
    /// `δ' = -δ` (the backward's pass over key blocks).
    pub(crate) fn transposed(
        band: &Band,
        causal: bool,
        nq: usize,
        nk: usize,
        b: usize,
    ) -> Geometry {
        let f = Geometry::new(band, causal, nq, nk, b);
        let flip = |x: i64| {
            if x.abs() >= FAR {
                -x.signum() * FAR
            } else {
                -x
            }
        };
        Geometry::of(flip(f.hi), flip(f.lo), -band.shift, nk, nq, b)
    }

    /// Rows `i < n_rows`, columns `j < nk`, pair visible for `lo <= i + c - j <= hi`.
    fn of(lo: i64, hi: i64, c: i64, n_rows: usize, nk: usize, b: usize) -> Geometry {
        let b = b as i64;
        let (nq, nk) = (n_rows as i64, nk as i64);
        // a side wider than every δ of the call is unbounded
        let lo = if lo > c - (nk - 1) { lo } else { -FAR };
        let hi = if hi < c + nq - 1 { hi } else { FAR };
        let tmin = (-c).div_euclid(b);
        let nkb = ((nk - 1 - c).div_euclid(b) - tmin + 1).max(0) as usize;
        let (up, upp) = if hi >= FAR {
            (FAR, FAR)
        } else {
            (
                ((hi + 1).div_euclid(b) - 1).max(0),
                (hi + b - 1).div_euclid(b),
            )
        };
        let (uf, ufp) = if lo <= -FAR {
            (FAR, FAR)
        } else {
            (
                ((1 - lo).div_euclid(b) - 1).max(0),
                (b - 1 - lo).div_euclid(b),
            )
        };
        Geometry {
            b,
            c,
            nk,
            lo,
            hi,
            tmin,
            nkb,
            up,
            upp,
            uf,
            ufp,
        }
    }

    /// The keys of key block `kb`: `[j0, j1)`, with `j0` the nominal first key (may be < 0).
    fn keys(&self, kb: i64) -> (usize, usize, i64) {
        let s0 = (kb + self.tmin) * self.b + self.c;
        (
            s0.clamp(0, self.nk) as usize,
            (s0 + self.b).clamp(0, self.nk) as usize,
            s0,
        )
    }

    /// Key blocks of the full past (`past`) or future tiles of query block `q`: `[a, b)`.
    fn full(&self, q: i64, past: bool) -> (i64, i64) {
        let n = self.nkb as i64;
        let (t0, t1) = if past {
            (q.saturating_sub(self.up), q - 1)
        } else {
            (q + 1, q.saturating_add(self.uf))
        };
        let a = (t0.saturating_sub(self.tmin)).clamp(0, n);
        let b = (t1.saturating_sub(self.tmin) + 1).clamp(0, n);
        (a, b.max(a))
    }

    /// The key blocks of the partial tiles of query block `q`, in order.
    fn partial(&self, q: i64) -> Vec<i64> {
        let mut t = Vec::new();
        if self.up < FAR {
            for u in (self.up + 1).max(1)..=self.upp {
                t.push(q - u);
            }
        }
        t.reverse();
        t.push(q);
        if self.uf < FAR {
            for w in (self.uf + 1).max(1)..=self.ufp {
                t.push(q + w);
            }
        }
        t.into_iter()
            .map(|t| t - self.tmin)
            .filter(|&kb| kb >= 0 && kb < self.nkb as i64)
            .collect()
    }

    /// Segment length of the past (`m_p`) or future sums: the most full tiles a block has.
    fn segment(&self, past: bool) -> usize {
        let m = if past { self.up } else { self.uf };
        (m.min(self.nkb as i64)).max(1) as usize
    }

    /// The largest `|δ|` a partial tile or a block state weighs by table.
    pub(crate) fn max_table_delta(&self) -> usize {
        let edge = |full: i64, part: i64| if full < FAR { part.max(0) } else { 0 };
        ((edge(self.up, self.upp).max(edge(self.uf, self.ufp)) + 2) * self.b) as usize
    }

    /// Whether the past / future side is bounded (by a window) rather than reaching every key.
    pub(crate) fn bounded(&self) -> (bool, bool) {
        (self.up < FAR, self.uf < FAR)
    }

    /// Whether the full past / future tiles exist at all.
    pub(crate) fn sides(&self) -> (bool, bool) {
        (self.up >= 1 && self.nkb > 0, self.uf >= 1 && self.nkb > 0)
    }

    /// The number of partial tiles per block (at most five).
    pub(crate) fn partial_tiles(&self) -> usize {
        let part = |full: i64, p: i64| {
            if full < FAR {
                (p - (full + 1).max(1) + 1).max(0)
            } else {
                0
            }
        };
        (1 + part(self.up, self.upp) + part(self.uf, self.ufp)) as usize
    }
}

/// Whether row `i` sees a key: some `j < nk` with `δ = i + c - j` in the band (`c` the causal
/// shift when causal, else the band's).
pub(crate) fn row_sees(
    band: &Band,
    causal_shift: Option<i64>,
    nk: usize,
) -> impl Fn(usize) -> bool {
    let causal = causal_shift.is_some();
    let (mut lo, mut hi) = (i128::MIN / 4, i128::MAX / 4);
    if let Some((left, right)) = band.window {
        lo = -(right as i128);
        hi = left as i128;
    }
    if causal {
        lo = lo.max(0);
    }
    let (c, nk) = (causal_shift.unwrap_or(band.shift) as i128, nk as i128);
    move |i| {
        let d = i as i128 + c;
        lo.max(d - (nk - 1)) <= hi.min(d)
    }
}

/// `λ^k = e^{-s k}` for `k < len` (all ones when `s = 0`).
fn powers(slope: f64, len: usize) -> Vec<f64> {
    (0..len).map(|k| (-slope * k as f64).exp()).collect()
}

/// `e^{-s x}` for `x >= 0`.
fn lam(slope: f64, x: i64) -> f64 {
    if slope == 0.0 {
        1.0
    } else {
        (-slope * x as f64).exp()
    }
}

/// In segments of `m`, `run[kb] = λ^B run[kb ∓ 1] + st[kb]` from the segment's start
/// (`up = true`) or end, in place: the decayed running sums `pre` (past) and `fsuf` (future).
fn decayed_runs(st: &mut [Array2<f64>], m: usize, lam_b: f64, up: bool) {
    st.par_chunks_mut(m).for_each(|seg| {
        let n = seg.len();
        for t in 1..n {
            let (from, to) = if up { (t - 1, t) } else { (n - t, n - 1 - t) };
            let prev = seg[from].clone();
            seg[to].scaled_add(lam_b, &prev);
        }
    });
}

/// In segments of `m`, `run[kb] = run[kb ± 1] + λ^{B dist} st[kb]`, `dist` counted from the
/// segment's end (`from_end`) or start: the weighted running sums `suf` (past) and `fpre`.
fn weighted_runs(
    st: &[Array2<f64>],
    m: usize,
    slope: f64,
    b: i64,
    from_end: bool,
) -> Vec<Array2<f64>> {
    st.par_chunks(m)
        .flat_map_iter(|seg| {
            let n = seg.len();
            let mut out: Vec<Array2<f64>> = seg.to_vec();
            let weight = |t: usize| {
                let dist = if from_end { n - 1 - t } else { t };
                lam(slope, b * dist as i64)
            };
            out.iter_mut()
                .enumerate()
                .for_each(|(t, o)| *o *= weight(t));
            for t in 1..n {
                let (from, to) = if from_end {
                    (n - t, n - 1 - t)
                } else {
                    (t - 1, t)
                };
                let prev = out[from].clone();
                out[to] += &prev;
            }
            out
        })
        .collect()
}

/// The running sums a call needs: `pre`/`suf` of `P` (past) and `fpre`/`fsuf` of `F` (future).
struct Sums {
    pre: Vec<Array2<f64>>,
    suf: Vec<Array2<f64>>,
    fpre: Vec<Array2<f64>>,
    fsuf: Vec<Array2<f64>>,
}

/// The block states of one side of a banded product `Σ_j w_ij Φ(x_i) · Φ(y_j) vals_j^T` and
/// what a row block needs to finish it: the states of its full tiles ([`BandStates::states`],
/// each row scaled by [`BandStates::row_factor`]) and its partial tiles ([`BandStates::tiles`],
/// weighted by [`BandStates::weight`]). The forward and both passes of the backward use it.
pub(crate) struct BandStates {
    geo: Geometry,
    blk: usize,
    slope: f64,
    pow: Vec<f64>,
    mp: usize,
    mf: usize,
    sums: Sums,
    shape: (usize, usize),
}

impl BandStates {
    /// The states of the columns `y` (features weighted or not) with values `vals`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        geo: Geometry,
        slope: f64,
        blk: usize,
        feats: &Features,
        y: ArrayView2<f64>,
        weighted: bool,
        vals: ArrayView2<f64>,
        ctl: &Control,
    ) -> Result<BandStates> {
        let s = slope;
        let pow = powers(s, geo.max_table_delta() + blk + 1);
        let (past, future) = geo.sides();
        // the block states P_t and F_t, all key blocks in parallel
        let block_states = |want: bool, from_end: bool| -> Result<Vec<Array2<f64>>> {
            if !want {
                return Ok(Vec::new());
            }
            (0..geo.nkb as i64)
                .into_par_iter()
                .map(|kb| {
                    ctl.check()?;
                    let (j0, j1, s0) = geo.keys(kb);
                    let mut f = feats.fill(y.slice(s![j0..j1, ..]), weighted);
                    if s != 0.0 {
                        for (jj, mut row) in f.outer_iter_mut().enumerate() {
                            let j = (j0 + jj) as i64 - s0;
                            let e = if from_end { geo.b - 1 - j } else { j };
                            row *= pow[e as usize];
                        }
                    }
                    Ok(f.t().dot(&vals.slice(s![j0..j1, ..])))
                })
                .collect()
        };
        let lam_b = lam(s, geo.b);
        let (mp, mf) = (geo.segment(true), geo.segment(false));
        let mut pre = block_states(past, true)?;
        let suf = if past && geo.up < FAR {
            weighted_runs(&pre, mp, s, geo.b, true)
        } else {
            Vec::new()
        };
        decayed_runs(&mut pre, mp, lam_b, true);
        let mut fsuf = block_states(future, false)?;
        let fpre = if future && geo.uf < FAR {
            weighted_runs(&fsuf, mf, s, geo.b, false)
        } else {
            Vec::new()
        };
        decayed_runs(&mut fsuf, mf, lam_b, false);
        Ok(BandStates {
            geo,
            blk,
            slope,
            pow,
            mp,
            mf,
            sums: Sums {
                pre,
                suf,
                fpre,
                fsuf,
            },
            shape: (feats.len(), vals.ncols()),
        })
    }

    /// The summed states of row block `qb`'s full past and future tiles (None: no such tiles).
    pub(crate) fn states(&self, qb: usize) -> Result<[Option<Array2<f64>>; 2]> {
        Ok([
            self.gather(qb as i64, true)?,
            self.gather(qb as i64, false)?,
        ])
    }

    fn gather(&self, q: i64, is_past: bool) -> Result<Option<Array2<f64>>> {
        let (geo, sums) = (&self.geo, &self.sums);
        let (a, b) = geo.full(q, is_past);
        if a >= b {
            return Ok(None);
        }
        let internal = || {
            Error::Value(
                "fast method (low-rank, banded): a state range outside its segments".into(),
            )
        };
        let m = if is_past { self.mp } else { self.mf } as i64;
        let n = geo.nkb as i64;
        let (sa, sb) = (a / m, (b - 1) / m);
        let seg_end = |sg: i64| ((sg + 1) * m).min(n) - 1;
        // (running sum, the key block its weights are counted from)
        let mut parts: Vec<(&Array2<f64>, i64)> = Vec::new();
        if is_past {
            if sa == sb && a % m == 0 {
                parts.push((&sums.pre[(b - 1) as usize], b - 1));
            } else if sa == sb && b - 1 == seg_end(sa) && !sums.suf.is_empty() {
                parts.push((&sums.suf[a as usize], seg_end(sa)));
            } else if sb == sa + 1 && !sums.suf.is_empty() {
                parts.push((&sums.suf[a as usize], seg_end(sa)));
                parts.push((&sums.pre[(b - 1) as usize], b - 1));
            } else {
                return Err(internal());
            }
        } else if sa == sb && b - 1 == seg_end(sa) {
            parts.push((&sums.fsuf[a as usize], a));
        } else if sa == sb && a % m == 0 && !sums.fpre.is_empty() {
            parts.push((&sums.fpre[(b - 1) as usize], a));
        } else if sb == sa + 1 && !sums.fpre.is_empty() {
            parts.push((&sums.fsuf[a as usize], a));
            parts.push((&sums.fpre[(b - 1) as usize], sb * m));
        } else {
            return Err(internal());
        }
        let mut acc = Array2::<f64>::zeros(self.shape);
        for (st, kref) in parts {
            let t = kref + geo.tmin;
            let e = if is_past {
                (q - t) * geo.b
            } else {
                (t - q) * geo.b
            } - geo.b
                + 1;
            acc.scaled_add(lam(self.slope, e), st);
        }
        Ok(Some(acc))
    }

    /// The factor of row `a` of a block on side `side` (0: past, 1: future).
    #[inline]
    pub(crate) fn row_factor(&self, side: usize, a: usize) -> f64 {
        self.pow[if side == 0 { a } else { self.blk - 1 - a }]
    }

    /// `Σ_side factor_a (f_a · state_side)` for a row block's features `f` (`rows x r`).
    pub(crate) fn apply(
        &self,
        states: &[Option<Array2<f64>>; 2],
        f: &Array2<f64>,
    ) -> Option<Array2<f64>> {
        self.combine(states, |st| f.dot(st))
    }

    /// `Σ_side factor_a (g_a · state_side^T)` for row values `g` (`rows x cols`): the
    /// coefficients of the features' gradient.
    pub(crate) fn apply_t(
        &self,
        states: &[Option<Array2<f64>>; 2],
        g: ArrayView2<f64>,
    ) -> Option<Array2<f64>> {
        self.combine(states, |st| g.dot(&st.t()))
    }

    fn combine(
        &self,
        states: &[Option<Array2<f64>>; 2],
        prod: impl Fn(&Array2<f64>) -> Array2<f64>,
    ) -> Option<Array2<f64>> {
        let mut out: Option<Array2<f64>> = None;
        for (side, st) in states.iter().enumerate() {
            let Some(st) = st else { continue };
            let mut g = prod(st);
            if self.slope != 0.0 {
                for (a, mut row) in g.outer_iter_mut().enumerate() {
                    row *= self.row_factor(side, a);
                }
            }
            match &mut out {
                Some(o) => *o += &g,
                None => out = Some(g),
            }
        }
        out
    }

    /// The column ranges `[j0, j1)` of row block `qb`'s partial tiles.
    pub(crate) fn tiles(&self, qb: usize) -> Vec<(usize, usize)> {
        self.geo
            .partial(qb as i64)
            .into_iter()
            .map(|kb| {
                let (j0, j1, _) = self.geo.keys(kb);
                (j0, j1)
            })
            .filter(|(j0, j1)| j0 < j1)
            .collect()
    }

    /// The columns `[lo, hi)` of a tile `[j0, j1)` that row `i` sees (relative to `j0`): those
    /// with `lo <= δ <= hi` of the band (empty when none).
    pub(crate) fn visible_columns(&self, i: usize, j0: usize, j1: usize) -> (usize, usize) {
        // δ = i + c - j in [lo, hi]  <=>  j in [i + c - hi, i + c - lo]
        let d0 = i as i64 + self.geo.c;
        let first = (d0 - self.geo.hi).clamp(j0 as i64, j1 as i64) as usize;
        let last = (d0 - self.geo.lo + 1).clamp(j0 as i64, j1 as i64) as usize;
        (first - j0, last.max(first) - j0)
    }

    /// `λ^|δ|` for row `i` and column `j`, 0 where the band masks the pair (partial tiles only).
    #[inline]
    pub(crate) fn weight(&self, i: usize, j: usize) -> f64 {
        let delta = i as i64 + self.geo.c - j as i64;
        if delta < self.geo.lo || delta > self.geo.hi {
            0.0
        } else {
            self.pow[delta.unsigned_abs() as usize]
        }
    }
}

/// `Σ_j w_ij p(M_ij) [v_j, 1]` over the visible pairs of a banded call, `w_ij = λ^|δ_ij|`,
/// each block of `blk` query rows handed to `emit(i0, numerators)` (`rows x (dv + 1)`) as soon as
/// it is summed; `x`, `y` rotated, `vb = [V, 1]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn band_sums(
    band: &Band,
    causal: bool,
    feats: &Features,
    poly: &crate::poly::Polynomial,
    blk: usize,
    x: ArrayView2<f64>,
    y: ArrayView2<f64>,
    vb: ArrayView2<f64>,
    ctl: &Control,
    emit: &(dyn Fn(usize, ArrayView2<f64>) -> Result<()> + Sync),
) -> Result<()> {
    let (nq, nk, cols) = (x.nrows(), y.nrows(), vb.ncols());
    let geo = Geometry::new(band, causal, nq, nk, blk);
    let st = BandStates::new(geo, band.slope, blk, feats, y, false, vb, ctl)?;
    let block = |qb: usize| -> Result<()> {
        ctl.check()?;
        let i0 = qb * blk;
        let rows = blk.min(nq - i0);
        let xb = x.slice(s![i0..i0 + rows, ..]);
        let mut out = Array2::<f64>::zeros((rows, cols));
        let states = {
            let _s = profile::span(Phase::Gemm);
            st.states(qb)?
        };
        if states.iter().any(|s| s.is_some()) {
            let f = feats.fill(xb, true);
            let _s = profile::span(Phase::Gemm);
            if let Some(g) = st.apply(&states, &f) {
                out += &g;
            }
        }
        let _s = profile::span(Phase::Diagonal);
        let mut scratch = Vec::new();
        for (j0, j1) in st.tiles(qb) {
            // p(M) times the pair's weight, row by row over the columns the band keeps
            let mut w = xb.dot(&y.slice(s![j0..j1, ..]).t());
            for (a, mut wr) in w.outer_iter_mut().enumerate() {
                let wr = wr.as_slice_mut().expect("a fresh row-major product");
                let (lo, hi) = st.visible_columns(i0 + a, j0, j1);
                wr[..lo].fill(0.0);
                wr[hi..].fill(0.0);
                let kept = &mut wr[lo..hi];
                super::forward::horner_in_place(&poly.coeffs, kept, &mut scratch);
                for (jj, p) in (lo..hi).zip(kept.iter_mut()) {
                    *p *= st.weight(i0 + a, j0 + jj);
                }
            }
            general_mat_mul(1.0, &w, &vb.slice(s![j0..j1, ..]), 1.0, &mut out);
        }
        emit(i0, out.view())
    };
    (0..nq.div_ceil(blk))
        .into_par_iter()
        .map(block)
        .collect::<Result<()>>()
}
