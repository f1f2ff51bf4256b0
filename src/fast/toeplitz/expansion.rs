//! The expansion of `p(M) ∘ F` into rescaled Toeplitz terms (docs/DESIGN.md §5.3-5.4).
//!
//! With `a_s = scale q[i,l1_s] w_s(δ) k[j,l2_s]` and `p(x) = Σ_t c_t x^t`, the multinomial
//! theorem gives, over multisets `τ` of `S` with multiplicities `m_s` and `|τ| = Σ m_s <= g`,
//!
//! ```text
//! p(M_ij) f(δ) = Σ_τ γ_τ q_i^α(τ) c_τ(δ) k_j^β(τ),
//! γ_τ = c_|τ| (|τ|! / Π_s m_s!) scale^|τ|,   α(τ) = Σ_s m_s e_{l1_s},   β(τ) = Σ_s m_s e_{l2_s},
//! c_τ(δ) = f(δ) Π_s w_s(δ)^{m_s}.
//! ```
//!
//! `α` and `β` are multi-indices over the `d` coordinates (entries of S sharing a row `l1` add
//! up in `α`), `q^α = Π_l q[:,l]^{α_l}`. The factor `f = exp(b)` (0 where masked) multiplies
//! *every* term, the all-ones term `τ = ∅` included: masking only the `w_s` would mask `M`, not
//! `p(M)`, and give masked pairs weight `p(0) ≈ 1`. Terms with equal `(α, β)` merge into one
//! Toeplitz kernel `C_αβ = Σ γ_τ c_τ`, which depends on W, scale, mask/bias and p only.
//!
//! There are `C(|S| + g, g)` terms; we refuse beyond a limit rather than enumerate them.

use crate::error::{Error, Result};
use crate::fast::common::ExpansionCounts;
use ndarray::{Array2, ArrayView2};
use std::collections::HashMap;
use std::ops::Range;

/// One `(α, β)` group: its terms are `terms[range]` of the expansion.
#[derive(Clone, Debug, PartialEq)]
pub struct Pair {
    pub alpha: usize,
    pub beta: usize,
    terms: Range<usize>,
}

#[derive(Clone, Debug, PartialEq)]
struct Term {
    gamma: f64,
    /// `(s, m_s)` with `m_s > 0`, as a range of `Expansion::factors`.
    factors: Range<usize>,
}

/// The enumerated expansion: multi-indices, `(α, β)` pairs sorted by `α` then `β`, and terms.
#[derive(Clone, Debug, PartialEq)]
pub struct Expansion {
    pub d: usize,
    pub degree: usize,
    /// `α`s: multi-indices over the `d` coordinates of q.
    pub alphas: Vec<Vec<u16>>,
    /// `β`s: multi-indices over the `d` coordinates of k.
    pub betas: Vec<Vec<u16>>,
    pub pairs: Vec<Pair>,
    terms: Vec<Term>,
    factors: Vec<(usize, u16)>,
}

/// `C(n + g, g)` in f64 (exact well past any limit we accept).
pub fn term_count(n_support: usize, degree: usize) -> f64 {
    (1..=degree).fold(1.0, |acc, t| acc * (n_support + t) as f64 / t as f64)
}

