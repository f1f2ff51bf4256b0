//! The fast backward's kernel spectra and term tables (cacheable: they depend on the inputs
//! listed on [`BackwardSpectra`], not on a plan's bounds).

use crate::error::{Error, Result};
use crate::fast::bounds::{max_abs, row_masses, FastBounds};
use crate::fast::grad_bounds::{derivative_coeffs, FactorStats};
use crate::fast::plans::BackwardPlan;
use crate::fast::toeplitz::blocks::{scatter, spectrum_blocks, try_filled, Block, ZERO_BLOCK};
use crate::fast::toeplitz::certify::PairNorms;
use crate::fast::toeplitz::expansion::Expansion;
use crate::fast::toeplitz::forward::{kernel_workers, KernelWorker};
use crate::poly::{norm2, WNorms, U};
use crate::toeplitz::{ToeplitzPlan, ToeplitzPlanner};
use ndarray::ArrayView2;
use rayon::prelude::*;
use std::collections::HashMap;
use std::ops::Range;

/// The correlation spectra `Σ_heads Σ_c conj(FFT(q^α a_c)) ⊙ FFT(k^β b_c)` of every pair,
/// `[block][pair]` like the kernel spectra; after [`BackwardKernel::finish`](super::BackwardKernel::finish) inverts them, each
/// pair's blocks hold `H_p(g)` as reals (block `b` holds `g` in `64 b .. 64 b + 64`).
pub struct CorrelationAccumulator {
    pub(super) blocks: Vec<Block>,
}

/// `(α or β index, multiplicity, index of the multi-index minus e_l)` per coordinate `l`.
pub(super) type Minus = Vec<(usize, f64, usize)>;

/// What the fast backward's kernels depend on and nothing else: the polynomial's coefficients
/// (and, for dw, its derivative's expansion), the support, the diagonal sequences, the mask/bias
/// factor, the scale and `(nq, nk, d)` — not a plan's data-dependent bounds. Shared (`Arc`)
/// across calls through [`crate::fast::cache`]; a [`BackwardKernel`](super::BackwardKernel) pairs it with one call's plan.
pub struct BackwardSpectra {
    pub(super) shape: (usize, usize, usize),
    pub(super) coeffs: Vec<f64>,
    /// Built with the derivative's expansion (dw).
    pub(super) with_dw: bool,
    pub(super) toeplitz: ToeplitzPlan,
    pub(super) expansion: Expansion,
    pub(super) dexp: Option<Expansion>,
    pub(super) terms: TermTable,
    pub(super) dterms: Option<TermTable>,
    /// `[block][pair]`; empty when streamed.
    pub(super) spectra: Vec<Block>,
    pub(super) streamed: bool,
    pub(super) norms: Vec<PairNorms>,
    pub(super) pair_inf: Vec<f64>,
    pub(super) by_alpha: Vec<Vec<usize>>,
    pub(super) by_beta: Vec<Vec<usize>>,
    pub(super) alpha_minus: Vec<Minus>,
    pub(super) beta_minus: Vec<Minus>,
    pub(super) d_inf: Vec<f64>,
    pub(super) links: Vec<usize>,
    pub(super) d_max_terms: usize,
    pub(super) support: Vec<(usize, usize)>,
    pub(super) scale: f64,
    pub(super) w_norms: WNorms,
    pub(super) masses: Vec<f64>,
    pub(super) seqs: Vec<f64>,
    pub(super) factor: Vec<f64>,
    pub(super) stats: FastBounds,
    pub(super) fstats: FactorStats,
}

/// For each multi-index, `(l, μ_l, index of μ - e_l)` for every `l` with `μ_l > 0`.
pub(super) fn minus_table(list: &[Vec<u16>]) -> Result<Vec<Minus>> {
    let index: HashMap<&[u16], usize> = list
        .iter()
        .enumerate()
        .map(|(i, m)| (m.as_slice(), i))
        .collect();
    list.iter()
        .map(|mu| {
            let mut out = Vec::new();
            for (l, &m) in mu.iter().enumerate() {
                if m > 0 {
                    let mut lower = mu.clone();
                    lower[l] -= 1;
                    let idx = *index.get(lower.as_slice()).ok_or_else(|| {
                        Error::Value("fast backward: expansion is missing a lower monomial".into())
                    })?;
                    out.push((l, m as f64, idx));
                }
            }
            Ok(out)
        })
        .collect()
}

