//! The exact method: streaming ("online") softmax over key blocks, FlashAttention-2 style.
//!
//! Nothing of size `n_q x n_k` is ever allocated: a unit of work (a block of `bq` queries of one
//! head) holds one strip of `MR x bk` scores at a time. Memory beyond inputs and outputs is
//! `O((n_q + n_k) d)`: the forward packs keys and values once per call into the layouts the
//! micro-kernel reads; the backward packs each unit's key chunk and each tile's queries (see
//! [`backward`]). For sparse `W` the kernels read the support's sequences along the diagonals:
//! built whole (`|S| (n_q + n_k)` per table, the part of `W` the call touches) for short calls,
//! per query block and a few key tiles (forward) or per tile (backward) for long ones
//! ([`sparse::TABLE_BYTES`]).
//!
//! Scores: for [`Position::Rotary`], `q` and `k` are rotated once (with `scale` and the attention
//! factor folded into `q`) and a strip is a GEMM `Q̃ K̃^T` on the register-blocked micro-kernel
//! of [`kernel`]. For [`Position::Sparse`], `S_ij = Σ_s (scale q_i[l1_s]) w_s(δ_ij) k_j[l2_s]`:
//! along a row `δ` runs over a contiguous range, so each support entry is a contiguous slice of
//! its diagonal sequence times a contiguous row of `k^T` ([`sparse`]).
//!
//! Layouts (`NR` = the micro-tile width, two SIMD registers): *key panels* hold `NR` keys
//! side by side, `[j / NR][l][j % NR]` (the `B` operand of `Q K^T`); *column panels* hold `NR`
//! columns of every row, `[c / NR][j][c % NR]` (the `B` operand of `P V`). Both are zero-padded.

pub mod backward;
pub(crate) mod decode;
pub mod forward;
pub mod kernel;
pub(crate) mod rotate;
pub(crate) mod sparse;

pub use backward::attention_backward;
pub use forward::{attention_forward, attention_forward_checked};

use crate::arch::lanes::{Lanes, LanesTask};
use crate::arch::Isa;
use crate::arch::Real;
use crate::error::{Error, Result};
use crate::position::{Bias, LogFactor, Position};
use crate::problem::Problem;
use ndarray::ArrayView2;
use ndarray::ArrayView4;
use rayon::prelude::*;

/// Block sizes of a call: `bq` queries per unit of work (a multiple of the micro-tile rows),
/// `bk` keys per tile (a multiple of `NR`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiles {
    pub mr: usize,
    pub nr: usize,
    pub bq: usize,
    pub bk: usize,
}

struct TilesOf;
impl<T: Real> LanesTask<T> for TilesOf {
    type Out = (usize, usize);
    #[inline(always)]
    fn run<L: Lanes<E = T>>(self) -> (usize, usize) {
        (L::MR, kernel::nr::<L>())
    }
}

impl Tiles {
    /// The blocks for element `T` on `isa`: key tiles of 2 KiB of scores per row (1 KiB for the
    /// backward) and query blocks of 60-120 rows (4x that for long sequences), whose K/V tiles
    /// stay in L2 for every strip of the block.
    pub fn choose<T: Real>(isa: Isa, prob: &Problem, backward: bool) -> Self {
        let (mr, nr) = T::with_lanes(isa, TilesOf);
        let elt = std::mem::size_of::<T>();
        // The backward keeps two bq x bk tiles (P and dS) in L2: smaller key tiles.
        let bytes = if backward { 1024 } else { 2048 };
        let bk = kernel::round_up((bytes / elt).min(prob.nk.max(1)), nr).max(nr);
        // Once a head's K and V outgrow the caches (8 MiB), every query block streams them from
        // memory: 4x taller forward blocks make each pass serve more rows (measured at n = 16K,
        // d = 128: 93 against 82-85 GF/s per thread; within noise at n <= 4K).
        let streamed = !backward && prob.nk * (prob.d + prob.dv) * elt >= 8 << 20;
        // The backward's dV and dK GEMMs have depth bq: 120 rows at d = 128 as well (n = 4096,
        // d = 128, 2 threads: 0.94-0.97 s against 0.97-0.99 s with 60).
        let bq = mr
            * (64 / mr).max(1)
            * if prob.d >= 128 && !backward { 1 } else { 2 }
            * if streamed { 4 } else { 1 };
        Self { mr, nr, bq, bk }
    }
}

