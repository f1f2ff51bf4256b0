//! Toeplitz products and diagonal correlations by real FFT.
//!
//! Diagonals are indexed as in the fast method: for an `nq x nk` Toeplitz matrix
//! `T[i, j] = c[j - i + nq - 1]` with `c` of length `glen = nq + nk - 1`. Then
//!
//! * `T y`: `z_i = Σ_j c[j-i+nq-1] y_j = (rev(c) * y)[i + nk - 1]`, `rev(c)[m] = c[glen-1-m]`;
//! * `T^T x`: `z_j = Σ_i c[j-i+nq-1] x_i = (c * x)[j + nq - 1]`;
//! * diagonal sums `s[g] = Σ_{j-i+nq-1=g} a_i b_j = (rev(a) * b)[g]` (the gradient of `T`).
//!
//! Every needed index of these linear convolutions is `< glen`, and the supports of the operands
//! fit in `glen`, so a *circular* convolution of any length `N >= glen` gives them without
//! wrap-around: `N` is the smallest `2^a 3^b 5^c >= glen` (even, so realfft uses its fast path).
//!
//! A [`ToeplitzPlan`] holds the two realfft plans for one `(nq, nk)`; a [`ToeplitzScratch`] the
//! reusable buffers. Batched use (the fast method): transform each vector once, multiply-accumulate
//! spectra with [`multiply_accumulate`], invert once per output. Kernel spectra carry the `1/N`
//! of the inverse transform.

use crate::error::{Error, Result};
use realfft::num_complex::Complex;
use realfft::{ComplexToReal, RealFftPlanner, RealToComplex};
use std::collections::HashMap;
use std::sync::Arc;

pub type C64 = Complex<f64>;

/// The smallest even `2^a 3^b 5^c >= max(min_len, 2)`.
pub fn fft_len(min_len: usize) -> usize {
    let target = min_len.max(2);
    let mut best = usize::MAX;
    let mut p5 = 2usize;
    while p5 < best {
        let mut p35 = p5;
        while p35 < best {
            let mut n = p35;
            while n < target {
                n = n.saturating_mul(2);
            }
            best = best.min(n);
            p35 = p35.saturating_mul(3);
        }
        p5 = p5.saturating_mul(5);
    }
    best
}

/// FFT plans for one `(nq, nk)` shape.
#[derive(Clone)]
pub struct ToeplitzPlan {
    nq: usize,
    nk: usize,
    n: usize,
    r2c: Arc<dyn RealToComplex<f64>>,
    c2r: Arc<dyn ComplexToReal<f64>>,
}

/// Reusable buffers for one thread: a length-`N` real buffer and the FFT scratch.
pub struct ToeplitzScratch {
    time: Vec<f64>,
    fft: Vec<C64>,
}

/// Caches [`ToeplitzPlan`]s per shape (and realfft plans per length).
#[derive(Default)]
pub struct ToeplitzPlanner {
    fft: RealFftPlanner<f64>,
    plans: HashMap<(usize, usize), ToeplitzPlan>,
}

impl ToeplitzPlanner {
    pub fn new() -> Self {
        Self::default()
    }

    /// The plan for `nq x nk` Toeplitz matrices (both must be positive).
    pub fn plan(&mut self, nq: usize, nk: usize) -> Result<ToeplitzPlan> {
        if nq == 0 || nk == 0 {
            return Err(Error::Value(format!(
                "Toeplitz shape: expected nq, nk >= 1, got ({nq}, {nk})"
            )));
        }
        if let Some(p) = self.plans.get(&(nq, nk)) {
            return Ok(p.clone());
        }
        let n = fft_len(nq + nk - 1);
        let plan = ToeplitzPlan {
            nq,
            nk,
            n,
            r2c: self.fft.plan_fft_forward(n),
            c2r: self.fft.plan_fft_inverse(n),
        };
        self.plans.insert((nq, nk), plan.clone());
        Ok(plan)
    }
}

fn fft_error(e: realfft::FftError) -> Error {
    Error::Value(format!("FFT: {e}"))
}

fn check_len(what: &str, expected: usize, got: usize) -> Result<()> {
    if expected != got {
        return Err(Error::Value(format!(
            "{what}: expected length {expected}, got {got}"
        )));
    }
    Ok(())
}

