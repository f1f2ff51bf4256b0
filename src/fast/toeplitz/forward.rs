//! The forward pass of the fast method for one head.
//!
//! For each column `x` of `[V, 1]` the numerator (or, for `x = 1`, the denominator) is
//!
//! ```text
//! N_i = Σ_α q_i^α z_α,i,     z_α = Σ_β T[C_αβ] (k^β ∘ x) = IFFT( Σ_β Ĉ_αβ ⊙ FFT(k^β ∘ x) ),
//! ```
//!
//! so a column costs `n_β` forward and `n_α` inverse FFTs plus `n_pairs` spectrum products. Per
//! frequency the spectrum products are a sparse `(n_α x n_β) · (n_β x columns)` complex product,
//! done one block of frequencies at a time out of cache ([`super::blocks`]).
//!
//! Stages per column tile of `[V, 1]`: (1) FFT `k^β ∘ x` for every `β` and column; (2) per
//! block of frequencies, `Â_α = Σ_β Ĉ_αβ ⊙ X̂_β` for every `α` and column; (3) per column,
//! inverse-FFT each `Â_α`, multiply by `q^α` and sum over `α` in a fixed order. Stages run in
//! parallel (rayon) over independent pieces, so results do not depend on the thread count. The
//! kernel spectra `Ĉ_αβ` live in a [`FastKernel`], built once and reusable for every head
//! sharing W, scale, mask/bias, shape and plan — or, when they do not fit the memory limit
//! ([`FastPlan::streamed`]), are rebuilt chunk by chunk of pairs inside stage (2), for every
//! column tile, with bitwise the same results. Each head is certified from its own data before
//! any FFT ([`super::certify::data_rounding`]).

use super::blocks::{
    scatter, spectrum_blocks, split_by_groups, stage2_dispatch, try_filled, Block, Stage2,
    ZERO_BLOCK,
};
use super::certify::{
    data_rounding, fast_plan, underflow_rounding, BetaNorms, Certificate, PairNorms,
};
use super::expansion::Expansion;
use crate::error::{Error, Result};
use crate::fast::bounds::{max_abs, row_masses, FastBounds};
use crate::fast::common::{FastLimits, FastOutput, FastReport, FastShape, HeadProblem};
use crate::fast::plans::FastPlan;
use crate::poly::{norm2, PolyKind, ScoreBound, WNorms, U};
use crate::toeplitz::{ToeplitzPlan, ToeplitzPlanner, ToeplitzScratch, C64};
use ndarray::{Array1, Array2, ArrayView2};
use rayon::prelude::*;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// What the kernel spectra depend on and nothing else: the polynomial's coefficients, the
/// support, the diagonal sequences, the mask/bias factor, the scale and `(nq, nk, d)` — not the
/// data-dependent bounds of a plan. Shared (`Arc`) by every call with the same inputs through
/// [`crate::fast::cache`]; a [`FastKernel`] pairs it with one call's plan.
pub struct FastSpectra {
    shape: (usize, usize, usize),
    coeffs: Vec<f64>,
    toeplitz: ToeplitzPlan,
    expansion: Expansion,
    /// `[block][pair]`, each kernel spectrum scaled by `1/N` (the inverse FFT's normalisation);
    /// empty when the spectra are streamed.
    spectra: Vec<Block>,
    /// When the spectra are streamed: what every chunk of them is rebuilt from.
    source: Option<KernelSource>,
    /// Per pair: `||C_αβ||_1`, `||C_αβ||_2` and its term mass (for the rounding certificate).
    norms: Vec<PairNorms>,
    support: Vec<(usize, usize)>,
    scale: f64,
    w_norms: WNorms,
    /// Per query row, a lower bound on its visible mass (`0.0`: no visible key).
    masses: Vec<f64>,
    /// The factor's statistics (`factor_sum`, `factor_norm2`, `min_row_mass`; the rest zero).
    stats: FastBounds,
}

