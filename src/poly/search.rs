//! The least-degree search every planner runs (docs/DESIGN.md §5.2): for `g = 0, 1, ...` up to a
//! cap, try a fixed list of polynomial families on given radii, let the caller judge each
//! candidate (certificate, cost, memory), and stop at the first degree with an accepted one.
//!
//! What differs between the planners is only the judgement: [`choose_degree`](super::choose_degree)
//! accepts `ρ <= target`; the fast forward and backward (both routes) build a plan and certify it.
//! The search itself — the order of the candidates, when a degree is too large to try, when
//! higher degrees are hopeless, which of several accepted candidates wins, and the reason given
//! when none is — is written once, here.

use super::{chebyshev, integrated_chebyshev, taylor, Polynomial, MAX_DEGREE};
use crate::error::Result;

/// A family of polynomials of a given degree on `[-R, R]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Taylor's series at 0 ([`taylor`]).
    Taylor,
    /// Chebyshev interpolation ([`chebyshev`]).
    Chebyshev,
    /// `1 + ∫_0^x q`, `q` the Chebyshev economization of degree `g - 1`
    /// ([`integrated_chebyshev`]).
    IntegratedChebyshev,
    /// Whichever of Taylor and Chebyshev has the smaller verified `ρ` (Taylor on ties): one
    /// candidate, both built.
    TaylorOrChebyshev,
}

impl Family {
    /// The family's polynomial of `degree` on `[-r, r]` (and the name of the one chosen).
    pub fn build(self, r: f64, degree: usize) -> Result<(Polynomial, &'static str)> {
        Ok(match self {
            Family::Taylor => (taylor(r, degree)?, "taylor"),
            Family::Chebyshev => (chebyshev(r, degree)?, "chebyshev"),
            Family::IntegratedChebyshev => {
                (integrated_chebyshev(r, degree)?, "integrated-chebyshev")
            }
            Family::TaylorOrChebyshev => {
                let t = taylor(r, degree)?;
                let c = chebyshev(r, degree)?;
                if c.rho < t.rho {
                    (c, "chebyshev")
                } else {
                    (t, "taylor")
                }
            }
        })
    }
}

/// The caller's judgement of one candidate.
pub enum Verdict<P> {
    /// Certified: `P` is the result (the plan, or the polynomial itself).
    Accept(P),
    /// Not certified. `why` becomes the search's reason if nothing later is accepted;
    /// `hopeless` says a higher degree cannot help this candidate (a rounding floor, say): when
    /// every candidate tried at a degree is hopeless the search stops.
    Reject { why: String, hopeless: bool },
    /// Not a candidate at all (e.g. `ρ >= 1`): neither tried nor a reason.
    Skip,
}

/// Which accepted candidate of a degree wins.
pub enum Pick<'a, P> {
    /// The first one (the search returns at once).
    First,
    /// The one with the smallest key (the first of equal keys), after every candidate of the
    /// degree was judged.
    Smallest(&'a dyn Fn(&P) -> f64),
}

/// The degree search. For each degree `g <= min(max_degree, MAX_DEGREE)`:
///
/// * `admit(g)`: `Some(why)` if degree `g` is too large to try (terms or features over a
///   limit); the search stops there with that reason, since sizes only grow with `g`;
/// * each `(family, radius)` of `tries`, in order: its polynomial of degree `g`, judged by
///   `judge(g, polynomial, name)`;
/// * the accepted candidates (by `pick`) end the search; if every candidate tried was
///   hopeless, so is the search.
///
/// `Ok(Ok(result))` when a candidate is accepted, `Ok(Err(why))` with the last reason given when
/// none is ("no degree tried" if none was given), `Err` for errors of `judge` or of building a
/// polynomial (which end the search at once).
pub fn search_degree<P>(
    max_degree: usize,
    tries: &[(Family, f64)],
    pick: Pick<'_, P>,
    mut admit: impl FnMut(usize) -> Option<String>,
    mut judge: impl FnMut(usize, Polynomial, &'static str) -> Result<Verdict<P>>,
) -> Result<std::result::Result<P, String>> {
    let mut why = String::from("no degree tried");
    for degree in 0..=max_degree.min(MAX_DEGREE) {
        if let Some(w) = admit(degree) {
            return Ok(Err(w));
        }
        let (mut tried, mut hopeless_count) = (0usize, 0usize);
        let mut best: Option<(P, f64)> = None;
        for &(family, r) in tries {
            let (poly, name) = family.build(r, degree)?;
            match judge(degree, poly, name)? {
                Verdict::Accept(p) => match pick {
                    Pick::First => return Ok(Ok(p)),
                    Pick::Smallest(key) => {
                        tried += 1;
                        let k = key(&p);
                        if best.as_ref().is_none_or(|(_, bk)| k < *bk) {
                            best = Some((p, k));
                        }
                    }
                },
                Verdict::Reject { why: w, hopeless } => {
                    tried += 1;
                    hopeless_count += usize::from(hopeless);
                    why = w;
                }
                Verdict::Skip => {}
            }
        }
        if let Some((p, _)) = best {
            return Ok(Ok(p));
        }
        if tried > 0 && hopeless_count == tried {
            break;
        }
    }
    Ok(Err(why))
}
