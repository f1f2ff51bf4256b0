//! Position matrices `W_δ` and Toeplitz biases, and their sequences along the score diagonals.
//!
//! Two kinds reach the kernels. [`RotaryW`] is analytic: `W_δ = f² blockdiag_m R(-δ θ_m)`, so
//! rotating `q_i` by `p_i θ` and `k_j` by `p'_j θ` (times `f`) turns the score into a plain dot
//! product. [`SparseW`] is everything else: a support `S` of entries `(l1, l2)` and a table of
//! values per `δ`. `BlockW` (2x2 blocks) and dense `W` are `SparseW` whose support is the blocks
//! or all `d²` entries; the Python layer reshapes them without copying.

use crate::arch::Real;
use crate::error::{Error, Result};
use crate::poly::{WNorms, U};
use crate::problem::Problem;
use ndarray::{Array2, ArrayView2, ArrayView3};
use rayon::prelude::*;

/// The bound (exclusive) on `|q_offset + i|` and `|k_offset + j|` for rotary with a non-zero
/// frequency: `2^53`, up to which float64 represents every integer, so that each position and
/// its neighbours get their own angle (checked by [`RotaryW::validate_positions`]).
pub const MAX_ROTARY_POSITION: i64 = 1 << 53;

/// Rotary position matrices: `theta` (`d/2` frequencies), attention factor `f`, and the pairs
/// `(p_m, r_m)` rotated by `θ_m` (layout).
#[derive(Clone, Debug)]
pub struct RotaryW {
    pub theta: Vec<f64>,
    pub factor: f64,
    pub pairs: Vec<(usize, usize)>,
}

impl RotaryW {
    pub fn validate(&self, d: usize) -> Result<()> {
        if 2 * self.pairs.len() != d || self.theta.len() != self.pairs.len() {
            return Err(Error::Value(format!(
                "w: rotary needs d/2 = {} frequencies and pairs, got {} and {}",
                d / 2,
                self.theta.len(),
                self.pairs.len()
            )));
        }
        let mut seen = vec![false; d];
        for &(p, r) in &self.pairs {
            if p >= d || r >= d || p == r || seen[p] || seen[r] {
                return Err(Error::Value(format!(
                    "w: rotary pairs must partition 0..{d}, got pair ({p}, {r})"
                )));
            }
            seen[p] = true;
            seen[r] = true;
        }
        if !self.factor.is_finite() || self.theta.iter().any(|t| !t.is_finite()) {
            return Err(Error::Value("w: rotary frequencies must be finite".into()));
        }
        Ok(())
    }

    /// The rotation is by absolute positions: they must fit in i64 (the relative ones
    /// [`Problem::validate`] checks may fit where `q_offset + n_q - 1` does not), and every angle
    /// `p θ` must be finite (a frequency of 1e300 at position 2^60 is not).
    /// With a non-zero frequency every absolute position must also be below
    /// [`MAX_ROTARY_POSITION`] in magnitude.
    pub fn validate_positions(&self, prob: &Problem) -> Result<()> {
        let last = |off: i64, n: usize| off as i128 + n.saturating_sub(1) as i128;
        let (lq, lk) = (last(prob.q_offset, prob.nq), last(prob.k_offset, prob.nk));
        if lq > i64::MAX as i128 || lk > i64::MAX as i128 {
            return Err(Error::Value(format!(
                "q_offset, k_offset: rotary needs absolute positions that fit in a 64-bit \
                 integer, got q positions up to {lq}, k positions up to {lk}"
            )));
        }
        let p = [prob.q_offset as i128, lq, prob.k_offset as i128, lk]
            .into_iter()
            .map(|x| x.unsigned_abs() as f64)
            .fold(0.0, f64::max);
        let th = self.theta.iter().fold(0.0f64, |m, t| m.max(t.abs()));
        // Beyond 2^53 float64 no longer holds every integer: neighbouring positions share one
        // angle and `p θ` rounds by up to `2^-53 |p| θ` radians (a radian at 2^53, θ = 1), so
        // the rotation has no accuracy left. Zero frequencies (`w = None`) do not rotate.
        if th > 0.0 && p >= MAX_ROTARY_POSITION as f64 {
            return Err(Error::Value(format!(
                "q_offset, k_offset: rotary needs absolute positions of magnitude below 2^53 = \
                 {MAX_ROTARY_POSITION} (float64 holds every integer only up to there; beyond it \
                 neighbouring positions get the same angle), got q positions {}..={lq}, k \
                 positions {}..={lk}",
                prob.q_offset, prob.k_offset
            )));
        }
        if !(p * th).is_finite() {
            return Err(Error::Value(format!(
                "w: rotary angles p θ overflow (|p| up to {p:e}, |θ| up to {th:e})"
            )));
        }
        Ok(())
    }