/// Terms of an expansion regrouped by its pairs: `(γ_τ, [(s, m_s)])` per pair. Built by the same
/// enumeration as [`Expansion::build`], matched to the expansion's pairs through the
/// multi-indices `(α, β)` (so nothing depends on the expansion's internal order).
pub(super) struct TermTable {
    pub(super) pairs: Vec<Vec<Term>>,
}

/// `(γ_τ, [(s, m_s)])`.
pub(super) type Term = (f64, Vec<(usize, u16)>);

impl TermTable {
    pub(super) fn new(
        e: &Expansion,
        support: &[(usize, usize)],
        coeffs: &[f64],
        scale: f64,
    ) -> Result<Self> {
        let (ns, d, degree) = (support.len(), e.d, coeffs.len().saturating_sub(1));
        let a_ix: HashMap<&[u16], usize> = e
            .alphas
            .iter()
            .enumerate()
            .map(|(i, m)| (m.as_slice(), i))
            .collect();
        let b_ix: HashMap<&[u16], usize> = e
            .betas
            .iter()
            .enumerate()
            .map(|(i, m)| (m.as_slice(), i))
            .collect();
        let p_ix: HashMap<(usize, usize), usize> = e
            .pairs
            .iter()
            .enumerate()
            .map(|(p, pr)| ((pr.alpha, pr.beta), p))
            .collect();
        let mut fact = vec![1.0f64; degree + 1];
        for t in 1..=degree {
            fact[t] = fact[t - 1] * t as f64;
        }
        let mut pairs = vec![Vec::new(); e.pairs.len()];
        for t in 0..=degree {
            if ns == 0 && t > 0 {
                break;
            }
            let mut seq = vec![0usize; t];
            loop {
                let mut fs: Vec<(usize, u16)> = Vec::new();
                for &x in &seq {
                    match fs.last_mut() {
                        Some(last) if last.0 == x => last.1 += 1,
                        _ => fs.push((x, 1)),
                    }
                }
                let (mut alpha, mut beta) = (vec![0u16; d], vec![0u16; d]);
                let mut multinomial = fact[t];
                for &(x, m) in &fs {
                    alpha[support[x].0] += m;
                    beta[support[x].1] += m;
                    multinomial /= fact[m as usize];
                }
                let gamma = coeffs[t] * multinomial * scale.powi(t as i32);
                let p = a_ix
                    .get(alpha.as_slice())
                    .zip(b_ix.get(beta.as_slice()))
                    .and_then(|(&a, &b)| p_ix.get(&(a, b)))
                    .ok_or_else(|| Error::Value("fast backward: a term without its pair".into()))?;
                pairs[*p].push((gamma, fs));
                match (0..t).rev().find(|&i| seq[i] + 1 < ns) {
                    Some(i) => {
                        let v = seq[i] + 1;
                        seq[i..].iter_mut().for_each(|x| *x = v);
                    }
                    None => break,
                }
            }
        }
        Ok(TermTable { pairs })
    }

    /// The kernel `C_p(g) = factor[g] Σ_τ γ_τ Π_s w_s(g)^{m_s}` for the diagonals
    /// `g0 .. g0 + out.len()`, with `w_s(g) = seqs[s * stride + g]` and `factor` indexed from
    /// `g0`; returns `Σ_g Σ_τ |γ_τ c_τ(g)|`. Powers by repeated products over cache-sized chunks
    /// (`|τ| <= degree` roundings per term, as `powi`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn kernel(
        &self,
        p: usize,
        seqs: &[f64],
        stride: usize,
        g0: usize,
        factor: &[f64],
        out: &mut [f64],
        tmp: &mut [f64],
    ) -> f64 {
        const CH: usize = 1024;
        let len = out.len();
        let mut mass = 0.0;
        out.iter_mut().for_each(|x| *x = 0.0);
        for c0 in (0..len).step_by(CH) {
            let c1 = (c0 + CH).min(len);
            let o = &mut out[c0..c1];
            let t = &mut tmp[..c1 - c0];
            for (gamma, fs) in &self.pairs[p] {
                t.iter_mut()
                    .zip(&factor[c0..c1])
                    .for_each(|(x, f)| *x = gamma * f);
                for &(x, m) in fs {
                    let w = &seqs[x * stride + g0 + c0..x * stride + g0 + c1];
                    for _ in 0..m {
                        t.iter_mut().zip(w).for_each(|(a, b)| *a *= b);
                    }
                }
                mass += t.iter().map(|x| x.abs()).sum::<f64>();
                o.iter_mut().zip(t.iter()).for_each(|(a, b)| *a += b);
            }
        }
        mass
    }
}

