//! The cost model (docs/DESIGN.md §10): the exact method's predicted flops, seconds and working
//! set, the fast routes' seconds from their flops, the fast method's default limits, and the
//! choice between the exact and the fast method with its reasons.
//!
//! The exact method's work is counted over visible `(query, key)` pairs only (masked tiles are
//! skipped): `2d` flops per pair for rotary's `Q K^T` GEMM or `4|S|` for a general support, plus
//! `2 d_v` for `P V` and 4 for the exponential and the running sums. Its time is
//! `a + b (d + d_v) + c |S|` nanoseconds per pair and dtype (`c = 0` for rotary: its scores are a
//! GEMM, counted in `b`), divided by the threads' speed-up. The fast routes' flops come from their
//! plans ([`crate::fast::certify`], [`crate::fast::lowrank`]); each route runs them at its own
//! rate. The constants were measured on the reference machine (2-core AMD EPYC, AVX-512) with
//! `python benchmarks/calibrate_planner.py`.

use crate::error::{Error, Result};
use crate::problem::Problem;

/// The fast method's default cap on the expansion's terms.
pub const MAX_TERMS: usize = 1_000_000;
/// The fast method's default cap on the polynomial degree.
pub const MAX_DEGREE: usize = 40;

/// `(a, b, c)`: nanoseconds per visible pair `a + b (d + d_v) + c |S|`, single thread.
type PairRate = (f64, f64, f64);
const ROTARY_F32: PairRate = (2.4, 0.035, 0.0);
const ROTARY_F64: PairRate = (3.3, 0.052, 0.0);
const SUPPORT_F32: PairRate = (2.6, 0.035, 0.15);
const SUPPORT_F64: PairRate = (3.5, 0.052, 0.27);
/// Backward / forward time of the exact method (recompute plus 4 GEMM-shaped products).
const EXACT_BACKWARD_RATIO: f64 = 2.5;
/// Speed-up of the exact kernels on 2 threads over 1 (parallel over (head, query block)).
const THREAD_SPEEDUP: f64 = 1.8;
/// The Toeplitz route's rate in its flop model (2.5 N log2 N per FFT plus the frequency-domain
/// products), forward and backward, 2 threads; the low-rank forward runs at the same rate.
const FAST_FLOPS_PER_SECOND: f64 = 4e9;
/// The low-rank backward's rate (GEMMs with the feature states, reverse sweeps through the
/// monomials): 5-25 GFLOP/s per head on the reference machine, one thread per head.
const LOWRANK_BACKWARD_FLOPS_PER_SECOND: f64 = 1e10;
/// The low-rank backward's fixed cost per call (bounds, the certificate, Python).
const LOWRANK_BACKWARD_CALL_SECONDS: f64 = 1e-3;
/// A table's diagonal sequences are kept whole up to this size; beyond, a few tiles' worth
/// (`TILE_DIAGONALS` per support entry) per worker.
const WHOLE_TABLE_BYTES: usize = 32 << 20;
const TILE_DIAGONALS: usize = 32768;
/// The most the exact backward's scratch holds beyond the gradients.
const BACKWARD_SCRATCH_BYTES: usize = 256 << 20;

/// How the exact method forms a call's scores, and the tables it reads.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExactCall {
    /// `None` for rotary (a GEMM on rotated q and k); else `(|S|, distinct W tables used)`.
    pub support: Option<(usize, usize)>,
    /// Bytes per element of the inputs (4 or 8).
    pub item: usize,
    /// Rows of the bias table (0 without a bias).
    pub bias_tables: usize,
    /// Elements of a stored `W` (0 without one): the backward accumulates `dW` in its output.
    pub values: usize,
}

/// Predicted cost of one method on one call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cost {
    pub flops: f64,
    pub seconds: f64,
    /// Bytes allocated beyond the inputs.
    pub working_bytes: usize,
}

/// The exact method's predicted flops, seconds and working set.
pub fn exact(prob: &Problem, call: &ExactCall, backward: bool) -> Cost {
    let (d, dv) = (prob.d, prob.dv);
    let pairs = prob.visible_pairs() * prob.batch as f64 * prob.hq as f64;
    let (ns, per_pair, rate) = match call.support {
        None => (0, 2 * d + 2 * dv + 4, rotary_rate(call.item)),
        Some((ns, _)) => (ns, 4 * ns + 2 * dv + 4, support_rate(call.item)),
    };
    let ratio = if backward { EXACT_BACKWARD_RATIO } else { 1.0 };
    let flops = pairs * per_pair as f64 * ratio;
    let ns_per_pair = rate.0 + rate.1 * (d + dv) as f64 + rate.2 * ns as f64;
    let seconds = pairs * ratio * ns_per_pair * 1e-9 / THREAD_SPEEDUP;
    Cost {
        flops,
        seconds,
        working_bytes: exact_working_bytes(prob, call, backward),
    }
}

