//! The fast method for RoPE without Toeplitz products: a low-rank feature map.
//!
//! For [`RotaryW`], `W_δ = R(p_i θ)^T R(p'_j θ)`: a rotation by the relative angle is the product
//! of the rotations by the absolute ones. With `x_i = scale f² R(p_i θ) q_i` and
//! `y_j = R(p'_j θ) k_j` (each pair `(a, b)` of coordinates turned by `ψ`:
//! `(a cos ψ - b sin ψ, a sin ψ + b cos ψ)`), `M_ij = x_i · y_j`, and the polynomial
//! `p(M) = Σ_t c_t M^t` is a rank-`r` matrix, `r = C(d + g, g)`:
//!
//! ```text
//! p(x_i · y_j) = Σ_{|α| <= g} [c_|α| (|α| choose α) x_i^α] y_j^α = Φq(x_i) · Φk(y_j).
//! ```
//!
//! Without a mask, `Ã [V, 1] = Φq (Φkᵀ [V, 1])`: two GEMMs, `O(n r (d_v + 1))`. With a causal
//! mask the query rows run in blocks: keys visible to every row of a block enter through a
//! running state `S = Σ_j Φk(y_j)ᵀ [v_j, 1]` (`r x (d_v + 1)`), the few partially visible keys
//! through `p(M)` itself. Memory is `O(block r + r d_v)` besides the outputs: no kernel spectra.
//! Windows and biases (and general `W`) keep the Toeplitz path ([`super::forward`]).
//!
//! # Certificate
//!
//! The polynomial's part is the Toeplitz path's: `|Õ - O| <= 2ρ/(1-ρ) max|v|` for `|p - exp|
//! <= ρ exp` on `[-R, R]`. Rounding (f64): the computed `x̂`, `ŷ` give scores `M̂` with
//! `|M̂ - M| <= R₂ (γ_{d+2} + 2u (ψ_max + 6))` (`R₂ = scale f² max|q_i| max|k_j| >= Σ_l |x_l
//! y_l|`, `ψ_max` the largest angle, whose rounding moves the rotation), hence `|p(M̂) - p(M)| <=
//! P'(R₂) |M̂ - M|` with `P(x) = Σ |c_t| x^t`; every sum the method forms (GEMMs in any order,
//! features by products, Horner on the diagonal blocks) is a sum of at most `N = n_k + r + 2g +
//! block + d + 16` rounded products of terms whose magnitudes add up to at most
//! `n_vis P(R₂) max|v|` per entry, so each numerator/denominator entry is off by at most
//! `n_vis E max|v|`, `E = γ_N P(R₂) + P'(R₂) |M̂ - M|`. With every denominator at least
//! `L n_vis`, `L = (1-ρ) e^{-R}`: `|out error| <= 2 E V / (L - E) + 2u V`.

use super::bounds::FastBounds;
use super::certify::{FastPlan, FastShape};
use super::expansion::ExpansionCounts;
use super::{FastLimits, FastOutput, FastReport};
use crate::error::{Error, Result};
use crate::poly::{chebyshev, taylor, Polynomial, MAX_DEGREE, U};
use crate::position::RotaryW;
use crate::problem::Control;
use ndarray::{s, Array1, Array2, ArrayView2};
use rayon::prelude::*;
use std::collections::HashMap;

use super::lowrank_backward::{chunk_len, chunk_ranges, consecutive, range_sums, scan};

/// Query rows per block (and the largest number of partially visible keys per block).
pub const BLOCK: usize = 256;

/// Rows per block of the low-rank forward with a causal mask: each row meets up to a block of
/// keys through `p(M)` directly (about `block (d + g + dv + 1)` flops on average) against
/// `4 r (dv + 1)` through the states; a multiple of 16 in `32..=BLOCK`.
pub fn forward_block(r: f64, d: usize, g: usize, dv: usize) -> usize {
    let cols = (dv + 1) as f64;
    let balance = 4.0 * r * cols / (d as f64 + g as f64 + cols);
    ((balance / 16.0).ceil() as usize * 16).clamp(32, BLOCK)
}

