//! The vocabulary both routes of the fast method share (docs/DESIGN.md §5): one head's problem
//! in Toeplitz form ([`HeadProblem`]), the limits and results of a call ([`FastLimits`],
//! [`FastReport`], [`FastOutput`]), the sizes plans are made of ([`FastShape`],
//! [`ExpansionCounts`]), the FFT
//! error and cost model ([`fft_relative_error`], [`fft_flops`]), and the row-chunk helpers the
//! low-rank passes run over (`chunk_ranges`, `scan`, ...).

use crate::error::{Error, Result};
use crate::poly::U;
use ndarray::{Array1, Array2, ArrayView2};
use rayon::prelude::*;

/// One head's problem in Toeplitz form. Positions: query `i` at `q_offset + i`, key `j` at
/// `k_offset + j`, `δ_ij = (q_offset - k_offset) + i - j`. Diagonals are indexed by
/// `g = j - i + nq - 1` in `0..glen`, `glen = nq + nk - 1` (so
/// `δ(g) = (q_offset - k_offset) + nq - 1 - g`).
pub struct HeadProblem<'a> {
    /// `nq x d`, unscaled.
    pub q: ArrayView2<'a, f64>,
    /// `nk x d`.
    pub k: ArrayView2<'a, f64>,
    /// `nk x dv`.
    pub v: ArrayView2<'a, f64>,
    pub scale: f64,
    /// S: the entries `(l1, l2)` of W that may be non-zero.
    pub support: &'a [(usize, usize)],
    /// `|S| x glen`: `seqs[[s, g]] = w_s(δ(g)) = W_δ(g)[l1_s, l2_s]`.
    pub seqs: ArrayView2<'a, f64>,
    /// `glen`: `exp(b(δ(g)))` (additive bias), `0.0` where masked.
    pub factor: &'a [f64],
}

impl HeadProblem<'_> {
    pub fn nq(&self) -> usize {
        self.q.nrows()
    }
    pub fn nk(&self) -> usize {
        self.k.nrows()
    }
    pub fn d(&self) -> usize {
        self.q.ncols()
    }
    pub fn dv(&self) -> usize {
        self.v.ncols()
    }
    /// `nq + nk - 1` (0 when either side is empty).
    pub fn glen(&self) -> usize {
        (self.nq() + self.nk()).saturating_sub(1)
    }

    /// Shapes agree, indices are in range, every value is finite and `factor >= 0`.
    pub fn validate(&self) -> Result<()> {
        let (nq, nk, d, ns) = (self.nq(), self.nk(), self.d(), self.support.len());
        if self.k.ncols() != d {
            return Err(Error::Value(format!(
                "k: expected {d} columns like q, got {}",
                self.k.ncols()
            )));
        }
        if self.v.nrows() != nk {
            return Err(Error::Value(format!(
                "v: expected {nk} rows like k, got {}",
                self.v.nrows()
            )));
        }
        if !self.scale.is_finite() {
            return Err(Error::Value(format!(
                "scale: expected a finite value, got {}",
                self.scale
            )));
        }
        if let Some(&(a, b)) = self.support.iter().find(|&&(a, b)| a >= d || b >= d) {
            return Err(Error::Value(format!(
                "support: expected entries < d = {d}, got ({a}, {b})"
            )));
        }
        if nq == 0 || nk == 0 {
            return Ok(());
        }
        let glen = self.glen();
        if self.seqs.shape() != [ns, glen] {
            return Err(Error::Value(format!(
                "seqs: expected shape ({ns}, {glen}), got {:?}",
                self.seqs.shape()
            )));
        }
        if self.factor.len() != glen {
            return Err(Error::Value(format!(
                "factor: expected length {glen}, got {}",
                self.factor.len()
            )));
        }
        for (name, x) in [
            ("q", &self.q),
            ("k", &self.k),
            ("v", &self.v),
            ("seqs", &self.seqs),
        ] {
            if x.iter().any(|v| !v.is_finite()) {
                return Err(Error::Value(format!(
                    "{name}: expected finite values, got inf or nan"
                )));
            }
        }
        if let Some(f) = self.factor.iter().find(|f| !(f.is_finite() && **f >= 0.0)) {
            return Err(Error::Value(format!(
                "factor: expected finite values >= 0, got {f}"
            )));
        }
        Ok(())
    }
}

/// Knobs that bound the work and memory of the fast method.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FastLimits {
    /// Highest polynomial degree tried (at most [`crate::poly::MAX_DEGREE`]).
    pub max_degree: usize,
    /// Largest number of expansion terms `C(|S| + g, g)` we enumerate.
    pub max_terms: usize,
    /// Bytes the fast method may hold at once (kernel spectra, accumulators, monomials); the
    /// columns of `[V, 1]` are processed in tiles to stay below it.
    pub max_working_bytes: usize,
}

impl Default for FastLimits {
    fn default() -> Self {
        FastLimits {
            max_degree: 40,
            max_terms: 1_000_000,
            max_working_bytes: 2 << 30,
        }
    }
}

/// What the fast method did and what it guarantees.
#[derive(Clone, Debug, PartialEq)]
pub struct FastReport {
    pub degree: usize,
    pub kind: crate::poly::PolyKind,
    /// The plan's score bound `R >= max |M_ij|`: the polynomial is certified on `[-r, r]` (on
    /// [`crate::fast::toeplitz::certify::snap_radius`]`(r)` for Chebyshev, at most 1/64 wider, so that calls share
    /// kernel spectra).
    pub r: f64,
    /// Verified relative error of `p` against `exp` on `[-r, r]`.
    pub rho: f64,
    pub terms: usize,
    pub n_alpha: usize,
    pub n_beta: usize,
    pub n_pairs: usize,
    pub fft_len: usize,
    /// Bound on `max |out - exact|` (polynomial error plus floating-point rounding).
    pub certified_error: f64,
    /// The polynomial's share of `certified_error`: `max|v| 2ρ/(1-ρ)`.
    pub approximation_error: f64,
    /// The rounding share of `certified_error`, from this head's data (see [`crate::fast::toeplitz::certify`]).
    pub rounding_error: f64,
    /// Bound on `max |lse - exact lse|` over rows with a visible key.
    pub certified_lse_error: f64,
}

