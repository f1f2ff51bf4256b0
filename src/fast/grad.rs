//! The vocabulary of the fast backward both routes share: one number per gradient ([`Grad5`],
//! budgets [`GradEps`], which gradients are wanted [`Want`]), a head's gradients and their
//! certificate ([`HeadGrads`], [`GradCertificate`]). The backward plan is in
//! [`crate::fast::plans`].

use ndarray::{Array1, Array2};

/// One number per gradient.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Grad5 {
    pub dq: f64,
    pub dk: f64,
    pub dv: f64,
    pub dw: f64,
    pub db: f64,
}

/// Per-head error budgets of the gradients (`eps` divided by how many heads add into each).
pub type GradEps = Grad5;

/// What the fast backward's `eps` bounds.
///
/// * `Relative` (the default): every gradient's max-norm error is at most `eps` times its
///   certified magnitude, `max |G̃ - G| <= eps · S_G` with `S_G >= max |G|` computed from the
///   call's data ([`crate::fast::grad_bounds::magnitudes`]). It does not change when `dout` is
///   rescaled (a loss scale, a mean over a batch) and does not grow with `d_v`.
/// * `Absolute`: every gradient entry within `eps` of the true gradient, `max |G̃ - G| <= eps`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum GradContract {
    #[default]
    Relative,
    Absolute,
}

impl GradContract {
    /// `"relative"` or `"absolute"`.
    pub fn parse(s: &str) -> Option<GradContract> {
        match s {
            "relative" => Some(GradContract::Relative),
            "absolute" => Some(GradContract::Absolute),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            GradContract::Relative => "relative",
            GradContract::Absolute => "absolute",
        }
    }
    /// The per-head budgets of one group of heads: `eps / m` (absolute), or `eps` times the
    /// group's magnitudes `scale` (relative: the call's scale of a gradient that `m` heads add
    /// into is `m` times the largest group's, and so is its error bound). A zero magnitude (the
    /// gradient is exactly zero, e.g. `dout = 0`) leaves the least positive budget: only a
    /// certificate of exactly zero meets it; a magnitude that is not finite leaves none (the
    /// call is refused rather than certified against an infinite budget).
    pub fn budgets(self, eps: f64, multiplicity: Grad5, scale: Grad5) -> GradEps {
        match self {
            GradContract::Absolute => Grad5::splat(eps).zip(multiplicity, |e, m| e / m),
            GradContract::Relative => scale.zip(scale, |s, _| {
                if !(eps > 0.0 && s.is_finite()) {
                    0.0
                } else if s > 0.0 {
                    eps * s
                } else {
                    f64::MIN_POSITIVE
                }
            }),
        }
    }
}

/// Which of the optional gradients are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Want {
    pub dw: bool,
    pub db: bool,
}

pub const GRAD_NAMES: [&str; 5] = ["dq", "dk", "dv", "dw", "dbias"];

impl Grad5 {
    pub fn splat(x: f64) -> Self {
        Grad5 {
            dq: x,
            dk: x,
            dv: x,
            dw: x,
            db: x,
        }
    }
    pub fn to_array(self) -> [f64; 5] {
        [self.dq, self.dk, self.dv, self.dw, self.db]
    }
    pub fn from_array(a: [f64; 5]) -> Self {
        Grad5 {
            dq: a[0],
            dk: a[1],
            dv: a[2],
            dw: a[3],
            db: a[4],
        }
    }
    pub fn zip(self, o: Grad5, f: impl Fn(f64, f64) -> f64) -> Grad5 {
        let (a, b) = (self.to_array(), o.to_array());
        Grad5::from_array([
            f(a[0], b[0]),
            f(a[1], b[1]),
            f(a[2], b[2]),
            f(a[3], b[3]),
            f(a[4], b[4]),
        ])
    }
    pub fn plus(self, o: Grad5) -> Grad5 {
        self.zip(o, |a, b| a + b)
    }
    pub fn max(self, o: Grad5) -> Grad5 {
        self.zip(o, f64::max)
    }
    /// Zero for the gradients that are not computed.
    pub fn masked(self, want: Want) -> Grad5 {
        Grad5 {
            dw: if want.dw { self.dw } else { 0.0 },
            db: if want.db { self.db } else { 0.0 },
            ..self
        }
    }
    /// The first computed gradient with `self > budget * frac` (NaN counts as over), if any.
    pub fn over(&self, budget: &Grad5, frac: f64, want: Want) -> Option<usize> {
        let (a, b) = (self.masked(want).to_array(), budget.to_array());
        let on = [true, true, true, want.dw, want.db];
        // NaN counts as over.
        (0..5).find(|&i| on[i] && (a[i].is_nan() || a[i] > b[i] * frac))
    }
    pub fn max_entry(&self) -> f64 {
        self.to_array().into_iter().fold(0.0, f64::max)
    }
}

/// The certificate of one head's gradients.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct GradCertificate {
    pub approximation: Grad5,
    pub rounding: Grad5,
    pub output: Grad5,
    pub certified: Grad5,
}

/// One head's gradients (`dq`: `nq x d`, `dk`: `nk x d`, `dv`: `nk x dv`) and the approximate
/// forward they are the gradient of (`out`, `lse`).
#[derive(Clone, Debug)]
pub struct HeadGrads {
    pub dq: Array2<f64>,
    pub dk: Array2<f64>,
    pub dv: Array2<f64>,
    pub out: Array2<f64>,
    pub lse: Array1<f64>,
    pub cert: GradCertificate,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_of_each_contract() {
        let m = Grad5 {
            dq: 1.0,
            dk: 4.0,
            dv: 4.0,
            dw: 2.0,
            db: 1.0,
        };
        let s = Grad5 {
            dq: 8.0,
            dk: 0.0,
            dv: f64::INFINITY,
            dw: f64::NAN,
            db: 0.5,
        };
        let abs = GradContract::Absolute.budgets(1e-3, m, s);
        assert_eq!(abs.to_array(), [1e-3, 2.5e-4, 2.5e-4, 5e-4, 1e-3]);
        let rel = GradContract::Relative.budgets(1e-3, m, s);
        // eps times the magnitude; a zero magnitude leaves only an exactly zero certificate;
        // a magnitude that is not finite leaves no budget at all
        assert_eq!(rel.to_array(), [8e-3, f64::MIN_POSITIVE, 0.0, 0.0, 5e-4]);
        assert_eq!(
            GradContract::Relative.budgets(0.0, m, s).to_array(),
            [0.0; 5],
            "eps = 0 asks for exact gradients under either contract"
        );
        for c in [GradContract::Relative, GradContract::Absolute] {
            assert_eq!(GradContract::parse(c.name()), Some(c));
        }
        assert_eq!(GradContract::parse("rel"), None);
        assert_eq!(GradContract::default(), GradContract::Relative);
    }
}
