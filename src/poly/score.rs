//! The score bound `R >= max_ij |M_ij|` on `M_ij = scale q_i^T W_δ(i,j) k_j` (docs/DESIGN.md
//! §5.2), computed in `O(n d + glen |S|)` without forming any score: the interval `[-R, R]` the
//! polynomial of [`super`] must certify.

use super::{mul_up, norm2, ETA, TINY, U};
use crate::error::{Error, Result};
use ndarray::ArrayView2;
use rayon::prelude::*;

/// Bounds on the scores, from the cheapest to the sharpest form (all `>= max |M_ij|`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScoreBound {
    /// `R = min(spectral, blocks, abs)`: the interval `[-R, R]` the polynomial must certify.
    pub r: f64,
    /// `scale Σ_s max|q[:,l1_s]| max|w_s| max|k[:,l2_s]|`, which also bounds `Σ_s |a_s|` for the
    /// expansion terms `a_s = scale q[i,l1_s] w_s k[j,l2_s]` (so `Σ_τ |terms| <= Σ_t |c_t| r_abs^t`).
    pub r_abs: f64,
    /// `scale max_i |q_i|_S max_δ ||W_δ||_2 max_j |k_j|_S`.
    pub spectral: f64,
    /// `Σ_blocks scale max_i |q_i[rows]| max_δ ||W_δ[block]||_2 max_j |k_j[cols]|`.
    pub blocks: f64,
}

/// The W-side of the score bound, computed once per (W, mask) in `O(glen |S|)` and reusable for
/// every head sharing them: per connected block of the support (W is block diagonal up to a
/// permutation of rows and columns) the largest spectral norm over visible diagonals, and per
/// support entry its largest magnitude.
///
/// Blocks of at most 2x2 (rotary, `BlockW`) use the exact 2x2 singular value
/// `σ_max = (√((a+d)² + (c-b)²) + √((a-d)² + (c+b)²)) / 2`; larger blocks use
/// `min(||B||_F, √(||B||_1 ||B||_∞))`, both upper bounds on `||B||_2`.
#[derive(Clone, Debug, PartialEq)]
pub struct WNorms {
    /// Per block: the row (l1) and column (l2) coordinates and `max_δ ||W_δ[block]||_2`.
    pub blocks: Vec<(Vec<usize>, Vec<usize>, f64)>,
    /// Per support entry: `max_{visible g} |seqs[s, g]|`.
    pub entry_max: Vec<f64>,
}

/// One block of a support: row coordinates, column coordinates, entries.
type Block = (Vec<usize>, Vec<usize>, Vec<usize>);

impl WNorms {
    /// The blocks of `support` (connected components of its rows and columns): per block its
    /// row and column coordinates and its entries (indices into `support`).
    fn blocks_of(d: usize, support: &[(usize, usize)]) -> Result<Vec<Block>> {
        if let Some(&(a, b)) = support.iter().find(|&&(a, b)| a >= d || b >= d) {
            return Err(Error::Value(format!(
                "support: expected entries < d = {d}, got ({a}, {b})"
            )));
        }
        // Union-find over 2d nodes: rows 0..d, columns d..2d.
        let mut parent: Vec<usize> = (0..2 * d).collect();
        fn find(p: &mut [usize], mut x: usize) -> usize {
            while p[x] != x {
                p[x] = p[p[x]];
                x = p[x];
            }
            x
        }
        for &(a, b) in support {
            let (ra, rb) = (find(&mut parent, a), find(&mut parent, d + b));
            parent[ra] = rb;
        }
        let mut root_block: Vec<Option<usize>> = vec![None; 2 * d];
        let mut members: Vec<Block> = Vec::new();
        for (s, &(a, b)) in support.iter().enumerate() {
            let root = find(&mut parent, a);
            let id = *root_block[root].get_or_insert_with(|| {
                members.push((Vec::new(), Vec::new(), Vec::new()));
                members.len() - 1
            });
            let m = &mut members[id];
            if !m.0.contains(&a) {
                m.0.push(a);
            }
            if !m.1.contains(&b) {
                m.1.push(b);
            }
            m.2.push(s);
        }
        Ok(members)
    }