/// What a low-rank plan needs beyond [`FastPlan`]: the bounds its rounding certificate used.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LowRank {
    /// `R₂ >= scale f² max|q_i| max|k_j|`.
    pub r2: f64,
    /// Largest rotation angle `max |p| max θ`.
    pub psi_max: f64,
    /// Causal shift `c = q_offset - k_offset` (query `i` sees keys `j <= i + c`), or None.
    pub causal_shift: Option<i64>,
}

/// `C(d + g, g)`, as f64 (no overflow for large `d`).
pub fn feature_count(d: usize, g: usize) -> f64 {
    (1..=g).fold(1.0, |acc, t| acc * (d + t) as f64 / t as f64)
}

/// `γ_n = n u / (1 - n u)`.
pub(crate) fn gamma(n: f64) -> f64 {
    let nu = n * U;
    if nu >= 0.5 {
        f64::INFINITY
    } else {
        nu / (1.0 - nu)
    }
}

/// `P(x) = Σ |c_t| x^t` and `P'(x) = Σ t |c_t| x^(t-1)` for `x >= 0`.
pub(crate) fn abs_evals(coeffs: &[f64], x: f64) -> (f64, f64) {
    let p = coeffs.iter().rev().fold(0.0, |acc, c| acc * x + c.abs());
    let dp = coeffs
        .iter()
        .enumerate()
        .skip(1)
        .rev()
        .fold(0.0, |acc, (t, c)| acc * x + t as f64 * c.abs());
    (p, dp)
}

/// `(E, L)` of the module docs for `poly`: each numerator/denominator entry is off by at most
/// `n_vis E max|v|` (resp. `n_vis E`), and every denominator is at least `n_vis L`.
fn rounding_parts(poly: &Polynomial, shape: FastShape, r: f64, lr: &LowRank) -> (f64, f64) {
    let g = poly.degree;
    let feats = feature_count(shape.d, g);
    let n = shape.nk as f64 + feats + (2 * g + BLOCK + shape.d + 16) as f64;
    let r2 = lr.r2 * (1.0 + 1e-9);
    let (p_abs, dp_abs) = abs_evals(&poly.coeffs, r2);
    let dm = r2 * (gamma((shape.d + 2) as f64) + 2.0 * U * (lr.psi_max + 6.0));
    let e = gamma(n) * p_abs + dp_abs * dm;
    let l = (1.0 - poly.rho) * (-r).exp();
    (e, l)
}

/// The rounding share of the certificate for `poly` (see the module docs); `inf` when the
/// denominators cannot be bounded away from 0.
pub fn rounding_error(poly: &Polynomial, shape: FastShape, r: f64, lr: &LowRank, v: f64) -> f64 {
    let (e, l) = rounding_parts(poly, shape, r, lr);
    if e.is_nan() || e >= l {
        return f64::INFINITY;
    }
    2.0 * e * v / (l - e) + 2.0 * U * v
}

