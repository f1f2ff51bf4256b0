//! The exact method: streaming ("online") softmax over key blocks, FlashAttention-2 style.
//!
//! Nothing of size `n_q x n_k` is ever allocated: a unit of work holds one `BQ x BK` tile of
//! scores. Memory beyond inputs and outputs is `O((n_q + n_k) d)` for rotated/transposed copies
//! of q and k, plus, for sparse `W`, the support's sequences along the diagonals
//! (`|S| (n_q + n_k)` per table, the size of the part of `W` the call touches).
//!
//! Scores of a tile: for [`Position::Rotary`], `q` and `k` are rotated once (with `scale` and the
//! attention factor folded into `q`), and the tile is a GEMM `Q̃ K̃^T`. For
//! [`Position::Sparse`], `S_ij = Σ_s (scale q_i[l1_s]) w_s(δ_ij) k_j[l2_s]`: along a tile row `δ`
//! runs over a contiguous range, so each support entry contributes a contiguous slice of its
//! diagonal sequence times a contiguous row of `k^T` — a vectorisable loop over keys.

pub mod backward;
pub mod forward;

pub use backward::attention_backward;
pub use forward::attention_forward;

use crate::position::{Bias, LogFactor, Position};
use crate::problem::Problem;
use crate::real::Real;
use ndarray::ArrayView4;
use rayon::prelude::*;

/// Query rows per tile.
pub const BQ: usize = 64;
/// Key rows per tile.
pub const BK: usize = 128;

/// Keys prepared once per `(batch, kv head)`: rotated (`n_k x d`, row-major, times the attention
/// factor) for rotary, transposed (`d x n_k`) for sparse `W`.
pub(crate) fn pack_keys<T: Real>(
    prob: &Problem,
    pos: &Position<'_, T>,
    k: &ArrayView4<'_, T>,
) -> Vec<Vec<T>> {
    let (nk, d) = (prob.nk, prob.d);
    (0..prob.batch * prob.hk)
        .into_par_iter()
        .map(|bh| {
            let kh = k.slice(ndarray::s![bh / prob.hk, bh % prob.hk, .., ..]);
            match pos {
                Position::Rotary(r) => {
                    let mut rows: Vec<T> = kh.iter().copied().collect();
                    r.rotate(&mut rows, d, prob.k_offset, r.factor);
                    rows
                }
                Position::Sparse(_) => {
                    let mut kt = vec![T::zero(); d * nk];
                    for (j, row) in kh.outer_iter().enumerate() {
                        for (l, &x) in row.iter().enumerate() {
                            kt[l * nk + j] = x;
                        }
                    }
                    kt
                }
            }
        })
        .collect()
}

/// Query rows `i0..i0+nb` of head `(b, h)`, prepared for scoring: times `scale` (and rotated
/// with the attention factor for rotary), row-major `nb x d`.
pub(crate) fn pack_queries<T: Real>(
    prob: &Problem,
    pos: &Position<'_, T>,
    q: &ArrayView4<'_, T>,
    bh: usize,
    i0: usize,
    nb: usize,
    out: &mut Vec<T>,
) {
    let qh = q.slice(ndarray::s![bh / prob.hq, bh % prob.hq, i0..i0 + nb, ..]);
    out.clear();
    out.extend(qh.iter().copied());
    match pos {
        Position::Rotary(r) => r.rotate(
            out,
            prob.d,
            prob.q_offset + i0 as i64,
            prob.scale * r.factor,
        ),
        Position::Sparse(_) => {
            let s = T::of(prob.scale);
            out.iter_mut().for_each(|x| *x = *x * s);
        }
    }
}

/// Per-table diagonal sequences of a sparse `W` (empty for rotary).
pub(crate) fn diagonal_tables<T: Real>(prob: &Problem, pos: &Position<'_, T>) -> Vec<Vec<T>> {
    match pos {
        Position::Rotary(_) => Vec::new(),
        Position::Sparse(sp) => {
            let mut used = vec![false; sp.values.dim().0];
            sp.index.iter().for_each(|&w| used[w] = true);
            (0..used.len())
                .into_par_iter()
                .map(|w| {
                    if used[w] {
                        sp.diagonals(w, prob)
                    } else {
                        Vec::new()
                    }
                })
                .collect()
        }
    }
}

