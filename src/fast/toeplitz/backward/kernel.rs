//! [`BackwardKernel`]: one call's plan applied to each head (the two FFT passes, the
//! correlations for dw/dbias, the per-head certificate).

use super::plan::{backward_pair_chunk, threads};
use super::spectra::{
    backward_factor_stats, check_backward_factor, BackwardSpectra, CorrelationAccumulator, Minus,
};
use super::BackwardReport;
use crate::error::{Error, Result};
use crate::fast::bounds::{max_abs, FastBounds};
use crate::fast::common::{FastLimits, FastShape};
use crate::fast::grad::{GradCertificate, HeadGrads};
use crate::fast::grad_bounds::{approximation_errors, GradBounds, PSums};
use crate::fast::plans::BackwardPlan;
use crate::fast::toeplitz::backward_certify::{
    data_terms, rounding_errors, KernelNorms, MonomialNorms, RoundingTerms,
};
use crate::fast::toeplitz::blocks::{spectrum_blocks, try_filled, Block, BLOCK, ZERO_BLOCK};
use crate::fast::toeplitz::certify::BetaNorms;
use crate::fast::toeplitz::expansion::Expansion;
use crate::fast::toeplitz::forward::{kernel_workers, KernelWorker};
use crate::poly::{norm2, U};
use crate::toeplitz::C64;
use ndarray::{Array1, Array2, ArrayView2};
use rayon::prelude::*;
use std::ops::Range;
use std::sync::Arc;

/// The per-call half of the fast backward: a call's certified plan and the (possibly cached,
/// shared) [`BackwardSpectra`] for its polynomial. Build once, apply to every head; each head is
/// checked against *this* plan's bounds and certified from its own data.
pub struct BackwardKernel {
    pub(super) plan: BackwardPlan,
    pub(super) s: Arc<BackwardSpectra>,
    /// Pairs per chunk when the plan streams the kernel spectra.
    pub(super) chunk: Option<usize>,
}

/// One `apply`'s buffers for streamed spectra: a chunk of kernel spectra and the workers that
/// build it.
pub(super) struct StreamBufs {
    pub(super) chunk: usize,
    pub(super) blocks: Vec<Block>,
    pub(super) workers: Vec<KernelWorker>,
}

impl BackwardKernel {
    /// Expands `plan.poly` (and `p'` for dw) over `support` and computes the kernel spectra.
    /// `seqs` (`|S| x glen`) and `factor` must be those the plan's bounds came from.
    pub fn new(
        plan: &BackwardPlan,
        support: &[(usize, usize)],
        seqs: ArrayView2<f64>,
        factor: &[f64],
        scale: f64,
        limits: &FastLimits,
    ) -> Result<Self> {
        let FastShape { nq, nk, d, .. } = plan.shape;
        // The cheap checks first, so a mismatched factor is refused before any FFT.
        let (stats, fstats) = backward_factor_stats(nq, nk, support, seqs, factor, scale)?;
        check_backward_factor(plan, &stats, &fstats)?;
        let make = if backward_pair_chunk(plan, support.len()).is_some() {
            BackwardSpectra::build_streamed
        } else {
            BackwardSpectra::build
        };
        let s = make(
            &plan.poly.coeffs,
            (nq, nk, d),
            plan.want.dw,
            support,
            seqs,
            factor,
            scale,
            limits.max_terms,
        )?;
        Self::with_spectra(plan, Arc::new(s))
    }

    /// Pairs `plan` with spectra built for its polynomial, shape and dw-ness (e.g. from the
    /// cache); refuses others, spectra held where the plan streams them (or the reverse), or a
    /// mask/bias factor outside the plan's bounds.
    pub fn with_spectra(plan: &BackwardPlan, s: Arc<BackwardSpectra>) -> Result<Self> {
        let FastShape { nq, nk, d, .. } = plan.shape;
        let same_poly = s.coeffs.len() == plan.poly.coeffs.len()
            && s.coeffs
                .iter()
                .zip(&plan.poly.coeffs)
                .all(|(a, b)| a.to_bits() == b.to_bits());
        if s.shape != (nq, nk, d) || !same_poly || s.with_dw != plan.want.dw {
            return Err(Error::Value(
                "fast backward kernel: spectra of another polynomial, shape or gradient set than \
                 the plan's"
                    .into(),
            ));
        }
        let chunk = backward_pair_chunk(plan, s.support.len());
        if chunk.is_some() != s.streamed() {
            return Err(Error::Value(format!(
                "fast backward kernel: spectra {}, but the plan has them {}; build them with \
                 BackwardSpectra::{}",
                if s.streamed() { "streamed" } else { "held" },
                if chunk.is_some() { "streamed" } else { "held" },
                if chunk.is_some() {
                    "build_streamed"
                } else {
                    "build"
                }
            )));
        }
        check_backward_factor(plan, &s.stats, &s.fstats)?;
        Ok(BackwardKernel {
            plan: plan.clone(),
            s,
            chunk,
        })
    }

