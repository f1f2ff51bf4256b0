//! The certified polynomial of the fast method (docs/DESIGN.md §5.2).
//!
//! Two ingredients:
//!
//! * a bound `R >= max_ij |M_ij|` on the scores `M_ij = scale q_i^T W_δ(i,j) k_j`, computed in
//!   `O(n d + glen |S|)` without forming any score ([`WNorms`], [`bound_r`]);
//! * the least degree `g` and monomial coefficients `c_t` of `p(x) = Σ_t c_t x^t` such that
//!   `|p(x) - e^x| <= ρ e^x` on `[-R, R]` ([`choose_degree`]), from Taylor's series or from
//!   Chebyshev interpolation, with `ρ` *verified* on a grid plus a rigorous between-points margin
//!   ([`certify`]).

use crate::error::{Error, Result};

mod score;
mod search;

/// Unit roundoff of f64.
pub(crate) const U: f64 = f64::EPSILON / 2.0;

/// Below this magnitude a rounded product or quotient is no longer within a relative `u` of
/// its value: it lies in (or next to) the subnormal range, where rounding is absolute, up to
/// half of [`ETA`]. Every bound that multiplies by `1 + k u` assumes results above it.
pub(crate) const TINY: f64 = f64::MIN_POSITIVE * 1024.0;

/// The smallest subnormal, `2^-1074`: the absolute rounding unit of the subnormal range.
pub(crate) const ETA: f64 = 5e-324;

/// `a b` rounded up for `a, b >= 0`: the plain product when it is well above the subnormal
/// range (callers add their relative slack; bit for bit the product), else the product plus
/// [`ETA`] (its rounding there is absolute, at most `ETA / 2`), so that a chain of such
/// products stays an upper bound even when an intermediate result underflows.
pub(crate) fn mul_up(a: f64, b: f64) -> f64 {
    let p = a * b;
    if a == 0.0 || b == 0.0 || p >= TINY || p.is_nan() {
        p
    } else {
        p + ETA
    }
}

/// `sqrt(Σ x²)` without the underflow (or overflow) of squaring: the plain sum of squares when
/// the largest magnitude `m` is in `[2^-500, 2^500]` (bit for bit as before; squares that
/// underflow there are below `2^-74` of `m²`, within the callers' relative slack), else
/// `m sqrt(Σ (x/m)²)`, with `2u` more for the quotients and rounded up in the subnormal range.
/// Callers multiply by their summation slack `1 + (n + 2) u` as before.
pub(crate) fn norm2<'a>(xs: impl Iterator<Item = &'a f64> + Clone) -> f64 {
    let m = xs.clone().fold(0.0f64, |m, x| m.max(x.abs()));
    if !(m.is_finite() && m > 0.0) {
        return if m == 0.0 {
            0.0
        } else {
            xs.map(|x| x * x).sum::<f64>().sqrt()
        };
    }
    if (2f64.powi(-500)..=2f64.powi(500)).contains(&m) {
        return xs.map(|x| x * x).sum::<f64>().sqrt();
    }
    let s = xs.map(|x| (x / m) * (x / m)).sum::<f64>().sqrt() * (1.0 + 2.0 * U);
    mul_up(m, s)
}

/// Highest degree we ever certify. Beyond it the expansion is astronomically large anyway, and
/// up to it the integer coefficients of the Chebyshev polynomials `T_j` (sum of magnitudes
/// `((1+√2)^j + (1-√2)^j)/2 < 2^53` for `j <= 40`) are exact in f64.
pub const MAX_DEGREE: usize = 40;

/// How the coefficients were obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PolyKind {
    /// `c_t = 1/t!`.
    Taylor,
    /// Chebyshev economization of `e^x` on `[-R, R]` (near-minimax, like interpolation at the
    /// Chebyshev points; see [`chebyshev`]), in monomial form.
    Chebyshev,
}

/// `p(x) = Σ_{t <= degree} coeffs[t] x^t` with `|p(x) - e^x| <= rho e^x` for `|x| <= r`
/// (`rho` verified by [`certify`], not merely predicted).
#[derive(Clone, Debug, PartialEq)]
pub struct Polynomial {
    pub kind: PolyKind,
    pub degree: usize,
    pub coeffs: Vec<f64>,
    pub rho: f64,
    pub r: f64,
}

impl Polynomial {
    /// `p(x)` by Horner's rule.
    pub fn eval(&self, x: f64) -> f64 {
        horner(&self.coeffs, x)
    }

    /// `Σ_t |c_t| x^t` for `x >= 0`: the size of the expanded terms when `Σ_s |a_s| <= x`, which
    /// governs cancellation (and so rounding) in the fast method.
    pub fn abs_eval(&self, x: f64) -> f64 {
        abs_horner(&self.coeffs, x)
    }
}

