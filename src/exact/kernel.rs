//! The register-blocked GEMM micro-kernel and the row operations of the online softmax, generic
//! over [`Lanes`]. Everything is `#[inline(always)]` (see [`crate::arch::lanes`]).
//!
//! The micro-kernel computes an `MR x NR` block of `C` (`NR = 2W`, two registers per row) held
//! in registers over the whole depth: per depth step it loads one row of `B` (two registers) and
//! broadcasts `MR` elements of `A` — `2 MR` FMAs for `MR + 2` loads. Callers pad their buffers so
//! that every block is full: `B` rows hold `NR` valid (or zero) elements, and `C` has `MR` rows.
//!
//! # Safety
//! Every `unsafe fn` here has the same contract, stated once: it runs inside a function compiled
//! for `L`'s instruction set on a CPU that has it ([`crate::arch::real::Real::with_lanes`]), and every
//! element its documentation names (`x[..n]`, the rows of a tile, a row's log-factor) is valid.
#![allow(clippy::missing_safety_doc)]

use crate::arch::lanes::Lanes;
use crate::arch::Real;
use num_traits::{Float, Zero};

/// Columns of a micro-tile.
#[inline(always)]
pub const fn nr<L: Lanes>() -> usize {
    2 * L::W
}

/// `n` rounded up to a multiple of `m`.
#[inline(always)]
pub const fn round_up(n: usize, m: usize) -> usize {
    n.div_ceil(m) * m
}

/// What a micro-tile does with its `MR x NR` result before storing it: row `r`, columns
/// `col..col + W` of the strip (one register).
pub trait Epilogue<L: Lanes> {
    /// Load `C` and add the product to it first.
    const ACCUMULATE: bool;
    /// `apply` is the identity (the tile is stored as it is).
    const IDENTITY: bool = false;
    /// # Safety
    /// Reads what the implementation addresses for row `r`, column `col`.
    unsafe fn apply(&mut self, r: usize, col: usize, v: L::V) -> L::V;
}

/// `C = A B`.
pub struct Store;
impl<L: Lanes> Epilogue<L> for Store {
    const ACCUMULATE: bool = false;
    const IDENTITY: bool = true;
    #[inline(always)]
    unsafe fn apply(&mut self, _: usize, _: usize, v: L::V) -> L::V {
        v
    }
}

/// `C += A B`.
pub struct Accumulate;
impl<L: Lanes> Epilogue<L> for Accumulate {
    const ACCUMULATE: bool = true;
    const IDENTITY: bool = true;
    #[inline(always)]
    unsafe fn apply(&mut self, _: usize, _: usize, v: L::V) -> L::V {
        v
    }
}

/// `C[MR x NR] = epi(A B)` (or `epi(C + A B)`), depth `k`. `A(r, p)` is at `a + r rsa + p csa`,
/// row `p` of `B` at `b + p rsb` (`NR` contiguous), row `r` of `C` at `c + r rsc` (`NR`
/// contiguous); `col` is the tile's first column in the strip (for the epilogue).
///
/// # Safety
/// Every element addressed must be valid; `c` must not alias `a` or `b`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub unsafe fn tile<L: Lanes, P: Epilogue<L>>(
    k: usize,
    a: *const L::E,
    rsa: usize,
    csa: usize,
    b: *const L::E,
    rsb: usize,
    c: *mut L::E,
    rsc: usize,
    col: usize,
    epi: &mut P,
) {
    match L::MR {
        4 => tile_n::<L, P, 4>(k, a, rsa, csa, b, rsb, c, rsc, col, epi),
        6 => tile_n::<L, P, 6>(k, a, rsa, csa, b, rsb, c, rsc, col, epi),
        8 => tile_n::<L, P, 8>(k, a, rsa, csa, b, rsb, c, rsc, col, epi),
        12 => tile_n::<L, P, 12>(k, a, rsa, csa, b, rsb, c, rsc, col, epi),
        _ => unreachable!("micro-tile rows"),
    }
}