/// A certified low-rank plan for `shape` with `bounds` (`R`, `max|v|`), or the reason there is
/// none: the least degree whose polynomial error plus rounding meets `eps`, within
/// `limits.max_terms` features.
pub fn lowrank_plan(
    shape: FastShape,
    bounds: &FastBounds,
    lr: LowRank,
    eps: f64,
    limits: &FastLimits,
) -> Result<FastPlan> {
    if eps.is_nan() || eps <= 0.0 {
        return Err(Error::Approximation(
            "fast method: eps = 0 asks for exact results".into(),
        ));
    }
    let (r, v) = (bounds.r, bounds.v_max);
    let max_degree = limits.max_degree.min(MAX_DEGREE);
    let mut why = String::from("no degree tried");
    for degree in 0..=max_degree {
        let feats = feature_count(shape.d, degree);
        if feats > limits.max_terms as f64 {
            why = format!(
                "degree {degree} needs C({} + {degree}, {degree}) = {feats:.3e} features, more \
                 than the limit of {}",
                shape.d, limits.max_terms
            );
            break;
        }
        let t = taylor(r, degree)?;
        let c = chebyshev(r, degree)?;
        let poly = if c.rho < t.rho { c } else { t };
        if poly.rho.is_nan() || poly.rho >= 1.0 {
            continue;
        }
        let approximation = v * 2.0 * poly.rho / (1.0 - poly.rho);
        let rounding = rounding_error(&poly, shape, r, &lr, v);
        let certified = approximation + rounding;
        if certified <= eps {
            let feats = feats as usize;
            let rows = BLOCK.min(shape.nq.max(1));
            let cols = shape.dv + 1;
            // features (q and k), the state and its products, the diagonal blocks
            let mut flops = 4.0 * (shape.nq + shape.nk) as f64 * feats as f64
                + 2.0 * (shape.nq + shape.nk) as f64 * feats as f64 * cols as f64;
            if lr.causal_shift.is_some() {
                flops += shape.nq as f64
                    * forward_block(feats as f64, shape.d, degree, shape.dv) as f64
                    * (2.0 * shape.d as f64 + 2.0 * degree as f64 + 2.0 * cols as f64);
            }
            // per chunk in flight (at most 8): block buffers and its prefix state; the
            // numerators
            let chunks = 8usize.min(shape.nq.div_ceil(4 * BLOCK)).max(1);
            let working_bytes =
                8 * chunks * (2 * rows * feats + 2 * feats * cols + rows * BLOCK + rows * cols)
                    + 8 * (shape.nq + shape.nk) * shape.d
                    + 16 * shape.nq * cols;
            let (e, l) = rounding_parts(&poly, shape, r, &lr);
            // |ln l̃ - ln l| <= -ln(1-ρ); the computed denominator is off by a factor within
            // 1 ± E/(L-E); the logarithm adds a few units of rounding
            let lse_error = -(1.0 - poly.rho).ln() + 2.0 * e / (l - e) + 64.0 * U;
            return Ok(FastPlan {
                shape,
                bounds: *bounds,
                poly,
                counts: ExpansionCounts {
                    terms: feats,
                    n_alpha: feats,
                    n_beta: feats,
                    n_pairs: feats,
                    max_betas_per_alpha: 1,
                    max_terms_per_pair: 1,
                },
                fft_len: 0,
                column_tile: cols,
                flops,
                kernel_flops: 0.0,
                working_bytes,
                kernel_bytes: 0,
                eps,
                approximation_error: approximation,
                rounding_error: rounding,
                certified_error: certified,
                certified_lse_error: lse_error,
                lowrank: Some(lr),
            });
        }
        why = format!(
            "degree {degree} ({} features) certifies only {certified:.3e} > eps = {eps:.3e}",
            feats as usize
        );
    }
    Err(Error::Approximation(format!(
        "fast method (low-rank): cannot certify eps: {why}"
    )))
}

/// `mul R(ψ_i) x_i` with `ψ_i = (start + i) θ` per pair: `x = rotate(q, c, scale f²)` and
/// `y = rotate(k, 0, 1)` give `M_ij = x_i · y_j` (see the module docs; any sign of `scale`).
pub fn rotate(rot: &RotaryW, x: ArrayView2<f64>, start: i64, mul: f64) -> Array2<f64> {
    let mut out = Array2::zeros(x.raw_dim());
    for (i, row) in x.outer_iter().enumerate() {
        let pos = (start + i as i64) as f64;
        for (m, &(p, r)) in rot.pairs.iter().enumerate() {
            let (sn, cs) = (pos * rot.theta[m]).sin_cos();
            let (a, b) = (row[p], row[r]);
            out[[i, p]] = mul * (a * cs - b * sn);
            out[[i, r]] = mul * (a * sn + b * cs);
        }
    }
    out
}

