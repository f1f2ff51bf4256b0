//! The two FFT passes of [`BackwardKernel::apply`] (see the parent module's "The products"):
//! pass 1, the forward over the columns of `[V, 1]` with the dq contractions, and pass 2, the
//! transposed products for dk and dv (and the correlation spectra for dw/dbias).

use super::kernel::{BackwardKernel, StreamBufs};
use super::plan::threads;
use super::spectra::{kernel_pass, CorrelationAccumulator};
use super::stage::{stage_t_dispatch, StageT};
use crate::error::{Error, Result};
use crate::fast::common::FastShape;
use crate::fast::toeplitz::blocks::split_by_groups;
use crate::fast::toeplitz::blocks::{
    spectrum_blocks, stage2_dispatch, try_filled, Block, Stage2, ZERO_BLOCK,
};
use crate::toeplitz::C64;
use rayon::prelude::*;
use std::ops::Range;

impl BackwardKernel {
    /// The kernel spectra of `pairs` for a block stage: the held ones (all pairs), or — with
    /// `stream` — rebuilt into its chunk buffer.
    fn chunk_spectra<'a>(
        &'a self,
        pairs: Range<usize>,
        stream: Option<&'a mut StreamBufs>,
        nblk: usize,
    ) -> Result<&'a [Block]> {
        let Some(sb) = stream else {
            return Ok(&self.s.spectra);
        };
        let StreamBufs {
            blocks, workers, ..
        } = sb;
        let blocks = &mut blocks[..nblk * pairs.len()];
        let src = (self.s.seqs.as_slice(), self.s.factor.as_slice());
        kernel_pass(
            &self.s.terms,
            &self.s.toeplitz,
            src,
            pairs,
            Some(blocks),
            workers,
        )?;
        Ok(blocks)
    }

    /// Frequency-block groups for the block stages: a few per thread for load balance.
    pub(super) fn block_groups(&self) -> (usize, usize) {
        let nblk = spectrum_blocks(self.s.toeplitz.fft_len());
        ((4 * threads()).clamp(1, nblk), nblk)
    }

    /// Pass 1 (the forward over `[V, 1]`): `(numerators cols x nq, Y cols x d x nq)`.
    pub(super) fn pass1(
        &self,
        qa: &[f64],
        kb: &[f64],
        bt: &[f64],
        xs: &mut [C64],
        acc: &mut [C64],
        mut stream: Option<&mut StreamBufs>,
    ) -> Result<(Vec<f64>, Vec<f64>)> {
        let FastShape { nq, nk, d, dv } = self.plan.shape;
        let e = &self.s.expansion;
        let (na, nb, np) = (e.alphas.len(), e.betas.len(), e.pairs.len());
        let tp = &self.s.toeplitz;
        let h = tp.spectrum_len();
        let cols = dv + 1;
        let tile = self.plan.column_tile.clamp(1, cols);
        let mut numer = try_filled(cols * nq, 0.0, "numerators")?;
        let mut y = try_filled(cols * d * nq, 0.0, "dq products")?;
        let (groups, nblk) = self.block_groups();
        let group = |g: usize| g * nblk / groups..(g + 1) * nblk / groups;
        for c0 in (0..cols).step_by(tile) {
            let cb = tile.min(cols - c0);
            // (1) X̂_β,c = FFT(k^β ∘ b_c).
            xs[..cb * nb * h]
                .par_chunks_mut(h)
                .enumerate()
                .try_for_each_init(
                    || (tp.make_scratch(), vec![0.0; nk]),
                    |(ws, prod), (idx, spec)| {
                        let (c, beta) = (idx / nb, idx % nb);
                        let kbeta = &kb[beta * nk..(beta + 1) * nk];
                        let x = &bt[(c0 + c) * nk..(c0 + c + 1) * nk];
                        prod.iter_mut()
                            .zip(kbeta.iter().zip(x))
                            .for_each(|(p, (a, b))| *p = a * b);
                        tp.forward(prod, spec, ws)
                    },
                )?;
            // (2) Â_α,c = Σ_β Ĉ_αβ X̂_β,c (the forward's block stage), for all pairs at once or
            // chunk by chunk.
            let step = stream.as_ref().map_or(np, |sb| sb.chunk).max(1);
            for p0 in (0..np.max(1)).step_by(step) {
                let pairs = p0..(p0 + step).min(np);
                let spectra = self.chunk_spectra(pairs.clone(), stream.as_deref_mut(), nblk)?;
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
            // (3) N_c += q^α z_α,c, Y_c,l += α_l q^{α-e_l} z_α,c, α in order.
            numer[c0 * nq..(c0 + cb) * nq]
                .par_chunks_mut(nq)
                .zip(y[c0 * d * nq..(c0 + cb) * d * nq].par_chunks_mut(d * nq))
                .zip(acc[..cb * na * h].par_chunks_mut(na * h))
                .try_for_each_init(
                    || tp.make_scratch(),
                    |ws, ((dst, ydst), specs)| {
                        for (alpha, spec) in specs.chunks_exact_mut(h).enumerate() {
                            let z = tp.inverse_product(spec, ws)?;
                            let qalpha = &qa[alpha * nq..(alpha + 1) * nq];
                            for ((o, zi), qi) in dst.iter_mut().zip(z).zip(qalpha) {
                                *o += qi * zi;
                            }
                            for &(l, m, idx) in &self.s.alpha_minus[alpha] {
                                let qm = &qa[idx * nq..(idx + 1) * nq];
                                for ((o, zi), qi) in
                                    ydst[l * nq..(l + 1) * nq].iter_mut().zip(z).zip(qm)
                                {
                                    *o += m * qi * zi;
                                }
                            }
                        }
                        Ok::<(), Error>(())
                    },
                )?;
        }
        Ok((numer, y))
    }

    /// Pass 2 (transposed products over the columns of `a`): `(dV dv x nk, E cols x d x nk)`;
    /// accumulates the correlation spectra when `corr` is given.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn pass2(
        &self,
        qa: &[f64],
        kb: &[f64],
        at: &[f64],
        bt: &[f64],
        mut corr: Option<&mut CorrelationAccumulator>,
        qs: &mut [C64],
        acc: &mut [C64],
        mut stream: Option<&mut StreamBufs>,
    ) -> Result<(Vec<f64>, Vec<f64>)> {
        let FastShape { nq, nk, d, dv } = self.plan.shape;
        let e = &self.s.expansion;
        let (na, nb, np) = (e.alphas.len(), e.betas.len(), e.pairs.len());
        let tp = &self.s.toeplitz;
        let h = tp.spectrum_len();
        let cols = dv + 1;
        let tile = self.plan.column_tile.clamp(1, cols);
        let zero = C64::new(0.0, 0.0);
        let hacc = corr.is_some();
        let mut ks = if hacc {
            try_filled(
                h.saturating_mul(nb).saturating_mul(tile),
                zero,
                "key spectra",
            )?
        } else {
            Vec::new()
        };
        let mut dvt = try_filled(dv * nk, 0.0, "dv")?;
        let mut et = try_filled(cols * d * nk, 0.0, "dk products")?;
        let (groups, nblk) = self.block_groups();
        let group = |g: usize| g * nblk / groups..(g + 1) * nblk / groups;
        let beta_first: Vec<usize> = self
            .s
            .by_beta
            .iter()
            .map(|ps| ps.first().copied().unwrap_or(np))
            .collect();
        for c0 in (0..cols).step_by(tile) {
            let cb = tile.min(cols - c0);
            // (1) Q̂_α,c = conj(FFT(q^α ∘ a_c)); with correlations also X̂_β,c = FFT(k^β ∘ b_c).
            qs[..cb * na * h]
                .par_chunks_mut(h)
                .enumerate()
                .try_for_each_init(
                    || (tp.make_scratch(), vec![0.0; nq]),
                    |(ws, prod), (idx, spec)| {
                        let (c, alpha) = (idx / na, idx % na);
                        let qalpha = &qa[alpha * nq..(alpha + 1) * nq];
                        let x = &at[(c0 + c) * nq..(c0 + c + 1) * nq];
                        prod.iter_mut()
                            .zip(qalpha.iter().zip(x))
                            .for_each(|(p, (a, b))| *p = a * b);
                        tp.forward(prod, spec, ws)?;
                        spec.iter_mut().for_each(|z| z.im = -z.im);
                        Ok::<(), Error>(())
                    },
                )?;
            if hacc {
                ks[..cb * nb * h]
                    .par_chunks_mut(h)
                    .enumerate()
                    .try_for_each_init(
                        || (tp.make_scratch(), vec![0.0; nk]),
                        |(ws, prod), (idx, spec)| {
                            let (c, beta) = (idx / nb, idx % nb);
                            let kbeta = &kb[beta * nk..(beta + 1) * nk];
                            let x = &bt[(c0 + c) * nk..(c0 + c + 1) * nk];
                            prod.iter_mut()
                                .zip(kbeta.iter().zip(x))
                                .for_each(|(p, (a, b))| *p = a * b);
                            tp.forward(prod, spec, ws)
                        },
                    )?;
            }
            // (2) Ŵ_β,c = Σ_α Ĉ_αβ Q̂_α,c, and Ĥ_p += Σ_c Q̂_α,c X̂_β,c, by frequency blocks, for
            // all pairs at once or chunk by chunk.
            let step = stream.as_ref().map_or(np, |sb| sb.chunk).max(1);
            for p0 in (0..np.max(1)).step_by(step) {
                let pairs = p0..(p0 + step).min(np);
                let spectra = self.chunk_spectra(pairs.clone(), stream.as_deref_mut(), nblk)?;
                let st = StageT {
                    e,
                    spectra,
                    pairs,
                    beta_first: &beta_first,
                    qs,
                    ks: if hacc { Some(&ks) } else { None },
                    h,
                    tile,
                    cb,
                };
                let parts = split_by_groups(&mut acc[..cb * nb * h], h, groups, nblk);
                let hparts: Vec<Option<&mut [Block]>> = match corr.as_deref_mut() {
                    Some(c) => {
                        let mut rest: &mut [Block] = &mut c.blocks;
                        let mut v = Vec::with_capacity(groups);
                        for g in 0..groups {
                            let r = group(g);
                            let (mine, others) = rest.split_at_mut((r.end - r.start) * np);
                            v.push(Some(mine));
                            rest = others;
                        }
                        v
                    }
                    None => (0..groups).map(|_| None).collect(),
                };
                parts
                    .into_par_iter()
                    .zip(hparts)
                    .enumerate()
                    .for_each(|(g, (mut out, hout))| {
                        let mut xl = vec![ZERO_BLOCK; na * tile];
                        let mut kl = if hacc {
                            vec![ZERO_BLOCK; nb * tile]
                        } else {
                            Vec::new()
                        };
                        let mut al = vec![ZERO_BLOCK; nb * tile];
                        stage_t_dispatch(&st, group(g), &mut out, hout, &mut xl, &mut kl, &mut al);
                    });
            }
            // (3) w_β,c = IFFT(Ŵ_β,c) read backwards; dV_c += k^β w, E_c,l += β_l k^{β-e_l} w.
            let mut dv_parts: Vec<&mut [f64]> = dvt.chunks_mut(nk).collect();
            dv_parts.push(&mut []); // the ones column has no dV
            let dv_parts: Vec<&mut [f64]> = dv_parts.into_iter().skip(c0).take(cb).collect();
            dv_parts
                .into_par_iter()
                .zip(et[c0 * d * nk..(c0 + cb) * d * nk].par_chunks_mut(d * nk))
                .zip(acc[..cb * nb * h].par_chunks_mut(nb * h))
                .try_for_each_init(
                    || (tp.make_scratch(), vec![0.0; nk]),
                    |(ws, wbuf), ((dst, edst), specs)| {
                        for (beta, spec) in specs.chunks_exact_mut(h).enumerate() {
                            let full = tp.inverse(spec, ws)?;
                            for (j, w) in wbuf.iter_mut().enumerate() {
                                *w = full[nk - 1 - j];
                            }
                            let kbeta = &kb[beta * nk..(beta + 1) * nk];
                            for ((o, wj), kj) in dst.iter_mut().zip(wbuf.iter()).zip(kbeta) {
                                *o += kj * wj;
                            }
                            for &(l, m, idx) in &self.s.beta_minus[beta] {
                                let km = &kb[idx * nk..(idx + 1) * nk];
                                for ((o, wj), kj) in edst[l * nk..(l + 1) * nk]
                                    .iter_mut()
                                    .zip(wbuf.iter())
                                    .zip(km)
                                {
                                    *o += m * kj * wj;
                                }
                            }
                        }
                        Ok::<(), Error>(())
                    },
                )?;
        }
        Ok((dvt, et))
    }
}