fn horner(c: &[f64], x: f64) -> f64 {
    c.iter().rev().fold(0.0, |acc, &ct| acc * x + ct)
}

fn abs_horner(c: &[f64], x: f64) -> f64 {
    let x = x.abs();
    c.iter().rev().fold(0.0, |acc, &ct| acc * x + ct.abs())
}

fn check_r(r: f64) -> Result<()> {
    if !(r.is_finite() && r >= 0.0) {
        return Err(Error::Value(format!(
            "score bound R: expected a finite value >= 0, got {r}"
        )));
    }
    Ok(())
}

/// Taylor polynomial `Σ_{t<=degree} x^t / t!` with its verified `rho` on `[-r, r]`.
pub fn taylor(r: f64, degree: usize) -> Result<Polynomial> {
    check_r(r)?;
    if degree > MAX_DEGREE {
        return Err(Error::Value(format!(
            "Taylor degree: expected at most {MAX_DEGREE}, got {degree}"
        )));
    }
    let mut coeffs = Vec::with_capacity(degree + 1);
    let mut c = 1.0;
    for t in 0..=degree {
        if t > 0 {
            c /= t as f64;
        }
        coeffs.push(c);
    }
    let rho = certify(&coeffs, r);
    Ok(Polynomial {
        kind: PolyKind::Taylor,
        degree,
        coeffs,
        rho,
        r,
    })
}

/// The degree-`g` Chebyshev economization of `e^x` on `[-r, r]`, in monomial form, with its
/// verified `rho`: near-minimax, like interpolation at the Chebyshev points, but computed stably.
///
/// Start from Taylor's polynomial of a degree `G` high enough that its remainder is negligible
/// (`r^{G+1} e^r / (G+1)! <= 1e-3 u e^{-r}`), then for `t = G, ..., g+1` remove the top monomial
/// with `c_t r^t 2^{1-t} T_t(x/r)`, whose size on `[-r, r]` is `|c_t| r^t 2^{1-t}`. The result is
/// the truncated Chebyshev series of `e^x` up to a tail `~ 2 I_{g+1}(r) / 2^g`. Interpolating at
/// Chebyshev points and converting `Σ a_j T_j(x/r)` to monomials gives the same polynomial in
/// exact arithmetic, but in f64 it amplifies the `u e^r` noise of the `a_j` by up to
/// `(1+√2)^j`, which at `r = 6` already floors the relative error near `1e-6`; economization only
/// ever subtracts small corrections from the exactly rounded `1/t!`.
pub fn chebyshev(r: f64, degree: usize) -> Result<Polynomial> {
    check_r(r)?;
    if degree > MAX_DEGREE {
        return Err(Error::Value(format!(
            "Chebyshev degree: expected at most {MAX_DEGREE}, got {degree}"
        )));
    }
    let tail = |t: usize| (1..=t).fold(r.exp(), |acc, k| acc * r / k as f64);
    let mut top = degree;
    while top < 4 * MAX_DEGREE && tail(top + 1) > 1e-3 * U * (-r).exp() {
        top += 1;
    }
    let mut c: Vec<f64> = Vec::with_capacity(top + 1);
    for t in 0..=top {
        c.push(if t == 0 { 1.0 } else { c[t - 1] / t as f64 });
    }
    // Monomial coefficients of T_0..T_top by T_{t+1} = 2y T_t - T_{t-1} (exact up to t = 40,
    // correctly rounded in relative terms beyond, which is all the small corrections need).
    let mut cheb: Vec<Vec<f64>> = vec![vec![1.0]];
    for t in 1..=top {
        let mut next = vec![0.0; t + 1];
        for (k, x) in next.iter_mut().enumerate() {
            let up = if k > 0 && k - 1 < t {
                2.0 * cheb[t - 1][k - 1]
            } else {
                0.0
            };
            let down = if t >= 2 && k <= t - 2 {
                cheb[t - 2][k]
            } else {
                0.0
            };
            *x = if t == 1 {
                if k == 1 {
                    1.0
                } else {
                    0.0
                }
            } else {
                up - down
            };
        }
        cheb.push(next);
    }
    if r > 0.0 {
        for t in (degree + 1..=top).rev() {
            // c_t x^t = c_t r^t 2^{1-t} (T_t(x/r) - (lower terms of 2^{1-t} T_t(y)) ...).
            let lead = c[t] * r.powi(t as i32) * 0.5f64.powi(t as i32 - 1);
            for k in (t % 2..t).step_by(2) {
                c[k] -= lead * cheb[t][k] / r.powi(k as i32);
            }
            c[t] = 0.0;
        }
    }
    c.truncate(degree + 1);
    let rho = certify(&c, r);
    Ok(Polynomial {
        kind: PolyKind::Chebyshev,
        degree,
        coeffs: c,
        rho,
        r,
    })
}