impl Expansion {
    /// Enumerates the expansion of `Σ_t coeffs[t] (Σ_s a_s)^t` for `support` on `d` coordinates.
    /// With `grouped = false` every term is its own pair (the test twin of the grouping).
    pub fn build(
        support: &[(usize, usize)],
        d: usize,
        coeffs: &[f64],
        scale: f64,
        grouped: bool,
        max_terms: usize,
    ) -> Result<Self> {
        let ns = support.len();
        let degree = coeffs.len().saturating_sub(1);
        if coeffs.is_empty() {
            return Err(Error::Value(
                "polynomial: expected at least one coefficient, got none".into(),
            ));
        }
        if let Some(&(a, b)) = support.iter().find(|&&(a, b)| a >= d || b >= d) {
            return Err(Error::Value(format!(
                "support: expected entries < d = {d}, got ({a}, {b})"
            )));
        }
        if degree > u16::MAX as usize {
            return Err(Error::Value(format!(
                "degree: expected at most {}, got {degree}",
                u16::MAX
            )));
        }
        let count = term_count(ns, degree);
        if count > max_terms as f64 {
            return Err(Error::Approximation(format!(
                "fast method: degree {degree} on |S| = {ns} support entries expands into C({}, {degree}) = {count:.3e} terms, \
                 more than the limit of {max_terms}; the work grows like that count (exponential in |S| and the degree), \
                 so the exact method is the better choice here",
                ns + degree
            )));
        }
        let mut fact = vec![1.0f64; degree + 1];
        for t in 1..=degree {
            fact[t] = fact[t - 1] * t as f64;
        }
        let mut alpha_ix: HashMap<Vec<u16>, usize> = HashMap::new();
        let mut beta_ix: HashMap<Vec<u16>, usize> = HashMap::new();
        let (mut alphas, mut betas) = (Vec::new(), Vec::new());
        let mut pair_ix: HashMap<(usize, usize), usize> = HashMap::new();
        // Per pair: (alpha, beta, [(gamma, factors)]).
        type Group = (usize, usize, Vec<(f64, Vec<(usize, u16)>)>);
        let mut groups: Vec<Group> = Vec::new();
        let intern =
            |map: &mut HashMap<Vec<u16>, usize>, list: &mut Vec<Vec<u16>>, key: Vec<u16>| {
                *map.entry(key.clone()).or_insert_with(|| {
                    list.push(key);
                    list.len() - 1
                })
            };
        for t in 0..=degree {
            if ns == 0 && t > 0 {
                break;
            }
            // Multisets of size t as non-decreasing index sequences.
            let mut seq = vec![0usize; t];
            loop {
                let mut fs: Vec<(usize, u16)> = Vec::new();
                for &s in &seq {
                    match fs.last_mut() {
                        Some(last) if last.0 == s => last.1 += 1,
                        _ => fs.push((s, 1)),
                    }
                }
                let (mut alpha, mut beta) = (vec![0u16; d], vec![0u16; d]);
                let mut multinomial = fact[t];
                for &(s, m) in &fs {
                    alpha[support[s].0] += m;
                    beta[support[s].1] += m;
                    multinomial /= fact[m as usize];
                }
                let gamma = coeffs[t] * multinomial * scale.powi(t as i32);
                let a = intern(&mut alpha_ix, &mut alphas, alpha);
                let b = intern(&mut beta_ix, &mut betas, beta);
                let p = if grouped {
                    *pair_ix.entry((a, b)).or_insert_with(|| {
                        groups.push((a, b, Vec::new()));
                        groups.len() - 1
                    })
                } else {
                    groups.push((a, b, Vec::new()));
                    groups.len() - 1
                };
                groups[p].2.push((gamma, fs));
                // Next sequence: bump the rightmost entry that can grow, reset the tail to it.
                match (0..t).rev().find(|&i| seq[i] + 1 < ns) {
                    Some(i) => {
                        let v = seq[i] + 1;
                        seq[i..].iter_mut().for_each(|x| *x = v);
                    }
                    None => break,
                }
            }
        }
        groups.sort_by_key(|g| (g.0, g.1));
        let (mut pairs, mut terms, mut factors) =
            (Vec::with_capacity(groups.len()), Vec::new(), Vec::new());
        for (alpha, beta, ts) in groups {
            let start = terms.len();
            for (gamma, fs) in ts {
                let f0 = factors.len();
                factors.extend(fs);
                terms.push(Term {
                    gamma,
                    factors: f0..factors.len(),
                });
            }
            pairs.push(Pair {
                alpha,
                beta,
                terms: start..terms.len(),
            });
        }
        Ok(Expansion {
            d,
            degree,
            alphas,
            betas,
            pairs,
            terms,
            factors,
        })
    }