/// Depth steps ahead that the micro-kernel prefetches `A` and `B` (the backward's transposed
/// `P^T dO` and `dS^T Q` read a new row of the L2-resident tile per step): backward n = 4096,
/// d = 64, 2 threads 0.47-0.48 s against 0.48-0.49 s without; the forward within noise.
const PF: usize = 16;

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tile_n<L: Lanes, P: Epilogue<L>, const MR: usize>(
    k: usize,
    a: *const L::E,
    rsa: usize,
    csa: usize,
    b: *const L::E,
    rsb: usize,
    c: *mut L::E,
    rsc: usize,
    col: usize,
    epi: &mut P,
) {
    let mut acc = [[L::zero(); 2]; MR];
    if P::ACCUMULATE {
        for (r, row) in acc.iter_mut().enumerate() {
            row[0] = L::load(c.add(r * rsc));
            row[1] = L::load(c.add(r * rsc + L::W));
        }
    }
    let mut ap = a;
    let mut bp = b;
    for _ in 0..k {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>(ap.wrapping_add(PF * csa) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add(PF * rsb) as *const i8);
        }
        let b0 = L::load(bp);
        let b1 = L::load(bp.add(L::W));
        for (r, row) in acc.iter_mut().enumerate() {
            let x = L::splat(*ap.add(r * rsa));
            row[0] = L::fma(x, b0, row[0]);
            row[1] = L::fma(x, b1, row[1]);
        }
        ap = ap.add(csa);
        bp = bp.add(rsb);
    }
    // The accumulators go to `C` as they are (a constant-indexed, fully unrolled loop), and a
    // non-trivial epilogue then runs on `C` in L1. Applied to `acc` directly, an epilogue too
    // large to unroll (exp, masking) indexes `acc` by a run-time row, and LLVM then keeps `acc`
    // on the stack and stores all 2 MR registers on every depth step (measured: the backward's
    // `P = exp(S - lse)` tile at half speed, 28% of the backward).
    for (r, row) in acc.iter().enumerate() {
        L::store(c.add(r * rsc), row[0]);
        L::store(c.add(r * rsc + L::W), row[1]);
    }
    if !P::IDENTITY {
        for r in 0..MR {
            for h in 0..2 {
                let at = c.add(r * rsc + h * L::W);
                L::store(at, epi.apply(r, col + h * L::W, L::load(at)));
            }
        }
    }
}

/// `C[MR x n] = epi(A B)` (or accumulated) for `n` a multiple of `NR`: micro-tiles side by side,
/// tile `t` reading `B` at `b + t bstep` and writing `C` at column `t NR`.
///
/// # Safety
/// As [`tile`], for every tile.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub unsafe fn strip<L: Lanes, P: Epilogue<L>>(
    n: usize,
    k: usize,
    a: *const L::E,
    rsa: usize,
    csa: usize,
    b: *const L::E,
    rsb: usize,
    bstep: usize,
    c: *mut L::E,
    rsc: usize,
    epi: &mut P,
) {
    let nr = nr::<L>();
    debug_assert!(n.is_multiple_of(nr));
    for t in 0..n / nr {
        tile::<L, P>(
            k,
            a,
            rsa,
            csa,
            b.add(t * bstep),
            rsb,
            c.add(t * nr),
            rsc,
            t * nr,
            epi,
        );
    }
}

/// Lanes of `v` at or beyond column `w` (of a register starting at `col`) set to `fill`.
#[inline(always)]
pub unsafe fn cut<L: Lanes>(v: L::V, col: usize, w: usize, fill: L::E) -> L::V {
    if col + L::W <= w {
        return v;
    }
    let mut tmp = [fill; 16];
    L::store(tmp.as_mut_ptr(), v);
    for x in tmp.iter_mut().take(L::W).skip(w.saturating_sub(col)) {
        *x = fill;
    }
    L::load(tmp.as_ptr())
}

/// Rows of the log-factor (bias and mask) for a strip, when it needs one: row `r` reads
/// `rows[r] + col`.
pub type LogRows<E> = Option<[*const E; 12]>;

/// Forward scores: adds the log-factor, masks columns `>= w` with `-inf` and keeps each row's
/// running maximum.
pub struct MaskMax<L: Lanes> {
    pub lf: LogRows<L::E>,
    pub w: usize,
    pub mx: [L::V; 12],
}

impl<L: Lanes> MaskMax<L> {
    #[inline(always)]
    pub unsafe fn new(lf: LogRows<L::E>, w: usize) -> Self {
        Self {
            lf,
            w,
            mx: [L::splat(L::E::neg_infinity()); 12],
        }
    }
    /// The maximum of row `r`.
    #[inline(always)]
    pub unsafe fn max(&self, r: usize) -> L::E {
        L::hmax(self.mx[r])
    }
}

impl<L: Lanes> Epilogue<L> for MaskMax<L> {
    const ACCUMULATE: bool = false;
    #[inline(always)]
    unsafe fn apply(&mut self, r: usize, col: usize, v: L::V) -> L::V {
        let v = match &self.lf {
            Some(rows) => L::add(v, L::load(rows[r].add(col))),
            None => v,
        };
        let v = cut::<L>(v, col, self.w, L::E::neg_infinity());
        self.mx[r] = L::max(self.mx[r], v);
        v
    }
}