/// The kernels of the pairs `pairs` ([`TermTable::kernel`]) with their norms and largest
/// entries, as many pairs at a time as there are `workers`, in parallel; with `out`, also their
/// spectra, written `[block][pair - pairs.start]` (stride `pairs.len()`). Each pair's work is
/// the same whatever the thread count and the chunking, so the results are bitwise the same.
pub(super) fn kernel_pass(
    terms: &TermTable,
    tp: &ToeplitzPlan,
    (seqs, factor): (&[f64], &[f64]),
    pairs: Range<usize>,
    mut out: Option<&mut [Block]>,
    workers: &mut [KernelWorker],
) -> Result<Vec<(PairNorms, f64)>> {
    let glen = factor.len();
    let up = 1.0 + (glen + 2) as f64 * U;
    let stride = pairs.len();
    let batch = workers.len().max(1);
    let spectra = out.is_some();
    let mut res = Vec::with_capacity(stride);
    for p0 in pairs.clone().step_by(batch) {
        let p1 = (p0 + batch).min(pairs.end);
        let part: Vec<Result<(PairNorms, f64)>> = workers[..p1 - p0]
            .par_iter_mut()
            .enumerate()
            .map(|(i, w)| {
                let (kern, tmp) = (&mut w.kern, &mut w.tmp);
                let mass = terms.kernel(p0 + i, seqs, glen, 0, factor, kern, tmp);
                let l1 = kern.iter().map(|x| x.abs()).sum::<f64>();
                let l2 = norm2(kern.iter());
                let inf = max_abs(kern.iter());
                if spectra {
                    tp.kernel_spectrum(kern, &mut w.spec, &mut w.ws)?;
                }
                Ok(([l1 * up, l2 * up, mass * up], inf * up))
            })
            .collect();
        for r in part {
            res.push(r?);
        }
        if let Some(blocks) = out.as_deref_mut() {
            for (i, w) in workers[..p1 - p0].iter().enumerate() {
                scatter(
                    std::slice::from_ref(&w.spec),
                    &mut blocks[p0 - pairs.start + i..],
                    stride,
                );
            }
        }
    }
    Ok(res)
}