    /// Rotates `rows` (`n x d`, row-major, in place) of positions `offset + i` and multiplies
    /// them by `mult`: `x_p' = x_p cos φ - x_r sin φ`, `x_r' = x_p sin φ + x_r cos φ`, `φ = p θ_m`.
    pub fn rotate<T: Real>(&self, rows: &mut [T], d: usize, offset: i64, mult: f64) {
        for (i, row) in rows.chunks_exact_mut(d).enumerate() {
            let pos = (offset + i as i64) as f64;
            for (&(p, r), &th) in self.pairs.iter().zip(&self.theta) {
                let (s, c) = (pos * th).sin_cos();
                let (xp, xr) = (row[p].f64(), row[r].f64());
                row[p] = T::of(mult * (xp * c - xr * s));
                row[r] = T::of(mult * (xp * s + xr * c));
            }
        }
    }

    /// The inverse of [`RotaryW::rotate`]'s rotation (the transpose), times `mult`.
    pub fn rotate_back<T: Real>(&self, rows: &mut [T], d: usize, offset: i64, mult: f64) {
        for (i, row) in rows.chunks_exact_mut(d).enumerate() {
            let pos = (offset + i as i64) as f64;
            for (&(p, r), &th) in self.pairs.iter().zip(&self.theta) {
                let (s, c) = (pos * th).sin_cos();
                let (xp, xr) = (row[p].f64(), row[r].f64());
                row[p] = T::of(mult * (xp * c + xr * s));
                row[r] = T::of(mult * (-xp * s + xr * c));
            }
        }
    }

    /// The support of [`RotaryW::as_sparse`]: `(p,p), (p,r), (r,p), (r,r)` per pair.
    pub fn support(&self) -> Vec<(usize, usize)> {
        self.pairs
            .iter()
            .flat_map(|&(p, r)| [(p, p), (p, r), (r, p), (r, r)])
            .collect()
    }

    /// The [`WNorms`] of [`RotaryW::as_sparse`] over the diagonals `factor > 0` marks, without
    /// the table: each entry's maximum from `sin_cos` directly (the same values the table
    /// holds; beyond [`EXACT_NORMS_UP_TO`] diagonals, `f²`, an upper bound), each block's norm
    /// `f²(1 + 4u)` (a rotation's, with the rounding of its entries).
    pub fn norms(&self, prob: &Problem, factor: &[f64]) -> Result<WNorms> {
        let glen = prob.glen();
        if factor.len() != glen {
            return Err(Error::Value(format!(
                "factor: expected {glen} values, got {}",
                factor.len()
            )));
        }
        let f2 = self.factor * self.factor;
        if glen > EXACT_NORMS_UP_TO {
            // Long tables: every entry is at most f² in size (|cos|, |sin| <= 1), the bound the
            // maxima approach anyway once the visible δ cover a period of each angle.
            let any = factor.iter().any(|&f| f > 0.0);
            let (e, block) = if any {
                (f2, f2 * (1.0 + 4.0 * U))
            } else {
                (0.0, 0.0)
            };
            let entry_max = vec![e; 4 * self.pairs.len()];
            return WNorms::from_maxima(prob.d, &self.support(), entry_max, |_| block);
        }
        let chunk = glen.div_ceil(4 * rayon::current_num_threads()).max(4096);
        let (maxima, any) = (0..glen.div_ceil(chunk))
            .into_par_iter()
            .map(|c| {
                let mut m = vec![0.0f64; 2 * self.theta.len()];
                let mut any = false;
                for g in (c * chunk..((c + 1) * chunk).min(glen)).filter(|&g| factor[g] > 0.0) {
                    any = true;
                    let delta = prob.delta(g) as f64;
                    for (t, &th) in self.theta.iter().enumerate() {
                        let (s, co) = (delta * th).sin_cos();
                        m[2 * t] = m[2 * t].max((f2 * co).abs());
                        m[2 * t + 1] = m[2 * t + 1].max((f2 * s).abs());
                    }
                }
                (m, any)
            })
            .reduce(
                || (vec![0.0; 2 * self.theta.len()], false),
                |(mut a, x), (b, y)| {
                    a.iter_mut().zip(b).for_each(|(a, b)| *a = a.max(b));
                    (a, x || y)
                },
            );
        let entry_max: Vec<f64> = maxima
            .chunks_exact(2)
            .flat_map(|cs| [cs[0], cs[1], cs[1], cs[0]])
            .collect();
        let block = if any { f2 * (1.0 + 4.0 * U) } else { 0.0 };
        WNorms::from_maxima(prob.d, &self.support(), entry_max, |_| block)
    }