    /// The spectra this kernel applies (shared with the cache and other calls).
    pub fn spectra(&self) -> &Arc<BackwardSpectra> {
        &self.s
    }

    pub fn plan(&self) -> &BackwardPlan {
        &self.plan
    }

    pub fn expansion(&self) -> &Expansion {
        &self.s.expansion
    }

    pub fn report(&self, cert: GradCertificate) -> BackwardReport {
        let p = &self.plan;
        let c = &p.counts;
        BackwardReport {
            degree: p.poly.degree,
            kind: p.poly.kind,
            r: p.poly.r,
            rho: p.poly.rho,
            rho_d: p.rho_d,
            terms: c.terms,
            n_alpha: c.n_alpha,
            n_beta: c.n_beta,
            n_pairs: c.n_pairs,
            fft_len: self.s.toeplitz.fft_len(),
            cert,
        }
    }

    /// A zeroed correlation accumulator (for dw/dbias), shared by the heads of this kernel.
    pub fn accumulator(&self) -> Result<CorrelationAccumulator> {
        let n = spectrum_blocks(self.s.toeplitz.fft_len()) * self.s.expansion.pairs.len();
        Ok(CorrelationAccumulator {
            blocks: try_filled(n, ZERO_BLOCK, "correlation spectra")?,
        })
    }

