//! Rotary rotation of many rows without a `sin_cos` per row and pair.
//!
//! A position splits as `p = a B + b` (`0 <= b < B`), so `φ = p θ = a B θ + b θ` and
//! `cos φ = cos(aBθ) cos(bθ) - sin(aBθ) sin(bθ)`, `sin φ = sin(aBθ) cos(bθ) + cos(aBθ) sin(bθ)`:
//! a fixed table of `(cos, sin)(bθ_m)` plus one `sin_cos` per pair every `B` rows. In f64 the
//! products add a few ulp to the angle's own rounding (`|aBθ + bθ - fl(pθ)| <= ulp(pθ)`).

use crate::arch::lanes::{Lanes, LanesTask};
use crate::arch::Real;
use crate::position::RotaryW;
use std::sync::{Arc, Mutex};

/// Rows per coarse angle.
const B: i64 = 64;

/// How the pairs sit in a row: the two common layouts get loops LLVM vectorises.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// `(2m, 2m + 1)`.
    Interleaved,
    /// `(m, m + d/2)`.
    Half,
    General,
}

/// `cos(b θ_m)`, `sin(b θ_m)` at `b * h + m` (`0 <= b < B`).
struct Fine {
    c: Vec<f64>,
    s: Vec<f64>,
}

/// The fine tables of the last few frequency vectors: a generation loop calls with the same
/// `θ` every step, and the `B h` sines and cosines were a tenth of a short call's time.
static FINE: Mutex<Vec<(Vec<u64>, Arc<Fine>)>> = Mutex::new(Vec::new());
const FINE_CACHED: usize = 8;

/// [`FINE`]'s lock, held across a `fork` ([`crate::fork`]).
#[cfg(feature = "python")]
pub(crate) fn fork_guard() -> Box<dyn std::any::Any> {
    Box::new(FINE.lock().unwrap_or_else(|e| e.into_inner()))
}

fn fine_table(theta: &[f64]) -> Arc<Fine> {
    let key: Vec<u64> = theta.iter().map(|t| t.to_bits()).collect();
    // A poisoned lock only means another thread panicked mid-update: rebuild the table.
    if let Ok(cache) = FINE.lock() {
        if let Some((_, f)) = cache.iter().find(|(k, _)| *k == key) {
            return f.clone();
        }
    }
    let h = theta.len();
    let mut c = Vec::with_capacity(B as usize * h);
    let mut s = Vec::with_capacity(B as usize * h);
    for b in 0..B {
        for &th in theta {
            let (sn, cs) = (b as f64 * th).sin_cos();
            c.push(cs);
            s.push(sn);
        }
    }
    let f = Arc::new(Fine { c, s });
    if let Ok(mut cache) = FINE.lock() {
        if cache.len() == FINE_CACHED {
            cache.remove(0);
        }
        cache.push((key, f.clone()));
    }
    f
}

/// The fine table of a [`RotaryW`].
pub(crate) struct Rotator<'r> {
    r: &'r RotaryW,
    layout: Layout,
    fine: Arc<Fine>,
    /// Every frequency is 0 (`w=None`): a rotation is the multiplication by its `mult`.
    identity: bool,
}

impl<'r> Rotator<'r> {
    pub fn new(r: &'r RotaryW) -> Self {
        let h = r.theta.len();
        let fine = fine_table(&r.theta);
        let layout = if r
            .pairs
            .iter()
            .enumerate()
            .all(|(m, &p)| p == (2 * m, 2 * m + 1))
        {
            Layout::Interleaved
        } else if r.pairs.iter().enumerate().all(|(m, &p)| p == (m, m + h)) {
            Layout::Half
        } else {
            Layout::General
        };
        let identity = r.theta.iter().all(|&t| t == 0.0);
        Self {
            r,
            layout,
            fine,
            identity,
        }
    }

