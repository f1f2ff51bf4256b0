//! Elementwise kernels of the tile loops, written so LLVM vectorises them, compiled for the
//! baseline target and for AVX2+FMA and AVX-512, and selected at run time (a wheel must run on
//! any x86-64, so nothing is built with `target-cpu=native`).
//!
//! `exp` is the usual range reduction `e^x = 2^k e^r`, `k = round(x log2 e)`,
//! `|r| <= ln2/2`, with `e^r` from its Taylor polynomial (degree 7 for f32: truncation
//! `(ln2/2)^8/8! < 6e-9`; degree 13 for f64: `< 5e-18`) and `2^k` built in the exponent bits.
//! Inputs below the smallest normal result (and `-inf`, the masked scores) give exactly 0.

use crate::arch::real::Real;
use std::cell::Cell;
use std::sync::OnceLock;

/// Instruction sets, in increasing order of capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Baseline,
    Avx2,
    Avx512,
}

/// The best instruction set this CPU supports (detected once).
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::env::var_os("FASTROPE_BASELINE").is_some() {
                return Isa::Baseline;
            }
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Baseline
    })
}

thread_local! {
    static FORCED: Cell<Option<Isa>> = const { Cell::new(None) };
}

/// The instruction set a call made on this thread uses: [`isa`], or a narrower one chosen with
/// [`with_isa`]. Kernels read it once per call, on the calling thread, and hand it to their
/// workers.
pub fn call_isa() -> Isa {
    let best = isa();
    FORCED.with(|f| f.get()).map_or(best, |f| f.min(best))
}

/// Runs `f` with calls on this thread limited to `limit` (tests compare the instruction sets).
pub fn with_isa<R>(limit: Isa, f: impl FnOnce() -> R) -> R {
    let old = FORCED.with(|c| c.replace(Some(limit)));
    let r = f();
    FORCED.with(|c| c.set(old));
    r
}

/// `e^x` for f32, per lane (see the module docs).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    {
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        const LN2_HI: f32 = 0.693_145_75;
        const LN2_LO: f32 = 1.428_606_8e-6;
        let xc = x.clamp(-87.0, 88.0);
        // Round to nearest with the 1.5 * 2^23 trick: vectorises without SSE4.1's roundps.
        let k = (xc * LOG2E + 12_582_912.0) - 12_582_912.0;
        let r = (xc - k * LN2_HI) - k * LN2_LO;
        let mut p = 1.0 / 5040.0;
        p = p * r + 1.0 / 720.0;
        p = p * r + 1.0 / 120.0;
        p = p * r + 1.0 / 24.0;
        p = p * r + 1.0 / 6.0;
        p = p * r + 0.5;
        p = p * r + 1.0;
        p = p * r + 1.0;
        let scale = f32::from_bits((((k as i32) + 127) as u32) << 23);
        let y = p * scale;
        if x < -87.0 {
            0.0
        } else {
            y
        }
    }
}

/// `e^x` for f64, per lane (see the module docs).
#[inline(always)]
pub fn exp_f64(x: f64) -> f64 {
    {
        const LOG2E: f64 = std::f64::consts::LOG2_E;
        const LN2_HI: f64 = 6.931_471_803_691_238e-1;
        const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
        let xc = x.clamp(-708.0, 709.0);
        let k = (xc * LOG2E + 6_755_399_441_055_744.0) - 6_755_399_441_055_744.0;
        let r = (xc - k * LN2_HI) - k * LN2_LO;
        // Taylor coefficients 1/13!, ..., 1/2!, 1, 1 (Horner).
        const C: [f64; 12] = [
            1.0 / 6_227_020_800.0,
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
        ];
        let mut p = C[0];
        for &c in &C[1..] {
            p = p * r + c;
        }
        p = p * r + 1.0;
        p = p * r + 1.0;
        let scale = f64::from_bits((((k as i64) + 1023) as u64) << 52);
        let y = p * scale;
        if x < -708.0 {
            0.0
        } else {
            y
        }
    }
}

