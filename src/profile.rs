//! Opt-in phase timers for the benchmark breakdowns (`benchmarks/bench_lowrank_phases.py`).
//!
//! Off by default: a [`span`] then costs one relaxed atomic load and times nothing. When on
//! ([`set`]), each span adds its elapsed nanoseconds to its phase's total on drop; spans on
//! several threads add up, so a total is thread-time (equal to wall time on one thread).
//! [`take`] returns the totals and resets them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// The phases of a fast call that the breakdown reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Bounds, certificate and route choice (`plan_fast`).
    Plan,
    /// The per-head bound check and conversion to float64 before a run.
    Check,
    /// Rotation by absolute positions.
    Rotate,
    /// Feature maps `Φ(x)`, `Φ(y)`.
    Features,
    /// GEMMs with feature matrices: running states and `Φq S`.
    Gemm,
    /// The partially visible tiles: `x yᵀ`, `p(M)` and its product with `[V, 1]`.
    Diagonal,
    /// Normalisation and the write of `out` and `lse`.
    Output,
    /// The backward's reverse sweeps through the feature maps (`J_Φᵀ` times a coefficient).
    Backprop,
}

const PHASES: [(Phase, &str); 8] = [
    (Phase::Plan, "plan"),
    (Phase::Check, "check"),
    (Phase::Rotate, "rotate"),
    (Phase::Features, "features"),
    (Phase::Gemm, "gemm"),
    (Phase::Diagonal, "diagonal"),
    (Phase::Output, "output"),
    (Phase::Backprop, "backprop"),
];

static ON: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];

/// Turns the timers on or off (totals are kept until [`take`]).
pub fn set(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// The totals in seconds per phase, in the order of [`Phase`]; resets them.
pub fn take() -> Vec<(&'static str, f64)> {
    PHASES
        .iter()
        .map(|&(p, name)| {
            (
                name,
                NANOS[p as usize].swap(0, Ordering::Relaxed) as f64 * 1e-9,
            )
        })
        .collect()
}

/// A running timer of `phase`; adds its time when dropped.
pub struct Span {
    phase: Phase,
    start: Option<Instant>,
}

/// Starts timing `phase` (nothing when the timers are off).
#[inline]
pub fn span(phase: Phase) -> Span {
    let start = ON.load(Ordering::Relaxed).then(Instant::now);
    Span { phase, start }
}

/// `f()` timed as `phase`.
#[inline]
pub fn time<R>(phase: Phase, f: impl FnOnce() -> R) -> R {
    let _s = span(phase);
    f()
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some(t) = self.start {
            let ns = t.elapsed().as_nanos().min(u64::MAX as u128) as u64;
            NANOS[self.phase as usize].fetch_add(ns, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_add_up_only_when_on() {
        // One test touches the global totals, so no other test races it.
        set(false);
        let _ = take();
        time(Phase::Gemm, || {
            std::thread::sleep(std::time::Duration::from_millis(2))
        });
        assert!(take().iter().all(|&(_, t)| t == 0.0));
        set(true);
        time(Phase::Gemm, || {
            std::thread::sleep(std::time::Duration::from_millis(2))
        });
        set(false);
        let t = take();
        let gemm = t.iter().find(|(n, _)| *n == "gemm").unwrap().1;
        assert!(gemm >= 0.002, "{t:?}");
        assert!(t
            .iter()
            .filter(|(n, _)| *n != "gemm")
            .all(|&(_, x)| x == 0.0));
        assert!(take().iter().all(|&(_, t)| t == 0.0));
    }
}