/// The diagonal sequences (`|S| x glen`, row-major) and the mask/bias factor a streamed
/// [`FastSpectra`] rebuilds its kernels from.
struct KernelSource {
    seqs: Vec<f64>,
    factor: Vec<f64>,
}

/// One thread's buffers for building kernels and their spectra: the kernel, its scratch, its
/// spectrum and an FFT scratch.
pub(crate) struct KernelWorker {
    pub(crate) ws: ToeplitzScratch,
    pub(crate) kern: Vec<f64>,
    pub(crate) tmp: Vec<f64>,
    pub(crate) spec: Vec<C64>,
}

/// One [`KernelWorker`] per thread (`spectra`: with a spectrum buffer).
pub(crate) fn kernel_workers(tp: &ToeplitzPlan, spectra: bool) -> Result<Vec<KernelWorker>> {
    let glen = tp.glen();
    let h = if spectra { tp.spectrum_len() } else { 0 };
    (0..rayon::current_num_threads().max(1))
        .map(|_| {
            Ok(KernelWorker {
                ws: tp.make_scratch(),
                kern: try_filled(glen, 0.0, "kernel")?,
                tmp: try_filled(glen, 0.0, "kernel scratch")?,
                spec: try_filled(h, C64::new(0.0, 0.0), "kernel spectrum")?,
            })
        })
        .collect()
}