macro_rules! multiversion {
    ($(#[$m:meta])* fn $name:ident<$t:ident>($($arg:ident : $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[inline]
        pub fn $name<$t: Real>($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn inner<$t: Real>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2<$t: Real>($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512<$t: Real>($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                match isa() {
                    // SAFETY: `isa()` detected the features these versions are compiled for.
                    Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above: AVX2 and FMA were detected.
                    Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    Isa::Baseline => {}
                }
            }
            inner($($arg),*)
        }
    };
}

multiversion! {
    /// `x = exp(x - shift)` in place; returns the sum of the results.
    fn exp_shift_sum<T>(xs: &mut [T], shift: T) -> T {
        let mut acc = [T::zero(); 8];
        let mut chunks = xs.chunks_exact_mut(8);
        for c in &mut chunks {
            for (a, x) in acc.iter_mut().zip(c.iter_mut()) {
                *x = Real::exp_lane(*x - shift);
                *a = *a + *x;
            }
        }
        let mut s = T::zero();
        for x in chunks.into_remainder() {
            *x = Real::exp_lane(*x - shift);
            s = s + *x;
        }
        acc.iter().fold(s, |a, &b| a + b)
    }
}

multiversion! {
    /// The largest element (`-inf` for an empty slice).
    fn max<T>(xs: &[T]) -> T {
        let mut acc = [T::neg_infinity(); 8];
        let mut chunks = xs.chunks_exact(8);
        for c in &mut chunks {
            for (a, &x) in acc.iter_mut().zip(c) {
                *a = if x > *a { x } else { *a };
            }
        }
        let m = chunks.remainder().iter().fold(T::neg_infinity(), |a, &x| if x > a { x } else { a });
        acc.iter().fold(m, |a, &x| if x > a { x } else { a })
    }
}

multiversion! {
    /// `row[j] += a * w[j] * k[j]`.
    fn axpy_prod<T>(row: &mut [T], a: T, w: &[T], k: &[T]) {
        for ((x, &wv), &kv) in row.iter_mut().zip(w).zip(k) {
            *x = *x + a * wv * kv;
        }
    }
}

multiversion! {
    /// `row[j] += b[j]`.
    fn add_assign<T>(row: &mut [T], b: &[T]) {
        for (x, &y) in row.iter_mut().zip(b) {
            *x = *x + y;
        }
    }
}

multiversion! {
    /// `ds[j] = p[j] * (ds[j] - di)` (the backward's `dS = P ∘ (dP - D)`).
    fn softmax_grad<T>(ds: &mut [T], p: &[T], di: T) {
        for (x, &pv) in ds.iter_mut().zip(p) {
            *x = pv * (*x - di);
        }
    }
}

multiversion! {
    /// For sparse `W`: `dk[j] += a * ds[j] * w[j]`, returns `Σ_j ds[j] w[j] k[j]`.
    fn sparse_dq_dk<T>(ds: &[T], w: &[T], k: &[T], dk: &mut [T], a: T) -> T {
        let mut acc = [T::zero(); 8];
        let n = ds.len().min(w.len()).min(k.len()).min(dk.len());
        let full = n - n % 8;
        for c in (0..full).step_by(8) {
            for l in 0..8 {
                let xw = ds[c + l] * w[c + l];
                acc[l] = acc[l] + xw * k[c + l];
                dk[c + l] = dk[c + l] + a * xw;
            }
        }
        let mut s = T::zero();
        for j in full..n {
            let xw = ds[j] * w[j];
            s = s + xw * k[j];
            dk[j] = dk[j] + a * xw;
        }
        acc.iter().fold(s, |x, &y| x + y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_and_exact_at_the_ends() {
        let mut worst32 = 0f64;
        let mut worst64 = 0f64;
        // Under Miri (~1000x slower) the same range at 100x the step.
        let (n, step) = if cfg!(miri) {
            (2_001, 0.1)
        } else {
            (200_001, 0.001)
        };
        for i in 0..n {
            let x = -100.0 + i as f64 * step;
            let e = x.exp();
            let y64 = exp_f64(x);
            worst64 = worst64.max(((y64 - e) / e).abs());
            if x > -87.0 && x < 88.0 {
                let y32 = exp_f32(x as f32) as f64;
                let e32 = (x as f32 as f64).exp();
                worst32 = worst32.max(((y32 - e32) / e32).abs());
            }
        }
        assert!(worst64 < 4e-16, "f64 exp relative error {worst64}");
        assert!(worst32 < 4e-7, "f32 exp relative error {worst32}");
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f64(f64::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f64(0.0), 1.0);
    }

    #[test]
    fn kernels_match_scalar_loops() {
        let mut xs: Vec<f64> = (0..37).map(|i| (i as f64 * 0.37).sin() * 5.0).collect();
        xs[3] = f64::NEG_INFINITY;
        let m = max(&xs);
        assert_eq!(m, xs.iter().copied().fold(f64::NEG_INFINITY, f64::max));
        let want: Vec<f64> = xs.iter().map(|x| (x - m).exp()).collect();
        let s = exp_shift_sum(&mut xs, m);
        for (a, b) in xs.iter().zip(&want) {
            assert!((a - b).abs() < 1e-15);
        }
        assert!((s - want.iter().sum::<f64>()).abs() < 1e-13);
        let (w, k): (Vec<f64>, Vec<f64>) = (0..19)
            .map(|i| (i as f64 * 0.1, 1.0 - i as f64 * 0.05))
            .unzip();
        let ds: Vec<f64> = (0..19).map(|i| (i as f64).cos()).collect();
        let mut dk = vec![0.5; 19];
        let got = sparse_dq_dk(&ds, &w, &k, &mut dk, 2.0);
        let want: f64 = (0..19).map(|j| ds[j] * w[j] * k[j]).sum();
        assert!((got - want).abs() < 1e-13);
        for j in 0..19 {
            assert!((dk[j] - (0.5 + 2.0 * ds[j] * w[j])).abs() < 1e-15);
        }
        assert_eq!(max::<f32>(&[]), f32::NEG_INFINITY);
    }
}
