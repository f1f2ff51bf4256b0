//! Which band a low-rank call has (docs/DESIGN.md §6): the window that masks, and the ALiBi decay
//! read off the bias table.
//!
//! A bias table `b(δ)` is ALiBi when `b(δ) = -s|δ|` on the visible `δ` (BLOOM, MPT). The
//! table is the interface every method shares (`fastrope.alibi(...)` builds it), so the
//! low-rank route recognises the form from the table's own values rather than asking for the
//! slope: `s = -b(δ*)/|δ*|` at the visible `δ* ≠ 0` nearest the diagonal, and the deviation
//! `η = max |b(δ) + s|δ||` over the visible `δ` with `s|δ| <= τ` enters the certificate as a
//! relative error `e^η - 1` of every weight (a float32 table is off by about `6e-8 s|δ|`).
//! Past `τ` (the tail) every pair weighs at most `e^{-τ + 1}` in both forms, and the
//! certificate carries that absolutely. Any other table is
//! refused with the place it departs from the form.

use crate::arch::Real;
use crate::fast::Band;
use crate::position::Bias;
use crate::problem::Problem;

/// Where the tail starts: `s|δ| > TAIL_FROM` weighs at most `e^{-63}` (about `4e-28`).
pub(crate) const TAIL_FROM: f64 = 64.0;

/// The largest deviation of a table from `-s|δ|` that the route takes (beyond it the
/// certificate would be spent on the table, not on the method).
const MAX_ETA: f64 = 1e-3;

/// The visible `δ` of row `i` lie in `[lo, hi]` ∩ `[i + c - (nk - 1), i + c]`.
struct Visible {
    lo: i128,
    hi: i128,
    c: i128,
    nq: i128,
    nk: i128,
}

impl Visible {
    fn new(prob: &Problem) -> Visible {
        let (mut lo, mut hi) = (i128::MIN / 4, i128::MAX / 4);
        if prob.causal {
            lo = 0;
        }
        if let Some((left, right)) = prob.window {
            lo = lo.max(-(right as i128));
            hi = hi.min(left as i128);
        }
        Visible {
            lo,
            hi,
            c: (prob.q_offset - prob.k_offset) as i128,
            nq: prob.nq as i128,
            nk: prob.nk as i128,
        }
    }

    /// `[a_i, b_i]`, empty when `a_i > b_i`.
    fn row(&self, i: i128) -> (i128, i128) {
        (
            self.lo.max(i + self.c - (self.nk - 1)),
            self.hi.min(i + self.c),
        )
    }

    /// The rows that see a key: `[first, last]`, or None.
    fn rows(&self) -> Option<(i128, i128)> {
        let first = (self.lo - self.c).max(0);
        let last = (self.hi + self.nk - 1 - self.c).min(self.nq - 1);
        (first <= last).then_some((first, last))
    }

    /// `max_i min_{δ visible to i} |δ|` over the rows that see a key: `max(a_i, 0) + max(-b_i,
    /// 0)` is convex in `i`, so its largest value is at the first or the last such row.
    fn farthest(&self) -> i128 {
        let Some((first, last)) = self.rows() else {
            return 0;
        };
        [first, last]
            .iter()
            .map(|&i| {
                let (a, b) = self.row(i);
                a.max(0) + (-b).max(0)
            })
            .max()
            .unwrap_or(0)
    }
}