/// Backward probabilities: `P = exp(S + log-factor - lse)`, 0 at columns `>= w` (and on rows
/// whose `neg_lse` is `-inf`). The exponent is capped at 0 (`P <= 1`, as a softmax weight is):
/// the backward recomputes `S`, and at huge scores (`|S|` near 1e300) its rounding differs from
/// the forward's by far more than 1, which made `P` up to `e^709` (fuzz/regressions/exact:
/// `dv` of 1e307 where one key has `P = 1`). `x - max(x, 0)` keeps a NaN a NaN on every
/// instruction set (their `min` differ on NaN operands).
pub struct ExpShift<L: Lanes> {
    pub lf: LogRows<L::E>,
    pub w: usize,
    pub neg_lse: [L::E; 12],
}

impl<L: Lanes> Epilogue<L> for ExpShift<L> {
    const ACCUMULATE: bool = false;
    #[inline(always)]
    unsafe fn apply(&mut self, r: usize, col: usize, v: L::V) -> L::V {
        let v = match &self.lf {
            Some(rows) => L::add(v, L::load(rows[r].add(col))),
            None => v,
        };
        let x = L::add(v, L::splat(self.neg_lse[r]));
        let p = L::exp(L::sub(x, L::max(x, L::splat(L::E::zero()))));
        cut::<L>(p, col, self.w, L::E::zero())
    }
}

/// Backward `dS = P ∘ (dP - D)`: `P` row `r` at `p + r ld`.
pub struct SoftmaxGrad<L: Lanes> {
    pub p: *const L::E,
    pub ld: usize,
    pub d: [L::E; 12],
}

impl<L: Lanes> Epilogue<L> for SoftmaxGrad<L> {
    const ACCUMULATE: bool = false;
    #[inline(always)]
    unsafe fn apply(&mut self, r: usize, col: usize, v: L::V) -> L::V {
        let p = L::load(self.p.add(r * self.ld + col));
        L::mul(p, L::sub(v, L::splat(self.d[r])))
    }
}

/// The largest of `x[..n]`, `n` a multiple of `W`.
#[inline(always)]
pub unsafe fn row_max<L: Lanes>(x: *const L::E, n: usize) -> L::E {
    let mut m0 = L::splat(L::E::neg_infinity());
    let mut m1 = m0;
    let mut j = 0;
    while j + 2 * L::W <= n {
        m0 = L::max(m0, L::load(x.add(j)));
        m1 = L::max(m1, L::load(x.add(j + L::W)));
        j += 2 * L::W;
    }
    if j < n {
        m0 = L::max(m0, L::load(x.add(j)));
    }
    L::hmax(L::max(m0, m1))
}

/// Whether `x[..n]` (any `n`) holds no NaN or Inf: `x * 0` is 0 for every finite `x`.
#[inline(always)]
pub unsafe fn all_finite<L: Lanes>(x: *const L::E, n: usize) -> bool {
    let (z0, zero) = (L::zero(), L::E::zero());
    let (mut a0, mut a1) = (z0, z0);
    let mut j = 0;
    while j + 2 * L::W <= n {
        a0 = L::fma(L::load(x.add(j)), z0, a0);
        a1 = L::fma(L::load(x.add(j + L::W)), z0, a1);
        j += 2 * L::W;
    }
    let mut t = L::hsum(L::add(a0, a1));
    while j < n {
        t = t + *x.add(j) * zero;
        j += 1;
    }
    t == zero
}

/// `x = exp(x - shift)` on `x[..n]` (`n` a multiple of `W`), returning the sum.
#[inline(always)]
pub unsafe fn exp_shift_sum<L: Lanes>(x: *mut L::E, n: usize, shift: L::E) -> L::E {
    let s = L::splat(shift);
    let mut a0 = L::zero();
    let mut a1 = L::zero();
    let mut j = 0;
    while j + 2 * L::W <= n {
        let e0 = L::exp(L::sub(L::load(x.add(j)), s));
        let e1 = L::exp(L::sub(L::load(x.add(j + L::W)), s));
        L::store(x.add(j), e0);
        L::store(x.add(j + L::W), e1);
        a0 = L::add(a0, e0);
        a1 = L::add(a1, e1);
        j += 2 * L::W;
    }
    if j < n {
        let e0 = L::exp(L::sub(L::load(x.add(j)), s));
        L::store(x.add(j), e0);
        a0 = L::add(a0, e0);
    }
    L::hsum(L::add(a0, a1))
}

/// `x *= s` on `x[..n]`, `n` a multiple of `W`.
#[inline(always)]
pub unsafe fn scale<L: Lanes>(x: *mut L::E, n: usize, s: L::E) {
    let sv = L::splat(s);
    let mut j = 0;
    while j < n {
        L::store(x.add(j), L::mul(L::load(x.add(j)), sv));
        j += L::W;
    }
}

/// `x += y` on `x[..n]` (any `n`).
#[inline(always)]
pub unsafe fn add_assign<L: Lanes>(x: *mut L::E, y: *const L::E, n: usize) {
    let mut j = 0;
    while j + L::W <= n {
        L::store(x.add(j), L::add(L::load(x.add(j)), L::load(y.add(j))));
        j += L::W;
    }
    while j < n {
        *x.add(j) = *x.add(j) + *y.add(j);
        j += 1;
    }
}