    /// Rotates `n` rows of `d` elements (row `i` at `rows[i * ld..]`, position `offset + i`) and
    /// multiplies them by `mult`: `x_p' = x_p cos φ - x_r sin φ`, `x_r' = x_p sin φ + x_r cos φ`
    /// (as [`RotaryW::rotate`]), or by the transpose when `back`. Compiled for the best
    /// instruction set (the arithmetic is the same on every one: no FMA contraction).
    pub fn rotate<T: Real>(
        &self,
        rows: &mut [T],
        ld: usize,
        n: usize,
        offset: i64,
        mult: f64,
        back: bool,
    ) {
        if self.identity {
            // cos 0 = 1, sin 0 = 0: `x mult`, what the general path gives for finite x.
            if mult != 1.0 {
                let (m, d) = (T::of(mult), 2 * self.r.pairs.len());
                for row in rows.chunks_mut(ld).take(n) {
                    row[..d].iter_mut().for_each(|x| *x = *x * m);
                }
            }
            return;
        }
        struct Task<'a, 'r, T> {
            rot: &'a Rotator<'r>,
            rows: &'a mut [T],
            ld: usize,
            n: usize,
            offset: i64,
            mult: f64,
            back: bool,
        }
        impl<T: Real> LanesTask<T> for Task<'_, '_, T> {
            type Out = ();
            #[inline(always)]
            fn run<L: Lanes<E = T>>(self) {
                self.rot.rotate_body(
                    self.rows,
                    self.ld,
                    self.n,
                    self.offset,
                    self.mult,
                    self.back,
                )
            }
        }
        let task = Task {
            rot: self,
            rows,
            ld,
            n,
            offset,
            mult,
            back,
        };
        T::with_lanes(crate::arch::simd::isa(), task)
    }

    /// Whether every frequency is 0 (`w=None`: the rotation is the identity).
    pub fn is_identity(&self) -> bool {
        self.identity
    }

    /// The lane distance of the pairs: 1 for interleaved `(2m, 2m + 1)`, `d/2` for half
    /// `(m, m + d/2)`, `None` for any other layout.
    pub fn pair_distance(&self) -> Option<usize> {
        match self.layout {
            Layout::Interleaved => Some(1),
            Layout::Half => Some(self.r.theta.len()),
            Layout::General => None,
        }
    }

    /// The partner of every element of a row (`r_m` of `p_m` and `p_m` of `r_m`).
    pub fn partners(&self) -> Vec<usize> {
        let mut out = vec![0; 2 * self.r.pairs.len()];
        for &(p, r) in &self.r.pairs {
            out[p] = r;
            out[r] = p;
        }
        out
    }

    /// The angles of rows at consecutive positions: [`Angles::at`] gives a row's pairs'
    /// `mc cos φ_m` and `ms sin φ_m` (`φ_m = pos θ_m`, from the coarse and fine tables).
    #[inline(always)]
    fn angles(&self, mc: f64, ms: f64) -> Angles<'_, 'r> {
        let h = self.r.theta.len();
        Angles {
            rot: self,
            ca: vec![1.0; h],
            sa: vec![0.0; h],
            cc: vec![0.0; h],
            ss: vec![0.0; h],
            have: None,
            mc,
            ms,
        }
    }

    /// The rotation of rows `offset..offset + n` (times `mult`) as two `n x d` tables, rounded
    /// to `T` once: `c[p_m] = c[r_m] = cos φ_m`, `s[p_m] = -sin φ_m`, `s[r_m] = sin φ_m`, so that
    /// the rotated row is `x' = x ∘ c + x[partner] ∘ s`.
    #[inline(always)]
    pub fn table<T: Real>(&self, offset: i64, n: usize, mult: f64, c: &mut [T], s: &mut [T]) {
        let h = self.r.theta.len();
        let d = 2 * h;
        // A loop, not a closure: a closure would be compiled without the caller's target
        // features (SSE2 only), and so would the arithmetic inside it.
        let mut ang = self.angles(mult, mult);
        for i in 0..n {
            let (cm, sm) = ang.at(offset + i as i64);
            let (co, so) = (&mut c[i * d..(i + 1) * d], &mut s[i * d..(i + 1) * d]);
            for (m, (&cv, &sv)) in cm.iter().zip(sm).enumerate() {
                let (cv, sv) = (T::of(cv), T::of(sv));
                let (p, r) = match self.layout {
                    Layout::Interleaved => (2 * m, 2 * m + 1),
                    Layout::Half => (m, m + h),
                    Layout::General => self.r.pairs[m],
                };
                co[p] = cv;
                co[r] = cv;
                so[p] = -sv;
                so[r] = sv;
            }
        }
    }

