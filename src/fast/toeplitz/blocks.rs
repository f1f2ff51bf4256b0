//! Kernel spectra in frequency blocks, and stage (2) of the forward: per block of frequencies,
//! the sparse product `Â_α,c = Σ_β Ĉ_αβ ⊙ X̂_β,c` over all `(α, β)` pairs and columns.
//!
//! Kernel spectra are stored `[block][pair]` with [`BLOCK`] frequencies per block, real and
//! imaginary parts split, so one block of all pairs is contiguous; the key spectra of the block
//! are split into a small buffer as they are read. Everything a block touches then fits in
//! cache, instead of every accumulator streaming through memory once per pair. The kernel is
//! compiled twice (baseline and AVX2+FMA) and chosen at run time.

use super::expansion::Expansion;
use crate::error::{Error, Result};
use crate::toeplitz::C64;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

pub use crate::fast::common::{spectrum_blocks, BLOCK};
pub(crate) type Block = [f64; 2 * BLOCK];
pub(crate) const ZERO_BLOCK: Block = [0.0; 2 * BLOCK];

/// Fault injection for tests: when non-zero, the allocation of [`try_filled`] that brings it
/// to zero fails as if memory were exhausted ([`inject_alloc_failure`]). One relaxed load per
/// buffer of a head's working set, not per element.
static FAIL_COUNTDOWN: AtomicUsize = AtomicUsize::new(0);

/// Makes the `nth` next fallible allocation of the fast method fail (1 = the next one; 0
/// disarms): the tests' stand-in for running out of memory in the middle of a call.
pub fn inject_alloc_failure(nth: usize) {
    FAIL_COUNTDOWN.store(nth, Ordering::SeqCst);
}

fn injected_failure() -> bool {
    FAIL_COUNTDOWN.load(Ordering::Relaxed) != 0
        && FAIL_COUNTDOWN
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok_and(|n| n == 1)
}

pub(crate) fn try_filled<T: Clone>(len: usize, value: T, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    let reserved = if injected_failure() {
        Err(())
    } else {
        v.try_reserve_exact(len).map_err(|_| ())
    };
    reserved.map_err(|_| {
        Error::Memory(format!(
            "fast method: cannot allocate {what} ({len} x {} bytes)",
            std::mem::size_of::<T>()
        ))
    })?;
    v.resize(len, value);
    Ok(v)
}

/// Splits `specs` (spectra of `h` frequencies each) into per-group pieces of frequency blocks.
pub(crate) fn split_by_groups(
    specs: &mut [C64],
    h: usize,
    groups: usize,
    nblk: usize,
) -> Vec<Vec<&mut [C64]>> {
    let group = |g: usize| g * nblk / groups..(g + 1) * nblk / groups;
    let mut parts: Vec<Vec<&mut [C64]>> = (0..groups).map(|_| Vec::new()).collect();
    for spec in specs.chunks_exact_mut(h) {
        let mut rest = spec;
        for (g, part) in parts.iter_mut().enumerate() {
            let r = group(g);
            let len = (r.end * BLOCK).min(h) - (r.start * BLOCK).min(h);
            let (mine, others) = rest.split_at_mut(len);
            part.push(mine);
            rest = others;
        }
    }
    parts
}

/// Writes spectra `specs[c]` (`c < cb`) into `blocks[b * stride + c]`: for each frequency
/// block the `cb` destinations are adjacent, so the transposition touches one page per block
/// instead of one per block and column.
pub(crate) fn scatter(specs: &[Vec<C64>], blocks: &mut [Block], stride: usize) {
    for (c, spec) in specs.iter().enumerate() {
        let mut chunks = spec.chunks_exact(BLOCK);
        for (b, src) in chunks.by_ref().enumerate() {
            let blk = &mut blocks[b * stride + c];
            for o in 0..BLOCK {
                blk[o] = src[o].re;
                blk[BLOCK + o] = src[o].im;
            }
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let blk = &mut blocks[(spec.len() / BLOCK) * stride + c];
            *blk = ZERO_BLOCK;
            for (o, z) in rest.iter().enumerate() {
                blk[o] = z.re;
                blk[BLOCK + o] = z.im;
            }
        }
    }
}

#[inline(always)]
fn mac(acc: &mut Block, s: &Block, x: &Block) {
    for f in 0..BLOCK {
        let (sr, si, xr, xi) = (s[f], s[BLOCK + f], x[f], x[BLOCK + f]);
        acc[f] += sr * xr - si * xi;
        acc[BLOCK + f] += sr * xi + si * xr;
    }
}