    /// The same matrices as a sparse support with their diagonal sequences (for the fast
    /// method): per pair, entries `(p,p), (p,r), (r,p), (r,r)` with `f² [cos, sin, -sin, cos](δθ)`.
    pub fn as_sparse(&self, prob: &Problem) -> (Vec<(usize, usize)>, Array2<f64>) {
        let glen = prob.glen();
        let f2 = self.factor * self.factor;
        let support = self.support();
        let mut seqs = Array2::zeros((support.len(), glen));
        for (m, &th) in self.theta.iter().enumerate() {
            for g in 0..glen {
                let (s, c) = (prob.delta(g) as f64 * th).sin_cos();
                seqs[[4 * m, g]] = f2 * c;
                seqs[[4 * m + 1, g]] = f2 * s;
                seqs[[4 * m + 2, g]] = -f2 * s;
                seqs[[4 * m + 3, g]] = f2 * c;
            }
        }
        (support, seqs)
    }
}

/// Diagonals up to which [`RotaryW::norms`] reads each entry's maximum exactly (a `sin_cos` per
/// diagonal and pair); longer tables take the bound `f²`.
pub const EXACT_NORMS_UP_TO: usize = 1 << 17;

/// General position matrices: `values[w, δ + L - 1, s] = W_δ[l1_s, l2_s]` for `δ` in
/// `[-(L-1), L-1]`; `index[b * hq + h]` says which table query head `h` of batch entry `b` uses.
#[derive(Clone, Debug)]
pub struct SparseW<'a, T> {
    pub support: Vec<(usize, usize)>,
    pub values: ArrayView3<'a, T>,
    pub index: Vec<usize>,
}

/// The row of a table of `rows = 2L - 1` rows (`half = L - 1`) that holds `δ`, if it has one.
/// In i128: `δ + half` overflows i64 for a masked `δ` near the i64 limits, which a table need
/// not cover.
pub(crate) fn table_row(delta: i64, half: i64, rows: usize) -> Option<usize> {
    let row = delta as i128 + half as i128;
    (0..rows as i128).contains(&row).then_some(row as usize)
}

/// A table of values per `δ` (rows `δ + L - 1`), shared by the position matrices and the bias.
fn half_width(rows: usize, what: &str) -> Result<i64> {
    if rows.is_multiple_of(2) {
        return Err(Error::Value(format!(
            "{what}: expected an odd number 2L-1 of rows along the δ axis, got {rows}"
        )));
    }
    Ok((rows as i64 - 1) / 2)
}

fn check_covers(prob: &Problem, rows: usize, what: &str) -> Result<i64> {
    let half = half_width(rows, what)?;
    if let Some((lo, hi)) = prob.visible_delta_range() {
        if lo < -half || hi > half {
            return Err(Error::Value(format!(
                "{what}: the call needs δ in [{lo}, {hi}], but the table has {rows} rows \
                 covering δ in [{}, {half}] (L = {})",
                -half,
                half + 1
            )));
        }
    }
    Ok(half)
}

fn check_index(index: &[usize], n_tables: usize, prob: &Problem, what: &str) -> Result<()> {
    // checked: `validate` may see a problem whose batch x heads overflows
    let heads = prob.batch.checked_mul(prob.hq);
    if heads != Some(index.len()) || index.iter().any(|&i| i >= n_tables) {
        return Err(Error::Value(format!(
            "{what}: expected one table index < {n_tables} per (batch, head) = {}, got {} \
             entries",
            heads.map_or_else(|| "more than usize::MAX".into(), |h| h.to_string()),
            index.len()
        )));
    }
    Ok(())
}