/// The transpose of [`rotate`]: `mul R(ψ_i)^T g_i` with `ψ_i = (start + i) θ` per pair (the
/// chain rule back from rotated coordinates: `dq = rotate_back(dx, c, scale f²)`).
pub fn rotate_back(rot: &RotaryW, g: ArrayView2<f64>, start: i64, mul: f64) -> Array2<f64> {
    let mut out = Array2::zeros(g.raw_dim());
    for (i, row) in g.outer_iter().enumerate() {
        let pos = (start + i as i64) as f64;
        for (m, &(p, r)) in rot.pairs.iter().enumerate() {
            let (sn, cs) = (pos * rot.theta[m]).sin_cos();
            let (a, b) = (row[p], row[r]);
            out[[i, p]] = mul * (a * cs + b * sn);
            out[[i, r]] = mul * (b * cs - a * sn);
        }
    }
    out
}

/// The monomials `x^α`, `|α| <= g`, built one product at a time, with the weights
/// `c_|α| (|α| choose α)` of the query side.
pub(crate) struct Features {
    /// `(parent, coordinate)`: monomial `m` is monomial `parent` times `x[coordinate]`.
    pub(crate) steps: Vec<(usize, usize)>,
    pub(crate) weight: Vec<f64>,
}

impl Features {
    pub(crate) fn new(d: usize, poly: &Polynomial) -> Self {
        let mut index: HashMap<Vec<usize>, usize> = HashMap::new();
        let mut list: Vec<Vec<usize>> = vec![Vec::new()];
        index.insert(Vec::new(), 0);
        let mut steps = vec![(0, 0)];
        let mut weight = vec![poly.coeffs[0]];
        let mut layer: Vec<Vec<usize>> = vec![Vec::new()];
        for t in 1..=poly.degree {
            let mut next = Vec::new();
            for combo in &layer {
                let from = combo.last().copied().unwrap_or(0);
                for l in from..d {
                    let mut c = combo.clone();
                    c.push(l);
                    let parent = index[combo];
                    index.insert(c.clone(), list.len());
                    steps.push((parent, l));
                    // t! / Π α_l!
                    let mut counts = vec![0usize; d];
                    for &x in &c {
                        counts[x] += 1;
                    }
                    let denom: f64 = counts
                        .iter()
                        .map(|&a| (1..=a).map(|x| x as f64).product::<f64>())
                        .product();
                    let multinom = (1..=t).map(|x| x as f64).product::<f64>() / denom;
                    weight.push(poly.coeffs[t] * multinom);
                    list.push(c.clone());
                    next.push(c);
                }
            }
            layer = next;
        }
        Features { steps, weight }
    }

    pub(crate) fn len(&self) -> usize {
        self.steps.len()
    }

    /// `rows x r` monomials of `x` (weighted for the query side).
    pub(crate) fn fill(&self, x: ArrayView2<f64>, weighted: bool) -> Array2<f64> {
        let r = self.len();
        let d = x.ncols();
        let mut f = Array2::zeros((x.nrows(), r));
        let mut xr = vec![0.0; d];
        let fs = f
            .as_slice_mut()
            .expect("a fresh array is in standard layout");
        for (row, fr) in x.outer_iter().zip(fs.chunks_exact_mut(r.max(1))) {
            xr.iter_mut().zip(row).for_each(|(a, &b)| *a = b);
            fr[0] = 1.0;
            for (m, &(parent, l)) in self.steps.iter().enumerate().skip(1) {
                fr[m] = fr[parent] * xr[l];
            }
            if weighted {
                fr.iter_mut().zip(&self.weight).for_each(|(a, &w)| *a *= w);
            }
        }
        f
    }

    /// `Σ_{i in rows} Φ(x_i) w_i^T` (`r x w.ncols()`), `blk` rows of features at a time, polling
    /// `ctl` between blocks: the running states of the low-rank forward and backward.
    pub(crate) fn state(
        &self,
        x: ArrayView2<f64>,
        w: ArrayView2<f64>,
        weighted: bool,
        rows: std::ops::Range<usize>,
        blk: usize,
        ctl: &Control,
    ) -> Result<Array2<f64>> {
        let mut st = Array2::zeros((self.len(), w.ncols()));
        for r0 in rows.clone().step_by(blk.max(1)) {
            ctl.check()?;
            let r1 = (r0 + blk).min(rows.end);
            let f = self.fill(x.slice(s![r0..r1, ..]), weighted);
            st += &f.t().dot(&w.slice(s![r0..r1, ..]));
        }
        Ok(st)
    }