/// `(a*b, error)` with `a*b = p + e` exactly (Dekker's product; no FMA needed, no overflow for
/// the magnitudes we meet).
fn two_prod(a: f64, b: f64) -> (f64, f64) {
    const SPLIT: f64 = 134_217_729.0; // 2^27 + 1
    let split = |x: f64| {
        let c = SPLIT * x;
        let hi = c - (c - x);
        (hi, x - hi)
    };
    let p = a * b;
    let ((ah, al), (bh, bl)) = (split(a), split(b));
    (p, ((ah * bh - p) + ah * bl + al * bh) + al * bl)
}

/// `(a+b, error)` with `a+b = s + e` exactly (Knuth's TwoSum).
fn two_sum(a: f64, b: f64) -> (f64, f64) {
    let s = a + b;
    let bb = s - a;
    (s, (a - (s - bb)) + (b - bb))
}

/// Compensated Horner (Graillat, Langlois & Louvet 2005): as accurate as Horner in twice the
/// working precision, `|result - p(x)| <= u |p(x)| + γ_{2g}^2 Σ|c_t||x|^t`. Plain Horner would
/// floor the certifiable `ρ` at about `γ_{2g} e^{2R}` (the cancellation of `Σ c_t x^t` near
/// `x = -R`), i.e. ~1e-7 at `R = 8`.
fn comp_horner(c: &[f64], x: f64) -> f64 {
    let Some((&last, rest)) = c.split_last() else {
        return 0.0;
    };
    let (mut s, mut err) = (last, 0.0);
    for &ct in rest.iter().rev() {
        let (p, pe) = two_prod(s, x);
        let (t, se) = two_sum(p, ct);
        s = t;
        err = err * x + (pe + se);
    }
    s + err
}

/// [`certify`]'s memo: the exact coefficients' and radius' bits.
type CertifyKey = (Vec<u64>, u64);
static CERTIFY_MEMO: std::sync::OnceLock<
    std::sync::Mutex<std::collections::HashMap<CertifyKey, f64>>,
> = std::sync::OnceLock::new();

/// [`certify`]'s memo lock, held across a `fork` ([`crate::fork`]).
#[cfg(feature = "python")]
pub(crate) fn fork_guard() -> Box<dyn std::any::Any> {
    let memo = CERTIFY_MEMO.get_or_init(Default::default);
    Box::new(memo.lock().unwrap_or_else(|e| e.into_inner()))
}

/// A rigorous upper bound on `max_{|x| <= r} |p(x) - e^x| / e^x` for the stored coefficients.
///
/// With `e(x) = p(x) e^{-x} - 1` we have `e'(x) = (p'(x) - p(x)) e^{-x}`, so on a grid of spacing
/// `h` every `x` lies within `h/2` of a grid point `x_k` and
/// `|e(x)| <= |e(x_k)| + (h/2) e^r max_{|x|<=r} |p'(x) - p(x)|`, where
/// `|p' - p| <= Σ_t |(t+1) c_{t+1} - c_t| r^t` (tiny: `p' - p = -x^g/g!` for Taylor). The grid is
/// refined until that margin is at most 1% of the grid maximum (or 2^20 intervals). At each grid
/// point `p` is evaluated by compensated Horner and the computed error is inflated by that
/// evaluation's bound, one ulp of `exp` and the rounding of the comparison itself, so the result
/// bounds the exact-arithmetic error of exactly these f64 coefficients.
pub fn certify(coeffs: &[f64], r: f64) -> f64 {
    if coeffs.is_empty() || !r.is_finite() || r < 0.0 {
        return f64::INFINITY;
    }
    // Memoised on the exact coefficients and radius: planning tries the same few polynomials
    // on every call (a plan, then the run; every step of a training loop), and the grid below
    // costs up to milliseconds each.
    let memo = CERTIFY_MEMO.get_or_init(Default::default);
    let key: CertifyKey = (coeffs.iter().map(|c| c.to_bits()).collect(), r.to_bits());
    if let Some(&rho) = memo.lock().ok().and_then(|m| m.get(&key).copied()).as_ref() {
        return rho;
    }
    let rho = certify_uncached(coeffs, r);
    if let Ok(mut m) = memo.lock() {
        if m.len() >= 4096 {
            m.clear();
        }
        m.insert(key, rho);
    }
    rho
}