impl ToeplitzPlan {
    pub fn nq(&self) -> usize {
        self.nq
    }
    pub fn nk(&self) -> usize {
        self.nk
    }
    /// Number of diagonals `nq + nk - 1`.
    pub fn glen(&self) -> usize {
        self.nq + self.nk - 1
    }
    /// FFT length `N`.
    pub fn fft_len(&self) -> usize {
        self.n
    }
    /// Length of every spectrum: `N/2 + 1` complex numbers.
    pub fn spectrum_len(&self) -> usize {
        self.n / 2 + 1
    }
    /// Bytes of one [`ToeplitzScratch`].
    pub fn scratch_bytes(&self) -> usize {
        8 * self.n + 16 * self.r2c.get_scratch_len().max(self.c2r.get_scratch_len())
    }

    pub fn make_scratch(&self) -> ToeplitzScratch {
        let len = self.r2c.get_scratch_len().max(self.c2r.get_scratch_len());
        ToeplitzScratch {
            time: vec![0.0; self.n],
            fft: vec![C64::new(0.0, 0.0); len],
        }
    }

    /// Spectrum of the zero-padded signal `f(0), ..., f(len-1), 0, ...` (`len <= N`).
    pub fn forward_from_fn(
        &self,
        len: usize,
        f: impl Fn(usize) -> f64,
        out: &mut [C64],
        ws: &mut ToeplitzScratch,
    ) -> Result<()> {
        if len > self.n {
            return Err(Error::Value(format!(
                "FFT input: expected at most {} samples, got {len}",
                self.n
            )));
        }
        check_len("spectrum buffer", self.spectrum_len(), out.len())?;
        let (head, tail) = ws.time.split_at_mut(len);
        head.iter_mut().enumerate().for_each(|(m, t)| *t = f(m));
        tail.iter_mut().for_each(|t| *t = 0.0);
        self.r2c
            .process_with_scratch(&mut ws.time, out, &mut ws.fft)
            .map_err(fft_error)
    }

    /// Spectrum of the zero-padded `y`.
    pub fn forward(&self, y: &[f64], out: &mut [C64], ws: &mut ToeplitzScratch) -> Result<()> {
        if y.len() > self.n {
            return Err(Error::Value(format!(
                "FFT input: expected at most {} samples, got {}",
                self.n,
                y.len()
            )));
        }
        check_len("spectrum buffer", self.spectrum_len(), out.len())?;
        let (head, tail) = ws.time.split_at_mut(y.len());
        head.copy_from_slice(y);
        tail.iter_mut().for_each(|t| *t = 0.0);
        self.r2c
            .process_with_scratch(&mut ws.time, out, &mut ws.fft)
            .map_err(fft_error)
    }

    /// Spectrum of the kernel for `T y` (`rev(c) / N`), `c` of length `glen`.
    pub fn kernel_spectrum(
        &self,
        c: &[f64],
        out: &mut [C64],
        ws: &mut ToeplitzScratch,
    ) -> Result<()> {
        check_len("Toeplitz sequence", self.glen(), c.len())?;
        let (last, inv) = (c.len() - 1, 1.0 / self.n as f64);
        self.forward_from_fn(c.len(), |m| c[last - m] * inv, out, ws)
    }

    /// Spectrum of the kernel for `T^T x` (`c / N`), `c` of length `glen`.
    pub fn kernel_spectrum_transposed(
        &self,
        c: &[f64],
        out: &mut [C64],
        ws: &mut ToeplitzScratch,
    ) -> Result<()> {
        check_len("Toeplitz sequence", self.glen(), c.len())?;
        let inv = 1.0 / self.n as f64;
        self.forward_from_fn(c.len(), |m| c[m] * inv, out, ws)
    }