    pub fn counts(&self) -> ExpansionCounts {
        let mut per_alpha = vec![0usize; self.alphas.len()];
        self.pairs.iter().for_each(|p| per_alpha[p.alpha] += 1);
        ExpansionCounts {
            terms: self.terms.len(),
            n_alpha: self.alphas.len(),
            n_beta: self.betas.len(),
            n_pairs: self.pairs.len(),
            max_betas_per_alpha: per_alpha.into_iter().max().unwrap_or(0),
            max_terms_per_pair: self.pairs.iter().map(|p| p.terms.len()).max().unwrap_or(0),
        }
    }

    /// Pairs with this `α` (pairs are sorted by `α`).
    pub fn pairs_of_alpha(&self, alpha: usize) -> Range<usize> {
        let lo = self.pairs.partition_point(|p| p.alpha < alpha);
        let hi = self.pairs.partition_point(|p| p.alpha <= alpha);
        lo..hi
    }

    /// The kernel `C_αβ(g) = factor[g] Σ_τ γ_τ Π_s seqs[s,g]^{m_s}` of one pair into `out`
    /// (`glen`), with `seqs` row-major `|S| x glen` and `tmp` a `glen` scratch. Returns
    /// `Σ_g Σ_τ |γ_τ c_τ(g)|`, the size the kernel's own rounding is relative to.
    pub fn kernel(
        &self,
        pair: usize,
        seqs: &[f64],
        factor: &[f64],
        out: &mut [f64],
        tmp: &mut [f64],
    ) -> f64 {
        let glen = factor.len();
        let mut mass = 0.0;
        out.iter_mut().for_each(|x| *x = 0.0);
        for term in &self.terms[self.pairs[pair].terms.clone()] {
            tmp.iter_mut()
                .zip(factor)
                .for_each(|(t, f)| *t = term.gamma * f);
            for &(s, m) in &self.factors[term.factors.clone()] {
                let row = &seqs[s * glen..(s + 1) * glen];
                let m = m as i32;
                tmp.iter_mut().zip(row).for_each(|(t, w)| *t *= w.powi(m));
            }
            out.iter_mut().zip(tmp.iter()).for_each(|(o, t)| *o += t);
            mass += tmp.iter().map(|t| t.abs()).sum::<f64>();
        }
        mass
    }

    /// Number of terms merged into a pair's kernel.
    pub fn terms_of_pair(&self, pair: usize) -> usize {
        self.pairs[pair].terms.len()
    }

