//! Deterministic test data without an RNG dependency: the generators every unit-test module of
//! the crate shares (one copy each, so a fixture means the same numbers everywhere).

use ndarray::{Array2, Array4};

/// Marsaglia's xorshift (shifts 13, 7, 17) on the raw state; the state must be non-zero.
#[derive(Clone, Debug)]
pub(crate) struct XorShift(pub(crate) u64);

impl XorShift {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Uniform numbers in [-1, 1) from [`XorShift`] seeded by `seed` (any seed, 0 included).
pub(crate) fn rng(seed: u64) -> impl FnMut() -> f64 {
    let mut s = XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    move || (s.next_u64() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
}

/// xorshift64*: uniform numbers in [-1, 1) and arrays of them.
#[derive(Clone, Debug)]
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
    pub(crate) fn array4(&mut self, s: (usize, usize, usize, usize)) -> Array4<f64> {
        Array4::from_shape_fn(s, |_| self.next())
    }
}

/// A 64-bit linear congruential generator (Knuth's MMIX constants): uniform numbers in [-1, 1)
/// and matrices of them.
#[derive(Clone, Debug)]
pub(crate) struct Lcg(pub(crate) u64);

impl Lcg {
    pub(crate) fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }
    pub(crate) fn mat(&mut self, r: usize, c: usize, s: f64) -> Array2<f64> {
        Array2::from_shape_fn((r, c), |_| s * self.next())
    }
}