impl BackwardSpectra {
    /// Expands the polynomial `coeffs` (and, with `with_dw`, its derivative) over `support` and
    /// computes the kernel spectra for `nq x nk` heads of dimension `d`.
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        coeffs: &[f64],
        shape: (usize, usize, usize),
        with_dw: bool,
        support: &[(usize, usize)],
        seqs: ArrayView2<f64>,
        factor: &[f64],
        scale: f64,
        max_terms: usize,
    ) -> Result<Self> {
        Self::build_as(
            coeffs, shape, with_dw, support, seqs, factor, scale, max_terms, false,
        )
    }

    /// [`BackwardSpectra::build`] for a streamed plan
    /// ([`backward_pair_chunk`](super::backward_pair_chunk)): everything but the kernel
    /// spectra (the kernels are built once for their norms, without their FFTs); every head
    /// rebuilds the spectra chunk by chunk from the sequences and the factor held here.
    #[allow(clippy::too_many_arguments)]
    pub fn build_streamed(
        coeffs: &[f64],
        shape: (usize, usize, usize),
        with_dw: bool,
        support: &[(usize, usize)],
        seqs: ArrayView2<f64>,
        factor: &[f64],
        scale: f64,
        max_terms: usize,
    ) -> Result<Self> {
        Self::build_as(
            coeffs, shape, with_dw, support, seqs, factor, scale, max_terms, true,
        )
    }

    /// True when the kernel spectra are not held but rebuilt chunk by chunk for every use.
    pub fn streamed(&self) -> bool {
        self.streamed
    }

    #[allow(clippy::too_many_arguments)]
    fn build_as(
        coeffs: &[f64],
        (nq, nk, d): (usize, usize, usize),
        with_dw: bool,
        support: &[(usize, usize)],
        seqs: ArrayView2<f64>,
        factor: &[f64],
        scale: f64,
        max_terms: usize,
        streamed: bool,
    ) -> Result<Self> {
        let (stats, fstats) = backward_factor_stats(nq, nk, support, seqs, factor, scale)?;
        let glen = nq + nk - 1;
        let w_norms = WNorms::new(d, support, seqs, factor)?;
        let masses = row_masses(nq, nk, factor);
        let expansion = Expansion::build(support, d, coeffs, scale, true, max_terms)?;
        let terms = TermTable::new(&expansion, support, coeffs, scale)?;
        let toeplitz = ToeplitzPlanner::new().plan(nq, nk)?;
        let (nblk, np) = (spectrum_blocks(toeplitz.fft_len()), expansion.pairs.len());
        let seqs_c: Vec<f64> = seqs.iter().copied().collect();
        let up = 1.0 + (glen + 2) as f64 * U;
        let mut workers = kernel_workers(&toeplitz, !streamed)?;
        let src = (seqs_c.as_slice(), factor);
        let (spectra, part) = if streamed {
            let part = kernel_pass(&terms, &toeplitz, src, 0..np, None, &mut workers)?;
            (Vec::new(), part)
        } else {
            let mut spectra = try_filled(nblk.saturating_mul(np), ZERO_BLOCK, "kernel spectra")?;
            let part = kernel_pass(
                &terms,
                &toeplitz,
                src,
                0..np,
                Some(&mut spectra),
                &mut workers,
            )?;
            (spectra, part)
        };
        drop(workers);
        let (norms, pair_inf): (Vec<PairNorms>, Vec<f64>) = part.into_iter().unzip();
        let (na, nb) = (expansion.alphas.len(), expansion.betas.len());
        let mut by_alpha = vec![Vec::new(); na];
        let mut by_beta = vec![Vec::new(); nb];
        for (p, pr) in expansion.pairs.iter().enumerate() {
            by_alpha[pr.alpha].push(p);
            by_beta[pr.beta].push(p);
        }
        let alpha_minus = minus_table(&expansion.alphas)?;
        let beta_minus = minus_table(&expansion.betas)?;
        let (mut dexp, mut d_inf, mut links, mut d_max_terms) = (None, Vec::new(), Vec::new(), 0);
        let mut dterms = None;
        if with_dw && coeffs.len() > 1 {
            let dc = derivative_coeffs(coeffs);
            let de = Expansion::build(support, d, &dc, scale, true, max_terms)?;
            let dt = TermTable::new(&de, support, &dc, scale)?;
            let a_ix: HashMap<&[u16], usize> = expansion
                .alphas
                .iter()
                .enumerate()
                .map(|(i, m)| (m.as_slice(), i))
                .collect();
            let b_ix: HashMap<&[u16], usize> = expansion
                .betas
                .iter()
                .enumerate()
                .map(|(i, m)| (m.as_slice(), i))
                .collect();
            let pair_ix: HashMap<(usize, usize), usize> = expansion
                .pairs
                .iter()
                .enumerate()
                .map(|(p, pr)| ((pr.alpha, pr.beta), p))
                .collect();
            let ns = support.len();
            links = vec![0usize; de.pairs.len() * ns];
            for (pd, pr) in de.pairs.iter().enumerate() {
                for (s, &(l1, l2)) in support.iter().enumerate() {
                    let mut a = de.alphas[pr.alpha].clone();
                    let mut b = de.betas[pr.beta].clone();
                    a[l1] += 1;
                    b[l2] += 1;
                    let p = a_ix
                        .get(a.as_slice())
                        .zip(b_ix.get(b.as_slice()))
                        .and_then(|(&ai, &bi)| pair_ix.get(&(ai, bi)))
                        .ok_or_else(|| {
                            Error::Value("fast backward: derivative pair without a parent".into())
                        })?;
                    links[pd * ns + s] = *p;
                }
            }
            d_inf = (0..de.pairs.len())
                .into_par_iter()
                .map_init(
                    || (vec![0.0; glen], vec![0.0; glen]),
                    |(kern, tmp), pd| {
                        dt.kernel(pd, &seqs_c, glen, 0, factor, kern, tmp);
                        max_abs(kern.iter()) * up
                    },
                )
                .collect();
            d_max_terms = de.counts().max_terms_per_pair;
            dexp = Some(de);
            dterms = Some(dt);
        }
        Ok(BackwardSpectra {
            shape: (nq, nk, d),
            coeffs: coeffs.to_vec(),
            with_dw,
            toeplitz,
            expansion,
            dexp,
            terms,
            dterms,
            spectra,
            streamed,
            norms,
            pair_inf,
            by_alpha,
            by_beta,
            alpha_minus,
            beta_minus,
            d_inf,
            links,
            d_max_terms,
            support: support.to_vec(),
            scale,
            w_norms,
            masses,
            seqs: seqs_c,
            factor: factor.to_vec(),
            stats,
            fstats,
        })
    }

    /// Bytes held (kernel spectra, norms, the copies of the sequences and the factor, the FFT
    /// plan's buffers, the expansions' tables).
    pub fn bytes(&self) -> usize {
        let idx = |l: &[Vec<u16>]| l.iter().map(|m| 24 + 2 * m.len()).sum::<usize>();
        let exp = |e: &Expansion| {
            idx(&e.alphas) + idx(&e.betas) + 64 * e.pairs.len() + 96 * e.counts().terms
        };
        let minus = |t: &[Minus]| t.iter().map(|m| 24 + 24 * m.len()).sum::<usize>();
        let table = |t: &TermTable| {
            t.pairs
                .iter()
                .map(|p| 24 + p.iter().map(|x| 40 + 16 * x.1.len()).sum::<usize>())
                .sum::<usize>()
        };
        std::mem::size_of::<Block>() * self.spectra.len()
            + 32 * self.norms.len()
            + 8 * (self.masses.len() + self.seqs.len() + self.factor.len())
            + 8 * (self.d_inf.len() + self.links.len())
            + 16 * self.toeplitz.fft_len()
            + exp(&self.expansion)
            + self.dexp.as_ref().map_or(0, exp)
            + table(&self.terms)
            + self.dterms.as_ref().map_or(0, table)
            + minus(&self.alpha_minus)
            + minus(&self.beta_minus)
            + 8 * (self.by_alpha.len() + self.by_beta.len() + self.norms.len())
    }
}