    /// Inverse transform of `spec` (destroyed); the returned slice is the whole length-`N` signal.
    pub fn inverse<'w>(&self, spec: &mut [C64], ws: &'w mut ToeplitzScratch) -> Result<&'w [f64]> {
        check_len("spectrum buffer", self.spectrum_len(), spec.len())?;
        // The imaginary parts at DC (and Nyquist) of a real signal are zero; products of such
        // spectra keep them zero exactly, but clear them so realfft never reports bad input.
        spec[0].im = 0.0;
        if self.n.is_multiple_of(2) {
            spec[self.n / 2].im = 0.0;
        }
        self.c2r
            .process_with_scratch(spec, &mut ws.time, &mut ws.fft)
            .map_err(fft_error)?;
        Ok(&ws.time)
    }

    /// `T y` (length `nq`) from the accumulated spectrum of `kernel_spectrum(c) ⊙ forward(y)`.
    pub fn inverse_product<'w>(
        &self,
        spec: &mut [C64],
        ws: &'w mut ToeplitzScratch,
    ) -> Result<&'w [f64]> {
        let (nq, nk) = (self.nq, self.nk);
        Ok(&self.inverse(spec, ws)?[nk - 1..nk - 1 + nq])
    }

    /// `T^T x` (length `nk`) from the spectrum of `kernel_spectrum_transposed(c) ⊙ forward(x)`.
    pub fn inverse_transposed_product<'w>(
        &self,
        spec: &mut [C64],
        ws: &'w mut ToeplitzScratch,
    ) -> Result<&'w [f64]> {
        let (nq, nk) = (self.nq, self.nk);
        Ok(&self.inverse(spec, ws)?[nq - 1..nq - 1 + nk])
    }

    /// `z = T y` for one sequence and one vector (`c`: `glen`, `y`: `nk`).
    pub fn matvec(&self, c: &[f64], y: &[f64], ws: &mut ToeplitzScratch) -> Result<Vec<f64>> {
        check_len("Toeplitz vector", self.nk, y.len())?;
        let mut kc = vec![C64::new(0.0, 0.0); self.spectrum_len()];
        let mut ky = kc.clone();
        self.kernel_spectrum(c, &mut kc, ws)?;
        self.forward(y, &mut ky, ws)?;
        kc.iter_mut().zip(&ky).for_each(|(a, b)| *a *= b);
        Ok(self.inverse_product(&mut kc, ws)?.to_vec())
    }

    /// `z = T^T x` (`c`: `glen`, `x`: `nq`).
    pub fn matvec_transposed(
        &self,
        c: &[f64],
        x: &[f64],
        ws: &mut ToeplitzScratch,
    ) -> Result<Vec<f64>> {
        check_len("Toeplitz vector", self.nq, x.len())?;
        let mut kc = vec![C64::new(0.0, 0.0); self.spectrum_len()];
        let mut kx = kc.clone();
        self.kernel_spectrum_transposed(c, &mut kc, ws)?;
        self.forward(x, &mut kx, ws)?;
        kc.iter_mut().zip(&kx).for_each(|(a, b)| *a *= b);
        Ok(self.inverse_transposed_product(&mut kc, ws)?.to_vec())
    }

    /// Diagonal sums `s[g] = Σ_{j-i+nq-1=g} a_i b_j` (`a`: `nq`, `b`: `nk`; result `glen`).
    pub fn diagonal_sums(
        &self,
        a: &[f64],
        b: &[f64],
        ws: &mut ToeplitzScratch,
    ) -> Result<Vec<f64>> {
        check_len("diagonal sums: first vector", self.nq, a.len())?;
        check_len("diagonal sums: second vector", self.nk, b.len())?;
        let mut sa = vec![C64::new(0.0, 0.0); self.spectrum_len()];
        let mut sb = sa.clone();
        let (last, inv) = (a.len() - 1, 1.0 / self.n as f64);
        self.forward_from_fn(a.len(), |m| a[last - m] * inv, &mut sa, ws)?;
        self.forward(b, &mut sb, ws)?;
        sa.iter_mut().zip(&sb).for_each(|(x, y)| *x *= y);
        let glen = self.glen();
        Ok(self.inverse(&mut sa, ws)?[..glen].to_vec())
    }
}

/// `acc += a ⊙ b` over spectra.
#[inline]
pub fn multiply_accumulate(acc: &mut [C64], a: &[C64], b: &[C64]) {
    for ((s, x), y) in acc.iter_mut().zip(a).zip(b) {
        s.re += x.re * y.re - x.im * y.im;
        s.im += x.re * y.im + x.im * y.re;
    }
}

/// `z = T y` (`z_i = Σ_j c[j-i+nq-1] y_j`, `c`: `nq + nk - 1`, `y`: `nk`) in one call; for
/// repeated products keep a [`ToeplitzPlan`] and its scratch instead.
pub fn toeplitz_matvec(c: &[f64], y: &[f64], nq: usize) -> Result<Vec<f64>> {
    let plan = ToeplitzPlanner::new().plan(nq, y.len())?;
    plan.matvec(c, y, &mut plan.make_scratch())
}

/// `T y` by the definition, `O(nq nk)`: the test oracle.
pub fn toeplitz_matvec_naive(c: &[f64], y: &[f64], nq: usize) -> Vec<f64> {
    (0..nq)
        .map(|i| {
            y.iter()
                .enumerate()
                .map(|(j, yj)| c[j + nq - 1 - i] * yj)
                .sum()
        })
        .collect()
}

/// `T^T x` by the definition (`nk = c.len() + 1 - x.len()`).
pub fn toeplitz_matvec_transposed_naive(c: &[f64], x: &[f64]) -> Vec<f64> {
    let nq = x.len();
    let nk = c.len() + 1 - nq;
    (0..nk)
        .map(|j| {
            x.iter()
                .enumerate()
                .map(|(i, xi)| c[j + nq - 1 - i] * xi)
                .sum()
        })
        .collect()
}