/// Output of one head: `out` (`nq x dv`), `lse` (`nq`, `-inf` for rows with no visible key).
#[derive(Clone, Debug)]
pub struct FastOutput {
    pub out: Array2<f64>,
    pub lse: Array1<f64>,
    pub report: FastReport,
}

/// The sizes the fast method's cost depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FastShape {
    pub nq: usize,
    pub nk: usize,
    pub d: usize,
    pub dv: usize,
}

/// `ε_f`: normwise relative error of one FFT of length `n` (see the module docs).
pub fn fft_relative_error(n: usize) -> f64 {
    8.0 * U * ((n.max(2) as f64).log2().ceil() + 2.0)
}

/// Predicted flops of one FFT of length `n` (`2.5 N log2 N`, the usual complex-FFT count; real
/// transforms do about half, which the model leaves as headroom).
pub fn fft_flops(n: usize) -> f64 {
    2.5 * n as f64 * (n.max(2) as f64).log2()
}

/// Sizes of an expansion (what cost and the rounding certificate depend on).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpansionCounts {
    pub terms: usize,
    pub n_alpha: usize,
    pub n_beta: usize,
    pub n_pairs: usize,
    /// Largest number of pairs sharing one `α` (spectra summed before one inverse FFT).
    pub max_betas_per_alpha: usize,
    /// Largest number of terms merged into one kernel.
    pub max_terms_per_pair: usize,
}

/// Frequencies per block of a stored spectrum (one block is `2 * BLOCK` f64: real parts, then
/// imaginary parts; the Toeplitz route's frequency-blocked products).
pub const BLOCK: usize = 32;

/// Number of frequency blocks for an FFT of length `n` (`n/2 + 1` frequencies, padded).
pub fn spectrum_blocks(n: usize) -> usize {
    (n / 2 + 1).div_ceil(BLOCK)
}

/// Bytes of one kernel spectrum for an FFT of length `n`, as stored (frequency blocks of
/// [`BLOCK`], padded).
pub fn spectrum_bytes(n: usize) -> usize {
    spectrum_blocks(n) * BLOCK * 16
}

/// At most this many chunks per pass (a function of the shape only: results are bitwise the same
/// for every thread count).
pub(crate) const MAX_CHUNKS: usize = 8;

/// Contiguous ranges of whole blocks covering `0..n`, at least 4 blocks each, at most
/// [`MAX_CHUNKS`] of them.
pub(crate) fn chunk_ranges(n: usize, blk: usize) -> Vec<(usize, usize)> {
    let per = chunk_len(n, blk);
    (0..n.div_ceil(per))
        .map(|c| (c * per, ((c + 1) * per).min(n)))
        .collect()
}

/// The rows of each chunk of [`chunk_ranges`] but the last.
pub(crate) fn chunk_len(n: usize, blk: usize) -> usize {
    let blk = blk.max(1);
    let nb = n.div_ceil(blk);
    let parts = (nb / 4).clamp(1, MAX_CHUNKS);
    nb.div_ceil(parts).max(1) * blk
}

/// `[(0, b_0), (b_0, b_1), ...]` for nondecreasing bounds `b`.
pub(crate) fn consecutive(bounds: &[usize]) -> Vec<(usize, usize)> {
    let mut prev = 0;
    bounds
        .iter()
        .map(|&b| {
            let r = (prev, b.max(prev));
            prev = b.max(prev);
            r
        })
        .collect()
}

/// `piece` summed over each range, the ranges cut into sub-ranges of whole blocks (about
/// `total / MAX_CHUNKS` rows) computed in parallel and added in order (deterministic).
pub(crate) fn range_sums(
    ranges: &[(usize, usize)],
    total: usize,
    blk: usize,
    zero: &Array2<f64>,
    piece: &(dyn Fn(usize, usize) -> Result<Array2<f64>> + Sync),
) -> Result<Vec<Array2<f64>>> {
    let step = (total.div_ceil(MAX_CHUNKS).div_ceil(blk).max(1)) * blk;
    let subs: Vec<(usize, usize, usize)> = ranges
        .iter()
        .enumerate()
        .flat_map(|(c, &(a, b))| {
            (a..b)
                .step_by(step)
                .map(move |s0| (c, s0, (s0 + step).min(b)))
        })
        .collect();
    let parts: Vec<Array2<f64>> = subs
        .par_iter()
        .map(|&(_, s0, s1)| piece(s0, s1))
        .collect::<Result<_>>()?;
    let mut out = vec![zero.clone(); ranges.len()];
    for (&(c, _, _), p) in subs.iter().zip(parts) {
        out[c] += &p;
    }
    Ok(out)
}

/// Running sums of `pieces` (inclusive), from the front or from the back.
pub(crate) fn scan(
    pieces: Vec<Array2<f64>>,
    zero: &Array2<f64>,
    from_back: bool,
) -> Vec<Array2<f64>> {
    let n = pieces.len();
    let mut out = vec![zero.clone(); n];
    let mut acc = zero.clone();
    let order: Vec<usize> = if from_back {
        (0..n).rev().collect()
    } else {
        (0..n).collect()
    };
    for i in order {
        acc += &pieces[i];
        out[i] = acc.clone();
    }
    out
}