/// Checks the inputs of a backward kernel; returns the factor's statistics.
pub(super) fn backward_factor_stats(
    nq: usize,
    nk: usize,
    support: &[(usize, usize)],
    seqs: ArrayView2<f64>,
    factor: &[f64],
    scale: f64,
) -> Result<(FastBounds, FactorStats)> {
    if nq == 0 || nk == 0 {
        return Err(Error::Value(format!(
            "fast backward kernel: expected nq, nk >= 1, got ({nq}, {nk})"
        )));
    }
    let glen = nq + nk - 1;
    if factor.len() != glen || factor.iter().any(|f| !(f.is_finite() && *f >= 0.0)) {
        return Err(Error::Value(format!(
            "factor: expected {glen} finite values >= 0, got {} values",
            factor.len()
        )));
    }
    if seqs.shape() != [support.len(), glen] || seqs.iter().any(|x| !x.is_finite()) {
        return Err(Error::Value(format!(
            "seqs: expected finite values of shape ({}, {glen}), got {:?}",
            support.len(),
            seqs.shape()
        )));
    }
    if !scale.is_finite() {
        return Err(Error::Value(format!(
            "scale: expected a finite value, got {scale}"
        )));
    }
    let zero = crate::poly::ScoreBound {
        r: 0.0,
        r_abs: 0.0,
        spectral: 0.0,
        blocks: 0.0,
    };
    let stats = FastBounds::from_parts(zero, 0.0, nq, nk, factor);
    Ok((stats, FactorStats::new(nq, nk, factor)?))
}

/// Refuses a mask/bias factor outside the bounds `plan` certified.
pub(super) fn check_backward_factor(
    plan: &BackwardPlan,
    stats: &FastBounds,
    fstats: &FactorStats,
) -> Result<()> {
    let pb = &plan.bounds;
    if stats.factor_sum > pb.factor_sum
        || stats.factor_norm2 > pb.factor_norm2
        || stats.min_row_mass < pb.min_row_mass
        || !fstats.within(&plan.fstats)
    {
        return Err(Error::Approximation(
            "fast backward kernel: the mask/bias factor is outside the bounds its plan certified"
                .into(),
        ));
    }
    Ok(())
}