    /// Norms from maxima computed elsewhere: `entry_max[s]` per support entry and
    /// `block_max(entries)` for the block made of those entries (before the rounding margin).
    pub fn from_maxima(
        d: usize,
        support: &[(usize, usize)],
        entry_max: Vec<f64>,
        block_max: impl Fn(&[usize]) -> f64,
    ) -> Result<Self> {
        if entry_max.len() != support.len() {
            return Err(Error::Value(format!(
                "entry_max: expected {} values, got {}",
                support.len(),
                entry_max.len()
            )));
        }
        let blocks = Self::blocks_of(d, support)?
            .into_iter()
            .map(|(rows, cols, entries)| {
                let b = block_max(&entries);
                (rows, cols, block_up(b))
            })
            .collect();
        Ok(WNorms { blocks, entry_max })
    }

    /// `support` entries must be `< d`; `seqs` is `|S| x glen`; `factor[g] > 0` marks the
    /// visible diagonals (only those can reach a score that matters).
    pub fn new(
        d: usize,
        support: &[(usize, usize)],
        seqs: ArrayView2<f64>,
        factor: &[f64],
    ) -> Result<Self> {
        let ns = support.len();
        if seqs.nrows() != ns || seqs.ncols() != factor.len() {
            return Err(Error::Value(format!(
                "seqs: expected shape ({ns}, {}), got {:?}",
                factor.len(),
                seqs.shape()
            )));
        }
        let members = Self::blocks_of(d, support)?;
        // Per block, each entry's place in the block matrix (hoisted out of the loop over δ).
        let places: Vec<Vec<(usize, usize)>> = members
            .iter()
            .map(|(rows, cols, entries)| {
                entries
                    .iter()
                    .map(|&s| {
                        let (a, b) = support[s];
                        let ia = rows.iter().position(|&x| x == a).unwrap_or(0);
                        let ib = cols.iter().position(|&x| x == b).unwrap_or(0);
                        (s, ia * cols.len() + ib)
                    })
                    .collect()
            })
            .collect();
        // Maxima over the visible diagonals, by chunks in parallel (a max is exact, so the
        // result does not depend on the chunking).
        let glen = factor.len();
        let nb = members.len();
        let chunk = glen.div_ceil(4 * rayon::current_num_threads()).max(4096);
        let maxima = (0..glen.div_ceil(chunk))
            .into_par_iter()
            .map(|c| {
                let (g0, g1) = (c * chunk, ((c + 1) * chunk).min(glen));
                let mut em = vec![0.0f64; ns];
                let mut best = vec![0.0f64; nb];
                let mut mat = Vec::new();
                for g in (g0..g1).filter(|&g| factor[g] > 0.0) {
                    for (s, e) in em.iter_mut().enumerate() {
                        *e = e.max(seqs[[s, g]].abs());
                    }
                    for (b, ((rows, cols, _), place)) in members.iter().zip(&places).enumerate() {
                        mat.clear();
                        mat.resize(rows.len() * cols.len(), 0.0);
                        for &(s, at) in place {
                            mat[at] += seqs[[s, g]];
                        }
                        best[b] = best[b].max(spectral_bound(&mat, rows.len(), cols.len()));
                    }
                }
                (em, best)
            })
            .reduce(
                || (vec![0.0; ns], vec![0.0; nb]),
                |(mut e1, mut b1), (e2, b2)| {
                    e1.iter_mut().zip(e2).for_each(|(a, b)| *a = a.max(b));
                    b1.iter_mut().zip(b2).for_each(|(a, b)| *a = a.max(b));
                    (e1, b1)
                },
            );
        let (entry_max, best) = maxima;
        let blocks = members
            .into_iter()
            .zip(best)
            .map(|((rows, cols, _), b)| (rows, cols, block_up(b)))
            .collect();
        Ok(WNorms { blocks, entry_max })
    }

