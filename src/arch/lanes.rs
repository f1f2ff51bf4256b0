//! A small SIMD vocabulary the exact kernels are written in, with one implementation per
//! instruction set: AVX-512 (16 f32 / 8 f64 lanes), AVX2+FMA (8 / 4) and a portable fallback
//! (arrays LLVM maps onto SSE2 or NEON). Nothing is compiled for the build machine's CPU: a kernel
//! is written once, generic over [`Lanes`], and [`Real::with_lanes`] runs it inside a function
//! compiled for the instruction set detected at run time.
//!
//! Every method is `#[inline(always)]` and every kernel built on them too, so that the whole
//! kernel is inlined into the `#[target_feature]` entry point and compiled for its features.
//!
//! `exp` is the range reduction of [`crate::arch::simd`]: `e^x = 2^k e^r`, `k = round(x log2 e)` (by
//! the `1.5·2^p` rounding trick, whose bit pattern also gives `2^k`), `r = x - k ln 2` in two
//! parts, and the Taylor polynomial of degree 7 (f32) or 13 (f64). Below the smallest normal
//! result, `-inf` (masked scores) included, it returns exactly 0.

use crate::arch::real::Real;
use crate::arch::simd::Isa;
use num_traits::Zero;

/// One SIMD register of `W` lanes of `E`, and the operations the kernels need.
///
/// # Safety
/// The methods are `unsafe`: the caller guarantees that the CPU has the instruction set (which
/// [`Real::with_lanes`] does) and, for `load`/`store`, that `W` elements at the pointer are valid.
#[allow(clippy::missing_safety_doc)] // the trait's `# Safety` covers every method
pub trait Lanes: Copy + Send + Sync + 'static {
    type E: Real;
    type V: Copy;
    /// Lanes per register.
    const W: usize;
    /// Rows of a GEMM micro-tile (its columns are two registers).
    const MR: usize;

    unsafe fn splat(x: Self::E) -> Self::V;
    unsafe fn load(p: *const Self::E) -> Self::V;
    unsafe fn store(p: *mut Self::E, v: Self::V);
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    /// `a * b + c`.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn min(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn hsum(v: Self::V) -> Self::E;
    unsafe fn hmax(v: Self::V) -> Self::E;
    /// `e^x` per lane (module docs).
    unsafe fn exp(x: Self::V) -> Self::V;

    /// Lanes `(2m, 2m + 1)` swapped (a rotary pair's partner).
    #[inline(always)]
    unsafe fn swap_pairs(x: Self::V) -> Self::V {
        let mut buf = [Self::E::zero(); 16];
        Self::store(buf.as_mut_ptr(), x);
        for m in 0..Self::W / 2 {
            buf.swap(2 * m, 2 * m + 1);
        }
        Self::load(buf.as_ptr())
    }

    /// Whether [`Lanes::window`] is a single in-register shuffle (else callers load instead).
    const FAST_WINDOW: bool = false;
    /// Lanes `n..W` of `lo` then lanes `0..n` of `hi`: the register starting `n` lanes into the
    /// pair (`n < W`; a constant after unrolling).
    #[inline(always)]
    unsafe fn window(lo: Self::V, hi: Self::V, n: usize) -> Self::V {
        let mut buf = [Self::E::zero(); 32];
        Self::store(buf.as_mut_ptr(), lo);
        Self::store(buf.as_mut_ptr().add(Self::W), hi);
        Self::load(buf.as_ptr().add(n))
    }

    #[inline(always)]
    unsafe fn zero() -> Self::V {
        Self::splat(Self::E::zero())
    }
}

/// A kernel generic over the instruction set: [`Real::with_lanes`] calls `run` with the best
/// [`Lanes`] for `T`, inside a function compiled for it. `run` must be `#[inline(always)]`.
pub trait LanesTask<T: Real> {
    type Out;
    fn run<L: Lanes<E = T>>(self) -> Self::Out;
}

/// Runs `task` with the lanes `L` (x86-64 entry points compiled with the features of `L`).
macro_rules! entry {
    ($name:ident, $feat:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feat)]
        pub(crate) unsafe fn $name<T: Real, L: Lanes<E = T>, K: LanesTask<T>>(task: K) -> K::Out {
            task.run::<L>()
        }
    };
}
entry!(run_avx512, "avx512f,avx512dq,avx2,fma");
entry!(run_avx2, "avx2,fma");