/// Everything the tile kernels of one call share.
pub(crate) struct Shared<'a, 'p, T> {
    pub prob: &'p Problem,
    pub pos: &'p Position<'a, T>,
    pub bias: Option<&'p Bias<'a, T>>,
    pub keys: Vec<Vec<T>>,
    pub tables: Vec<Vec<T>>,
    pub logf: LogFactor<T>,
}

impl<'a, 'p, T: Real> Shared<'a, 'p, T> {
    pub fn new(
        prob: &'p Problem,
        pos: &'p Position<'a, T>,
        bias: Option<&'p Bias<'a, T>>,
        k: &ArrayView4<'_, T>,
    ) -> Self {
        let keys = pack_keys(prob, pos, k);
        let tables = diagonal_tables(prob, pos);
        let logf = LogFactor::new(prob, bias);
        Self {
            prob,
            pos,
            bias,
            keys,
            tables,
            logf,
        }
    }

    /// The diagonal range `g_lo..=g_hi` of tile rows `i0..i0+nb`, keys `j0..j0+nbk`.
    #[inline]
    pub fn tile_diagonals(&self, i0: usize, nb: usize, j0: usize, nbk: usize) -> (usize, usize) {
        let nq = self.prob.nq;
        (j0 + nq - (i0 + nb), j0 + nbk - 1 + nq - 1 - i0)
    }

    /// Scores of a tile into `s` (`nb x nbk`, row-major), including the bias and mask when the
    /// tile needs them. `qb` comes from [`pack_queries`]; `kvh` is the flattened kv head.
    #[allow(clippy::too_many_arguments)]
    pub fn tile_scores(
        &self,
        bh: usize,
        kvh: usize,
        qb: &[T],
        i0: usize,
        nb: usize,
        j0: usize,
        nbk: usize,
        s: &mut [T],
    ) {
        let (nq, nk, d) = (self.prob.nq, self.prob.nk, self.prob.d);
        let keys = &self.keys[kvh];
        match self.pos {
            Position::Rotary(_) => {
                crate::real::gemm_rm(
                    nb,
                    d,
                    nbk,
                    T::one(),
                    qb,
                    d,
                    &keys[j0 * d..],
                    d,
                    true,
                    T::zero(),
                    s,
                    nbk,
                );
            }
            Position::Sparse(sp) => {
                let glen = self.prob.glen();
                let table = &self.tables[sp.index[bh]];
                s[..nb * nbk].iter_mut().for_each(|x| *x = T::zero());
                for (si, &(l1, l2)) in sp.support.iter().enumerate() {
                    let seq = &table[si * glen..(si + 1) * glen];
                    let krow = &keys[l2 * nk + j0..l2 * nk + j0 + nbk];
                    for i in 0..nb {
                        let a = qb[i * d + l1];
                        if a == T::zero() {
                            continue;
                        }
                        let base = j0 + nq - 1 - (i0 + i);
                        let w = &seq[base..base + nbk];
                        crate::simd::axpy_prod(&mut s[i * nbk..(i + 1) * nbk], a, w, krow);
                    }
                }
            }
        }
        let (g_lo, g_hi) = self.tile_diagonals(i0, nb, j0, nbk);
        if !(self.logf.trivial || (self.bias.is_none() && self.logf.all_visible(g_lo, g_hi))) {
            let lf = self.logf.for_head(self.bias, bh);
            for i in 0..nb {
                let base = j0 + nq - 1 - (i0 + i);
                crate::simd::add_assign(&mut s[i * nbk..(i + 1) * nbk], &lf[base..base + nbk]);
            }
        }
    }
}

#[cfg(test)]
mod tests;