    /// The score bounds for one head (`q`: `nq x d`, `k`: `nk x d`), in `O((nq + nk) d)`.
    pub fn bound(
        &self,
        support: &[(usize, usize)],
        q: ArrayView2<f64>,
        k: ArrayView2<f64>,
        scale: f64,
    ) -> ScoreBound {
        let scale = scale.abs();
        let mut all_rows: Vec<usize> = self
            .blocks
            .iter()
            .flat_map(|b| b.0.iter().copied())
            .collect();
        let mut all_cols: Vec<usize> = self
            .blocks
            .iter()
            .flat_map(|b| b.1.iter().copied())
            .collect();
        all_rows.sort_unstable();
        all_cols.sort_unstable();
        // One pass over each of q and k: the column maxima and the largest norm of each row
        // restricted to every block's coordinates (and to all of them).
        let q_sets: Vec<&[usize]> = std::iter::once(all_rows.as_slice())
            .chain(self.blocks.iter().map(|b| b.0.as_slice()))
            .collect();
        let k_sets: Vec<&[usize]> = std::iter::once(all_cols.as_slice())
            .chain(self.blocks.iter().map(|b| b.1.as_slice()))
            .collect();
        let (q_col, q_norm) = row_maxima(q, &q_sets);
        let (k_col, k_norm) = row_maxima(k, &k_sets);
        // Products rounded up (`mul_up`) where they underflow: subnormal keys times a huge
        // table entry make a normal score that a plain product chain rounds to 0.
        let r_abs: f64 = mul_up(
            support
                .iter()
                .zip(&self.entry_max)
                .map(|(&(a, b), &w)| mul_up(mul_up(q_col[a], w), k_col[b]))
                .sum::<f64>(),
            scale,
        );
        let wmax = self.blocks.iter().fold(0.0f64, |m, b| m.max(b.2));
        let spectral = mul_up(mul_up(mul_up(scale, q_norm[0]), wmax), k_norm[0]);
        let blocks: f64 = mul_up(
            self.blocks
                .iter()
                .enumerate()
                .map(|(i, (_, _, w))| mul_up(mul_up(q_norm[i + 1], *w), k_norm[i + 1]))
                .sum::<f64>(),
            scale,
        );
        // The products and sums above round; a relative slack of 64u keeps R an upper bound.
        let slack = 1.0 + 64.0 * U * (support.len() as f64 + 4.0);
        let (r_abs, spectral, blocks) = (r_abs * slack, spectral * slack, blocks * slack);
        ScoreBound {
            r: r_abs.min(spectral).min(blocks),
            r_abs,
            spectral,
            blocks,
        }
    }
}

/// `(max_i |x_il| per column l, max_i ||x_i[set]||_2 per set)`, by chunks of rows in parallel
/// (maxima are exact, so the result does not depend on the chunking).
fn row_maxima(x: ArrayView2<f64>, sets: &[&[usize]]) -> (Vec<f64>, Vec<f64>) {
    let (n, d) = x.dim();
    let chunk = 8192;
    let merge = |(mut a, mut b): (Vec<f64>, Vec<f64>), (c, e): (Vec<f64>, Vec<f64>)| {
        a.iter_mut().zip(c).for_each(|(a, c)| *a = a.max(c));
        b.iter_mut().zip(e).for_each(|(b, e)| *b = b.max(e));
        (a, b)
    };
    (0..n.div_ceil(chunk))
        .into_par_iter()
        .map(|c| {
            let (mut col, mut norm) = (vec![0.0f64; d], vec![0.0f64; sets.len()]);
            for i in c * chunk..((c + 1) * chunk).min(n) {
                let row = x.row(i);
                for (m, v) in col.iter_mut().zip(row.iter()) {
                    *m = m.max(v.abs());
                }
                for (m, set) in norm.iter_mut().zip(sets) {
                    *m = m.max(norm2(set.iter().map(|&l| &row[l])));
                }
            }
            (col, norm)
        })
        .reduce(|| (vec![0.0; d], vec![0.0; sets.len()]), merge)
}

/// A block norm computed in a few operations, rounded up: `16u` relative, and in the subnormal
/// range (where those operations round absolutely) `16` units of `2^-1074` more.
fn block_up(b: f64) -> f64 {
    let b = b * (1.0 + 16.0 * U);
    if b > 0.0 && b < TINY {
        b + 16.0 * ETA
    } else {
        b
    }
}

/// Upper bound on the spectral norm of a row-major `m x n` block: exact for blocks up to 2x2.
fn spectral_bound(mat: &[f64], m: usize, n: usize) -> f64 {
    if m <= 2 && n <= 2 {
        let at = |i: usize, j: usize| if i < m && j < n { mat[i * n + j] } else { 0.0 };
        let (a, b, c, d) = (at(0, 0), at(0, 1), at(1, 0), at(1, 1));
        return 0.5 * ((a + d).hypot(c - b) + (a - d).hypot(c + b));
    }
    let fro = norm2(mat.iter());
    let norm1 = (0..n)
        .map(|j| (0..m).map(|i| mat[i * n + j].abs()).sum::<f64>())
        .fold(0.0, f64::max);
    let norm_inf = (0..m)
        .map(|i| mat[i * n..(i + 1) * n].iter().map(|x| x.abs()).sum::<f64>())
        .fold(0.0, f64::max);
    fro.min((norm1 * norm_inf).sqrt())
}