/// `x` (`n x m`, any strides) into column panels `[c / nr][j][c % nr]` (zero-padded columns).
pub(crate) fn column_panels<T: Real>(x: ArrayView2<'_, T>, nr: usize) -> Vec<T> {
    let (n, m) = x.dim();
    let mut out = vec![T::zero(); m.div_ceil(nr) * n * nr];
    column_panels_into(x, nr, &mut out, n, 0);
    out
}

/// Rows `j0..j0 + x.nrows()` of the column panels of an `n x m` array, from `x`.
fn column_panels_into<T: Real>(
    x: ArrayView2<'_, T>,
    nr: usize,
    out: &mut [T],
    n: usize,
    j0: usize,
) {
    for (jj, row) in x.outer_iter().enumerate() {
        let j = j0 + jj;
        match row.as_slice() {
            Some(r) => {
                for (p, chunk) in r.chunks(nr).enumerate() {
                    let at = p * n * nr + j * nr;
                    out[at..at + chunk.len()].copy_from_slice(chunk);
                }
            }
            None => {
                for (c, &v) in row.iter().enumerate() {
                    out[(c / nr) * n * nr + j * nr + c % nr] = v;
                }
            }
        }
    }
}

/// `x` (`n x m`) into key panels `[j / nr][c][j % nr]` (zero-padded rows).
pub(crate) fn key_panels<T: Real>(x: ArrayView2<'_, T>, nr: usize) -> Vec<T> {
    let (n, m) = x.dim();
    let mut out = vec![T::zero(); n.div_ceil(nr) * m * nr];
    key_panels_into(x, nr, &mut out);
    out
}

/// `x` into the key panels starting at `out` (rows of `x` from a multiple of `nr`).
fn key_panels_into<T: Real>(x: ArrayView2<'_, T>, nr: usize, out: &mut [T]) {
    let m = x.ncols();
    for (j, row) in x.outer_iter().enumerate() {
        let panel = &mut out[(j / nr) * m * nr..(j / nr + 1) * m * nr];
        let jj = j % nr;
        match row.as_slice() {
            Some(r) => {
                for (c, &v) in r.iter().enumerate() {
                    panel[c * nr + jj] = v;
                }
            }
            None => {
                for (c, &v) in row.iter().enumerate() {
                    panel[c * nr + jj] = v;
                }
            }
        }
    }
}

/// Rotated keys (times the attention factor) of rows `j_base..j_base + kh.nrows()` of one kv
/// head as key panels and, with `columns`, column panels (of `kh.nrows()` rows), a block of rows
/// at a time (no `n x d` temporary). `j_base` is a multiple of `nr`.
pub(crate) fn rotated_key_panels<T: Real>(
    prob: &Problem,
    rot: &rotate::Rotator<'_>,
    factor: f64,
    kh: ArrayView2<'_, T>,
    j_base: usize,
    nr: usize,
    columns: bool,
) -> (Vec<T>, Vec<T>) {
    let (nk, d) = (kh.nrows(), prob.d);
    const CHUNK: usize = 256;
    let chunk = kernel::round_up(CHUNK.min(nk.max(1)), nr);
    let mut kp = vec![T::zero(); nk.div_ceil(nr) * d * nr];
    let mut kc = if columns {
        vec![T::zero(); d.div_ceil(nr) * nk * nr]
    } else {
        Vec::new()
    };
    // `w=None` (no rotation, factor 1): the keys go into the panels as they are.
    if rot.is_identity() && factor == 1.0 {
        key_panels_into(kh, nr, &mut kp);
        if columns {
            column_panels_into(kh, nr, &mut kc, nk, 0);
        }
        return (kp, kc);
    }
    let mut buf = vec![T::zero(); chunk * d];
    for j0 in (0..nk).step_by(chunk) {
        let rows = chunk.min(nk - j0);
        for (dst, src) in buf
            .chunks_exact_mut(d)
            .zip(kh.slice(ndarray::s![j0..j0 + rows, ..]).outer_iter())
        {
            match src.as_slice() {
                Some(x) => dst.copy_from_slice(x),
                None => dst.iter_mut().zip(src.iter()).for_each(|(a, &b)| *a = b),
            }
        }
        let at = prob.k_offset + (j_base + j0) as i64;
        rot.rotate(&mut buf, d, rows, at, factor, false);
        let view = ArrayView2::from_shape((rows, d), &buf[..rows * d]).expect("rows x d");
        key_panels_into(view, nr, &mut kp[j0 * d..]);
        if columns {
            column_panels_into(view, nr, &mut kc, nk, j0);
        }
    }
    (kp, kc)
}