/// Runs `task` with the lanes of `isa` for element `T` (f32: [`F32x16`], [`F32x8`],
/// [`Portable`]; f64 likewise).
#[inline]
pub(crate) fn dispatch<T: Real, L512, L256, LP, K>(isa: Isa, task: K) -> K::Out
where
    L512: Lanes<E = T>,
    L256: Lanes<E = T>,
    LP: Lanes<E = T>,
    K: LanesTask<T>,
{
    #[cfg(target_arch = "x86_64")]
    {
        match isa {
            // SAFETY: `isa` comes from `crate::arch::simd::isa()` (or a narrower choice), which
            // detected these features on this CPU.
            Isa::Avx512 => return unsafe { run_avx512::<T, L512, K>(task) },
            // SAFETY: as above: AVX2 and FMA were detected.
            Isa::Avx2 => return unsafe { run_avx2::<T, L256, K>(task) },
            Isa::Baseline => {}
        }
    }
    let _ = isa;
    task.run::<LP>()
}

// ------------------------------------------------------------------------------------------------
// Portable fallback: `N` lanes as an array.

/// `N` lanes of `E` as a plain array (the fallback on CPUs without AVX2 and off x86-64).
#[derive(Clone, Copy)]
pub struct Portable<E, const N: usize>(std::marker::PhantomData<E>);

impl<E: Real, const N: usize> Lanes for Portable<E, N> {
    type E = E;
    type V = [E; N];
    const W: usize = N;
    const MR: usize = 4;

    #[inline(always)]
    unsafe fn splat(x: E) -> [E; N] {
        [x; N]
    }
    #[inline(always)]
    unsafe fn load(p: *const E) -> [E; N] {
        std::ptr::read_unaligned(p as *const [E; N])
    }
    #[inline(always)]
    unsafe fn store(p: *mut E, v: [E; N]) {
        std::ptr::write_unaligned(p as *mut [E; N], v)
    }
    #[inline(always)]
    unsafe fn add(a: [E; N], b: [E; N]) -> [E; N] {
        std::array::from_fn(|i| a[i] + b[i])
    }
    #[inline(always)]
    unsafe fn sub(a: [E; N], b: [E; N]) -> [E; N] {
        std::array::from_fn(|i| a[i] - b[i])
    }
    #[inline(always)]
    unsafe fn mul(a: [E; N], b: [E; N]) -> [E; N] {
        std::array::from_fn(|i| a[i] * b[i])
    }
    #[inline(always)]
    unsafe fn fma(a: [E; N], b: [E; N], c: [E; N]) -> [E; N] {
        std::array::from_fn(|i| a[i] * b[i] + c[i])
    }
    #[inline(always)]
    unsafe fn max(a: [E; N], b: [E; N]) -> [E; N] {
        std::array::from_fn(|i| if b[i] > a[i] { b[i] } else { a[i] })
    }
    #[inline(always)]
    unsafe fn min(a: [E; N], b: [E; N]) -> [E; N] {
        std::array::from_fn(|i| if b[i] < a[i] { b[i] } else { a[i] })
    }
    #[inline(always)]
    unsafe fn hsum(v: [E; N]) -> E {
        v.iter().fold(E::zero(), |s, &x| s + x)
    }
    #[inline(always)]
    unsafe fn hmax(v: [E; N]) -> E {
        v.iter()
            .fold(E::neg_infinity(), |s, &x| if x > s { x } else { s })
    }
    #[inline(always)]
    unsafe fn exp(x: [E; N]) -> [E; N] {
        std::array::from_fn(|i| x[i].exp_lane())
    }
}

// ------------------------------------------------------------------------------------------------
// x86-64

#[cfg(target_arch = "x86_64")]
pub use x86::{F32x16, F32x8, F64x4, F64x8};