    /// Row by row, the gradient `Σ_m coef[m] ∂(x^α_m)/∂x` (`rows x d`), with `mono` the
    /// unweighted monomials of `x` ([`Features::fill`] with `weighted = false`): reverse mode
    /// through the product steps, so each entry is a sum of products `coef[m] α_l x^{α_m - e_l}`.
    pub(crate) fn backprop(
        &self,
        x: ArrayView2<f64>,
        mono: ArrayView2<f64>,
        coef: ArrayView2<f64>,
    ) -> Array2<f64> {
        let d = x.ncols();
        let mut out = Array2::zeros(x.raw_dim());
        let mut adj = vec![0.0; self.len()];
        let (mut mr, mut xr, mut gr) = (vec![0.0; self.len()], vec![0.0; d], vec![0.0; d]);
        for (i, row) in x.outer_iter().enumerate() {
            adj.iter_mut().zip(coef.row(i)).for_each(|(a, &c)| *a = c);
            mr.iter_mut().zip(mono.row(i)).for_each(|(a, &c)| *a = c);
            xr.iter_mut().zip(row).for_each(|(a, &b)| *a = b);
            gr.iter_mut().for_each(|g| *g = 0.0);
            for (m, &(parent, l)) in self.steps.iter().enumerate().skip(1).rev() {
                let a = adj[m];
                if a != 0.0 {
                    gr[l] += a * mr[parent];
                    adj[parent] += a * xr[l];
                }
            }
            out.row_mut(i)
                .iter_mut()
                .zip(&gr)
                .for_each(|(o, &g)| *o = g);
        }
        out
    }
}

/// `[V, 1]` (`nk x (dv + 1)`).
pub(crate) fn with_ones(v: ArrayView2<f64>) -> Array2<f64> {
    let (nk, dv) = v.dim();
    let mut vb = Array2::ones((nk, dv + 1));
    vb.slice_mut(s![.., ..dv]).assign(&v);
    vb
}