impl<T: Real> SparseW<'_, T> {
    pub fn validate(&self, prob: &Problem) -> Result<()> {
        let (nw, rows, ns) = self.values.dim();
        if ns != self.support.len() {
            return Err(Error::Value(format!(
                "w: expected {} values per δ (one per support entry), got {ns}",
                self.support.len()
            )));
        }
        if let Some(&(a, b)) = self
            .support
            .iter()
            .find(|&&(a, b)| a >= prob.d || b >= prob.d)
        {
            return Err(Error::Value(format!(
                "w: support entries must be < d = {}, got ({a}, {b})",
                prob.d
            )));
        }
        check_covers(prob, rows, "w")?;
        check_index(&self.index, nw, prob, "w")
    }

    /// Sequences along the diagonals for table `w`: `out[s * glen + g] = w_s(δ(g))`, 0 outside
    /// the table (only masked diagonals can be outside after [`SparseW::validate`]).
    pub fn diagonals(&self, w: usize, prob: &Problem) -> Vec<T> {
        let glen = prob.glen();
        let rows = self.values.dim().1;
        let half = (rows as i64 - 1) / 2;
        let mut out = vec![T::zero(); self.support.len() * glen];
        for g in 0..glen {
            let Some(row) = table_row(prob.delta(g), half, rows) else {
                continue;
            };
            let vals = self.values.slice(ndarray::s![w, row, ..]);
            for (s, &x) in vals.iter().enumerate() {
                out[s * glen + g] = x;
            }
        }
        out
    }
}

/// Additive Toeplitz bias `b(δ)`: `values[t, δ + L_b - 1]`, `index` as for [`SparseW`].
#[derive(Clone, Debug)]
pub struct Bias<'a, T> {
    pub values: ArrayView2<'a, T>,
    pub index: Vec<usize>,
}

impl<T: Real> Bias<'_, T> {
    pub fn validate(&self, prob: &Problem) -> Result<()> {
        let (nb, rows) = self.values.dim();
        check_covers(prob, rows, "bias")?;
        check_index(&self.index, nb, prob, "bias")
    }
}

/// The additive log-factor along the diagonals: `b(δ(g))`, or `-inf` where a mask drops `δ(g)`.
/// One sequence per bias table (or one in all without a bias). `visible_prefix[g]` counts the
/// visible diagonals before `g`, so a tile's visibility is two lookups.
#[derive(Clone, Debug)]
pub struct LogFactor<T> {
    pub seqs: Vec<Vec<T>>,
    pub visible_prefix: Vec<usize>,
    /// No bias and nothing masked: kernels may skip adding the sequence.
    pub trivial: bool,
}

impl<T: Real> LogFactor<T> {
    pub fn new(prob: &Problem, bias: Option<&Bias<'_, T>>) -> Self {
        let glen = prob.glen();
        let mut visible_prefix = Vec::with_capacity(glen + 1);
        visible_prefix.push(0);
        let mut all_visible = true;
        for g in 0..glen {
            let keep = prob.keeps(prob.delta(g));
            all_visible &= keep;
            visible_prefix.push(visible_prefix[g] + keep as usize);
        }
        let one = |b: Option<(&ArrayView2<'_, T>, usize)>| -> Vec<T> {
            (0..glen)
                .map(|g| {
                    let delta = prob.delta(g);
                    if !prob.keeps(delta) {
                        return T::neg_infinity();
                    }
                    match b {
                        None => T::zero(),
                        Some((vals, t)) => {
                            let half = (vals.dim().1 as i64 - 1) / 2;
                            vals[[t, (delta + half) as usize]]
                        }
                    }
                })
                .collect()
        };
        let seqs = match bias {
            None => vec![one(None)],
            Some(b) => (0..b.values.dim().0)
                .map(|t| one(Some((&b.values, t))))
                .collect(),
        };
        Self {
            seqs,
            visible_prefix,
            trivial: all_visible && bias.is_none(),
        }
    }