#[cfg(not(target_arch = "x86_64"))]
pub type F32x16 = Portable<f32, 4>;
#[cfg(not(target_arch = "x86_64"))]
pub type F32x8 = Portable<f32, 4>;
#[cfg(not(target_arch = "x86_64"))]
pub type F64x8 = Portable<f64, 2>;
#[cfg(not(target_arch = "x86_64"))]
pub type F64x4 = Portable<f64, 2>;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Lanes;
    use std::arch::x86_64::*;

    /// `e^x` for f32 lanes, from the primitives and `pow2(m)`: `2^k` from the bits of
    /// `m = k + 1.5·2^23`.
    #[inline(always)]
    unsafe fn exp_f32<L: Lanes<E = f32>>(x: L::V, pow2: impl Fn(L::V) -> L::V) -> L::V {
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        const LN2_HI: f32 = 0.693_145_75;
        const LN2_LO: f32 = 1.428_606_8e-6;
        const MAGIC: f32 = 12_582_912.0;
        let xc = L::min(L::max(x, L::splat(-87.0)), L::splat(88.0));
        let m = L::fma(xc, L::splat(LOG2E), L::splat(MAGIC));
        let k = L::sub(m, L::splat(MAGIC));
        let r = L::fma(k, L::splat(-LN2_HI), xc);
        let r = L::fma(k, L::splat(-LN2_LO), r);
        let mut p = L::splat(1.0 / 5040.0);
        for c in [
            1.0 / 720.0,
            1.0 / 120.0,
            1.0 / 24.0,
            1.0 / 6.0,
            0.5,
            1.0,
            1.0,
        ] {
            p = L::fma(p, r, L::splat(c));
        }
        L::mul(p, pow2(m))
    }

    /// `e^x` for f64 lanes (as [`exp_f32`], magic `1.5·2^52`).
    #[inline(always)]
    unsafe fn exp_f64<L: Lanes<E = f64>>(x: L::V, pow2: impl Fn(L::V) -> L::V) -> L::V {
        const LOG2E: f64 = std::f64::consts::LOG2_E;
        #[allow(clippy::excessive_precision)] // the digits of crate::arch::simd's scalar twin
        const LN2_HI: f64 = 6.931_471_803_691_238_2e-1;
        const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
        const MAGIC: f64 = 6_755_399_441_055_744.0;
        let xc = L::min(L::max(x, L::splat(-708.0)), L::splat(709.0));
        let m = L::fma(xc, L::splat(LOG2E), L::splat(MAGIC));
        let k = L::sub(m, L::splat(MAGIC));
        let r = L::fma(k, L::splat(-LN2_HI), xc);
        let r = L::fma(k, L::splat(-LN2_LO), r);
        const C: [f64; 13] = [
            1.0 / 479_001_600.0,
            1.0 / 39_916_800.0,
            1.0 / 3_628_800.0,
            1.0 / 362_880.0,
            1.0 / 40_320.0,
            1.0 / 5_040.0,
            1.0 / 720.0,
            1.0 / 120.0,
            1.0 / 24.0,
            1.0 / 6.0,
            0.5,
            1.0,
            1.0,
        ];
        let mut p = L::splat(1.0 / 6_227_020_800.0);
        for c in C {
            p = L::fma(p, r, L::splat(c));
        }
        L::mul(p, pow2(m))
    }

    #[derive(Clone, Copy)]
    pub struct F32x16;
    #[derive(Clone, Copy)]
    pub struct F32x8;
    #[derive(Clone, Copy)]
    pub struct F64x8;
    #[derive(Clone, Copy)]
    pub struct F64x4;

    /// `valignd` by a constant in asm, `#[inline]` into the AVX-512 kernels (asm with `zmm`
    /// operands needs the feature on its own function). LLVM re-lowers
    /// `_mm512_alignr_epi32` to `vpermt2ps`/`vpermt2pd` with an index vector loaded per use,
    /// which costs a register and a copy of the destroyed source: the BlockW scores kernel then
    /// spilled 9 registers per block.
    mod valignd {
        use std::arch::x86_64::__m512i;
        macro_rules! valignd {
            ($($name:ident $k:literal)*) => {$(
                #[inline]
                #[target_feature(enable = "avx512f")]
                pub unsafe fn $name(h: __m512i, l: __m512i) -> __m512i {
                    let r: __m512i;
                    std::arch::asm!(
                        "valignd {r}, {h}, {l}, {k}",
                        r = lateout(zmm_reg) r,
                        h = in(zmm_reg) h,
                        l = in(zmm_reg) l,
                        k = const $k,
                        options(pure, nomem, nostack, preserves_flags),
                    );
                    r
                }
            )*};
        }
        valignd!(v1 1 v2 2 v3 3 v4 4 v5 5 v6 6 v7 7 v8 8 v9 9 v10 10 v11 11 v12 12 v13 13 v14 14 v15 15);
    }

    impl Lanes for F32x16 {
        type E = f32;
        type V = __m512;
        const W: usize = 16;
        const MR: usize = 12;
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m512 {
            _mm512_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            _mm512_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            _mm512_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sub(a: __m512, b: __m512) -> __m512 {
            _mm512_sub_ps(a, b)
        }
        #[inline(always)]
        unsafe fn mul(a: __m512, b: __m512) -> __m512 {
            _mm512_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn max(a: __m512, b: __m512) -> __m512 {
            _mm512_max_ps(a, b)
        }
        #[inline(always)]
        unsafe fn min(a: __m512, b: __m512) -> __m512 {
            _mm512_min_ps(a, b)
        }
        #[inline(always)]
        unsafe fn swap_pairs(x: Self::V) -> Self::V {
            _mm512_permute_ps::<0b10_11_00_01>(x)
        }
        #[inline(always)]
        unsafe fn hsum(v: __m512) -> f32 {
            _mm512_reduce_add_ps(v)
        }
        #[inline(always)]
        unsafe fn hmax(v: __m512) -> f32 {
            _mm512_reduce_max_ps(v)
        }
        #[inline(always)]
        unsafe fn exp(x: __m512) -> __m512 {
            let y = exp_f32::<Self>(x, |m| {
                let b = _mm512_add_epi32(_mm512_castps_si512(m), _mm512_set1_epi32(127));
                _mm512_castsi512_ps(_mm512_slli_epi32::<23>(b))
            });
            let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(-87.0));
            _mm512_maskz_mov_ps(keep, y)
        }
        const FAST_WINDOW: bool = true;
        #[inline(always)]
        unsafe fn window(lo: __m512, hi: __m512, n: usize) -> __m512 {
            let (l, h) = (_mm512_castps_si512(lo), _mm512_castps_si512(hi));
            let r = match n {
                0 => l,
                1 => valignd::v1(h, l),
                2 => valignd::v2(h, l),
                3 => valignd::v3(h, l),
                4 => valignd::v4(h, l),
                5 => valignd::v5(h, l),
                6 => valignd::v6(h, l),
                7 => valignd::v7(h, l),
                8 => valignd::v8(h, l),
                9 => valignd::v9(h, l),
                10 => valignd::v10(h, l),
                11 => valignd::v11(h, l),
                12 => valignd::v12(h, l),
                13 => valignd::v13(h, l),
                14 => valignd::v14(h, l),
                _ => valignd::v15(h, l),
            };
            _mm512_castsi512_ps(r)
        }
    }

    impl Lanes for F64x8 {
        type E = f64;
        type V = __m512d;
        const W: usize = 8;
        const MR: usize = 8;
        #[inline(always)]
        unsafe fn splat(x: f64) -> __m512d {
            _mm512_set1_pd(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f64) -> __m512d {
            _mm512_loadu_pd(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f64, v: __m512d) {
            _mm512_storeu_pd(p, v)
        }
        #[inline(always)]
        unsafe fn add(a: __m512d, b: __m512d) -> __m512d {
            _mm512_add_pd(a, b)
        }
        #[inline(always)]
        unsafe fn sub(a: __m512d, b: __m512d) -> __m512d {
            _mm512_sub_pd(a, b)
        }
        #[inline(always)]
        unsafe fn mul(a: __m512d, b: __m512d) -> __m512d {
            _mm512_mul_pd(a, b)
        }
        #[inline(always)]
        unsafe fn fma(a: __m512d, b: __m512d, c: __m512d) -> __m512d {
            _mm512_fmadd_pd(a, b, c)
        }
        #[inline(always)]
        unsafe fn max(a: __m512d, b: __m512d) -> __m512d {
            _mm512_max_pd(a, b)
        }
        #[inline(always)]
        unsafe fn min(a: __m512d, b: __m512d) -> __m512d {
            _mm512_min_pd(a, b)
        }
        #[inline(always)]
        unsafe fn swap_pairs(x: Self::V) -> Self::V {
            _mm512_permute_pd::<0b0101_0101>(x)
        }
        #[inline(always)]
        unsafe fn hsum(v: __m512d) -> f64 {
            _mm512_reduce_add_pd(v)
        }
        #[inline(always)]
        unsafe fn hmax(v: __m512d) -> f64 {
            _mm512_reduce_max_pd(v)
        }
        #[inline(always)]
        unsafe fn exp(x: __m512d) -> __m512d {
            let y = exp_f64::<Self>(x, |m| {
                let b = _mm512_add_epi64(_mm512_castpd_si512(m), _mm512_set1_epi64(1023));
                _mm512_castsi512_pd(_mm512_slli_epi64::<52>(b))
            });
            let keep = _mm512_cmp_pd_mask::<_CMP_GE_OQ>(x, _mm512_set1_pd(-708.0));
            _mm512_maskz_mov_pd(keep, y)
        }
        const FAST_WINDOW: bool = true;
        #[inline(always)]
        unsafe fn window(lo: __m512d, hi: __m512d, n: usize) -> __m512d {
            let (l, h) = (_mm512_castpd_si512(lo), _mm512_castpd_si512(hi));
            let r = match n {
                0 => l,
                1 => _mm512_alignr_epi64::<1>(h, l),
                2 => _mm512_alignr_epi64::<2>(h, l),
                3 => _mm512_alignr_epi64::<3>(h, l),
                4 => _mm512_alignr_epi64::<4>(h, l),
                5 => _mm512_alignr_epi64::<5>(h, l),
                6 => _mm512_alignr_epi64::<6>(h, l),
                _ => _mm512_alignr_epi64::<7>(h, l),
            };
            _mm512_castsi512_pd(r)
        }
    }

    impl Lanes for F32x8 {
        type E = f32;
        type V = __m256;
        const W: usize = 8;
        const MR: usize = 6;
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m256 {
            _mm256_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            _mm256_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            _mm256_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sub(a: __m256, b: __m256) -> __m256 {
            _mm256_sub_ps(a, b)
        }
        #[inline(always)]
        unsafe fn mul(a: __m256, b: __m256) -> __m256 {
            _mm256_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn max(a: __m256, b: __m256) -> __m256 {
            _mm256_max_ps(a, b)
        }
        #[inline(always)]
        unsafe fn min(a: __m256, b: __m256) -> __m256 {
            _mm256_min_ps(a, b)
        }
        #[inline(always)]
        unsafe fn swap_pairs(x: Self::V) -> Self::V {
            _mm256_permute_ps::<0b10_11_00_01>(x)
        }
        #[inline(always)]
        unsafe fn hsum(v: __m256) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
        }
        #[inline(always)]
        unsafe fn hmax(v: __m256) -> f32 {
            let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_max_ss(s, _mm_shuffle_ps::<1>(s, s)))
        }
        #[inline(always)]
        unsafe fn exp(x: __m256) -> __m256 {
            let y = exp_f32::<Self>(x, |m| {
                let b = _mm256_add_epi32(_mm256_castps_si256(m), _mm256_set1_epi32(127));
                _mm256_castsi256_ps(_mm256_slli_epi32::<23>(b))
            });
            let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(-87.0));
            _mm256_and_ps(keep, y)
        }
    }

    impl Lanes for F64x4 {
        type E = f64;
        type V = __m256d;
        const W: usize = 4;
        const MR: usize = 6;
        #[inline(always)]
        unsafe fn splat(x: f64) -> __m256d {
            _mm256_set1_pd(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f64) -> __m256d {
            _mm256_loadu_pd(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f64, v: __m256d) {
            _mm256_storeu_pd(p, v)
        }
        #[inline(always)]
        unsafe fn add(a: __m256d, b: __m256d) -> __m256d {
            _mm256_add_pd(a, b)
        }
        #[inline(always)]
        unsafe fn sub(a: __m256d, b: __m256d) -> __m256d {
            _mm256_sub_pd(a, b)
        }
        #[inline(always)]
        unsafe fn mul(a: __m256d, b: __m256d) -> __m256d {
            _mm256_mul_pd(a, b)
        }
        #[inline(always)]
        unsafe fn fma(a: __m256d, b: __m256d, c: __m256d) -> __m256d {
            _mm256_fmadd_pd(a, b, c)
        }
        #[inline(always)]
        unsafe fn max(a: __m256d, b: __m256d) -> __m256d {
            _mm256_max_pd(a, b)
        }
        #[inline(always)]
        unsafe fn min(a: __m256d, b: __m256d) -> __m256d {
            _mm256_min_pd(a, b)
        }
        #[inline(always)]
        unsafe fn swap_pairs(x: Self::V) -> Self::V {
            _mm256_permute_pd::<0b0101>(x)
        }
        #[inline(always)]
        unsafe fn hsum(v: __m256d) -> f64 {
            let s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd::<1>(v));
            _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)))
        }
        #[inline(always)]
        unsafe fn hmax(v: __m256d) -> f64 {
            let s = _mm_max_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd::<1>(v));
            _mm_cvtsd_f64(_mm_max_sd(s, _mm_unpackhi_pd(s, s)))
        }
        #[inline(always)]
        unsafe fn exp(x: __m256d) -> __m256d {
            let y = exp_f64::<Self>(x, |m| {
                let b = _mm256_add_epi64(_mm256_castpd_si256(m), _mm256_set1_epi64x(1023));
                _mm256_castsi256_pd(_mm256_slli_epi64::<52>(b))
            });
            let keep = _mm256_cmp_pd::<_CMP_GE_OQ>(x, _mm256_set1_pd(-708.0));
            _mm256_and_pd(keep, y)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::simd::isa;

    /// Runs a check with every lanes type this CPU supports.
    struct ExpCheck;
    impl<T: Real> LanesTask<T> for ExpCheck {
        type Out = f64;
        #[inline(always)]
        fn run<L: Lanes<E = T>>(self) -> f64 {
            let mut worst = 0f64;
            let mut buf = vec![T::zero(); L::W];
            let lo = if T::NAME == "float32" { -87.0 } else { -708.0 };
            // Under Miri (~1000x slower) the same range at 100x the step.
            let (n, step) = if cfg!(miri) {
                (400, 0.5)
            } else {
                (40_000, 0.005)
            };
            for i in 0..n {
                let x0 = -100.0 + i as f64 * step - if i % 2 == 0 { 0.0 } else { 600.0 };
                for (l, b) in buf.iter_mut().enumerate() {
                    *b = T::of(x0 + l as f64 * 1e-3);
                }
                // SAFETY: dispatched for this CPU; buf has W elements.
                unsafe { L::store(buf.as_mut_ptr(), L::exp(L::load(buf.as_ptr()))) };
                for (l, yb) in buf.iter().enumerate().take(L::W) {
                    let x = T::of(x0 + l as f64 * 1e-3).f64();
                    let e = x.exp();
                    let y = yb.f64();
                    if x < lo {
                        assert_eq!(y, 0.0, "exp({x}) = {y}");
                    } else if x < 88.0 {
                        worst = worst.max(((y - e) / e).abs());
                    }
                }
            }
            worst
        }
    }

    #[test]
    fn vector_exp_every_isa() {
        let mut isas = vec![Isa::Baseline];
        if isa() != Isa::Baseline {
            isas.push(Isa::Avx2);
        }
        if isa() == Isa::Avx512 {
            isas.push(Isa::Avx512);
        }
        for &i in &isas {
            let w32 = f32::with_lanes(i, ExpCheck);
            let w64 = f64::with_lanes(i, ExpCheck);
            assert!(w32 < 4e-7, "{i:?}: f32 exp relative error {w32}");
            assert!(w64 < 4e-16, "{i:?}: f64 exp relative error {w64}");
        }
        // -inf (masked scores) gives exactly 0.
        struct NegInf;
        impl<T: Real> LanesTask<T> for NegInf {
            type Out = T;
            #[inline(always)]
            fn run<L: Lanes<E = T>>(self) -> T {
                // SAFETY: dispatched for this CPU.
                unsafe { L::hsum(L::exp(L::splat(T::neg_infinity()))) }
            }
        }
        for &i in &isas {
            assert_eq!(f32::with_lanes(i, NegInf), 0.0);
            assert_eq!(f64::with_lanes(i, NegInf), 0.0);
        }
    }
}