/// The kernels `C_αβ` of the pairs `pairs` and their norms, as many pairs at a time as there
/// are `workers`, in parallel; with `out`, also their spectra, written `[block][pair -
/// pairs.start]` (stride `pairs.len()`). Each pair's work is the same whatever the thread count,
/// so the results are bitwise the same for every thread count and every chunking.
fn kernel_pass(
    e: &Expansion,
    tp: &ToeplitzPlan,
    src: (&[f64], &[f64]),
    pairs: Range<usize>,
    mut out: Option<&mut [Block]>,
    workers: &mut [KernelWorker],
) -> Result<Vec<PairNorms>> {
    let (seqs, factor) = src;
    let glen = factor.len();
    let stride = pairs.len();
    let mut norms = Vec::with_capacity(stride);
    let batch = workers.len().max(1);
    // Summation rounding of the norms themselves, so they stay upper bounds.
    let up = 1.0 + (glen + 2) as f64 * U;
    let spectra = out.is_some();
    for p0 in pairs.clone().step_by(batch) {
        let p1 = (p0 + batch).min(pairs.end);
        let part: Vec<Result<PairNorms>> = workers[..p1 - p0]
            .par_iter_mut()
            .enumerate()
            .map(|(i, w)| {
                let mass = e.kernel(p0 + i, seqs, factor, &mut w.kern, &mut w.tmp);
                let l1 = w.kern.iter().map(|x| x.abs()).sum::<f64>();
                let l2 = norm2(w.kern.iter());
                if spectra {
                    tp.kernel_spectrum(&w.kern, &mut w.spec, &mut w.ws)?;
                }
                Ok([l1 * up, l2 * up, mass * up])
            })
            .collect();
        for r in part {
            norms.push(r?);
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
    Ok(norms)
}

/// Checks the inputs of a kernel and returns the factor's statistics.
fn factor_stats(
    nq: usize,
    nk: usize,
    seqs: ArrayView2<f64>,
    factor: &[f64],
    scale: f64,
) -> Result<FastBounds> {
    if nq == 0 || nk == 0 {
        return Err(Error::Value(format!(
            "fast kernel: expected nq, nk >= 1, got ({nq}, {nk})"
        )));
    }
    let glen = nq + nk - 1;
    if factor.len() != glen || factor.iter().any(|f| !(f.is_finite() && *f >= 0.0)) {
        return Err(Error::Value(format!(
            "factor: expected {glen} finite values >= 0, got {} values",
            factor.len()
        )));
    }
    if seqs.iter().any(|x| !x.is_finite()) {
        return Err(Error::Value(
            "seqs: expected finite values, got inf or nan".into(),
        ));
    }
    if !scale.is_finite() {
        return Err(Error::Value(format!(
            "scale: expected a finite value, got {scale}"
        )));
    }
    let zero = ScoreBound {
        r: 0.0,
        r_abs: 0.0,
        spectral: 0.0,
        blocks: 0.0,
    };
    Ok(FastBounds::from_parts(zero, 0.0, nq, nk, factor))
}

impl FastSpectra {
    /// Expands the polynomial `coeffs` over `support` and computes the kernel spectra for
    /// `nq x nk` heads of dimension `d`.
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        coeffs: &[f64],
        shape: (usize, usize, usize),
        support: &[(usize, usize)],
        seqs: ArrayView2<f64>,
        factor: &[f64],
        scale: f64,
        max_terms: usize,
        grouped: bool,
    ) -> Result<Self> {
        Self::build_as(
            coeffs, shape, support, seqs, factor, scale, max_terms, grouped, false,
        )
    }

    /// [`FastSpectra::build`] for a streamed plan ([`FastPlan::streamed`]): the expansion, the
    /// per-pair norms (the kernels are built once, without their FFTs), the row masses and a
    /// copy of the sequences and the factor — not the spectra, which every head rebuilds chunk
    /// by chunk ([`FastKernel::apply`]).
    #[allow(clippy::too_many_arguments)]
    pub fn build_streamed(
        coeffs: &[f64],
        shape: (usize, usize, usize),
        support: &[(usize, usize)],
        seqs: ArrayView2<f64>,
        factor: &[f64],
        scale: f64,
        max_terms: usize,
        grouped: bool,
    ) -> Result<Self> {
        Self::build_as(
            coeffs, shape, support, seqs, factor, scale, max_terms, grouped, true,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn build_as(
        coeffs: &[f64],
        (nq, nk, d): (usize, usize, usize),
        support: &[(usize, usize)],
        seqs: ArrayView2<f64>,
        factor: &[f64],
        scale: f64,
        max_terms: usize,
        grouped: bool,
        streamed: bool,
    ) -> Result<Self> {
        let stats = factor_stats(nq, nk, seqs, factor, scale)?;
        let w_norms = WNorms::new(d, support, seqs, factor)?;
        let masses = row_masses(nq, nk, factor);
        let expansion = Expansion::build(support, d, coeffs, scale, grouped, max_terms)?;
        let toeplitz = ToeplitzPlanner::new().plan(nq, nk)?;
        let (nblk, np) = (spectrum_blocks(toeplitz.fft_len()), expansion.pairs.len());
        let seqs_c: Vec<f64> = seqs.iter().copied().collect();
        let mut workers = kernel_workers(&toeplitz, !streamed)?;
        let src = (seqs_c.as_slice(), factor);
        let (spectra, norms) = if streamed {
            let norms = kernel_pass(&expansion, &toeplitz, src, 0..np, None, &mut workers)?;
            (Vec::new(), norms)
        } else {
            let mut spectra = try_filled(nblk.saturating_mul(np), ZERO_BLOCK, "kernel spectra")?;
            let norms = kernel_pass(
                &expansion,
                &toeplitz,
                src,
                0..np,
                Some(&mut spectra),
                &mut workers,
            )?;
            (spectra, norms)
        };
        let source = streamed.then(|| KernelSource {
            seqs: seqs_c,
            factor: factor.to_vec(),
        });
        Ok(FastSpectra {
            shape: (nq, nk, d),
            coeffs: coeffs.to_vec(),
            toeplitz,
            expansion,
            spectra,
            source,
            norms,
            support: support.to_vec(),
            scale,
            w_norms,
            masses,
            stats,
        })
    }

    /// True when the spectra are not held but rebuilt chunk by chunk for every use.
    pub fn streamed(&self) -> bool {
        self.source.is_some()
    }

    /// Bytes held (kernel spectra or, streamed, the sequences and factor they are rebuilt
    /// from; norms, masses, the FFT plan's buffers, the expansion).
    pub fn bytes(&self) -> usize {
        let e = &self.expansion;
        let idx = |l: &[Vec<u16>]| l.iter().map(|m| 24 + 2 * m.len()).sum::<usize>();
        let source = self
            .source
            .as_ref()
            .map_or(0, |s| 8 * (s.seqs.len() + s.factor.len()));
        std::mem::size_of::<Block>() * self.spectra.len()
            + source
            + 24 * self.norms.len()
            + 8 * self.masses.len()
            + 16 * self.toeplitz.fft_len()
            + idx(&e.alphas)
            + idx(&e.betas)
            + 64 * e.pairs.len()
            + 96 * e.counts().terms
            + 16 * self.support.len()
    }

    pub fn expansion(&self) -> &Expansion {
        &self.expansion
    }
}

/// The per-call half of the fast method: a call's certified plan and the (possibly cached,
/// shared) [`FastSpectra`] for its polynomial. Build once, [`apply`](FastKernel::apply) to every
/// head; each head is checked against *this* plan's bounds and certified from its own data.
pub struct FastKernel {
    plan: FastPlan,
    spectra: Arc<FastSpectra>,
    /// Buffers of finished `apply` calls, for the next ones.
    pool: Mutex<Vec<Buffers>>,
}

/// One `apply`'s buffers: key spectra and accumulators of a column tile and, when the spectra
/// are streamed, one chunk of kernel spectra and the kernel workers that build it.
struct Buffers {
    xs: Vec<C64>,
    acc: Vec<C64>,
    chunk: Vec<Block>,
    workers: Vec<KernelWorker>,
}

impl FastKernel {
    /// Expands `plan.poly` over `support` and computes the kernel spectra. `seqs` (`|S| x glen`)
    /// and `factor` (`glen`) must be those the plan's bounds were read from (checked through
    /// their norms).
    pub fn new(
        plan: &FastPlan,
        support: &[(usize, usize)],
        seqs: ArrayView2<f64>,
        factor: &[f64],
        scale: f64,
        limits: &FastLimits,
    ) -> Result<Self> {
        Self::build(plan, support, seqs, factor, scale, limits, true)
    }

    pub(crate) fn build(
        plan: &FastPlan,
        support: &[(usize, usize)],
        seqs: ArrayView2<f64>,
        factor: &[f64],
        scale: f64,
        limits: &FastLimits,
        grouped: bool,
    ) -> Result<Self> {
        let FastShape { nq, nk, d, .. } = plan.shape;
        // The cheap checks first, so a mismatched factor is refused before any FFT.
        check_factor(plan, &factor_stats(nq, nk, seqs, factor, scale)?)?;
        let make = if plan.streamed() {
            FastSpectra::build_streamed
        } else {
            FastSpectra::build
        };
        let spectra = make(
            &plan.poly.coeffs,
            (nq, nk, d),
            support,
            seqs,
            factor,
            scale,
            limits.max_terms,
            grouped,
        )?;
        Self::with_spectra(plan, Arc::new(spectra))
    }

    /// Pairs `plan` with spectra built for its polynomial and shape (e.g. from the cache);
    /// refuses spectra of another polynomial or shape, held where the plan streams them or
    /// streamed where it holds them, or whose mask/bias factor is outside the plan's bounds.
    pub fn with_spectra(plan: &FastPlan, spectra: Arc<FastSpectra>) -> Result<Self> {
        let FastShape { nq, nk, d, .. } = plan.shape;
        let same_poly = spectra.coeffs.len() == plan.poly.coeffs.len()
            && spectra
                .coeffs
                .iter()
                .zip(&plan.poly.coeffs)
                .all(|(a, b)| a.to_bits() == b.to_bits());
        if spectra.shape != (nq, nk, d) || !same_poly {
            return Err(Error::Value(
                "fast kernel: spectra of another polynomial or shape than the plan's".into(),
            ));
        }
        if spectra.streamed() != plan.streamed() {
            let (have, want) = if plan.streamed() {
                ("held", "streamed")
            } else {
                ("streamed", "held")
            };
            return Err(Error::Value(format!(
                "fast kernel: spectra {have}, but the plan has them {want}; build them with \
                 FastSpectra::{}",
                if plan.streamed() {
                    "build_streamed"
                } else {
                    "build"
                }
            )));
        }
        check_factor(plan, &spectra.stats)?;
        Ok(FastKernel {
            plan: plan.clone(),
            spectra,
            pool: Mutex::new(Vec::new()),
        })
    }

    pub fn plan(&self) -> &FastPlan {
        &self.plan
    }

    pub fn expansion(&self) -> &Expansion {
        &self.spectra.expansion
    }

    /// The spectra this kernel applies (shared with the cache and other calls).
    pub fn spectra(&self) -> &Arc<FastSpectra> {
        &self.spectra
    }

    /// One head: `q` (`nq x d`), `k` (`nk x d`), `v` (`nk x dv`), with bounds within the plan's.
    pub fn apply(
        &self,
        q: ArrayView2<f64>,
        k: ArrayView2<f64>,
        v: ArrayView2<f64>,
    ) -> Result<FastOutput> {
        let FastShape { nq, nk, d, dv } = self.plan.shape;
        for (name, x, rows, cols) in [("q", &q, nq, d), ("k", &k, nk, d), ("v", &v, nk, dv)] {
            if x.shape() != [rows, cols] {
                return Err(Error::Value(format!(
                    "{name}: expected shape ({rows}, {cols}), got {:?}",
                    x.shape()
                )));
            }
            if x.iter().any(|y| !y.is_finite()) {
                return Err(Error::Value(format!(
                    "{name}: expected finite values, got inf or nan"
                )));
            }
        }
        let head = self
            .spectra
            .w_norms
            .bound(&self.spectra.support, q, k, self.spectra.scale);
        let v_max = max_abs(v.iter());
        let pb = &self.plan.bounds;
        if head.r > pb.r || head.r_abs > pb.r_abs || v_max > pb.v_max {
            return Err(Error::Approximation(format!(
                "fast method: this head (R = {:.4}, R_abs = {:.4}, max|v| = {:.4}) exceeds the bounds \
                 its plan certified (R = {:.4}, R_abs = {:.4}, max|v| = {:.4})",
                head.r, head.r_abs, v_max, pb.r, pb.r_abs, pb.v_max
            )));
        }
        let e = &self.spectra.expansion;
        // Row-major n_index x n, so rows are contiguous slices.
        let (qa, kb) = (
            Expansion::monomials(&e.alphas, q),
            Expansion::monomials(&e.betas, k),
        );
        let not_contiguous = || Error::Value("monomials: expected a contiguous array".into());
        let (qa, kb) = (
            qa.as_slice().ok_or_else(not_contiguous)?,
            kb.as_slice().ok_or_else(not_contiguous)?,
        );
        // The head's own certificate, from the norms of its data, before any FFT runs.
        let q_max: Vec<f64> = qa.chunks_exact(nq).map(|r| max_abs(r.iter())).collect();
        let up = 1.0 + (nk + 2) as f64 * U;
        let k_norms: Vec<BetaNorms> = kb
            .chunks_exact(nk)
            .map(|r| {
                let l1 = r.iter().map(|x| x.abs()).sum::<f64>() * up;
                let l2 = norm2(r.iter()) * up;
                [l1, l2, max_abs(r.iter())]
            })
            .collect();
        let e_data = data_rounding(
            e,
            &self.spectra.norms,
            &q_max,
            &k_norms,
            self.spectra.toeplitz.fft_len(),
        );
        // The subnormal range's absolute rounding: per unit column, and for the numerators
        // (columns of `v`, at most max|v|) not scaled down with max|v| below 1.
        let e_abs = underflow_rounding(
            e,
            &self.spectra.norms,
            &q_max,
            &k_norms,
            self.spectra.toeplitz.fft_len(),
        );
        let e_abs = if v_max > 0.0 {
            e_abs / v_max.min(1.0)
        } else {
            e_abs
        };
        let head_bounds = FastBounds {
            r: head.r,
            v_max,
            ..*pb
        };
        let mut cert = Certificate::new(&head_bounds, self.plan.poly.rho, e_data + e_abs);
        // The plan's a-priori certificate has no absolute term: it stands in for the head's own
        // only when that term is within its margin (`1.01`, on an `E` at least `e_data`).
        let negligible = e_abs <= U * e_data;
        if negligible
            && (cert.certified_error.is_nan() || cert.certified_error > self.plan.certified_error)
        {
            // Both are valid bounds; keep the smaller.
            cert = Certificate {
                approximation_error: self.plan.approximation_error,
                rounding_error: self.plan.rounding_error,
                certified_error: self.plan.certified_error,
                certified_lse_error: self.plan.certified_lse_error,
            };
        }
        if !negligible && (cert.certified_error > self.plan.eps || cert.certified_error.is_nan()) {
            return Err(Error::Approximation(format!(
                "fast method: this head's operands reach the subnormal range (a product of q, k or \
                 W below 2.2e-308 that a larger factor makes matter), where rounding is absolute: \
                 rounding bound {e_abs:.3e} against {e_data:.3e} for ordinary magnitudes, \
                 certified error {:.3e} above eps = {:.3e}; use the exact method",
                cert.certified_error, self.plan.eps
            )));
        }
        if cert.certified_error.is_nan() || cert.certified_error > self.plan.eps {
            return Err(Error::Approximation(format!(
                "fast method: this head's certified error is {:.3e} (polynomial {:.3e}, rounding {:.3e}), \
                 above eps = {:.3e}; double precision cannot certify it here",
                cert.certified_error, cert.approximation_error, cert.rounding_error, self.plan.eps
            )));
        }
        let numer = self.numerators(qa, kb, v)?;
        let mut out = Array2::<f64>::zeros((nq, dv));
        let mut lse = Array1::<f64>::from_elem(nq, f64::NEG_INFINITY);
        for i in 0..nq {
            if self.spectra.masses[i] <= 0.0 {
                continue; // no visible key: output 0, lse -inf, exactly
            }
            let den = numer[dv * nq + i];
            if !(den.is_finite() && den > 0.0) {
                return Err(Error::Approximation(format!(
                    "fast method: row {i} has denominator {den:e} despite the certificate; \
                     use the exact method"
                )));
            }
            for c in 0..dv {
                out[[i, c]] = numer[c * nq + i] / den;
            }
            lse[i] = den.ln();
        }
        let mut report = self.report();
        report.certified_error = cert.certified_error;
        report.approximation_error = cert.approximation_error;
        report.rounding_error = cert.rounding_error;
        report.certified_lse_error = cert.certified_lse_error;
        Ok(FastOutput { out, lse, report })
    }

    /// What `apply` reports, with the plan's a-priori certificate (`apply` replaces it by the
    /// head's own, which is never larger).
    pub fn report(&self) -> FastReport {
        let p = &self.plan;
        let c = self.spectra.expansion.counts();
        FastReport {
            degree: p.poly.degree,
            kind: p.poly.kind,
            r: p.bounds.r,
            rho: p.poly.rho,
            terms: c.terms,
            n_alpha: c.n_alpha,
            n_beta: c.n_beta,
            n_pairs: c.n_pairs,
            fft_len: self.spectra.toeplitz.fft_len(),
            certified_error: p.certified_error,
            approximation_error: p.approximation_error,
            rounding_error: p.rounding_error,
            certified_lse_error: p.certified_lse_error,
        }
    }

    /// `Σ_j p(M_ij) f_ij x_j` for every column `x` of `[V, 1]`, column-major (`(dv+1) x nq`).
    ///
    /// Parallel (rayon) over `(β, column)` FFTs, frequency-block groups and columns; every
    /// output is summed in a fixed order, so results do not depend on the thread count. With
    /// streamed spectra, stage (2) runs once per chunk of pairs, each chunk's spectra rebuilt
    /// just before; the chunks continue each other's sums, so the result is bitwise that of the
    /// held spectra.
    fn numerators(&self, qa: &[f64], kb: &[f64], v: ArrayView2<f64>) -> Result<Vec<f64>> {
        let FastShape { nq, nk, dv, .. } = self.plan.shape;
        let e = &self.spectra.expansion;
        let (na, nb, np) = (e.alphas.len(), e.betas.len(), e.pairs.len());
        let tp = &self.spectra.toeplitz;
        let (h, nblk) = (tp.spectrum_len(), spectrum_blocks(tp.fft_len()));
        let cols = dv + 1;
        let tile = self.plan.column_tile.clamp(1, cols);
        let chunk = match self.spectra.source {
            Some(_) => self.plan.pair_chunk().clamp(1, np.max(1)),
            None => np,
        };
        let mut xt = vec![0.0; tile * nk];
        let zero = C64::new(0.0, 0.0);
        // Spectra buffers are reused across heads (a pool, one entry per concurrent `apply`):
        // fresh gigabytes would cost page faults on every head.
        let pooled = self.pool.lock().ok().and_then(|mut p| p.pop());
        let mut bufs = match pooled {
            Some(bufs) => bufs,
            None => Buffers {
                xs: try_filled(
                    h.saturating_mul(nb).saturating_mul(tile),
                    zero,
                    "key spectra",
                )?,
                acc: try_filled(
                    h.saturating_mul(na).saturating_mul(tile),
                    zero,
                    "accumulators",
                )?,
                chunk: match self.spectra.source {
                    Some(_) => try_filled(
                        nblk.saturating_mul(chunk),
                        ZERO_BLOCK,
                        "a chunk of kernel spectra",
                    )?,
                    None => Vec::new(),
                },
                workers: match self.spectra.source {
                    Some(_) => kernel_workers(tp, true)?,
                    None => Vec::new(),
                },
            },
        };
        let mut numer = try_filled(cols * nq, 0.0, "numerators")?;
        // Frequency-block groups for stage (2): a few per thread for load balance.
        let groups = (4 * rayon::current_num_threads()).clamp(1, nblk);
        let group = |g: usize| g * nblk / groups..(g + 1) * nblk / groups;
        for c0 in (0..cols).step_by(tile) {
            let cb = tile.min(cols - c0);
            // The tile's columns of [V, 1], contiguous (V is row-major: read it once per tile).
            for (j, row) in v.rows().into_iter().enumerate() {
                for c in 0..cb {
                    xt[c * nk + j] = if c0 + c < dv { row[c0 + c] } else { 1.0 };
                }
            }
            let Buffers {
                xs,
                acc,
                chunk: cbuf,
                workers,
            } = &mut bufs;
            // (1) X̂_β,c = FFT(k^β ∘ x_c) for the tile's columns x_c of [V, 1].
            xs[..cb * nb * h]
                .par_chunks_mut(h)
                .enumerate()
                .try_for_each_init(
                    || (tp.make_scratch(), vec![0.0; nk]),
                    |(ws, prod), (idx, spec)| {
                        let (c, beta) = (idx / nb, idx % nb);
                        let kbeta = &kb[beta * nk..(beta + 1) * nk];
                        let x = &xt[c * nk..(c + 1) * nk];
                        prod.iter_mut()
                            .zip(kbeta.iter().zip(x))
                            .for_each(|(p, (a, b))| *p = a * b);
                        tp.forward(prod, spec, ws)
                    },
                )?;
            // (2) Â_α,c = Σ_β Ĉ_αβ X̂_β,c, by groups of frequency blocks (cache-resident), for
            // all pairs at once or chunk by chunk.
            for p0 in (0..np.max(1)).step_by(chunk.max(1)) {
                let pairs = p0..(p0 + chunk).min(np);
                let spectra: &[Block] = match &self.spectra.source {
                    Some(src) => {
                        let blocks = &mut cbuf[..nblk * pairs.len()];
                        let src = (src.seqs.as_slice(), src.factor.as_slice());
                        kernel_pass(e, tp, src, pairs.clone(), Some(blocks), workers)?;
                        blocks
                    }
                    None => &self.spectra.spectra,
                };
                let st = Stage2 {
                    e,
                    spectra,
                    pairs,
                    xs,
                    h,
                    tile,
                    cb,
                };
                let parts = split_by_groups(&mut acc[..cb * na * h], h, groups, nblk);
                parts.into_par_iter().enumerate().for_each(|(g, mut out)| {
                    let mut xl = vec![ZERO_BLOCK; nb * tile];
                    let mut al = vec![ZERO_BLOCK; na * tile];
                    stage2_dispatch(&st, group(g), &mut out, &mut xl, &mut al);
                });
            }
            // (3) N[:, c] += Σ_α q^α ∘ IFFT(Â_α,c)[rows], α in order.
            numer[c0 * nq..(c0 + cb) * nq]
                .par_chunks_mut(nq)
                .zip(acc[..cb * na * h].par_chunks_mut(na * h))
                .try_for_each_init(
                    || tp.make_scratch(),
                    |ws, (dst, specs)| {
                        for (spec, qalpha) in specs.chunks_exact_mut(h).zip(qa.chunks_exact(nq)) {
                            let z = tp.inverse_product(spec, ws)?;
                            for ((o, zi), qi) in dst.iter_mut().zip(z).zip(qalpha.iter()) {
                                *o += qi * zi;
                            }
                        }
                        Ok::<(), Error>(())
                    },
                )?;
        }
        if let Ok(mut p) = self.pool.lock() {
            p.push(bufs);
        }
        Ok(numer)
    }
}

/// Refuses a mask/bias factor outside the bounds `plan` certified.
fn check_factor(plan: &FastPlan, stats: &FastBounds) -> Result<()> {
    let pb = &plan.bounds;
    if stats.factor_sum > pb.factor_sum
        || stats.factor_norm2 > pb.factor_norm2
        || stats.min_row_mass < pb.min_row_mass
    {
        return Err(Error::Approximation(
            "fast kernel: the mask/bias factor is outside the bounds its plan certified".into(),
        ));
    }
    Ok(())
}

/// The fast method for one head: bounds → certified plan → kernel → apply. Refuses with
/// `Error::Approximation` (and the reason) when `eps` cannot be certified within `limits`.
pub fn fast_forward_head(prob: &HeadProblem, eps: f64, limits: &FastLimits) -> Result<FastOutput> {
    let bounds = FastBounds::from_problem(prob)?;
    let (nq, nk, dv) = (prob.nq(), prob.nk(), prob.dv());
    if nq == 0 || nk == 0 {
        if eps.is_nan() || eps < 0.0 {
            return Err(Error::Value(format!(
                "eps: expected a value >= 0, got {eps}"
            )));
        }
        let report = FastReport {
            degree: 0,
            kind: PolyKind::Taylor,
            r: 0.0,
            rho: 0.0,
            terms: 0,
            n_alpha: 0,
            n_beta: 0,
            n_pairs: 0,
            fft_len: 0,
            certified_error: 0.0,
            approximation_error: 0.0,
            rounding_error: 0.0,
            certified_lse_error: 0.0,
        };
        let lse = Array1::from_elem(nq, f64::NEG_INFINITY);
        return Ok(FastOutput {
            out: Array2::zeros((nq, dv)),
            lse,
            report,
        });
    }
    let shape = FastShape {
        nq,
        nk,
        d: prob.d(),
        dv,
    };
    let plan = fast_plan(shape, prob.support, &bounds, eps, limits)?;
    let kernel = FastKernel::new(
        &plan,
        prob.support,
        prob.seqs,
        prob.factor,
        prob.scale,
        limits,
    )?;
    kernel.apply(prob.q, prob.k, prob.v)
}
