//! Frequency-domain products of the transposed pass, blocked and dispatched by instruction set.

use crate::fast::toeplitz::blocks::{Block, BLOCK, ZERO_BLOCK};
use crate::fast::toeplitz::expansion::Expansion;
use crate::toeplitz::C64;
use std::ops::Range;

#[inline(always)]
pub(super) fn mac(acc: &mut Block, s: &Block, x: &Block) {
    for f in 0..BLOCK {
        let (sr, si, xr, xi) = (s[f], s[BLOCK + f], x[f], x[BLOCK + f]);
        acc[f] += sr * xr - si * xi;
        acc[BLOCK + f] += sr * xi + si * xr;
    }
}

/// What the transposed block stage reads for one column tile.
pub(super) struct StageT<'a> {
    pub(super) e: &'a Expansion,
    /// Kernel spectra of the pairs `pairs`, `[block][pair - pairs.start]`.
    pub(super) spectra: &'a [Block],
    /// The pairs whose spectra `spectra` holds: all, or one chunk when streamed.
    pub(super) pairs: Range<usize>,
    /// Per `β`, its first pair (`n_pairs` for none): a `β` begun in an earlier chunk continues
    /// from its sum in `out`.
    pub(super) beta_first: &'a [usize],
    /// `conj(FFT(q^α ∘ a_c))`: spectrum `c * n_α + α`.
    pub(super) qs: &'a [C64],
    /// `FFT(k^β ∘ b_c)`: spectrum `c * n_β + β` (correlations only).
    pub(super) ks: Option<&'a [C64]>,
    pub(super) h: usize,
    pub(super) tile: usize,
    pub(super) cb: usize,
}

pub(super) fn load(src: &[C64], blk: &mut Block) {
    *blk = ZERO_BLOCK;
    for (o, z) in src.iter().enumerate() {
        blk[o] = z.re;
        blk[BLOCK + o] = z.im;
    }
}

/// For frequency blocks `blocks`: `Ŵ_β,c = Σ_{pairs (α,β)} Ĉ_αβ ⊙ Q̂_α,c` into
/// `out[c * n_β + β]`, and with correlations `Ĥ_p += Σ_c Q̂_α,c ⊙ X̂_β,c` into
/// `hout[(b - blocks.start) * n_pairs + p]`. Pairs are visited in their (α-sorted) order and
/// scattered to their β accumulator, so the kernel spectra stream in order. Only the pairs of
/// `st.pairs` are applied, and a `β` begun in an earlier chunk continues from `out`: chunks
/// applied in order perform the additions of all pairs at once, in the same order (bitwise the
/// same results).
#[inline(always)]
pub(super) fn stage_t_blocks(
    st: &StageT,
    blocks: Range<usize>,
    out: &mut [&mut [C64]],
    mut hout: Option<&mut [Block]>,
    xl: &mut [Block],
    kl: &mut [Block],
    al: &mut [Block],
) {
    let (e, tile, cb, h) = (st.e, st.tile, st.cb, st.h);
    let (na, nb, np) = (e.alphas.len(), e.betas.len(), e.pairs.len());
    let first = blocks.start;
    for b in blocks {
        let (lo, hi) = (b * BLOCK, ((b + 1) * BLOCK).min(h));
        for alpha in 0..na {
            for c in 0..cb {
                let at = (c * na + alpha) * h;
                load(&st.qs[at + lo..at + hi], &mut xl[alpha * tile + c]);
            }
        }
        if let Some(ks) = st.ks {
            for beta in 0..nb {
                for c in 0..cb {
                    let at = (c * nb + beta) * h;
                    load(&ks[at + lo..at + hi], &mut kl[beta * tile + c]);
                }
            }
        }
        let chunk = st.pairs.clone();
        al.iter_mut().for_each(|x| *x = ZERO_BLOCK);
        for beta in (0..nb).filter(|&beta| st.beta_first[beta] < chunk.start) {
            for c in 0..cb {
                let src = &out[c * nb + beta][(b - first) * BLOCK..(b - first) * BLOCK + hi - lo];
                load(src, &mut al[beta * tile + c]);
            }
        }
        let npc = chunk.len();
        let spec = &st.spectra[b * npc..(b + 1) * npc];
        for (p, pr) in e.pairs[chunk.clone()]
            .iter()
            .enumerate()
            .map(|(i, pr)| (chunk.start + i, pr))
        {
            let (alpha, beta) = (pr.alpha, pr.beta);
            let s = &spec[p - chunk.start];
            let xs = &xl[alpha * tile..alpha * tile + cb];
            for (a, x) in al[beta * tile..beta * tile + cb].iter_mut().zip(xs) {
                mac(a, s, x);
            }
            if let Some(hb) = hout.as_deref_mut() {
                let dst = &mut hb[(b - first) * np + p];
                for (x, y) in xs.iter().zip(&kl[beta * tile..beta * tile + cb]) {
                    mac(dst, x, y);
                }
            }
        }
        for beta in 0..nb {
            for c in 0..cb {
                let blk = &al[beta * tile + c];
                let dst =
                    &mut out[c * nb + beta][(b - first) * BLOCK..(b - first) * BLOCK + hi - lo];
                for (o, z) in dst.iter_mut().enumerate() {
                    *z = C64::new(blk[o], blk[BLOCK + o]);
                }
            }
        }
    }
}

/// [`stage_t_blocks`] compiled for AVX2+FMA.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn stage_t_blocks_avx2(
    st: &StageT,
    blocks: Range<usize>,
    out: &mut [&mut [C64]],
    hout: Option<&mut [Block]>,
    xl: &mut [Block],
    kl: &mut [Block],
    al: &mut [Block],
) {
    stage_t_blocks(st, blocks, out, hout, xl, kl, al)
}

pub(super) fn stage_t_dispatch(
    st: &StageT,
    blocks: Range<usize>,
    out: &mut [&mut [C64]],
    hout: Option<&mut [Block]>,
    xl: &mut [Block],
    kl: &mut [Block],
    al: &mut [Block],
) {
    #[cfg(target_arch = "x86_64")]
    if crate::arch::simd::isa() != crate::arch::simd::Isa::Baseline {
        // SAFETY: isa() reports AVX2 and FMA (AVX-512 machines have both).
        return unsafe { stage_t_blocks_avx2(st, blocks, out, hout, xl, kl, al) };
    }
    stage_t_blocks(st, blocks, out, hout, xl, kl, al)
}
