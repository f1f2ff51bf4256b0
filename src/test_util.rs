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

/// One head of the fast method with owned data (the fixture of the `fast` tests): q, k, v, the
/// output cotangent, W as support and diagonal sequences, and the mask/bias factor.
pub(crate) mod head {
    use super::rng;
    use crate::fast::naive::score;
    use crate::fast::HeadProblem;
    use ndarray::{Array2, ArrayView2};

    #[derive(Clone)]
    pub(crate) struct Owned {
        pub(crate) q: Array2<f64>,
        pub(crate) k: Array2<f64>,
        pub(crate) v: Array2<f64>,
        pub(crate) dout: Array2<f64>,
        pub(crate) scale: f64,
        pub(crate) support: Vec<(usize, usize)>,
        pub(crate) seqs: Array2<f64>,
        pub(crate) factor: Vec<f64>,
    }

    impl Owned {
        pub(crate) fn prob(&self) -> HeadProblem<'_> {
            HeadProblem {
                q: self.q.view(),
                k: self.k.view(),
                v: self.v.view(),
                scale: self.scale,
                support: &self.support,
                seqs: self.seqs.view(),
                factor: &self.factor,
            }
        }
        pub(crate) fn dout(&self) -> ArrayView2<'_, f64> {
            self.dout.view()
        }

        pub(crate) fn max_score(&self) -> f64 {
            let p = self.prob();
            let mut m: f64 = 0.0;
            for i in 0..p.nq() {
                for j in 0..p.nk() {
                    if self.factor[j + p.nq() - 1 - i] > 0.0 {
                        m = m.max(score(&p, i, j).abs());
                    }
                }
            }
            m
        }
    }

    /// `δ(g)` for diagonal `g` with `offset = q_offset - k_offset`.
    pub(crate) fn delta(offset: i64, nq: usize, g: usize) -> i64 {
        offset + nq as i64 - 1 - g as i64
    }

    /// Random q, k, v and dout with entries up to `amp` (dout up to 1); rotary W (interleaved
    /// pairs, base 10000), no mask.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rotary(
        nq: usize,
        nk: usize,
        d: usize,
        dv: usize,
        offset: i64,
        amp: f64,
        seed: u64,
    ) -> Owned {
        let mut u = rng(seed);
        let glen = nq + nk - 1;
        let mut support = Vec::new();
        let mut rows = Vec::new();
        for m in 0..d / 2 {
            let theta = 10000f64.powf(-2.0 * m as f64 / d as f64);
            let (p, r) = (2 * m, 2 * m + 1);
            let angle = |g: usize| delta(offset, nq, g) as f64 * theta;
            support.extend([(p, p), (p, r), (r, p), (r, r)]);
            rows.push((0..glen).map(|g| angle(g).cos()).collect::<Vec<_>>());
            rows.push((0..glen).map(|g| angle(g).sin()).collect());
            rows.push((0..glen).map(|g| -angle(g).sin()).collect());
            rows.push((0..glen).map(|g| angle(g).cos()).collect());
        }
        let seqs = Array2::from_shape_fn((support.len(), glen), |(s, g)| rows[s][g]);
        Owned {
            q: Array2::from_shape_fn((nq, d), |_| amp * u()),
            k: Array2::from_shape_fn((nk, d), |_| amp * u()),
            v: Array2::from_shape_fn((nk, dv), |_| u()),
            dout: Array2::from_shape_fn((nq, dv), |_| u()),
            scale: 1.0 / (d as f64).sqrt(),
            support,
            seqs,
            factor: vec![1.0; glen],
        }
    }

    /// Causal (`δ >= 0`), a window `-right <= δ <= left` and an ALiBi-like bias `-slope |δ|`.
    pub(crate) fn mask(
        o: &mut Owned,
        offset: i64,
        causal: bool,
        window: Option<(i64, i64)>,
        slope: f64,
    ) {
        let nq = o.q.nrows();
        for (g, f) in o.factor.iter_mut().enumerate() {
            let dl = delta(offset, nq, g);
            let visible = (!causal || dl >= 0) && window.is_none_or(|(l, r)| -r <= dl && dl <= l);
            *f = if visible {
                (-slope * dl.abs() as f64).exp()
            } else {
                0.0
            };
        }
    }
}
