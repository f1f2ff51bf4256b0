//! The fast method's planner and run, forward and backward (f64), on arbitrary small calls: no
//! panic; an `Err`, or finite results within the certificate of the naive reference: forward
//! `max |out - O| <= min(certified_error, eps)` (a deferred plan guarantees `eps`), `lse` within
//! `certified_lse_error`, each gradient within its certified error; plus the reference's own
//! rounding (`64 u` of what each entry sums). Non-finite inputs (NaN, ±inf in q, k, v, dout,
//! the tables or the scale) are only required not to panic, as in the `exact` target: the Rust
//! API leaves the finiteness scan to its caller (the Python layer's `check_finite`), and the
//! planners' maxima do not see a NaN.
#![no_main]

use fastrope::fast::{FastLimits, GradContract, Want};
use fastrope::plan::backward::{plan_fast_backward, want_for};
use fastrope::plan::backward_run::run_fast_backward;
use fastrope::plan::forward::{plan_fast, run_fast};
use fastrope::plan::Route;
use fastrope::Control;
use fastrope_fuzz::{all_finite, first_mismatch, reference, Case};
use libfuzzer_sys::fuzz_target;

const U: f64 = f64::EPSILON / 2.0;

fuzz_target!(|data: &[u8]| {
    let mut u = arbitrary::Unstructured::new(data);
    let Ok(route) = u.choose(&[Route::Auto, Route::Toeplitz, Route::LowRank]).copied() else { return };
    let Ok(case) = Case::draw(&mut u, true) else { return };
    let (prob, pos, bias) = (&case.prob, case.position(), case.bias());
    let limits = FastLimits { max_degree: 24, max_terms: 20_000, max_working_bytes: 1 << 26 };
    let ctl = Control::new();
    let (q, k, v) = (case.q.view(), case.k.view(), case.v.view());
    let mut bad = Vec::new();
    let mut r = None;
    let finite = case.finite();
    // The reference's rounding, and an absolute floor for results in the subnormal range (where
    // rounding is absolute, 2^-1074 per operation, and no relative bound covers it).
    let slack = |r: &fastrope_fuzz::Reference| {
        64.0 * U * prob.d as f64 * f64::max(1.0, r.score_abs) * r.v_max + 1e-300
    };
    if let Ok(call) = plan_fast(prob, &pos, bias.as_ref(), q, k, v, case.eps, &limits, 1, route) {
        if let Ok((out, lse)) = run_fast(&call, prob, &pos, bias.as_ref(), q, k, v, &limits, &ctl)
            .map_err(|_| ())
            .and_then(|r| if finite { Ok(r) } else { Err(()) })
        {
            let rf = r.get_or_insert_with(|| reference(&case));
            let bound = call.certified_error.min(case.eps) + slack(rf);
            if !all_finite(&out) {
                bad.push("out: not finite".to_string());
            }
            bad.extend(first_mismatch("out", &out, &rf.out, |_| bound));
            bad.extend(first_mismatch("lse", &lse, &rf.lse, |_| call.certified_lse_error + 64.0 * U * f64::max(1.0, rf.score_abs)));
        }
    }
    let want: Want = want_for(&pos, bias.as_ref(), true, true);
    let dout = Some(case.dout.view());
    if let Ok(call) = plan_fast_backward(
        prob, &pos, bias.as_ref(), q, k, v, dout, None, None, case.eps, GradContract::Relative, want,
        &limits, 1, None, route,
    ) {
        if let Ok((g, _, _, cert)) =
            run_fast_backward(&call, prob, &pos, bias.as_ref(), q, k, v, case.dout.view(), None, &limits, &ctl)
                .map_err(|_| ())
                .and_then(|r| if finite { Ok(r) } else { Err(()) })
        {
            let rf = r.get_or_insert_with(|| reference(&case));
            let tol = |c: f64, abs: &[f64]| {
                let a = abs.to_vec();
                move |n: usize| c + 64.0 * U * (prob.d + prob.nk) as f64 * a[n] + 1e-300
            };
            for (name, x) in [("dq", &g.dq), ("dk", &g.dk), ("dv", &g.dv)] {
                if !all_finite(x) {
                    bad.push(format!("{name}: not finite"));
                }
            }
            bad.extend(first_mismatch("dq", &g.dq, &rf.dq, tol(cert.dq, rf.dq_abs.as_slice().unwrap())));
            bad.extend(first_mismatch("dk", &g.dk, &rf.dk, tol(cert.dk, rf.dk_abs.as_slice().unwrap())));
            bad.extend(first_mismatch("dv", &g.dv, &rf.dv, tol(cert.dv, rf.dv_abs.as_slice().unwrap())));
            if let (Some(got), Some(want), Some(abs)) = (&g.dw, &rf.dw, &rf.dw_abs) {
                bad.extend(first_mismatch("dw", got, want, tol(cert.dw, abs.as_slice().unwrap())));
            }
            if let (Some(got), Some(want), Some(abs)) = (&g.dbias, &rf.db, &rf.db_abs) {
                bad.extend(first_mismatch("dbias", got, want, tol(cert.db, abs.as_slice().unwrap())));
            }
        }
    }
    assert!(bad.is_empty(), "{:?} (route {route:?})\n{case:?}", bad);
});