    /// Monomials `x^μ` for each multi-index `μ` of `indices` (`alphas` or `betas`): a
    /// row-major `n_index x n` array for `x`: `n x d`.
    pub fn monomials(indices: &[Vec<u16>], x: ArrayView2<f64>) -> Array2<f64> {
        let n = x.nrows();
        let mut out = Array2::<f64>::ones((indices.len(), n));
        for (mu, mut row) in indices.iter().zip(out.rows_mut()) {
            for (l, &e) in mu.iter().enumerate() {
                if e > 0 {
                    let col = x.column(l);
                    row.iter_mut()
                        .zip(col.iter())
                        .for_each(|(o, v)| *o *= v.powi(e as i32));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_the_combinatorics() {
        // Rotary, d = 2: S = 2x2 block; α and β are compositions of t into 2 parts.
        let s2 = [(0, 0), (0, 1), (1, 0), (1, 1)];
        let e = Expansion::build(&s2, 2, &[1.0; 7], 1.0, true, 1 << 20).unwrap();
        let c = e.counts();
        assert_eq!(c.terms, term_count(4, 6) as usize);
        assert_eq!(c.terms, 210);
        assert_eq!(c.n_alpha, 28);
        assert_eq!(c.n_pairs, (1..=7).map(|m| m * m).sum::<usize>());
        // d = 4 rotary: two blocks; pairs = Σ_{t1+t2<=g} (t1+1)^2 (t2+1)^2.
        let s4: Vec<(usize, usize)> = (0..2)
            .flat_map(|m| {
                [
                    (2 * m, 2 * m),
                    (2 * m, 2 * m + 1),
                    (2 * m + 1, 2 * m),
                    (2 * m + 1, 2 * m + 1),
                ]
            })
            .collect();
        let e4 = Expansion::build(&s4, 4, &[1.0; 7], 1.0, true, 1 << 20).unwrap();
        assert_eq!(e4.counts().n_pairs, 2058);
        assert_eq!(e4.counts().n_alpha, 210);
        let u = Expansion::build(&s2, 2, &[1.0; 7], 1.0, false, 1 << 20).unwrap();
        assert_eq!(u.counts().n_pairs, 210);
        assert!(matches!(
            Expansion::build(&s4, 4, &[1.0; 30], 1.0, true, 1000),
            Err(Error::Approximation(_))
        ));
        // Empty support: only the constant term.
        let e0 = Expansion::build(&[], 3, &[1.0, 1.0], 1.0, true, 10).unwrap();
        assert_eq!((e0.counts().terms, e0.counts().n_pairs), (1, 1));
    }

    /// Dense reconstruction `Σ_pairs q^α C_αβ(g) k^β` equals `p(M) f` entry by entry, for the
    /// grouped and the ungrouped expansion alike.
    #[test]
    fn grouped_and_ungrouped_expansions_reproduce_p_of_m() {
        let (nq, nk, d) = (5, 6, 3);
        let glen = nq + nk - 1;
        let support = [(0, 1), (1, 1), (2, 0), (0, 0), (2, 2)];
        let val = |a: usize, b: usize| ((a * 7 + b * 3) % 11) as f64 / 11.0 - 0.5;
        let q = Array2::from_shape_fn((nq, d), |(i, l)| val(i, l));
        let k = Array2::from_shape_fn((nk, d), |(j, l)| val(l + 3, j));
        let seqs: Vec<f64> = (0..support.len() * glen).map(|x| val(x, x / 3)).collect();
        let factor: Vec<f64> = (0..glen)
            .map(|g| if g == 2 { 0.0 } else { 1.0 + g as f64 * 0.1 })
            .collect();
        let coeffs = [1.0, 0.9, 0.45, 0.2, 0.03];
        let scale = 0.8;
        let p = |x: f64| coeffs.iter().rev().fold(0.0, |a, c| a * x + c);
        for grouped in [true, false] {
            let e = Expansion::build(&support, d, &coeffs, scale, grouped, 1 << 20).unwrap();
            let qa = Expansion::monomials(&e.alphas, q.view());
            let kb = Expansion::monomials(&e.betas, k.view());
            let mut kernels = vec![vec![0.0; glen]; e.pairs.len()];
            let mut tmp = vec![0.0; glen];
            for (pi, kern) in kernels.iter_mut().enumerate() {
                e.kernel(pi, &seqs, &factor, kern, &mut tmp);
            }
            for i in 0..nq {
                for j in 0..nk {
                    let g = j + nq - 1 - i;
                    let m: f64 = support
                        .iter()
                        .enumerate()
                        .map(|(s, &(a, b))| q[[i, a]] * seqs[s * glen + g] * k[[j, b]])
                        .sum();
                    let want = p(scale * m) * factor[g];
                    let got: f64 = e
                        .pairs
                        .iter()
                        .zip(&kernels)
                        .map(|(pr, kern)| qa[[pr.alpha, i]] * kern[g] * kb[[pr.beta, j]])
                        .sum();
                    assert!(
                        (got - want).abs() < 1e-13,
                        "grouped={grouped} ({i},{j}): {got} vs {want}"
                    );
                }
            }
        }
    }
}