/// An error naming `name` when a row `j0..j1` (axis 2) of `x` holds a NaN or an Inf.
#[cfg_attr(not(feature = "python"), allow(dead_code))]
pub(crate) fn check_rows<T: Real>(
    name: &str,
    x: &ArrayView4<'_, T>,
    j0: usize,
    j1: usize,
) -> Result<()> {
    check_rows_of(name, x, j0, j1, false)
}

/// [`check_rows`], on the calling thread alone when `serial`.
pub(crate) fn check_rows_of<T: Real>(
    name: &str,
    x: &ArrayView4<'_, T>,
    j0: usize,
    j1: usize,
    serial: bool,
) -> Result<()> {
    let (batch, heads) = (x.dim().0, x.dim().1);
    let isa = crate::arch::simd::isa();
    let finite = |bh: usize| {
        let xh = x.slice(ndarray::s![bh / heads, bh % heads, j0..j1, ..]);
        match xh.as_slice() {
            Some(xs) => xs.chunks(4096).all(|c| T::with_lanes(isa, AllFinite(c))),
            None => xh.iter().all(|v| v.is_finite()),
        }
    };
    let ok = if serial {
        (0..batch * heads).all(finite)
    } else {
        (0..batch * heads).into_par_iter().all(finite)
    };
    if ok {
        Ok(())
    } else {
        Err(non_finite(name, x))
    }
}

/// Whether every entry of a slice is finite ([`kernel::all_finite`] on the best lanes).
struct AllFinite<'a, T>(&'a [T]);

impl<T: Real> LanesTask<T> for AllFinite<'_, T> {
    type Out = bool;
    #[inline(always)]
    fn run<L: Lanes<E = T>>(self) -> bool {
        // SAFETY: the pointer and length are the slice's.
        unsafe { kernel::all_finite::<L>(self.0.as_ptr(), self.0.len()) }
    }
}

/// The error for a NaN or Inf in `x` (the same words as the Python-side scan).
pub(crate) fn non_finite<T: Real>(name: &str, x: &ArrayView4<'_, T>) -> Error {
    let what = if x.iter().any(|v| v.is_nan()) {
        "NaN"
    } else {
        "Inf"
    };
    Error::Value(format!(
        "{name}: expected finite values, got {what} (pass check_finite=False to skip this scan; \
         the result is then undefined)"
    ))
}

/// The error for a result that is not finite from inputs that are (`what`: the arrays): an
/// intermediate of the kernels' grouping left the floating-point range where the reference's
/// `scale Σ q_x W_xy k_y` may not (`scale q`, `W k`, a score's terms, `Σ P v`, a gradient).
pub(crate) fn overflow_error<T: Real>(what: &str) -> Error {
    let (ty, max) = if std::mem::size_of::<T>() == 4 {
        ("float32", f32::MAX as f64)
    } else {
        ("float64", f64::MAX)
    };
    Error::Value(format!(
        "{what}: not finite: the scores or an intermediate of them (scale q, W k, the terms \
         q_x W_xy k_y, the sums of v or of the gradients) overflow {ty} (|x| > {max:.1e}) \
         although every input is finite; rescale q, k, v or scale"
    ))
}