/// One head through the low-rank path: `x` (`nq x d`) and `y` (`nk x d`) rotated by
/// [`rotate`], `v` (`nk x dv`). Returns `out` and `lse` (`-inf` for rows with no visible key).
pub fn lowrank_head(
    plan: &FastPlan,
    x: ArrayView2<f64>,
    y: ArrayView2<f64>,
    v: ArrayView2<f64>,
    ctl: &Control,
) -> Result<FastOutput> {
    let lr = plan
        .lowrank
        .ok_or_else(|| Error::Value("lowrank_head: the plan is not a low-rank plan".into()))?;
    let (nq, nk, dv) = (x.nrows(), y.nrows(), v.ncols());
    let poly = &plan.poly;
    let feats = Features::new(x.ncols(), poly);
    let r = feats.len();
    let blk = forward_block(r as f64, x.ncols(), poly.degree, dv);
    let vb = with_ones(v);
    let cols = dv + 1;
    // query i sees keys j < visible(i)
    let visible = |i: usize| -> usize {
        match lr.causal_shift {
            None => nk,
            Some(c) => (i as i64 + c + 1).clamp(0, nk as i64) as usize,
        }
    };
    let zero = Array2::<f64>::zeros((r, cols));
    let key_state = |a: usize, b: usize| feats.state(y, vb.view(), false, a..b, blk, ctl);
    // Chunks of query blocks in parallel, each from the prefix state of the keys its first
    // block sees in full (the chunking depends on the shape only: the same bits for any thread
    // count); within a chunk, blocks in order.
    let qchunks = chunk_ranges(nq, blk);
    let kbounds: Vec<usize> = qchunks.iter().map(|&(i0, _)| visible(i0)).collect();
    let pieces = range_sums(&consecutive(&kbounds), nk, blk, &zero, &key_state)?;
    let prefix = scan(pieces, &zero, false);
    let mut acc = Array2::<f64>::zeros((nq, cols));
    let chunk = |(c, mut acc): (usize, ndarray::ArrayViewMut2<f64>)| -> Result<()> {
        let (c0, c1) = qchunks[c];
        let mut state = prefix[c].clone();
        let mut in_state = kbounds[c];
        for i0 in (c0..c1).step_by(blk) {
            ctl.check()?;
            let i1 = (i0 + blk).min(c1);
            let (full, last) = (visible(i0), visible(i1 - 1));
            if in_state < full {
                state += &key_state(in_state, full)?;
                in_state = full;
            }
            let fq = feats.fill(x.slice(s![i0..i1, ..]), true);
            let mut block = fq.dot(&state);
            if last > full {
                // partially visible keys: p(M) itself, masked
                let m = x
                    .slice(s![i0..i1, ..])
                    .dot(&y.slice(s![full..last, ..]).t());
                let pm = Array2::from_shape_fn(m.dim(), |(a, b)| {
                    if full + b < visible(i0 + a) {
                        poly.eval(m[[a, b]])
                    } else {
                        0.0
                    }
                });
                block += &pm.dot(&vb.slice(s![full..last, ..]));
            }
            acc.slice_mut(s![i0 - c0..i1 - c0, ..]).assign(&block);
        }
        Ok(())
    };
    let per = chunk_len(nq, blk);
    let jobs: Vec<(usize, ndarray::ArrayViewMut2<f64>)> = acc
        .axis_chunks_iter_mut(ndarray::Axis(0), per)
        .enumerate()
        .collect();
    jobs.into_par_iter().map(chunk).collect::<Result<()>>()?;
    let mut out = Array2::<f64>::zeros((nq, dv));
    let mut lse = Array1::<f64>::from_elem(nq, f64::NEG_INFINITY);
    for i in 0..nq {
        let seen = match lr.causal_shift {
            None => nk,
            Some(c) => (i as i64 + c + 1).clamp(0, nk as i64) as usize,
        };
        if seen == 0 {
            continue;
        }
        let den = acc[[i, dv]];
        if den.is_nan() || den <= 0.0 {
            return Err(Error::Approximation(format!(
                "fast method (low-rank): a denominator came out {den:e}; its certificate failed"
            )));
        }
        for c in 0..dv {
            out[[i, c]] = acc[[i, c]] / den;
        }
        lse[i] = den.ln();
    }
    Ok(FastOutput {
        out,
        lse,
        report: FastReport {
            degree: poly.degree,
            kind: poly.kind,
            r: plan.bounds.r,
            rho: poly.rho,
            terms: plan.counts.terms,
            n_alpha: plan.counts.n_alpha,
            n_beta: plan.counts.n_beta,
            n_pairs: plan.counts.n_pairs,
            fft_len: 0,
            certified_error: plan.certified_error,
            approximation_error: plan.approximation_error,
            rounding_error: plan.rounding_error,
            certified_lse_error: plan.certified_lse_error,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        }
        fn mat(&mut self, r: usize, c: usize, s: f64) -> Array2<f64> {
            Array2::from_shape_fn((r, c), |_| s * self.next())
        }
    }

    #[allow(clippy::too_many_arguments)]
    /// `Σ_j p(M_ij) [v_j, 1]` by the definition, `M_ij = scale q_iᵀ W_δ k_j` with Rotary `W_δ`.
    fn naive(
        rot: &RotaryW,
        poly: &Polynomial,
        q: &Array2<f64>,
        k: &Array2<f64>,
        v: &Array2<f64>,
        scale: f64,
        c: i64,
        causal: bool,
    ) -> (Array2<f64>, Array1<f64>) {
        let (nq, nk, dv) = (q.nrows(), k.nrows(), v.ncols());
        let f2 = rot.factor * rot.factor;
        let mut out = Array2::zeros((nq, dv));
        let mut lse = Array1::from_elem(nq, f64::NEG_INFINITY);
        for i in 0..nq {
            let (mut num, mut den) = (vec![0.0; dv], 0.0);
            for j in 0..nk {
                let delta = c + i as i64 - j as i64;
                if causal && delta < 0 {
                    continue;
                }
                let mut m = 0.0;
                for (t, &(p, r)) in rot.pairs.iter().enumerate() {
                    let (sn, cs) = (delta as f64 * rot.theta[t]).sin_cos();
                    m += f2
                        * (cs * (q[[i, p]] * k[[j, p]] + q[[i, r]] * k[[j, r]])
                            + sn * (q[[i, p]] * k[[j, r]] - q[[i, r]] * k[[j, p]]));
                }
                let a = poly.eval(scale * m);
                den += a;
                for (x, vv) in num.iter_mut().zip(v.row(j)) {
                    *x += a * vv;
                }
            }
            if den > 0.0 {
                for (o, x) in out.row_mut(i).iter_mut().zip(&num) {
                    *o = x / den;
                }
                lse[i] = den.ln();
            }
        }
        (out, lse)
    }

    #[test]
    fn lowrank_head_matches_the_definition() {
        let mut g = Lcg(7);
        let rot = RotaryW {
            theta: vec![0.9, 0.05],
            factor: 1.1,
            pairs: vec![(0, 2), (1, 3)],
        };
        let (nq, nk, d, dv, scale) = (300, 280, 4, 3, 0.5);
        let q = g.mat(nq, d, 0.7);
        let k = g.mat(nk, d, 0.7);
        let v = g.mat(nk, dv, 1.0);
        for (shift, causal) in [(0, false), (0, true), (-5, true), (3, true), (400, true)] {
            let lr = LowRank {
                r2: 4.0,
                psi_max: 1000.0,
                causal_shift: causal.then_some(shift),
            };
            let bounds = FastBounds {
                r: 2.0,
                r_abs: 4.0,
                v_max: 1.0,
                factor_sum: 1.0,
                factor_norm2: 1.0,
                min_row_mass: 1.0,
            };
            let shape = FastShape { nq, nk, d, dv };
            let limits = FastLimits {
                max_degree: 12,
                max_terms: 5000,
                max_working_bytes: 1 << 30,
            };
            let plan = lowrank_plan(shape, &bounds, lr, 1e-6, &limits).unwrap();
            assert_eq!(plan.counts.terms as f64, feature_count(d, plan.poly.degree));
            let x = rotate(&rot, q.view(), shift, scale * rot.factor * rot.factor);
            let y = rotate(&rot, k.view(), 0, 1.0);
            let got = lowrank_head(&plan, x.view(), y.view(), v.view(), &Control::new()).unwrap();
            let (out, lse) = naive(&rot, &plan.poly, &q, &k, &v, scale, shift, causal);
            for i in 0..nq {
                assert_eq!(got.lse[i].is_finite(), lse[i].is_finite(), "row {i}");
                if lse[i].is_finite() {
                    assert!((got.lse[i] - lse[i]).abs() < 1e-12, "lse row {i}");
                    for c in 0..dv {
                        assert!((got.out[[i, c]] - out[[i, c]]).abs() < 1e-12, "out {i} {c}");
                    }
                }
            }
        }
    }

    #[test]
    fn refusals_name_the_reason() {
        let shape = FastShape {
            nq: 10,
            nk: 10,
            d: 64,
            dv: 1,
        };
        let bounds = FastBounds {
            r: 1.0,
            r_abs: 1.0,
            v_max: 1.0,
            factor_sum: 1.0,
            factor_norm2: 1.0,
            min_row_mass: 1.0,
        };
        let lr = LowRank {
            r2: 1.0,
            psi_max: 0.0,
            causal_shift: None,
        };
        let limits = FastLimits {
            max_degree: 12,
            max_terms: 2000,
            max_working_bytes: 1 << 30,
        };
        let e = lowrank_plan(shape, &bounds, lr, 1e-3, &limits).unwrap_err();
        assert!(format!("{e}").contains("features"), "{e}");
        assert!(lowrank_plan(shape, &bounds, lr, 0.0, &limits).is_err());
    }
}