/// `ds = p ∘ (ds - di)` on `n` elements, `n` a multiple of `W` (the backward's
/// `dS = P ∘ (dP - D)`).
#[inline(always)]
pub unsafe fn softmax_grad<L: Lanes>(ds: *mut L::E, p: *const L::E, n: usize, di: L::E) {
    let dv = L::splat(di);
    let mut j = 0;
    while j < n {
        let x = L::mul(L::load(p.add(j)), L::sub(L::load(ds.add(j)), dv));
        L::store(ds.add(j), x);
        j += L::W;
    }
}

/// Fills `x[from..to]` with `v`.
#[inline(always)]
pub unsafe fn fill<E: Real>(x: *mut E, from: usize, to: usize, v: E) {
    for j in from..to {
        *x.add(j) = v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::lanes::LanesTask;
    use crate::arch::Isa;

    /// A strip of micro-tiles against a naive product, for every instruction set.
    struct StripCheck;
    impl<T: Real> LanesTask<T> for StripCheck {
        type Out = f64;
        #[inline(always)]
        fn run<L: Lanes<E = T>>(self) -> f64 {
            let (mr, nr) = (L::MR, nr::<L>());
            let (k, n) = (37, 3 * nr);
            let a: Vec<T> = (0..mr * k)
                .map(|i| T::of(((i * 7) % 11) as f64 - 5.0))
                .collect();
            // B as panels of nr columns: panel t row p at t * k * nr + p * nr.
            let b: Vec<T> = (0..n * k)
                .map(|i| T::of(((i * 5) % 13) as f64 * 0.25))
                .collect();
            let mut c = vec![T::one(); mr * n];
            // SAFETY: dispatched for this CPU; all buffers sized for the call.
            unsafe {
                strip::<L, _>(
                    n,
                    k,
                    a.as_ptr(),
                    k,
                    1,
                    b.as_ptr(),
                    nr,
                    k * nr,
                    c.as_mut_ptr(),
                    n,
                    &mut Accumulate,
                )
            };
            let mut worst = 0f64;
            for r in 0..mr {
                for col in 0..n {
                    let (t, cc) = (col / nr, col % nr);
                    let want: f64 = 1.0
                        + (0..k)
                            .map(|p| a[r * k + p].f64() * b[t * k * nr + p * nr + cc].f64())
                            .sum::<f64>();
                    worst = worst.max((c[r * n + col].f64() - want).abs());
                }
            }
            worst
        }
    }

    #[test]
    fn strip_matches_naive_every_isa() {
        for isa in [Isa::Baseline, Isa::Avx2, Isa::Avx512] {
            if isa <= crate::arch::simd::isa() {
                assert!(f64::with_lanes(isa, StripCheck) < 1e-12, "{isa:?} f64");
                assert!(f32::with_lanes(isa, StripCheck) < 1e-3, "{isa:?} f32");
            }
        }
    }

    /// Throughput of the micro-kernel on L1-resident operands (run with `--ignored`).
    struct Peak(usize);
    impl<T: Real> LanesTask<T> for Peak {
        type Out = f64;
        #[inline(always)]
        fn run<L: Lanes<E = T>>(self) -> f64 {
            let (mr, nr, k) = (L::MR, nr::<L>(), self.0);
            let a = vec![T::of(0.5); mr * k];
            let b = vec![T::of(0.25); k * nr * 4];
            let mut c = vec![T::zero(); mr * nr * 4];
            let reps = 1_000_000_000 / (mr * nr * k * 4);
            let mut best = f64::MAX;
            for _ in 0..10 {
                let t0 = std::time::Instant::now();
                for _ in 0..reps {
                    // SAFETY: as in StripCheck.
                    unsafe {
                        strip::<L, _>(
                            4 * nr,
                            k,
                            a.as_ptr(),
                            k,
                            1,
                            b.as_ptr(),
                            nr,
                            k * nr,
                            c.as_mut_ptr(),
                            4 * nr,
                            &mut Accumulate,
                        )
                    };
                    std::hint::black_box(&mut c);
                }
                best = best.min(t0.elapsed().as_secs_f64());
            }
            2.0 * (reps * mr * nr * k * 4) as f64 / best / 1e9
        }
    }

    #[test]
    #[ignore]
    fn micro_kernel_peak() {
        for k in [64, 128, 256] {
            println!(
                "k={k}: f32 {:.1} GF/s, f64 {:.1} GF/s (avx512); f32 {:.1} (avx2)",
                f32::with_lanes(Isa::Avx512, Peak(k)),
                f64::with_lanes(Isa::Avx512, Peak(k)),
                f32::with_lanes(Isa::Avx2, Peak(k))
            );
        }
    }
}