/// The band of a call whose heads share bias table `table` (or have none): the window when it
/// masks something, the ALiBi slope and the certificate's view of the table; otherwise the
/// reason the table is not ALiBi.
pub(crate) fn band_of<T: Real>(
    prob: &Problem,
    bias: Option<(&Bias<'_, T>, usize)>,
    window_masks: bool,
) -> Result<Band, String> {
    let vis = Visible::new(prob);
    let reach =
        (prob.q_offset as i128 - prob.k_offset as i128).abs() + prob.nq as i128 + prob.nk as i128;
    if (bias.is_some() || window_masks) && reach >= 1i128 << 58 {
        return Err(format!(
            "takes a window or a bias only with positions within 2^58 (the offsets differ by \
             {}; the Toeplitz route applies it)",
            prob.q_offset as i128 - prob.k_offset as i128
        ));
    }
    let mut band = Band {
        shift: prob.q_offset - prob.k_offset,
        window: if window_masks { prob.window } else { None },
        min_mass: 1.0,
        ..Band::default()
    };
    let Some((bias, table)) = bias else {
        return Ok(band);
    };
    let Some((dlo, dhi)) = prob.visible_delta_range() else {
        return Ok(band);
    };
    let row = bias.values.row(table);
    let half = (row.len() as i64 - 1) / 2;
    let b = |delta: i64| row[(delta + half) as usize].f64();
    // the slope from the visible δ ≠ 0 nearest to the diagonal
    let near = if dlo > 0 {
        Some(dlo)
    } else if dhi < 0 {
        Some(dhi)
    } else if dhi >= 1 {
        Some(1)
    } else if dlo <= -1 {
        Some(-1)
    } else {
        None
    };
    let s = near.map_or(0.0, |d| -b(d) / d.unsigned_abs() as f64);
    if !(s.is_finite() && s >= 0.0) {
        return Err(format!(
            "takes a bias only of the ALiBi form b(δ) = -s|δ| with s >= 0 (this table has \
             slope {s:e} at the δ nearest 0; the Toeplitz route applies it)"
        ));
    }
    let (mut eta, mut worst, mut tail_b) = (0.0f64, 0i64, f64::NEG_INFINITY);
    let mut tail = false;
    for delta in dlo..=dhi {
        let value = b(delta);
        let form = -s * delta.unsigned_abs() as f64;
        if s * (delta.unsigned_abs() as f64) <= TAIL_FROM {
            let dev = (value - form).abs();
            if dev.is_nan() || dev > eta {
                // NaN lands here too, and stays the worst
                eta = if dev.is_nan() { f64::INFINITY } else { dev };
                worst = delta;
            }
        } else {
            tail = true;
            tail_b = tail_b.max(value);
        }
    }
    if eta.is_nan() || eta > MAX_ETA {
        return Err(format!(
            "takes a bias only of the ALiBi form b(δ) = -s|δ| (with s = {s:e} from the δ nearest 0, the \
             table is off by {eta:.3e} at δ = {worst}; the Toeplitz route applies it)"
        ));
    }
    if tail && (tail_b.is_nan() || tail_b > -TAIL_FROM + 1.0) {
        return Err(format!(
            "takes a bias only of the ALiBi form b(δ) = -s|δ| (with s = {s:e}, the table rises \
             to {tail_b:e} where -s|δ| < -{TAIL_FROM}; the Toeplitz route applies it)"
        ));
    }
    let min_mass = (-s * vis.farthest() as f64).exp();
    if min_mass.is_nan() || min_mass < 1e-250 {
        return Err(format!(
            "takes no ALiBi bias that leaves a row's whole weight below 1e-250 (slope {s:e}, a \
             row {} positions from its nearest key; the Toeplitz route applies it)",
            vis.farthest()
        ));
    }
    band.slope = s;
    band.bias_eta = eta;
    band.min_mass = min_mass;
    if tail {
        band.tail_from = TAIL_FROM;
        band.tail_weight = tail_b.exp().max((-TAIL_FROM).exp());
    }
    Ok(band)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    fn prob(nq: usize, nk: usize, causal: bool, window: Option<(i64, i64)>, c: i64) -> Problem {
        Problem {
            batch: 1,
            hq: 1,
            hk: 1,
            nq,
            nk,
            d: 2,
            dv: 1,
            scale: 1.0,
            causal,
            window,
            q_offset: c,
            k_offset: 0,
        }
    }

    fn alibi(s: f64, l: usize) -> Array2<f64> {
        Array2::from_shape_fn((1, 2 * l - 1), |(_, g)| {
            -s * (g as f64 - (l - 1) as f64).abs()
        })
    }

    #[test]
    fn reads_the_slope_and_the_deviation() {
        let p = prob(50, 50, true, None, 0);
        let t = alibi(0.3, 50);
        let bias = Bias {
            values: t.view(),
            index: vec![0],
        };
        let band = band_of(&p, Some((&bias, 0)), false).unwrap();
        assert_eq!(band.slope, 0.3);
        assert_eq!(band.bias_eta, 0.0);
        assert_eq!(band.min_mass, 1.0);
        // a float32 table: off by its rounding, measured
        let t32 = t.mapv(|x| x as f32);
        let b32 = Bias {
            values: t32.view(),
            index: vec![0],
        };
        let band = band_of(&p, Some((&b32, 0)), false).unwrap();
        assert!(
            band.bias_eta > 0.0 && band.bias_eta < 1e-5,
            "{}",
            band.bias_eta
        );
    }

    #[test]
    fn refuses_other_tables_with_the_place() {
        let p = prob(50, 50, false, None, 0);
        let mut t = alibi(0.25, 50);
        t[[0, 49 + 7]] += 0.5;
        let bias = Bias {
            values: t.view(),
            index: vec![0],
        };
        let why = band_of(&p, Some((&bias, 0)), false).unwrap_err();
        assert!(why.contains("δ = 7"), "{why}");
        let t = alibi(-0.25, 50);
        let bias = Bias {
            values: t.view(),
            index: vec![0],
        };
        assert!(band_of(&p, Some((&bias, 0)), false).is_err());
    }

    #[test]
    fn offsets_near_the_i64_limits_are_refused_not_overflowed() {
        // found by the fast fuzz target: the band's block geometry negated c = i64::MIN
        let mut p = prob(3, 3, true, Some((1, 1)), 0);
        p.q_offset = i64::MIN / 2;
        p.k_offset = i64::MAX / 2;
        assert!(band_of::<f64>(&p, None, true).unwrap_err().contains("2^58"));
    }

    #[test]
    fn tail_and_far_rows() {
        // slope 8: the tail starts at |δ| = 9
        let p = prob(40, 40, false, None, 0);
        let t = alibi(8.0, 40);
        let bias = Bias {
            values: t.view(),
            index: vec![0],
        };
        let band = band_of(&p, Some((&bias, 0)), false).unwrap();
        assert_eq!(band.tail_from, TAIL_FROM);
        assert!(band.tail_weight <= (-63.0f64).exp());
        // queries 5 positions after the first key, causal: row 3 is 5 from its nearest key
        let p = prob(4, 4, true, None, 5);
        let t = alibi(0.5, 9);
        let bias = Bias {
            values: t.view(),
            index: vec![0],
        };
        let band = band_of(&p, Some((&bias, 0)), false).unwrap();
        assert!(
            (band.min_mass - (-0.5f64 * 5.0).exp()).abs() < 1e-15,
            "{}",
            band.min_mass
        );
    }
}