fn rotary_rate(item: usize) -> PairRate {
    if item == 4 {
        ROTARY_F32
    } else {
        ROTARY_F64
    }
}

fn support_rate(item: usize) -> PairRate {
    if item == 4 {
        SUPPORT_F32
    } else {
        SUPPORT_F64
    }
}

/// Outputs and lse, the keys in the kernel's layout, the diagonal tables, and the masks' and
/// biases' sequences; the backward adds the gradients, a query-sized buffer and its scratch.
fn exact_working_bytes(prob: &Problem, call: &ExactCall, backward: bool) -> usize {
    let (b, hq, hk, nq, nk, d, dv) = (
        prob.batch as u128,
        prob.hq as u128,
        prob.hk as u128,
        prob.nq as u128,
        prob.nk as u128,
        prob.d as u128,
        prob.dv as u128,
    );
    let item = call.item as u128;
    let tables = match call.support {
        None => 0,
        Some((ns, w_tables)) => {
            let per_table = ns as u128 * (nq + nk) * item;
            let kept = if per_table <= WHOLE_TABLE_BYTES as u128 {
                per_table
            } else {
                ns as u128 * TILE_DIAGONALS as u128 * item
            };
            w_tables as u128 * kept
        }
    };
    let mut ws = b * hq * nq * (dv + 1) * item
        + b * hk * nk * d * item
        + tables
        + (nq + nk) * 8 * (1 + call.bias_tables as u128);
    if backward {
        let grads = (b * hq * nq * d + b * hk * nk * (d + dv)) * item;
        ws += grads + b * hq * nq * d * item + (4 * grads).min(BACKWARD_SCRATCH_BYTES as u128);
        ws += call.values as u128 * item;
    }
    usize::try_from(ws).unwrap_or(usize::MAX)
}

/// Flops of the exact method ignoring masks (`2 n_q n_k (d + d_v)` per head, times the backward
/// ratio): an upper bound, for deciding how to run a call (how often to poll for signals).
pub fn exact_flops_bound(prob: &Problem, backward: bool) -> f64 {
    // in f64 throughout: `batch * hq` and `d + dv` may overflow usize on unvalidated calls
    let f = 2.0
        * prob.batch as f64
        * prob.hq as f64
        * prob.nq as f64
        * prob.nk as f64
        * (prob.d as f64 + prob.dv as f64);
    if backward {
        EXACT_BACKWARD_RATIO * f
    } else {
        f
    }
}

/// Predicted seconds of a fast plan of `flops` (forward or backward, low-rank or Toeplitz route).
pub fn fast_seconds(flops: f64, backward: bool, lowrank: bool) -> f64 {
    if backward && lowrank {
        flops / LOWRANK_BACKWARD_FLOPS_PER_SECOND + LOWRANK_BACKWARD_CALL_SECONDS
    } else {
        flops / FAST_FLOPS_PER_SECOND
    }
}

/// What the choice knows of a certified fast plan.
#[derive(Clone, Debug, PartialEq)]
pub struct FastOffer<'a> {
    pub backward: bool,
    pub seconds: f64,
    pub working_bytes: usize,
    pub degree: usize,
    pub poly_kind: &'a str,
    pub bound_r: f64,
    pub terms: usize,
    pub lowrank: bool,
    /// What a result guarantees (output rounding included).
    pub certified: f64,
}

/// The method taken, why, and the reason the other one was not.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    /// `"exact"` or `"fast"`.
    pub method: &'static str,
    pub why: String,
    /// `("exact" | "fast", reason)`: the method not taken.
    pub refused: (&'static str, String),
}