/// What stage (2) reads and writes for one column tile.
pub(crate) struct Stage2<'a> {
    pub(crate) e: &'a Expansion,
    /// Kernel spectra of the pairs `pairs`, `[block][pair - pairs.start]`.
    pub(crate) spectra: &'a [Block],
    /// The pairs whose spectra `spectra` holds: all of them, or one chunk when the spectra are
    /// streamed ([`super::forward`]).
    pub(crate) pairs: Range<usize>,
    /// Key spectra `X̂_β,c` in natural layout: spectrum `c * n_β + β`, `h` frequencies each.
    pub(crate) xs: &'a [C64],
    pub(crate) h: usize,
    pub(crate) tile: usize,
    pub(crate) cb: usize,
}

/// Stage (2) for frequency blocks `blocks`: `Â_α,c = Σ_{pairs (α,β)} Ĉ_αβ ⊙ X̂_β,c`. Each block
/// of the key spectra is split into real/imaginary parts in a cache-resident buffer, multiplied
/// and accumulated there, and written to `out[c * n_α + α]` (the blocks' part of `Â_α,c`).
///
/// Only the pairs of `st.pairs` are applied. An `α` whose pairs begin in an earlier chunk
/// continues from the value in `out` (the sum left there by that chunk), so applying the chunks
/// `0..p1, p1..p2, ...` in order performs the very additions, in the same order, as applying all
/// pairs at once: the results are bitwise the same.
#[inline(always)]
fn stage2_blocks(
    st: &Stage2,
    blocks: Range<usize>,
    out: &mut [&mut [C64]],
    xl: &mut [Block],
    al: &mut [Block],
) {
    let (e, tile, cb, h) = (st.e, st.tile, st.cb, st.h);
    let (na, nb) = (e.alphas.len(), e.betas.len());
    let chunk = st.pairs.clone();
    let np = chunk.len();
    let first = blocks.start * BLOCK;
    for b in blocks {
        let (lo, hi) = (b * BLOCK, ((b + 1) * BLOCK).min(h));
        for beta in 0..nb {
            for c in 0..cb {
                let src = &st.xs[(c * nb + beta) * h + lo..(c * nb + beta) * h + hi];
                let blk = &mut xl[beta * tile + c];
                *blk = ZERO_BLOCK;
                for (o, z) in src.iter().enumerate() {
                    blk[o] = z.re;
                    blk[BLOCK + o] = z.im;
                }
            }
        }
        let spec = &st.spectra[b * np..(b + 1) * np];
        for (alpha, a) in al.chunks_exact_mut(tile).enumerate().take(na) {
            let own = e.pairs_of_alpha(alpha);
            let (p0, p1) = (own.start.max(chunk.start), own.end.min(chunk.end));
            // An α without pairs is written (as zero) with the first chunk.
            if p0 >= p1 && !(own.is_empty() && chunk.start == 0) {
                continue;
            }
            let a = &mut a[..cb];
            if own.start >= chunk.start {
                a.iter_mut().for_each(|x| *x = ZERO_BLOCK);
            } else {
                for (c, blk) in a.iter_mut().enumerate() {
                    *blk = ZERO_BLOCK;
                    let src = &out[c * na + alpha][lo - first..hi - first];
                    for (o, z) in src.iter().enumerate() {
                        blk[o] = z.re;
                        blk[BLOCK + o] = z.im;
                    }
                }
            }
            for p in p0..p1 {
                let (s, beta) = (&spec[p - chunk.start], e.pairs[p].beta);
                for (ac, x) in a.iter_mut().zip(&xl[beta * tile..beta * tile + cb]) {
                    mac(ac, s, x);
                }
            }
            for (c, blk) in a.iter().enumerate() {
                let dst = &mut out[c * na + alpha][lo - first..hi - first];
                for (o, z) in dst.iter_mut().enumerate() {
                    *z = C64::new(blk[o], blk[BLOCK + o]);
                }
            }
        }
    }
}

/// [`stage2_blocks`] compiled for AVX2+FMA.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn stage2_blocks_avx2(
    st: &Stage2,
    blocks: Range<usize>,
    out: &mut [&mut [C64]],
    xl: &mut [Block],
    al: &mut [Block],
) {
    stage2_blocks(st, blocks, out, xl, al)
}

/// [`stage2_blocks`] with the best instruction set of this CPU (chosen at run time, as nothing
/// is compiled for the build machine's CPU).
pub(crate) fn stage2_dispatch(
    st: &Stage2,
    blocks: Range<usize>,
    out: &mut [&mut [C64]],
    xl: &mut [Block],
    al: &mut [Block],
) {
    #[cfg(target_arch = "x86_64")]
    if crate::arch::simd::isa() != crate::arch::simd::Isa::Baseline {
        // SAFETY: isa() reports AVX2 and FMA (AVX-512 machines have both).
        return unsafe { stage2_blocks_avx2(st, blocks, out, xl, al) };
    }
    stage2_blocks(st, blocks, out, xl, al)
}
