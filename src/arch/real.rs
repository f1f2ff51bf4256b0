//! The floating-point types the kernels are generic over, with the GEMM each one uses.

use crate::arch::lanes::{self, LanesTask, Portable};
use crate::arch::simd::Isa;
use num_traits::Float;
use std::fmt::Debug;
use std::iter::Sum;

/// `f32` or `f64`. Kernels compute in `Self`; reductions that span many tiles accumulate in f64.
pub trait Real: Float + Debug + Default + Send + Sync + Sum + 'static {
    const NAME: &'static str;

    fn of(x: f64) -> Self;
    fn f64(self) -> f64;
    /// `x` as float64: a view of the same memory for `f64`, a converted copy otherwise.
    fn cow_f64(x: ndarray::ArrayView2<'_, Self>) -> ndarray::CowArray<'_, f64, ndarray::Ix2>;
    /// `e^x`, vectorisable (see [`crate::arch::simd`]); exactly 0 for `-inf`.
    fn exp_lane(self) -> Self;

    /// Runs `task` with this type's SIMD lanes for `isa` (from [`crate::arch::simd::call_isa`]),
    /// compiled for that instruction set.
    fn with_lanes<K: LanesTask<Self>>(isa: Isa, task: K) -> K::Out;

    /// `C = alpha * A B + beta * C` with arbitrary (row, column) strides, via `matrixmultiply`.
    ///
    /// # Safety
    /// The pointers and strides must describe valid `m x k`, `k x n` and `m x n` matrices, and
    /// `c` must not alias `a` or `b`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );
}

impl Real for f32 {
    const NAME: &'static str = "float32";
    fn cow_f64(x: ndarray::ArrayView2<'_, f32>) -> ndarray::CowArray<'_, f64, ndarray::Ix2> {
        x.mapv(|v| v as f64).into()
    }
    #[inline(always)]
    fn of(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn exp_lane(self) -> Self {
        crate::arch::simd::exp_f32(self)
    }
    #[inline]
    fn with_lanes<K: LanesTask<Self>>(isa: Isa, task: K) -> K::Out {
        lanes::dispatch::<f32, lanes::F32x16, lanes::F32x8, Portable<f32, 4>, K>(isa, task)
    }
    unsafe fn gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    ) {
        matrixmultiply::sgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
    }
}

impl Real for f64 {
    const NAME: &'static str = "float64";
    fn cow_f64(x: ndarray::ArrayView2<'_, f64>) -> ndarray::CowArray<'_, f64, ndarray::Ix2> {
        x.into()
    }
    #[inline(always)]
    fn of(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn exp_lane(self) -> Self {
        crate::arch::simd::exp_f64(self)
    }
    #[inline]
    fn with_lanes<K: LanesTask<Self>>(isa: Isa, task: K) -> K::Out {
        lanes::dispatch::<f64, lanes::F64x8, lanes::F64x4, Portable<f64, 2>, K>(isa, task)
    }
    unsafe fn gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    ) {
        matrixmultiply::dgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
    }
}

/// Row-major GEMM on slices: `c (m x n) = alpha * a (m x k) * op(b) + beta * c`, where `op(b)` is
/// `b` (`k x n`, row-major) or, with `b_transposed`, `b^T` for a row-major `n x k` `b`.
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn gemm_rm<T: Real>(
    m: usize,
    k: usize,
    n: usize,
    alpha: T,
    a: &[T],
    lda: usize,
    b: &[T],
    ldb: usize,
    b_transposed: bool,
    beta: T,
    c: &mut [T],
    ldc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(m == 0 || a.len() >= (m - 1) * lda + k);
    assert!(c.len() >= (m - 1) * ldc + n);
    let (rsb, csb) = if b_transposed {
        assert!(b.len() >= (n - 1) * ldb + k);
        (1isize, ldb as isize)
    } else {
        assert!(k == 0 || b.len() >= (k - 1) * ldb + n);
        (ldb as isize, 1isize)
    };
    // SAFETY: the asserts above bound every index the GEMM touches; `c` is a distinct &mut.
    unsafe {
        T::gemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            lda as isize,
            1,
            b.as_ptr(),
            rsb,
            csb,
            beta,
            c.as_mut_ptr(),
            ldc as isize,
            1,
        )
    }
}

/// `c (m x n) = alpha * a^T b + beta * c` for row-major `a (k x m)` and `b (k x n)`.
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn gemm_tn<T: Real>(
    m: usize,
    k: usize,
    n: usize,
    alpha: T,
    a: &[T],
    lda: usize,
    b: &[T],
    ldb: usize,
    beta: T,
    c: &mut [T],
    ldc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(k == 0 || a.len() >= (k - 1) * lda + m);
    assert!(k == 0 || b.len() >= (k - 1) * ldb + n);
    assert!(c.len() >= (m - 1) * ldc + n);
    // SAFETY: bounds asserted above; `c` is a distinct &mut.
    unsafe {
        T::gemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            1,
            lda as isize,
            b.as_ptr(),
            ldb as isize,
            1,
            beta,
            c.as_mut_ptr(),
            ldc as isize,
            1,
        )
    }
}