/// `R >= max_ij |M_ij|` for one head: the smaller of the spectral-norm bound (per block of the
/// support) and the sum over S of infinity norms. See [`WNorms`] and [`ScoreBound`].
pub fn bound_r(
    q: ArrayView2<f64>,
    k: ArrayView2<f64>,
    scale: f64,
    support: &[(usize, usize)],
    seqs: ArrayView2<f64>,
    factor: &[f64],
) -> Result<f64> {
    if q.ncols() != k.ncols() {
        return Err(Error::Value(format!(
            "k: expected {} columns like q, got {}",
            q.ncols(),
            k.ncols()
        )));
    }
    Ok(WNorms::new(q.ncols(), support, seqs, factor)?
        .bound(support, q, k, scale)
        .r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::rng;
    use ndarray::Array2;

    /// Subnormal keys (1e-310) under a table entry of 1e300 give a normal score (1e-10 here):
    /// the bound must dominate it, though `||k||_2` computed by squares underflows to 0.
    #[test]
    fn score_bound_dominates_scores_of_subnormal_keys() {
        let support = vec![(0, 0), (0, 1), (1, 0), (1, 1)];
        let seqs = Array2::from_shape_vec((4, 1), vec![1e-310, 1e300, 1e-310, 1e-310]).unwrap();
        let q = Array2::from_shape_vec((1, 2), vec![1.0, 1e-310]).unwrap();
        for kv in [1e-310, 3e-320, 1e-160] {
            let k = Array2::from_elem((1, 2), kv);
            let b = WNorms::new(2, &support, seqs.view(), &[1.0])
                .unwrap()
                .bound(&support, q.view(), k.view(), 1.0);
            let m = 1e300 * kv; // q_0 W_01 k_1, the largest term
            assert!(
                b.r >= m,
                "k = {kv:e}: R = {:e} below the score {m:e} ({b:?})",
                b.r
            );
            assert!(b.spectral >= m && b.blocks >= m && b.r_abs >= m, "{b:?}");
        }
        // Ordinary magnitudes: bit for bit the plain formulas.
        let x = [0.3, -1.25, 2.0];
        assert_eq!(norm2(x.iter()), x.iter().map(|v| v * v).sum::<f64>().sqrt());
        assert_eq!(mul_up(0.3, 1.7), 0.3 * 1.7);
        assert!(mul_up(1e-300, 1e-10) >= 1e-310 && mul_up(1e-200, 1e-200) > 0.0);
    }

    #[test]
    fn score_bound_dominates_every_score() {
        let (d, nq, nk) = (6, 17, 23);
        let glen = nq + nk - 1;
        let mut u = rng(7);
        let q = Array2::from_shape_fn((nq, d), |_| u());
        let k = Array2::from_shape_fn((nk, d), |_| 2.0 * u());
        // Rotary-like blocks on (0,1), (2,3) plus a scattered 1x2 block on row 4.
        let support = vec![
            (0, 0),
            (0, 1),
            (1, 0),
            (1, 1),
            (2, 2),
            (2, 3),
            (3, 2),
            (3, 3),
            (4, 5),
            (4, 4),
        ];
        let seqs = Array2::from_shape_fn((support.len(), glen), |_| u());
        let factor: Vec<f64> = (0..glen)
            .map(|g| if g % 3 == 0 { 0.0 } else { 1.0 })
            .collect();
        let wn = WNorms::new(d, &support, seqs.view(), &factor).unwrap();
        assert_eq!(wn.blocks.len(), 3);
        let b = wn.bound(&support, q.view(), k.view(), 0.7);
        let mut max_m: f64 = 0.0;
        for i in 0..nq {
            for j in 0..nk {
                let g = j + nq - 1 - i;
                if factor[g] > 0.0 {
                    let m: f64 = support
                        .iter()
                        .enumerate()
                        .map(|(s, &(a, c))| q[[i, a]] * seqs[[s, g]] * k[[j, c]])
                        .sum();
                    max_m = max_m.max((0.7 * m).abs());
                }
            }
        }
        assert!(max_m <= b.r && b.r <= b.r_abs && b.r <= b.spectral && b.r <= b.blocks);
        // Exact 2x2 singular value: a rotation has norm 1.
        let (c, s) = (0.3f64.cos(), 0.3f64.sin());
        assert!((spectral_bound(&[c, s, -s, c], 2, 2) - 1.0).abs() < 1e-15);
        assert!(matches!(
            bound_r(
                q.view(),
                k.view(),
                1.0,
                &[(6, 0)],
                seqs.slice(ndarray::s![..1, ..]),
                &factor
            ),
            Err(Error::Value(_))
        ));
    }
}