    /// The sequence for query head `bh` (flattened `b * hq + h`).
    pub fn for_head<'s>(&'s self, bias: Option<&Bias<'_, T>>, bh: usize) -> &'s [T] {
        match bias {
            None => &self.seqs[0],
            Some(b) => &self.seqs[b.index[bh]],
        }
    }

    /// Whether any diagonal in `g_lo..=g_hi` is visible.
    #[inline]
    pub fn any_visible(&self, g_lo: usize, g_hi: usize) -> bool {
        self.visible_prefix[g_hi + 1] > self.visible_prefix[g_lo]
    }

    /// Whether every diagonal in `g_lo..=g_hi` is visible.
    #[inline]
    pub fn all_visible(&self, g_lo: usize, g_hi: usize) -> bool {
        self.visible_prefix[g_hi + 1] - self.visible_prefix[g_lo] == g_hi + 1 - g_lo
    }
}

/// The position matrices of a call.
#[derive(Clone, Debug)]
pub enum Position<'a, T> {
    Rotary(RotaryW),
    Sparse(SparseW<'a, T>),
}

impl<T: Real> Position<'_, T> {
    pub fn validate(&self, prob: &Problem) -> Result<()> {
        match self {
            Position::Rotary(r) => {
                r.validate(prob.d)?;
                r.validate_positions(prob)
            }
            Position::Sparse(s) => s.validate(prob),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prob(nq: usize, nk: usize, d: usize, causal: bool, window: Option<(i64, i64)>) -> Problem {
        Problem {
            batch: 1,
            hq: 1,
            hk: 1,
            nq,
            nk,
            d,
            dv: 1,
            scale: 1.0,
            causal,
            window,
            q_offset: 7,
            k_offset: 2,
        }
    }

    #[test]
    fn rotary_norms_match_those_of_its_table() {
        let rot = RotaryW {
            theta: vec![1.0, 0.1, 1e-3, 1e-4],
            factor: 1.3,
            pairs: vec![(0, 4), (1, 5), (2, 6), (3, 7)],
        };
        for (nq, nk, causal, window) in [
            (40, 30, false, None),
            (40, 30, true, None),
            (9000, 8000, true, Some((50, 0))),
            (300, 200, false, Some((3, 2))),
            (20, 20, true, Some((-100, 100))), // nothing visible
        ] {
            let p = prob(nq, nk, 8, causal, window);
            let logf = LogFactor::<f64>::new(&p, None);
            let fac: Vec<f64> = logf.seqs[0].iter().map(|x| x.exp()).collect();
            let (support, seqs) = rot.as_sparse(&p);
            let table = WNorms::new(8, &support, seqs.view(), &fac).unwrap();
            let fast = rot.norms(&p, &fac).unwrap();
            assert_eq!(support, rot.support());
            // the same maxima, bit for bit
            assert_eq!(
                fast.entry_max, table.entry_max,
                "{nq} {nk} {causal} {window:?}"
            );
            assert_eq!(fast.blocks.len(), table.blocks.len());
            for (a, b) in fast.blocks.iter().zip(&table.blocks) {
                assert_eq!((&a.0, &a.1), (&b.0, &b.1));
                // an upper bound within a few units of rounding
                assert!(a.2 >= b.2 && a.2 <= b.2 * (1.0 + 8.0 * U) + f64::MIN_POSITIVE);
            }
        }
        // Past EXACT_NORMS_UP_TO diagonals: f² bounds every entry's maximum.
        let (nq, nk) = (EXACT_NORMS_UP_TO / 2 + 10, EXACT_NORMS_UP_TO / 2);
        let p = prob(nq, nk, 8, true, None);
        let fac: Vec<f64> = LogFactor::<f64>::new(&p, None).seqs[0]
            .iter()
            .map(|x| x.exp())
            .collect();
        let (support, seqs) = rot.as_sparse(&p);
        let table = WNorms::new(8, &support, seqs.view(), &fac).unwrap();
        let long = rot.norms(&p, &fac).unwrap();
        let f2 = rot.factor * rot.factor;
        for (a, b) in long.entry_max.iter().zip(&table.entry_max) {
            assert!(*a >= *b && *a == f2);
        }
        for (a, b) in long.blocks.iter().zip(&table.blocks) {
            assert!(a.2 >= b.2 && a.2 <= b.2 * (1.0 + 8.0 * U));
        }
    }
}