/// Whether query row `i` of head `bh` sees a key: inside the mask and with a bias that is not
/// `-inf` there (`lse = -inf` is then not a fully masked row but overflowed scores).
fn row_sees_a_key<T: Real>(sh: &Shared<'_, '_, T>, bh: usize, i: usize) -> bool {
    let Some((j0, j1)) = sh.visible_keys(i, 1, 0, sh.prob.nk, 1) else {
        return false;
    };
    match sh.bias {
        None => true,
        Some(b) => {
            let seq = sh.logf.for_head(Some(b), bh);
            let g0 = sh.prob.nq - 1 - i;
            seq[g0 + j0..g0 + j1]
                .iter()
                .any(|&x| x != T::neg_infinity())
        }
    }
}

/// Every entry finite (a contiguous array in one pass without early exit).
pub(crate) fn all_finite<T: Real, D: ndarray::Dimension>(x: &ndarray::ArrayView<'_, T, D>) -> bool {
    match x.as_slice() {
        Some(xs) => xs.iter().fold(true, |a, v| a & v.is_finite()),
        None => x.iter().all(|v| v.is_finite()),
    }
}

/// Whether the call's inputs are finite: `arrays` (q, k, v, ...), a sparse `w`'s table, `scale`,
/// and the bias (where `-inf` is a legal mask). Read only once a result is found not finite: the
/// Rust API leaves the NaN/Inf scan to its caller (the Python layer's `check_finite`), and a
/// caller that skipped it keeps the undefined result it asked for.
pub(crate) fn inputs_finite<T: Real>(
    prob: &Problem,
    pos: &Position<'_, T>,
    bias: Option<&Bias<'_, T>>,
    arrays: &[&ArrayView4<'_, T>],
) -> bool {
    prob.scale.is_finite()
        && arrays.iter().all(|a| all_finite(a))
        && match pos {
            Position::Sparse(sp) => all_finite(&sp.values),
            Position::Rotary(_) => true,
        }
        && bias.is_none_or(|b| {
            b.values
                .iter()
                .all(|&x| x.is_finite() || x == T::neg_infinity())
        })
}

/// The forward's results against silent overflow: every `out` finite, no `lse` NaN or `+inf`,
/// and `lse = -inf` only for a row that sees no key; otherwise, when the inputs are finite, the
/// overflow error. One read of `out` and `lse` (`O(output)`); a row's visibility is looked up
/// only where `lse = -inf`, the inputs read only when a result is not finite.
pub(crate) fn check_forward_result<T: Real>(
    sh: &Shared<'_, '_, T>,
    arrays: &[&ArrayView4<'_, T>],
    out: &ndarray::Array4<T>,
    lse: &ndarray::Array3<T>,
) -> Result<()> {
    let nq = sh.prob.nq.max(1);
    let ok = all_finite(&out.view())
        && lse.iter().enumerate().all(|(n, &l)| {
            l.is_finite() || (l == T::neg_infinity() && !row_sees_a_key(sh, n / nq, n % nq))
        });
    if ok || !inputs_finite(sh.prob, sh.pos, sh.bias, arrays) {
        return Ok(());
    }
    Err(overflow_error::<T>("out, lse"))
}

/// Everything the units of one call share.
pub(crate) struct Shared<'a, 'p, T> {
    pub prob: &'p Problem,
    pub pos: &'p Position<'a, T>,
    pub bias: Option<&'p Bias<'a, T>>,
    pub isa: Isa,
    pub tiles: Tiles,
    /// Per kv head: key panels of the rotated keys (rotary) or padded `k^T` (sparse).
    pub keys: Vec<Vec<T>>,
    /// Per `w` table: the padded diagonal sequences of its support ([`sparse::tables`]); empty
    /// when `seg_tiles` is not 0.
    pub tables: Vec<Vec<T>>,
    /// The forward builds the sequences per query block and `seg_tiles` key tiles, the
    /// backward per tile ([`sparse::segment`]), instead of whole (when not 0).
    pub seg_tiles: usize,
    pub logf: LogFactor<T>,
    /// The log-factor sequences with `sparse::PAD_L` / `PAD_R` of `-inf` either side.
    pub lfpad: Vec<Vec<T>>,
    pub rot: Option<rotate::Rotator<'p>>,
    /// The support grouped into 2x2 blocks, when it is one (BlockW).
    pub blocks: Option<Vec<(usize, usize)>>,
}

impl<'a, 'p, T: Real> Shared<'a, 'p, T> {
    /// Shared state without packed keys (each pass packs what it reads).
    pub fn new(
        prob: &'p Problem,
        pos: &'p Position<'a, T>,
        bias: Option<&'p Bias<'a, T>>,
        backward: bool,
    ) -> Self {
        Self::new_with(prob, pos, bias, backward, true)
    }

    /// [`Shared::new`]; without `sequences`, no diagonal sequences of a sparse `w` are built
    /// (the decode path reads `w`'s rows itself).
    pub fn new_with(
        prob: &'p Problem,
        pos: &'p Position<'a, T>,
        bias: Option<&'p Bias<'a, T>>,
        backward: bool,
        sequences: bool,
    ) -> Self {
        let isa = crate::arch::simd::call_isa();
        let tiles = Tiles::choose::<T>(isa, prob, backward);
        let seg_tiles = match pos {
            Position::Sparse(sp) if sequences => sparse::segment_tiles(prob, sp),
            _ => 0,
        };
        let tables = match pos {
            Position::Sparse(sp) if seg_tiles == 0 && sequences => sparse::tables(prob, sp),
            _ => Vec::new(),
        };
        let logf = LogFactor::new(prob, bias);
        let lfpad = logf
            .seqs
            .iter()
            .map(|seq| {
                let mut v = vec![T::neg_infinity(); sparse::padded(seq.len())];
                v[sparse::PAD_L..sparse::PAD_L + seq.len()].copy_from_slice(seq);
                v
            })
            .collect();
        let (rot, blocks) = match pos {
            Position::Rotary(r) => (Some(rotate::Rotator::new(r)), None),
            Position::Sparse(sp) => (None, sparse::block_pairs(&sp.support)),
        };
        Self {
            prob,
            pos,
            bias,
            isa,
            tiles,
            keys: Vec::new(),
            tables,
            seg_tiles,
            logf,
            lfpad,
            rot,
            blocks,
        }
    }

    /// Packs the keys for scoring (see [`Shared::keys`]).
    pub fn pack_keys(&mut self, k: &ArrayView4<'_, T>) {
        self.pack_keys_of(k, false)
    }

    /// [`Shared::pack_keys`], on the calling thread alone when `serial`.
    pub fn pack_keys_of(&mut self, k: &ArrayView4<'_, T>, serial: bool) {
        let prob = self.prob;
        let nr = self.tiles.nr;
        let pos = self.pos;
        let rot = &self.rot;
        let pack = |kvh: usize| {
            let kh = k.slice(ndarray::s![kvh / prob.hk, kvh % prob.hk, .., ..]);
            match (pos, rot) {
                (Position::Rotary(r), Some(rot)) => {
                    rotated_key_panels(prob, rot, r.factor, kh, 0, nr, false).0
                }
                _ => sparse::padded_transpose(kh),
            }
        };
        let heads = 0..prob.batch * prob.hk;
        self.keys = if serial {
            heads.map(pack).collect()
        } else {
            heads.into_par_iter().map(pack).collect()
        };
    }

    /// The whole sequences of head `bh`'s table (`seg_tiles` 0).
    pub fn full_seqs(&self, bh: usize) -> sparse::Seqs<T> {
        let Position::Sparse(sp) = self.pos else {
            unreachable!("sequences of a rotary call")
        };
        sparse::Seqs {
            ptr: self.tables[sp.index[bh]].as_ptr(),
            stride: sparse::padded(self.prob.glen()),
            x0: 0,
        }
    }

    /// Flattened kv head of flattened query head `bh`.
    #[inline]
    pub fn kv_head(&self, bh: usize) -> usize {
        let prob = self.prob;
        (bh / prob.hq) * prob.hk + (bh % prob.hq) / prob.group()
    }

    /// The diagonal range `g_lo..=g_hi` of rows `i0..i0+nb`, keys `j0..j0+nbk`.
    #[inline]
    pub fn tile_diagonals(&self, i0: usize, nb: usize, j0: usize, nbk: usize) -> (usize, usize) {
        let nq = self.prob.nq;
        (j0 + nq - (i0 + nb), j0 + nbk - 1 + nq - 1 - i0)
    }

    /// The keys `j0..j1` of `tile_j0..tile_j0 + nbk` that rows `i0..i0+nb` may see (empty when
    /// none), with `j0` rounded down to a multiple of `align` (counted from the tile start).
    #[inline]
    pub fn visible_keys(
        &self,
        i0: usize,
        nb: usize,
        tile_j0: usize,
        nbk: usize,
        align: usize,
    ) -> Option<(usize, usize)> {
        let prob = self.prob;
        let (lo, hi) = prob.visible_delta_range()?;
        let c = prob.q_offset - prob.k_offset;
        // j = c + i - δ
        let jlo = (c + i0 as i64 - hi).max(tile_j0 as i64);
        let jhi = (c + (i0 + nb - 1) as i64 - lo).min((tile_j0 + nbk - 1) as i64);
        if jlo > jhi {
            return None;
        }
        let (g_lo, g_hi) = self.tile_diagonals(i0, nb, jlo as usize, (jhi - jlo + 1) as usize);
        if !self.logf.any_visible(g_lo, g_hi) {
            return None;
        }
        let j0 = tile_j0 + (jlo as usize - tile_j0) / align * align;
        Some((j0, jhi as usize + 1))
    }

    /// Whether scores of rows `i0..i0+nb`, keys `j0..j1` need the log-factor added (a bias, or a
    /// mask that drops some of them).
    #[inline]
    pub fn needs_log_factor(&self, i0: usize, nb: usize, j0: usize, j1: usize) -> bool {
        if self.logf.trivial {
            return false;
        }
        let (g_lo, g_hi) = self.tile_diagonals(i0, nb, j0, j1 - j0);
        self.bias.is_some() || !self.logf.all_visible(g_lo, g_hi)
    }

    /// Pointers to the padded log-factor of rows `i..i + 12` of head `bh` at key `j0` (rows
    /// past `n_q` land in the padding).
    #[inline]
    pub fn log_rows(&self, bh: usize, i: usize, j0: usize) -> [*const T; 12] {
        let seq = match self.bias {
            None => &self.lfpad[0],
            Some(b) => &self.lfpad[b.index[bh]],
        };
        let base = sparse::PAD_L + j0 + self.prob.nq - 1;
        std::array::from_fn(|r| seq[base - (i + r).min(base)..].as_ptr())
    }

    /// Query rows `i0..i0+nb` of head `bh`, prepared for scoring, into `out` (row stride `ld`,
    /// `nbp` rows, zero padding): times `scale` (and rotated with the attention factor for
    /// rotary).
    #[allow(clippy::too_many_arguments)]
    pub fn pack_queries(
        &self,
        q: &ArrayView4<'_, T>,
        bh: usize,
        i0: usize,
        nb: usize,
        nbp: usize,
        ld: usize,
        out: &mut Vec<T>,
    ) {
        let prob = self.prob;
        let qh = q.slice(ndarray::s![bh / prob.hq, bh % prob.hq, i0..i0 + nb, ..]);
        out.clear();
        out.resize(nbp * ld, T::zero());
        for (i, row) in qh.outer_iter().enumerate() {
            let dst = &mut out[i * ld..i * ld + prob.d];
            match row.as_slice() {
                Some(r) => dst.copy_from_slice(r),
                None => dst.iter_mut().zip(row.iter()).for_each(|(x, &y)| *x = y),
            }
        }
        match (self.pos, &self.rot) {
            (Position::Rotary(r), Some(rot)) => rot.rotate(
                out,
                ld,
                nb,
                prob.q_offset + i0 as i64,
                prob.scale * r.factor,
                false,
            ),
            _ => {
                let s = T::of(prob.scale);
                out.iter_mut().for_each(|x| *x = *x * s);
            }
        }
    }
}

#[cfg(test)]
mod tests;