/// Exact or fast for a call the fast method certifies: the fast method when `forced`
/// (`method='fast'`) or predicted faster, and when its working set fits `memory_limit`.
/// A forced fast method that does not fit is an [`Error::Approximation`].
pub fn choose(
    fast: &FastOffer<'_>,
    exact_seconds: f64,
    eps: f64,
    memory_limit: usize,
    forced: bool,
) -> Result<Choice> {
    let what = if fast.backward {
        "the fast backward"
    } else {
        "the fast method"
    };
    if fast.working_bytes > memory_limit {
        let msg = format!(
            "{what} needs {}, more than memory_limit = {}",
            format_bytes(fast.working_bytes),
            format_bytes(memory_limit)
        );
        if forced {
            return Err(Error::Approximation(format!("method='fast': {msg}")));
        }
        return Ok(Choice {
            method: "exact",
            why: msg.clone(),
            refused: ("fast", msg),
        });
    }
    let ratio = exact_seconds / fast.seconds.max(1e-12);
    let summary = summary(fast, exact_seconds, eps);
    Ok(if forced {
        let not_exact = "method='fast' was requested".to_string();
        Choice {
            method: "fast",
            why: format!("{not_exact}: {summary}"),
            refused: ("exact", not_exact),
        }
    } else if ratio > 1.0 {
        Choice {
            method: "fast",
            why: format!("fast is predicted {ratio:.1}x cheaper: {summary}"),
            refused: (
                "exact",
                format!("predicted {ratio:.1}x slower than the fast method"),
            ),
        }
    } else {
        let inv = 1.0 / ratio;
        Choice {
            method: "exact",
            why: format!("exact is predicted {inv:.1}x cheaper: {summary}"),
            refused: (
                "fast",
                format!("predicted {inv:.1}x slower than the exact method"),
            ),
        }
    })
}

/// The fast plan in a sentence: its polynomial, route, certificate and predicted seconds.
fn summary(fast: &FastOffer<'_>, exact_seconds: f64, eps: f64) -> String {
    let (degree, kind, terms) = (fast.degree, fast.poly_kind, fast.terms);
    let rope = "(RoPE scores are q'·k' after rotating by absolute position: no Toeplitz products)";
    let via = match (fast.lowrank, fast.backward) {
        (false, _) => String::new(),
        (true, false) => format!(", as {terms} low-rank features {rope}"),
        (true, true) => format!(", differentiated through {terms} low-rank features {rope}"),
    };
    let (r, cert, eps_s) = (g(fast.bound_r, 3), g(fast.certified, 2), g(eps, 2));
    let (fs, es) = (g(fast.seconds, 3), g(exact_seconds, 3));
    let head = format!("degree-{degree} {kind} polynomial on [-R, R]{via}, R = {r}");
    if fast.backward {
        format!(
            "{head}, certifies every gradient to {cert} <= eps = {eps_s}; predicted fast \
             backward {fs} s vs exact {es} s"
        )
    } else {
        format!("{head}, certifies {cert} <= eps = {eps_s}; predicted fast {fs} s vs exact {es} s")
    }
}

/// `bytes` for a message: `"512 bytes"`, `"12.5 KiB"`, `"3.0 MiB"`, `"2.10 GiB"`.
pub fn format_bytes(bytes: usize) -> String {
    const KIB: f64 = 1024.0;
    let b = bytes as f64;
    if bytes < 1024 {
        format!("{bytes} bytes")
    } else if b < KIB * KIB {
        format!("{:.1} KiB", b / KIB)
    } else if b < KIB * KIB * KIB {
        format!("{:.1} MiB", b / (KIB * KIB))
    } else {
        format!("{:.2} GiB", b / (KIB * KIB * KIB))
    }
}

/// The error of an exact call whose working set exceeds `memory_limit` (a `MemoryError` in
/// Python), or `None`.
pub fn exact_memory_refusal(
    prob: &Problem,
    working_bytes: usize,
    memory_limit: usize,
) -> Option<String> {
    (working_bytes > memory_limit).then(|| {
        format!(
            "fastrope: the exact method needs a working set of {}, more than memory_limit = {} \
             (shapes ({}, {}, {}, {}, {}, {}, {}))",
            format_bytes(working_bytes),
            format_bytes(memory_limit),
            prob.batch,
            prob.hq,
            prob.hk,
            prob.nq,
            prob.nk,
            prob.d,
            prob.dv
        )
    })
}

/// `x` to `sig` significant digits in the shortest of fixed and scientific notation, trailing
/// zeros dropped (C's and Python's `%g`).
pub fn g(x: f64, sig: usize) -> String {
    if !x.is_finite() {
        return if x.is_nan() {
            "nan".into()
        } else if x > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        };
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0" } else { "0" }.into();
    }
    let sig = sig.max(1);
    let sci = format!("{:.*e}", sig - 1, x);
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if exp < -4 || exp >= sig as i32 {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", trim_zeros(mantissa), exp.unsigned_abs())
    } else {
        let decimals = (sig as i32 - 1 - exp).max(0) as usize;
        trim_zeros(&format!("{x:.decimals$}")).to_string()
    }
}

fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prob(nq: usize, nk: usize, d: usize, dv: usize) -> Problem {
        Problem {
            batch: 1,
            hq: 2,
            hk: 1,
            nq,
            nk,
            d,
            dv,
            scale: 1.0,
            causal: false,
            window: None,
            q_offset: 0,
            k_offset: 0,
        }
    }

    #[test]
    fn g_formats_like_percent_g() {
        let cases = [
            (0.0, 3, "0"),
            (1.0, 3, "1"),
            (123456.0, 3, "1.23e+05"),
            (0.000123456, 3, "0.000123"),
            (0.0000123456, 3, "1.23e-05"),
            (1.5e-3, 2, "0.0015"),
            (99.96, 3, "100"),
            (999.6, 3, "1e+03"),
            (12.0, 2, "12"),
            (-2.5e10, 3, "-2.5e+10"),
            (1e-6, 2, "1e-06"),
        ];
        for (x, sig, want) in cases {
            assert_eq!(g(x, sig), want, "{x} to {sig} digits");
        }
    }

    #[test]
    fn exact_cost_counts_visible_pairs() {
        let p = prob(8, 8, 4, 4);
        let rot = ExactCall {
            support: None,
            item: 4,
            bias_tables: 0,
            values: 0,
        };
        let full = exact(&p, &rot, false);
        assert_eq!(full.flops, 2.0 * 64.0 * (2 * 4 + 2 * 4 + 4) as f64);
        let causal = exact(
            &Problem {
                causal: true,
                ..p.clone()
            },
            &rot,
            false,
        );
        assert_eq!(causal.flops, full.flops * 36.0 / 64.0);
        let back = exact(&p, &rot, true);
        assert_eq!(back.flops, 2.5 * full.flops);
        assert!(back.working_bytes > full.working_bytes);
        // a general support costs 4|S| flops per pair in place of 2d, and keeps its tables
        let sup = ExactCall {
            support: Some((3, 1)),
            ..rot
        };
        let s = exact(&p, &sup, false);
        assert_eq!(s.flops, 2.0 * 64.0 * (4 * 3 + 2 * 4 + 4) as f64);
        assert_eq!(s.working_bytes, full.working_bytes + 3 * 16 * 4);
    }

    fn offer(seconds: f64, working_bytes: usize) -> FastOffer<'static> {
        FastOffer {
            backward: false,
            seconds,
            working_bytes,
            degree: 7,
            poly_kind: "chebyshev",
            bound_r: 2.0,
            terms: 120,
            lowrank: false,
            certified: 1e-4,
        }
    }

    #[test]
    fn choose_takes_the_faster_method_and_says_why() {
        let c = choose(&offer(1.0, 10), 1.4, 1e-3, 100, false).unwrap();
        assert_eq!(c.method, "fast");
        assert!(c
            .why
            .starts_with("fast is predicted 1.4x cheaper: degree-7 chebyshev"));
        assert_eq!(c.refused.1, "predicted 1.4x slower than the fast method");
        let c = choose(&offer(1.4, 10), 1.0, 1e-3, 100, false).unwrap();
        assert_eq!(c.method, "exact");
        assert_eq!(
            c.refused,
            ("fast", "predicted 1.4x slower than the exact method".into())
        );
        let c = choose(&offer(1.4, 10), 1.0, 1e-3, 100, true).unwrap();
        assert_eq!(c.method, "fast");
        assert_eq!(c.refused, ("exact", "method='fast' was requested".into()));
    }

    #[test]
    fn choose_refuses_a_fast_plan_over_the_memory_limit() {
        let c = choose(&offer(1.0, 3 << 20), 10.0, 1e-3, 2 << 20, false).unwrap();
        assert_eq!(c.method, "exact");
        assert_eq!(
            c.why,
            "the fast method needs 3.0 MiB, more than memory_limit = 2.0 MiB"
        );
        let e = choose(&offer(1.0, 3 << 20), 10.0, 1e-3, 2 << 20, true).unwrap_err();
        assert!(matches!(e, Error::Approximation(m) if m.starts_with("method='fast': the fast")));
    }

    #[test]
    fn bytes_are_written_in_the_unit_that_shows_them() {
        assert_eq!(format_bytes(10), "10 bytes");
        assert_eq!(format_bytes(1023), "1023 bytes");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(3 << 20), "3.0 MiB");
        assert_eq!(format_bytes(2254857830), "2.10 GiB");
    }

    #[test]
    fn fast_seconds_per_route() {
        assert_eq!(fast_seconds(4e9, false, true), 1.0);
        assert_eq!(fast_seconds(4e9, true, false), 1.0);
        assert_eq!(fast_seconds(1e10, true, true), 1.0 + 1e-3);
    }
}