fn certify_uncached(coeffs: &[f64], r: f64) -> f64 {
    let g = coeffs.len() - 1;
    let gamma = |k: usize| {
        let ku = k as f64 * U;
        ku / (1.0 - ku)
    };
    let g2 = gamma(2 * g + 2).powi(2);
    let point = |x: f64| -> f64 {
        let p = comp_horner(coeffs, x);
        let e = x.exp();
        let rel = (p - e).abs() / e;
        let eval_err =
            (2.0 * U * p.abs() + g2 * abs_horner(coeffs, x) * (1.0 + 4.0 * g as f64 * U)) / e;
        (1.0 + 8.0 * U) * (rel + eval_err) + 4.0 * U
    };
    if r == 0.0 {
        return point(0.0);
    }
    // max |p' - p| on [-r, r] via the Chebyshev coefficients of p' - p in y = x/r (|T_k| <= 1):
    // y^t = 2^{1-t} Σ_{j < t/2} C(t, j) T_{t-2j} (+ 2^{-t} C(t, t/2) T_0 for even t). Summing
    // monomial magnitudes instead would ignore the cancellation that makes p' - p small, and
    // for Chebyshev coefficients overshoot by orders of magnitude. The f64 conversion errs by
    // at most (g+2) u Σ_t |d_t| r^t, which we add.
    let mut cheb = vec![0.0f64; g + 1];
    let mut crude = 0.0;
    for t in 0..=g {
        let next = if t < g {
            (t + 1) as f64 * coeffs[t + 1]
        } else {
            0.0
        };
        let d = next - coeffs[t];
        let dt = d * r.powi(t as i32);
        crude += (d.abs() + 3.0 * U * (next.abs() + coeffs[t].abs())) * r.powi(t as i32);
        let mut binom = 1.0; // C(t, j)
        for j in 0..=t / 2 {
            let k = t - 2 * j;
            let w = if k == 0 { 0.5 } else { 1.0 };
            cheb[k] += dt * w * binom * 0.5f64.powi(t as i32 - 1);
            binom = binom * (t - j) as f64 / (j + 1) as f64;
        }
    }
    let dsum = cheb.iter().map(|b| b.abs()).sum::<f64>() + (g + 4) as f64 * 4.0 * U * crude;
    let slope = r.exp() * dsum * (1.0 + 64.0 * U);
    let mut m = 1024usize;
    loop {
        let mut grid_max: f64 = 0.0;
        let mut max_gap: f64 = 0.0;
        let mut prev = -r;
        for k in 0..=m {
            // Endpoints exactly ±r; the margin uses the largest gap actually realised.
            let x = if k == m {
                r
            } else {
                -r + (2.0 * r) * (k as f64 / m as f64)
            };
            max_gap = max_gap.max(x - prev);
            prev = x;
            let e = point(x);
            if e.is_nan() {
                return f64::INFINITY;
            }
            grid_max = grid_max.max(e);
        }
        let margin = 0.5 * max_gap * slope;
        if margin <= 0.01 * grid_max || m >= 1 << 20 || !grid_max.is_finite() {
            return grid_max + margin;
        }
        m *= 4;
    }
}

/// `p = 1 + ∫_0^x q` with `q` the degree-`g-1` Chebyshev economization of `e^x` on `[-r, r]`:
/// `p' = q` is then near-minimax, and `|p - e^x| = |∫_0^x (q - e^t) dt| <= ρ' |e^x - 1|`, so `p`
/// stays close too. The gradient certificate is dominated by `ρ'` (through `dS`), which this
/// family makes 3-4x smaller than the economization of `p` itself at equal degree.
pub fn integrated_chebyshev(r: f64, degree: usize) -> Result<Polynomial> {
    if degree == 0 {
        return taylor(r, 0);
    }
    let q = chebyshev(r, degree - 1)?;
    let mut coeffs = Vec::with_capacity(degree + 1);
    coeffs.push(1.0);
    coeffs.extend(q.coeffs.iter().enumerate().map(|(t, c)| c / (t + 1) as f64));
    let rho = certify(&coeffs, r);
    Ok(Polynomial {
        kind: PolyKind::Chebyshev,
        degree,
        coeffs,
        rho,
        r,
    })
}

/// The least-degree certified polynomial with relative error at most `rho` on `[-r, r]`, up to
/// [`MAX_DEGREE`]. Both kinds are tried at each degree; at equal degree Taylor wins (it is more
/// accurate where real scores concentrate, near 0).
pub fn choose_degree(r: f64, rho: f64) -> Result<Polynomial> {
    choose_degree_up_to(r, rho, MAX_DEGREE)
}