/// Diagonal sums by the definition.
pub fn diagonal_sums_naive(a: &[f64], b: &[f64]) -> Vec<f64> {
    let nq = a.len();
    let mut s = vec![0.0; a.len() + b.len() - 1];
    for (i, ai) in a.iter().enumerate() {
        for (j, bj) in b.iter().enumerate() {
            s[j + nq - 1 - i] += ai * bj;
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::rng;

    fn close(a: &[f64], b: &[f64], scale: f64) {
        assert_eq!(a.len(), b.len());
        let tol = 64.0 * f64::EPSILON * scale;
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= tol, "{x} vs {y} (tol {tol})");
        }
    }

    #[test]
    fn fft_len_is_smooth_even_and_minimal() {
        assert_eq!(fft_len(0), 2);
        assert_eq!(fft_len(7), 8);
        assert_eq!(fft_len(11), 12);
        assert_eq!(fft_len(13), 16);
        assert_eq!(fft_len(61), 64);
        assert_eq!(fft_len(8191), 8192);
        assert_eq!(fft_len(8193), 8640); // 2^6 3^3 5
        for m in 1..500 {
            let n = fft_len(m);
            let mut r = n;
            for p in [2, 3, 5] {
                while r.is_multiple_of(p) {
                    r /= p;
                }
            }
            assert!(n >= m && n.is_multiple_of(2) && r == 1);
        }
    }

    #[test]
    fn products_match_the_naive_twins() {
        let mut u = rng(3);
        let mut planner = ToeplitzPlanner::new();
        for &(nq, nk) in &[
            (1, 1),
            (1, 7),
            (7, 1),
            (13, 13),
            (17, 31),
            (97, 41),
            (101, 103),
            (256, 3),
        ] {
            let plan = planner.plan(nq, nk).unwrap();
            let mut ws = plan.make_scratch();
            let c: Vec<f64> = (0..nq + nk - 1).map(|_| u()).collect();
            let y: Vec<f64> = (0..nk).map(|_| u()).collect();
            let x: Vec<f64> = (0..nq).map(|_| u()).collect();
            let size = (nq + nk) as f64;
            close(
                &plan.matvec(&c, &y, &mut ws).unwrap(),
                &toeplitz_matvec_naive(&c, &y, nq),
                size,
            );
            close(
                &toeplitz_matvec(&c, &y, nq).unwrap(),
                &toeplitz_matvec_naive(&c, &y, nq),
                size,
            );
            close(
                &plan.matvec_transposed(&c, &x, &mut ws).unwrap(),
                &toeplitz_matvec_transposed_naive(&c, &x),
                size,
            );
            close(
                &plan.diagonal_sums(&x, &y, &mut ws).unwrap(),
                &diagonal_sums_naive(&x, &y),
                size,
            );
        }
    }

    #[test]
    fn batched_spectra_accumulate_like_a_sum_of_products() {
        let (nq, nk) = (29, 37);
        let mut u = rng(5);
        let plan = ToeplitzPlanner::new().plan(nq, nk).unwrap();
        let mut ws = plan.make_scratch();
        let h = plan.spectrum_len();
        let mut acc = vec![C64::new(0.0, 0.0); h];
        let mut want = vec![0.0; nq];
        for _ in 0..3 {
            let c: Vec<f64> = (0..nq + nk - 1).map(|_| u()).collect();
            let y: Vec<f64> = (0..nk).map(|_| u()).collect();
            let (mut sc, mut sy) = (vec![C64::new(0.0, 0.0); h], vec![C64::new(0.0, 0.0); h]);
            plan.kernel_spectrum(&c, &mut sc, &mut ws).unwrap();
            plan.forward(&y, &mut sy, &mut ws).unwrap();
            multiply_accumulate(&mut acc, &sc, &sy);
            want.iter_mut()
                .zip(toeplitz_matvec_naive(&c, &y, nq))
                .for_each(|(w, z)| *w += z);
        }
        close(
            plan.inverse_product(&mut acc, &mut ws).unwrap(),
            &want,
            200.0,
        );
    }

    #[test]
    fn bad_lengths_are_errors_not_panics() {
        let plan = ToeplitzPlanner::new().plan(4, 5).unwrap();
        let mut ws = plan.make_scratch();
        assert!(matches!(
            plan.matvec(&[1.0; 7], &[1.0; 5], &mut ws),
            Err(Error::Value(_))
        ));
        assert!(matches!(
            plan.matvec(&[1.0; 8], &[1.0; 4], &mut ws),
            Err(Error::Value(_))
        ));
        assert!(ToeplitzPlanner::new().plan(0, 3).is_err());
    }
}