    #[inline(always)]
    fn rotate_body<T: Real>(
        &self,
        rows: &mut [T],
        ld: usize,
        n: usize,
        offset: i64,
        mult: f64,
        back: bool,
    ) {
        let h = self.r.theta.len();
        let sgn = if back { -mult } else { mult };
        // A loop, not a closure (see `table`).
        let mut ang = self.angles(mult, sgn);
        for i in 0..n {
            let (cc, ss) = ang.at(offset + i as i64);
            let row = &mut rows[i * ld..i * ld + 2 * h];
            match self.layout {
                Layout::Half => {
                    let (lo, hi) = row.split_at_mut(h);
                    for (((p, r), &c), &s) in lo.iter_mut().zip(hi.iter_mut()).zip(cc).zip(ss) {
                        let (xp, xr) = (p.f64(), r.f64());
                        *p = T::of(xp * c - xr * s);
                        *r = T::of(xp * s + xr * c);
                    }
                }
                Layout::Interleaved => {
                    for ((x, &c), &s) in row.chunks_exact_mut(2).zip(cc).zip(ss) {
                        let (xp, xr) = (x[0].f64(), x[1].f64());
                        x[0] = T::of(xp * c - xr * s);
                        x[1] = T::of(xp * s + xr * c);
                    }
                }
                Layout::General => {
                    for ((&(p, r), &c), &s) in self.r.pairs.iter().zip(cc).zip(ss) {
                        let (xp, xr) = (row[p].f64(), row[r].f64());
                        row[p] = T::of(xp * c - xr * s);
                        row[r] = T::of(xp * s + xr * c);
                    }
                }
            }
        }
    }
}

/// The angles of a [`Rotator`]'s rows, one position after another (see [`Rotator::angles`]).
struct Angles<'a, 'r> {
    rot: &'a Rotator<'r>,
    /// `cos`, `sin` of the coarse angle `a B θ_m` of the block `have`.
    ca: Vec<f64>,
    sa: Vec<f64>,
    /// The last row's `mc cos φ_m`, `ms sin φ_m`.
    cc: Vec<f64>,
    ss: Vec<f64>,
    have: Option<i64>,
    mc: f64,
    ms: f64,
}

impl Angles<'_, '_> {
    /// The pairs' `mc cos φ_m` and `ms sin φ_m` at position `pos`: the coarse angle of `pos`'s
    /// block of `B` positions (computed when the block changes) times the fine table's.
    #[inline(always)]
    fn at(&mut self, pos: i64) -> (&[f64], &[f64]) {
        let rot = self.rot;
        let h = rot.r.theta.len();
        let (a, b) = (pos.div_euclid(B), pos.rem_euclid(B) as usize);
        if self.have != Some(a) {
            for ((c, s), &th) in self.ca.iter_mut().zip(self.sa.iter_mut()).zip(&rot.r.theta) {
                (*s, *c) = ((a * B) as f64 * th).sin_cos();
            }
            self.have = Some(a);
        }
        let (fc, fs) = (
            &rot.fine.c[b * h..(b + 1) * h],
            &rot.fine.s[b * h..(b + 1) * h],
        );
        let (mc, ms) = (self.mc, self.ms);
        for ((((c, s), (&xc, &xs)), &yc), &ys) in self
            .cc
            .iter_mut()
            .zip(self.ss.iter_mut())
            .zip(self.ca.iter().zip(&self.sa))
            .zip(fc)
            .zip(fs)
        {
            *c = mc * (xc * yc - xs * ys);
            *s = ms * (xs * yc + xc * ys);
        }
        (&self.cc, &self.ss)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_rotary_rotate_both_ways() {
        let d = 8;
        let r = RotaryW {
            theta: (0..d / 2)
                .map(|m| 10000f64.powf(-2.0 * m as f64 / d as f64))
                .collect(),
            factor: 1.0,
            pairs: (0..d / 2).map(|m| (2 * m, 2 * m + 1)).collect(),
        };
        let n = 100;
        let x: Vec<f64> = (0..n * d)
            .map(|i| ((i * 7919) % 113) as f64 / 50.0 - 1.0)
            .collect();
        let general = RotaryW {
            pairs: vec![(3, 0), (1, 6), (2, 7), (5, 4)],
            ..r.clone()
        };
        let half = RotaryW {
            pairs: (0..d / 2).map(|m| (m, m + d / 2)).collect(),
            ..r.clone()
        };
        for (r, offset) in [
            (&r, -70i64),
            (&r, 0),
            (&general, 5),
            (&half, 1_000_003),
            (&half, 3),
        ] {
            let mut want = x.clone();
            r.rotate(&mut want, d, offset, 1.5);
            let mut got = x.clone();
            let rot = Rotator::new(r);
            rot.rotate(&mut got, d, n, offset, 1.5, false);
            let tol = 1e-15 * (offset.unsigned_abs() as f64 + n as f64).max(1.0);
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < tol, "offset {offset}: {a} vs {b}");
            }
            rot.rotate(&mut got, d, n, offset, 1.0 / 1.5, true);
            for (a, b) in got.iter().zip(&x) {
                assert!((a - b).abs() < tol, "back, offset {offset}: {a} vs {b}");
            }
        }
    }
}
