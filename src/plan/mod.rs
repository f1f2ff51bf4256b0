//! The planner (docs/DESIGN.md §8): which fast route serves a call, with which certified
//! polynomial, at what predicted cost, and why every other route was refused.
//!
//! A plan is data: [`forward::FastCall`] / [`backward::FastBackwardCall`] hold, per group of heads
//! sharing a `w` table and a bias table, the certified plan of the route taken, plus the
//! [`Refusal`] of every route that was considered and not taken. It is made once per call and
//! executed as it is ([`forward::run_fast`], [`backward_run::run_fast_backward`]): the Python layer
//! keeps the plan it was shown and hands it back to run, so a call never plans twice
//! ([`planner_calls`] counts the plans made, for the tests that prove it).
//!
//! Routes (docs/DESIGN.md §5, §6):
//! * `toeplitz`: the polynomial expanded into rescaled Toeplitz matrices, applied with FFTs;
//!   any `w`, bias and mask.
//! * `lowrank`: Rotary / `w=None` only, any mask and window, no bias or an ALiBi one: rotate
//!   by absolute position, then monomial features and running states (no FFT).
//!
//! [`Route`] lets a caller restrict the choice (the Python `route=` argument); `Auto` takes the
//! cheaper of the routes that certify.
//!
//! [`cost`] is the cost model: what the exact method and each fast route are predicted to take,
//! and whether a call runs exact or fast, with the reasons.

pub mod backward;
pub mod backward_run;
mod band;
pub mod cost;
pub mod forward;

use crate::fast::LowRank;
use crate::position::{Bias, Position};
use crate::problem::Problem;
use std::sync::atomic::{AtomicU64, Ordering};

/// Which fast route a call may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Route {
    /// The cheaper of the routes that certify.
    #[default]
    Auto,
    Toeplitz,
    LowRank,
}

impl Route {
    /// `"auto"`, `"toeplitz"` or `"lowrank"`.
    pub fn parse(s: &str) -> crate::Result<Route> {
        match s {
            "auto" => Ok(Route::Auto),
            "toeplitz" => Ok(Route::Toeplitz),
            "lowrank" => Ok(Route::LowRank),
            other => Err(crate::Error::Value(format!(
                "route: expected 'auto', 'toeplitz' or 'lowrank', got {other:?}"
            ))),
        }
    }

    pub fn allows(self, name: &str) -> bool {
        match self {
            Route::Auto => true,
            Route::Toeplitz => name == "toeplitz",
            Route::LowRank => name == "lowrank",
        }
    }
}

/// A route that was considered and not taken, with the reason.
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    /// `"toeplitz"` or `"lowrank"`.
    pub route: &'static str,
    pub reason: String,
}

/// Adds `reason` for `route` unless the same refusal is already listed (groups of heads often
/// refuse a route for the same reason).
pub(crate) fn refuse(list: &mut Vec<Refusal>, route: &'static str, reason: String) {
    if !list.iter().any(|r| r.route == route && r.reason == reason) {
        list.push(Refusal { route, reason });
    }
}

/// The refusal of a call that neither route serves: each route's own reason, without the
/// prefix its planner gives it when it is the only one. `what`: `"fast"` or `"fast backward"`.
pub(crate) fn no_route(what: &str, eps: f64, lowrank: &str, toeplitz: &str) -> String {
    format!(
        "no {what} route serves eps = {eps:.3e}: the low-rank route: {}; the Toeplitz route: {}",
        route_reason(lowrank),
        route_reason(toeplitz)
    )
}

/// A planner's message without its `fast method ...: ` / `fast backward ...: ` prefix.
fn route_reason(msg: &str) -> &str {
    const PREFIXES: [&str; 7] = [
        "fast method (low-rank): cannot certify eps: ",
        "fast method (low-rank): ",
        "fast method: ",
        "fast backward (low-rank) cannot certify the gradients to eps: ",
        "fast backward (low-rank): ",
        "fast backward cannot certify the gradients to eps: ",
        "fast backward: ",
    ];
    if let Some(rest) = msg.strip_prefix("fast method cannot certify eps = ") {
        if let Some(i) = rest.find(": ") {
            return &rest[i + 2..];
        }
    }
    PREFIXES
        .iter()
        .find_map(|p| msg.strip_prefix(p))
        .unwrap_or(msg)
}

static PLANNER_CALLS: AtomicU64 = AtomicU64::new(0);

/// How many fast plans (forward or backward) this process has made.
pub fn planner_calls() -> u64 {
    PLANNER_CALLS.load(Ordering::Relaxed)
}

pub(crate) fn count_plan() {
    PLANNER_CALLS.fetch_add(1, Ordering::Relaxed);
}

/// The low-rank route's parameters when it applies ([`crate::fast::lowrank`]: Rotary, without a
/// bias or with an ALiBi one (bias table `bias.1`), any window, and `route` allows it), for a
/// Cauchy-Schwarz bound `r2` on the rotated scores; otherwise the reason it does not.
pub(crate) fn lowrank_of<T: crate::arch::Real>(
    prob: &Problem,
    pos: &Position<'_, T>,
    bias: Option<(&Bias<'_, T>, usize)>,
    r2: f64,
    route: Route,
) -> Result<LowRank, String> {
    let Position::Rotary(rot) = pos else {
        return Err("needs Rotary or w=None (w is a general table)".into());
    };
    let c = prob.q_offset - prob.k_offset;
    // a window wider than every visible δ (e.g. `(None, None)`) masks nothing
    let window_masks = prob.window.is_some_and(|(left, right)| {
        (left as i128) < c as i128 + prob.nq as i128 - 1
            || (right as i128) < prob.nk as i128 - 1 - c as i128
    });
    let band = band::band_of(prob, bias, window_masks)?;
    if !route.allows("lowrank") {
        return Err("route='toeplitz' was requested".into());
    }
    let max_pos = (c.unsigned_abs() as f64)
        .max((c + prob.nq as i64 - 1).unsigned_abs() as f64)
        .max(prob.nk as f64);
    let theta = rot.theta.iter().fold(0.0f64, |m, t| m.max(t.abs()));
    Ok(LowRank {
        r2,
        psi_max: max_pos * theta,
        causal_shift: prob.causal.then_some(c),
        band,
    })
}