/// [`choose_degree`] with an explicit degree cap (at most [`MAX_DEGREE`]).
pub fn choose_degree_up_to(r: f64, rho: f64, max_degree: usize) -> Result<Polynomial> {
    check_r(r)?;
    if !(rho.is_finite() && rho > 0.0) {
        return Err(Error::Value(format!(
            "relative error rho: expected a finite value > 0, got {rho}"
        )));
    }
    let max_degree = max_degree.min(MAX_DEGREE);
    let mut best = (f64::INFINITY, f64::INFINITY);
    let found = search_degree(
        max_degree,
        &[(Family::Taylor, r), (Family::Chebyshev, r)],
        Pick::First,
        |_| None,
        |_, poly, _| {
            if poly.rho <= rho {
                return Ok(Verdict::Accept(poly));
            }
            match poly.kind {
                PolyKind::Taylor => best.0 = poly.rho,
                PolyKind::Chebyshev => best.1 = poly.rho,
            }
            Ok(Verdict::Reject {
                why: String::new(),
                hopeless: false,
            })
        },
    )?;
    found.map_err(|_| {
        Error::Approximation(format!(
            "polynomial degree: no polynomial of degree <= {max_degree} reaches relative error {rho:.3e} \
             on [-{r}, {r}] (at degree {max_degree}: Taylor {:.3e}, Chebyshev {:.3e}); \
             a smaller score bound R or a larger eps is needed",
            best.0, best.1
        ))
    })
}

// The score bound R lives with the other data-dependent bounds; re-exported here because it is
// the interval the polynomial certifies.
pub use score::{bound_r, ScoreBound, WNorms};
pub use search::{search_degree, Family, Pick, Verdict};

#[cfg(test)]
mod tests {
    use super::*;

    fn max_rel_err(p: &Polynomial, points: usize) -> f64 {
        (0..=points)
            .map(|k| -p.r + 2.0 * p.r * k as f64 / points as f64)
            .map(|x| (comp_horner(&p.coeffs, x) - x.exp()).abs() / x.exp())
            .fold(0.0, f64::max)
    }

    #[test]
    fn taylor_and_chebyshev_reproduce_exp() {
        for &r in &[0.3, 1.0, 4.0] {
            let t = taylor(r, 34).unwrap();
            let c = chebyshev(r, 34).unwrap();
            assert!(t.rho < 1e-12 && c.rho < 1e-12, "r={r}: {} {}", t.rho, c.rho);
        }
        // Degree-1 economization on [-1, 1] is the truncated Chebyshev series a_0 + a_1 x,
        // a_0 = I_0(1), a_1 = 2 I_1(1).
        let c = chebyshev(1.0, 1).unwrap();
        assert!((c.coeffs[0] - 1.266_065_877_752_008).abs() < 1e-14);
        assert!((c.coeffs[1] - 1.130_318_207_984_97).abs() < 1e-14);
    }

    #[test]
    fn certified_rho_holds_on_a_finer_grid() {
        for &r in &[0.01, 0.5, 1.0, 3.0, 8.0] {
            for &rho in &[1e-2, 1e-4, 1e-6, 1e-9] {
                let p = choose_degree(r, rho).unwrap();
                assert!(p.rho <= rho);
                let fine = max_rel_err(&p, 3_000_017);
                assert!(
                    fine <= p.rho,
                    "r={r} rho={rho}: fine {fine} > certified {}",
                    p.rho
                );
                // Least degree: one less does not certify for either kind.
                if p.degree > 0 {
                    assert!(taylor(r, p.degree - 1).unwrap().rho > rho);
                    assert!(chebyshev(r, p.degree - 1).unwrap().rho > rho);
                }
            }
        }
    }

    #[test]
    fn chebyshev_wins_on_wide_intervals_taylor_on_ties() {
        let p = choose_degree(6.0, 1e-6).unwrap();
        assert_eq!(p.kind, PolyKind::Chebyshev);
        assert!(taylor(6.0, p.degree).unwrap().rho > 1e-6);
        let p0 = choose_degree(0.0, 1e-3).unwrap();
        assert_eq!((p0.kind, p0.degree), (PolyKind::Taylor, 0));
    }

    #[test]
    fn choose_degree_refuses_the_impossible() {
        assert!(matches!(
            choose_degree(60.0, 1e-12),
            Err(Error::Approximation(_))
        ));
        assert!(matches!(
            choose_degree(f64::NAN, 1e-3),
            Err(Error::Value(_))
        ));
        assert!(matches!(choose_degree(1.0, 0.0), Err(Error::Value(_))));
    }
}