    /// The head's own bounds and certificate, from the norms of its data, before any FFT.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn certify(
        &self,
        q: ArrayView2<f64>,
        k: ArrayView2<f64>,
        v: ArrayView2<f64>,
        dout: ArrayView2<f64>,
        qa: &[f64],
        kb: &[f64],
        psums: Option<&PSums>,
    ) -> Result<GradCertificate> {
        let FastShape { nq, nk, dv, .. } = self.plan.shape;
        let head = self.s.w_norms.bound(&self.s.support, q, k, self.s.scale);
        let v_max = max_abs(v.iter());
        let pb = &self.plan.bounds;
        let gb = GradBounds::new(
            &self.s.w_norms,
            &self.s.support,
            self.s.scale,
            q,
            k,
            v,
            dout,
        );
        let ps = match psums {
            Some(p) => *p,
            None => {
                let seqs =
                    ArrayView2::from_shape((self.s.support.len(), nq + nk - 1), &self.s.seqs)
                        .map_err(|e| Error::Value(format!("seqs: {e}")))?;
                let want = self.plan.want;
                PSums::from_data(
                    q,
                    k,
                    self.s.scale,
                    &self.s.support,
                    seqs,
                    &self.s.factor,
                    self.plan.bounds.r,
                    &self.plan.fstats,
                    want.dw || want.db,
                )?
            }
        };
        if head.r > pb.r
            || head.r_abs > pb.r_abs
            || v_max > pb.v_max
            || !gb.within(&self.plan.grad)
            || !ps.within(&self.plan.psums)
        {
            return Err(Error::Approximation(format!(
                "fast backward: this head (R = {:.4}, max|v| = {:.4}, max|dout| = {:.4}) exceeds the \
                 bounds its plan certified (R = {:.4}, max|v| = {:.4}, max|dout| = {:.4})",
                head.r, v_max, gb.do_max, pb.r, pb.v_max, self.plan.grad.do_max
            )));
        }
        let up_q = 1.0 + (nq + 2) as f64 * U;
        let up_k = 1.0 + (nk + 2) as f64 * U;
        let norms3 = |r: &[f64], up: f64| -> BetaNorms {
            let l1 = r.iter().map(|x| x.abs()).sum::<f64>() * up;
            let l2 = norm2(r.iter()) * up;
            [l1, l2, max_abs(r.iter())]
        };
        let q_norms: Vec<BetaNorms> = qa.par_chunks_exact(nq).map(|r| norms3(r, up_q)).collect();
        let k_norms: Vec<BetaNorms> = kb.par_chunks_exact(nk).map(|r| norms3(r, up_k)).collect();
        let q_max: Vec<f64> = q_norms.iter().map(|x| x[2]).collect();
        let d = self.plan.shape.d;
        let minus_max = |table: &[Minus], norms: &[BetaNorms]| -> Vec<Vec<f64>> {
            let mut out = vec![vec![0.0; table.len()]; d];
            for (mu, entries) in table.iter().enumerate() {
                for &(l, m, idx) in entries {
                    out[l][mu] = m * norms[idx][2] * (1.0 + 2.0 * U);
                }
            }
            out
        };
        let dq_max = minus_max(&self.s.alpha_minus, &q_norms);
        let dk_max = minus_max(&self.s.beta_minus, &k_norms);
        let kn = KernelNorms {
            e: &self.s.expansion,
            pair_norms: &self.s.norms,
            pair_inf: &self.s.pair_inf,
            by_alpha: &self.s.by_alpha,
            by_beta: &self.s.by_beta,
            d_inf: &self.s.d_inf,
            links: &self.s.links,
            d_pairs: self.s.dexp.as_ref().map_or(0, |e| e.pairs.len()),
            d_max_terms: self.s.d_max_terms,
            ns: self.s.support.len(),
            fft_len: self.s.toeplitz.fft_len(),
            nq,
            nk,
            scale: self.s.scale,
            h_terms: (dv + 1) * self.plan.heads,
        };
        let mn = MonomialNorms {
            q_max: &q_max,
            q_norms: &q_norms,
            k_norms: &k_norms,
            dq_max: &dq_max,
            dk_max: &dk_max,
        };
        let want = self.plan.want;
        let terms: RoundingTerms =
            data_terms(&kn, &mn, &self.plan.poly.coeffs, head.r_abs, &gb, want);
        let fb = FastBounds {
            r: head.r,
            r_abs: head.r_abs,
            v_max,
            ..*pb
        };
        let (rho, rho_d) = (self.plan.poly.rho, self.plan.rho_d);
        let (approx, mag) = approximation_errors(rho, rho_d, &gb, &ps);
        let rounding = rounding_errors(&terms, rho, rho_d, head.r, &fb, &gb, &ps, dv).masked(want);
        let approx = approx.masked(want);
        // Both the head's and the plan's certificates are valid: keep the smaller per gradient.
        let approx = approx.zip(self.plan.approximation, f64::min);
        let rounding = rounding.zip(self.plan.rounding, f64::min);
        let output = mag
            .plus(self.plan.eps)
            .zip(mag, |a, _| a * self.plan.out_rel)
            .masked(want)
            .zip(self.plan.output, f64::min);
        let certified = approx.plus(rounding).plus(output);
        let cert = GradCertificate {
            approximation: approx,
            rounding,
            output,
            certified,
        };
        if let Some(msg) = self.plan.over_message(&cert, "this head's") {
            return Err(Error::Approximation(format!(
                "{msg}; double precision cannot certify it here"
            )));
        }
        Ok(cert)
    }

    /// One head: `q` (`nq x d`), `k` (`nk x d`), `v` (`nk x dv`), `dout` (`nq x dv`). With dw or
    /// dbias wanted, `corr` must be the kernel's [`CorrelationAccumulator`] (shared by the heads,
    /// applied one after another), and [`BackwardKernel::finish`] turns it into dw and dbias.
    /// `psums`: the head's [`PSums`] if already computed (else computed here).
    pub fn apply(
        &self,
        q: ArrayView2<f64>,
        k: ArrayView2<f64>,
        v: ArrayView2<f64>,
        dout: ArrayView2<f64>,
        corr: Option<&mut CorrelationAccumulator>,
        psums: Option<&PSums>,
    ) -> Result<HeadGrads> {
        let FastShape { nq, nk, d, dv } = self.plan.shape;
        for (name, x, rows, cols) in [
            ("q", &q, nq, d),
            ("k", &k, nk, d),
            ("v", &v, nk, dv),
            ("dout", &dout, nq, dv),
        ] {
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
        let want = self.plan.want;
        if (want.dw || want.db) != corr.is_some() {
            return Err(Error::Value(
                "fast backward: a correlation accumulator is needed exactly when dw or dbias is wanted"
                    .into(),
            ));
        }
        let e = &self.s.expansion;
        let (qa, kb) = (
            Expansion::monomials(&e.alphas, q),
            Expansion::monomials(&e.betas, k),
        );
        let not_contiguous = || Error::Value("monomials: expected a contiguous array".into());
        let (qa, kb) = (
            qa.as_slice().ok_or_else(not_contiguous)?,
            kb.as_slice().ok_or_else(not_contiguous)?,
        );
        let cert = self.certify(q, k, v, dout, qa, kb, psums)?;
        let cols = dv + 1;
        // b = [V, 1], column-major.
        let mut bt = vec![1.0; cols * nk];
        for (j, row) in v.rows().into_iter().enumerate() {
            for c in 0..dv {
                bt[c * nk + j] = row[c];
            }
        }
        // Spectra buffers shared by the two passes (pass 1: key spectra in `nb_buf`, per-α
        // accumulators in `na_buf`; pass 2: query spectra in `na_buf`, per-β accumulators in
        // `nb_buf`), so fresh pages are faulted in once.
        let h = self.s.toeplitz.spectrum_len();
        let tile = self.plan.column_tile.clamp(1, cols);
        let zero = C64::new(0.0, 0.0);
        let (na, nb) = (e.alphas.len(), e.betas.len());
        let mut na_buf = try_filled(h.saturating_mul(na).saturating_mul(tile), zero, "spectra")?;
        let mut nb_buf = try_filled(h.saturating_mul(nb).saturating_mul(tile), zero, "spectra")?;
        let mut stream = match self.chunk {
            Some(chunk) => {
                let nblk = spectrum_blocks(self.s.toeplitz.fft_len());
                Some(StreamBufs {
                    chunk,
                    blocks: try_filled(
                        nblk.saturating_mul(chunk),
                        ZERO_BLOCK,
                        "a chunk of kernel spectra",
                    )?,
                    workers: kernel_workers(&self.s.toeplitz, true)?,
                })
            }
            None => None,
        };
        // Pass 1: numerators (cols x nq) and the dq products Y (cols x d x nq).
        let (numer, y) = self.pass1(qa, kb, &bt, &mut nb_buf, &mut na_buf, stream.as_mut())?;
        let mut out = Array2::<f64>::zeros((nq, dv));
        let mut lse = Array1::<f64>::from_elem(nq, f64::NEG_INFINITY);
        let mut at = vec![0.0; cols * nq];
        let mut dq = Array2::<f64>::zeros((nq, d));
        for i in 0..nq {
            if self.s.masses[i] <= 0.0 {
                continue; // no visible key: no gradient flows through this row
            }
            let den = numer[dv * nq + i];
            if !(den.is_finite() && den > 0.0) {
                return Err(Error::Approximation(format!(
                    "fast backward: row {i} has denominator {den:e} despite the certificate; \
                     use the exact method"
                )));
            }
            let mut dsum = 0.0;
            for c in 0..dv {
                let o = numer[c * nq + i] / den;
                out[[i, c]] = o;
                dsum += dout[[i, c]] * o;
                at[c * nq + i] = dout[[i, c]] / den;
            }
            at[dv * nq + i] = -dsum / den;
            lse[i] = den.ln();
            for l in 0..d {
                let mut s = 0.0;
                for c in 0..cols {
                    s += at[c * nq + i] * y[(c * d + l) * nq + i];
                }
                dq[[i, l]] = s;
            }
        }
        drop(y);
        // Pass 2: dV (dv x nk), the dk products E (cols x d x nk), the correlations.
        let (dvt, et) = self.pass2(
            qa,
            kb,
            &at,
            &bt,
            corr,
            &mut na_buf,
            &mut nb_buf,
            stream.as_mut(),
        )?;
        let mut dk = Array2::<f64>::zeros((nk, d));
        let mut dvv = Array2::<f64>::zeros((nk, dv));
        for j in 0..nk {
            for l in 0..d {
                let mut s = 0.0;
                for c in 0..cols {
                    s += bt[c * nk + j] * et[(c * d + l) * nk + j];
                }
                dk[[j, l]] = s;
            }
            for c in 0..dv {
                dvv[[j, c]] = dvt[c * nk + j];
            }
        }
        Ok(HeadGrads {
            dq,
            dk,
            dv: dvv,
            out,
            lse,
            cert,
        })
    }

    /// Inverts the accumulated correlations and contracts them with the kernels: `dw`
    /// (`|S| x glen`, along the diagonals `g`) when wanted, and `dbias` (`glen`) when wanted.
    #[allow(clippy::type_complexity)]
    pub fn finish(
        &self,
        mut corr: CorrelationAccumulator,
    ) -> Result<(Option<Array2<f64>>, Option<Vec<f64>>)> {
        let FastShape { nq, nk, .. } = self.plan.shape;
        let glen = nq + nk - 1;
        let want = self.plan.want;
        let e = &self.s.expansion;
        let np = e.pairs.len();
        let tp = &self.s.toeplitz;
        let (n, h) = (tp.fft_len(), tp.spectrum_len());
        let nblk = spectrum_blocks(n);
        if corr.blocks.len() != nblk * np {
            return Err(Error::Value(
                "fast backward: correlation accumulator of another kernel".into(),
            ));
        }
        let inv_n = 1.0 / n as f64;
        let shift = n - (nq - 1); // H(g) = IFFT[(g - (nq-1)) mod N] / N
                                  // (1) Invert each pair's spectrum; store H_p(g) back in its blocks as reals.
        let batch = 4 * threads().max(1);
        for p0 in (0..np).step_by(batch) {
            let p1 = (p0 + batch).min(np);
            let blocks = &corr.blocks;
            let hs: Vec<Result<Vec<f64>>> = (p0..p1)
                .into_par_iter()
                .map_init(
                    || (tp.make_scratch(), vec![C64::new(0.0, 0.0); h]),
                    |(ws, spec), p| {
                        for (b, chunk) in spec.chunks_mut(BLOCK).enumerate() {
                            let blk = &blocks[b * np + p];
                            for (o, z) in chunk.iter_mut().enumerate() {
                                *z = C64::new(blk[o], blk[BLOCK + o]);
                            }
                        }
                        let full = tp.inverse(spec, ws)?;
                        Ok((0..glen).map(|g| full[(g + shift) % n] * inv_n).collect())
                    },
                )
                .collect();
            for (i, hv) in hs.into_iter().enumerate() {
                let hv = hv?;
                let p = p0 + i;
                for b in 0..nblk {
                    let blk = &mut corr.blocks[b * np + p];
                    for (o, x) in blk.iter_mut().enumerate() {
                        let g = b * 2 * BLOCK + o;
                        *x = if g < glen { hv[g] } else { 0.0 };
                    }
                }
            }
        }
        // (2) Contractions over chunks of diagonals (fixed chunks: thread-count independent).
        let ns = self.s.support.len();
        const CHUNK: usize = 64 * BLOCK; // diagonals per chunk, a whole number of blocks
        let chunks: Vec<Range<usize>> = (0..glen)
            .step_by(CHUNK)
            .map(|g0| g0..(g0 + CHUNK).min(glen))
            .collect();
        let blocks = &corr.blocks;
        let scale = self.s.scale;
        let parts: Vec<(Vec<f64>, Vec<f64>)> = chunks
            .par_iter()
            .map(|r| {
                let clen = r.len();
                let fac = &self.s.factor[r.clone()];
                let (mut kern, mut tmp) = (vec![0.0; clen], vec![0.0; clen]);
                let hp = |p: usize, dst: &mut Vec<f64>| {
                    dst.clear();
                    for b in r.start / (2 * BLOCK)..r.end.div_ceil(2 * BLOCK) {
                        dst.extend_from_slice(&blocks[b * np + p]);
                    }
                    dst.truncate(clen);
                };
                let mut hbuf = Vec::with_capacity(clen + 2 * BLOCK);
                let mut db = Vec::new();
                if want.db {
                    db = vec![0.0; clen];
                    for p in 0..np {
                        self.s.terms.kernel(
                            p,
                            &self.s.seqs,
                            glen,
                            r.start,
                            fac,
                            &mut kern,
                            &mut tmp,
                        );
                        hp(p, &mut hbuf);
                        for ((o, c), x) in db.iter_mut().zip(&kern).zip(&hbuf) {
                            *o += c * x;
                        }
                    }
                }
                let mut dw = Vec::new();
                if want.dw {
                    dw = vec![0.0; ns * clen];
                    if let (Some(de), Some(dt)) = (&self.s.dexp, &self.s.dterms) {
                        for pd in 0..de.pairs.len() {
                            dt.kernel(pd, &self.s.seqs, glen, r.start, fac, &mut kern, &mut tmp);
                            for s in 0..ns {
                                hp(self.s.links[pd * ns + s], &mut hbuf);
                                for ((o, c), x) in dw[s * clen..(s + 1) * clen]
                                    .iter_mut()
                                    .zip(&kern)
                                    .zip(&hbuf)
                                {
                                    *o += scale * c * x;
                                }
                            }
                        }
                    }
                }
                (dw, db)
            })
            .collect();
        let mut dw = want.dw.then(|| Array2::<f64>::zeros((ns, glen)));
        let mut db = want.db.then(|| vec![0.0; glen]);
        for (r, (pw, pb)) in chunks.iter().zip(parts) {
            let clen = r.len();
            if let Some(dw) = dw.as_mut() {
                for s in 0..ns {
                    for (g, x) in r.clone().zip(&pw[s * clen..(s + 1) * clen]) {
                        dw[[s, g]] = *x;
                    }
                }
            }
            if let Some(db) = db.as_mut() {
                db[r.clone()].copy_from_slice(&pb);
            }
        }
        Ok((dw, db))
    }
}
