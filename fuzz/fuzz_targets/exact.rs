//! The exact forward and backward (f64) on arbitrary small calls: no panic; an `Err`, or results
//! within `1e-9` (relative to `max |v|`, to each gradient entry's `Σ |term|`) of the naive
//! reference; ill-conditioned scores (huge values, rotary angles at huge positions) widen that
//! by their condition, and non-finite inputs are only required not to panic (the Rust API leaves
//! the finiteness scan to its caller: the Python layer's `check_finite`).
#![no_main]

use fastrope::exact::backward::BackwardInputs;
use fastrope::exact::{attention_backward, attention_forward};
use fastrope::{Control, Position};
use fastrope_fuzz::{all_finite, first_mismatch, is_overflow_error, reference, Case};
use libfuzzer_sys::fuzz_target;

const U: f64 = f64::EPSILON / 2.0;

fuzz_target!(|data: &[u8]| {
    let mut u = arbitrary::Unstructured::new(data);
    let Ok(case) = Case::draw(&mut u, true) else { return };
    if std::env::var_os("FUZZ_PRINT_CASE").is_some() {
        eprintln!("{case:?}"); // to read a reproducer whose failure is a panic in the library
    }
    let (prob, pos, bias) = (&case.prob, case.position(), case.bias());
    let ctl = Control::new();
    let (out, lse) =
        match attention_forward(prob, &pos, bias.as_ref(), case.q.view(), case.k.view(), case.v.view(), &ctl) {
            Ok(r) => r,
            // The overflow error only where an input is huge (no other call can overflow).
            Err(e) => {
                assert!(!is_overflow_error(&e) || !case.finite() || case.extreme(), "{e}\n{case:?}");
                return;
            }
        };
    let inp = BackwardInputs {
        out: out.view(),
        lse: lse.view(),
        dout: case.dout.view(),
        want_dw: true,
        want_dbias: true,
        threads: 2,
    };
    let grads = attention_backward(
        prob, &pos, bias.as_ref(), case.q.view(), case.k.view(), case.v.view(), &inp, &ctl,
    );
    if !case.finite() {
        return;
    }
    let r = reference(&case);
    if !all_finite(&r.out) || r.lse.iter().any(|x| x.is_nan() || *x == f64::INFINITY) || !r.score_abs.is_finite() {
        return; // the scores themselves overflow f64 (no relative tolerance exists)
    }
    // Absolute error of a computed score: rounding of the d² products, and for rotary the angle
    // `p θ` of each absolute position (what RoPE rotates by), rounded at up to |p| θ.
    let angle = match &pos {
        Position::Rotary(rot) => {
            let p = (prob.q_offset.unsigned_abs() + prob.nq as u64).max(prob.k_offset.unsigned_abs() + prob.nk as u64);
            4.0 * U * p as f64 * rot.theta.iter().fold(0.0f64, |m, t| m.max(t.abs()))
        }
        Position::Sparse(_) => 0.0,
    };
    let score_err = r.score_abs * (16.0 * prob.d as f64 * U + angle);
    let rel = f64::max(1e-9, 4.0 * score_err);
    if !rel.is_finite() {
        return; // an infinite score bound (inf * 0 in it would make NaN tolerances)
    }
    // The gradients rotate back by the same rounded angles: each term of dq, dk is off by the
    // angle's error relative to its own magnitude, not to the score's.
    let rel_grad = rel + 4.0 * angle;
    let mut bad = Vec::new();
    if !all_finite(&out) {
        bad.push("out: not finite".to_string());
    }
    bad.extend(first_mismatch("out", &out, &r.out, |_| rel * r.v_max));
    bad.extend(first_mismatch("lse", &lse, &r.lse, |_| 1e-9 * f64::max(1.0, r.score_abs) + 2.0 * score_err));
    // The reference's gradients overflow f64 (huge dout times huge v: dp = ±inf, dS = inf - inf):
    // no tolerance exists for them, only the forward is compared.
    let grads_finite = [&r.dq, &r.dk, &r.dv, &r.dq_abs, &r.dk_abs, &r.dv_abs].iter().all(|a| all_finite(a))
        && [&r.dw, &r.dw_abs].iter().all(|a| a.as_ref().is_none_or(all_finite))
        && [&r.db, &r.db_abs].iter().all(|a| a.as_ref().is_none_or(all_finite));
    match &grads {
        // An intermediate (or a gradient itself) overflowed: a clear error, never silent NaN.
        Err(e) if is_overflow_error(e) && case.extreme() => {}
        Err(e) => bad.push(format!("backward failed on a valid call: {e}")),
        Ok(_) if !grads_finite => {}
        Ok(g) => {
            // Relative to what each entry sums, plus underflow's absolute floor (`underflow_floor`).
            let tol = |abs: &ndarray::Array4<f64>, floor: &ndarray::Array4<f64>, rel: f64| {
                let (a, f) = (abs.as_slice().unwrap().to_vec(), floor.as_slice().unwrap().to_vec());
                move |n: usize| rel * a[n] + f[n] + 1e-300
            };
            bad.extend(first_mismatch("dq", &g.dq, &r.dq, tol(&r.dq_abs, &r.dq_floor, rel_grad)));
            bad.extend(first_mismatch("dk", &g.dk, &r.dk, tol(&r.dk_abs, &r.dk_floor, rel_grad)));
            bad.extend(first_mismatch("dv", &g.dv, &r.dv, tol(&r.dv_abs, &r.dv_floor, rel)));
            if let (Some(got), Some(want), Some(abs), Some(fl)) = (&g.dw, &r.dw, &r.dw_abs, &r.dw_floor) {
                let (a, f) = (abs.as_slice().unwrap(), fl.as_slice().unwrap());
                bad.extend(first_mismatch("dw", got, want, |n| rel * a[n] + f[n] + 1e-300));
            }
            if let (Some(got), Some(want), Some(abs), Some(fl)) = (&g.dbias, &r.db, &r.db_abs, &r.db_floor) {
                let (a, f) = (abs.as_slice().unwrap(), fl.as_slice().unwrap());
                bad.extend(first_mismatch("dbias", got, want, |n| rel * a[n] + f[n] + 1e-300));
            }
        }
    }
    assert!(bad.is_empty(), "{:?}\n{case:?}", bad);
});
