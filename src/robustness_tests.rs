//! A property test over the Rust entry points: random and often inconsistent problems (shapes,
//! tables, indices, masks, offsets, non-finite values) must give `Ok` or `Err`, never a panic.

use crate::exact::backward::BackwardInputs;
use crate::exact::{attention_backward, attention_forward};
use crate::fast::FastLimits;
use crate::plan::backward::plan_fast_backward;
use crate::plan::backward_run::run_fast_backward;
use crate::plan::forward::{plan_fast, run_fast};
use crate::plan::Route;
use crate::position::{Bias, Position, RotaryW, SparseW};
use crate::problem::{Control, Problem};
use crate::test_util::XorShift;
use ndarray::{Array2, Array3, Array4};

struct Rng(XorShift);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn below(&mut self, n: u64) -> usize {
        (self.next() % n.max(1)) as usize
    }
    fn float(&mut self) -> f64 {
        match self.below(40) {
            0 => f64::NAN,
            1 => f64::INFINITY,
            2 => 1e300,
            _ => (self.next() % 2001) as f64 / 1000.0 - 1.0,
        }
    }
    /// Small offsets, huge ones (rotary refuses `|p| >= 2^53`) and one in between.
    fn offset(&mut self) -> i64 {
        [0, 3, -5, 40, 1 << 50, i64::MAX / 4, i64::MIN / 4][self.below(7)]
    }
}

fn arr4(r: &mut Rng, s: (usize, usize, usize, usize)) -> Array4<f64> {
    Array4::from_shape_fn(s, |_| r.float())
}

#[test]
fn random_problems_never_panic() {
    let mut r = Rng(XorShift(0x9E37_79B9_7F4A_7C15));
    let (mut computed, mut fast_runs, mut fast_backward_runs) = (0, 0, 0);
    for case in 0..1500 {
        let (batch, hk) = (1 + r.below(2), 1 + r.below(2));
        let hq = hk * (1 + r.below(2)) + if r.below(8) == 0 { 1 } else { 0 };
        let (nq, nk, d, dv) = (r.below(9), r.below(9), 1 + r.below(5), r.below(4));
        let prob = Problem {
            batch,
            hq,
            hk,
            nq,
            nk,
            d,
            dv,
            scale: if r.below(20) == 0 {
                f64::NAN
            } else {
                r.float()
            },
            causal: r.below(2) == 0,
            window: match r.below(3) {
                0 => None,
                1 => Some((r.below(5) as i64, r.below(5) as i64)),
                _ => Some((-(r.below(3) as i64), 2)),
            },
            q_offset: r.offset(),
            k_offset: r.offset(),
        };
        // Arrays that sometimes disagree with the problem's shapes.
        let jitter = |r: &mut Rng, x: usize| if r.below(10) == 0 { x + 1 } else { x };
        let q = arr4(&mut r, (batch, hq, jitter(&mut Rng(XorShift(case)), nq), d));
        let k = arr4(
            &mut r,
            (batch, hk, nk, jitter(&mut Rng(XorShift(case + 7)), d)),
        );
        let v = arr4(&mut r, (batch, hk, nk, dv));
        let rows = 2 * r.below(12) + if r.below(10) == 0 { 0 } else { 1 };
        let ns = r.below(4);
        let support: Vec<(usize, usize)> = (0..ns)
            .map(|_| (r.below(d as u64 + 1), r.below(d as u64)))
            .collect();
        let values = Array3::from_shape_fn((1 + r.below(2), rows, ns), |_| r.float());
        let w_index: Vec<usize> = (0..batch * hq + r.below(2)).map(|_| r.below(3)).collect();
        let pairs: Vec<(usize, usize)> = (0..d / 2).map(|m| (2 * m, 2 * m + 1)).collect();
        let rot = RotaryW {
            theta: vec![0.5; pairs.len()],
            factor: 1.0,
            pairs,
        };
        let pos: Position<'_, f64> = if r.below(2) == 0 {
            Position::Rotary(rot)
        } else {
            Position::Sparse(SparseW {
                support,
                values: values.view(),
                index: w_index,
            })
        };
        let bvals = Array2::from_shape_fn((1, 2 * r.below(12) + 1), |_| r.float());
        let bias = (r.below(2) == 0).then(|| Bias {
            values: bvals.view(),
            index: vec![r.below(2); batch * hq],
        });
        let ctl = Control::new();
        let fwd = attention_forward(
            &prob,
            &pos,
            bias.as_ref(),
            q.view(),
            k.view(),
            v.view(),
            &ctl,
        );
        if let Ok((out, lse)) = &fwd {
            computed += 1;
            let dout = Array4::from_elem(out.dim(), 1.0);
            let inp = BackwardInputs {
                out: out.view(),
                lse: lse.view(),
                dout: dout.view(),
                want_dw: true,
                want_dbias: true,
                threads: 2,
            };
            let _ = attention_backward(
                &prob,
                &pos,
                bias.as_ref(),
                q.view(),
                k.view(),
                v.view(),
                &inp,
                &ctl,
            );
        }
        let limits = FastLimits {
            max_degree: 12,
            max_terms: 2000,
            max_working_bytes: 1 << 24,
        };
        if let Ok(call) = plan_fast(
            &prob,
            &pos,
            bias.as_ref(),
            q.view(),
            k.view(),
            v.view(),
            1e-2,
            &limits,
            2,
            Route::Auto,
        ) {
            fast_runs += 1;
            let _ = run_fast(
                &call,
                &prob,
                &pos,
                bias.as_ref(),
                q.view(),
                k.view(),
                v.view(),
                &limits,
                &ctl,
            );
        }
        // The fast backward, with a dout of the right shape or (sometimes) a wrong one.
        let dshape = if r.below(10) == 0 {
            (batch, hq, nq + 1, dv)
        } else {
            (batch, hq, nq, dv)
        };
        let dout = arr4(&mut r, dshape);
        let want = crate::fast::Want {
            dw: r.below(2) == 0,
            db: bias.is_some(),
        };
        if let Ok(call) = plan_fast_backward(
            &prob,
            &pos,
            bias.as_ref(),
            q.view(),
            k.view(),
            v.view(),
            Some(dout.view()),
            None,
            None,
            1e-2,
            crate::fast::GradContract::Absolute,
            want,
            &limits,
            2,
            None,
            Route::Auto,
        ) {
            fast_backward_runs += 1;
            let _ = run_fast_backward(
                &call,
                &prob,
                &pos,
                bias.as_ref(),
                q.view(),
                k.view(),
                v.view(),
                dout.view(),
                None,
                &limits,
                &ctl,
            );
        }
    }
    // The generator must reach the kernels, not only the validation.
    assert!(
        computed > 40 && fast_runs > 5 && fast_backward_runs > 5,
        "computed {computed}, fast {fast_runs}, fast backward {fast_backward_runs}"
    );
}

/// Found by the `validate` fuzz target (fuzz/): `batch * hq` overflowed in the table-index check.
#[test]
fn table_index_check_of_a_huge_problem_is_an_error() {
    let prob = Problem {
        batch: usize::MAX,
        hq: 2,
        hk: 1,
        nq: 1,
        nk: 1,
        d: 2,
        dv: 1,
        scale: 1.0,
        causal: false,
        window: None,
        q_offset: 0,
        k_offset: 0,
    };
    let values = Array3::<f64>::zeros((1, 1, 1));
    let sp = SparseW {
        support: vec![(0, 0)],
        values: values.view(),
        index: vec![0],
    };
    assert!(Position::Sparse(sp).validate(&prob).is_err());
    let bvals = Array2::<f64>::zeros((1, 1));
    let bias = Bias {
        values: bvals.view(),
        index: vec![0],
    };
    assert!(bias.validate(&prob).is_err());
}

/// Found by the `fast` fuzz target (fuzz/regressions/fast/crash-5a9e7f…): a `BlockW` entry of
/// `1e300` times subnormal keys (`1e-310`) makes a normal score of 7.4e-13, but the score bound
/// squared the keys (`||k||_2` underflowed to 0, so `R` missed the score) and the rounding model
/// was relative only. Now the Toeplitz route either refuses (the operands reach the subnormal
/// range, where rounding is absolute) or its result is within its certificate; the exact method
/// gets the reference's lse.
#[test]
fn subnormal_keys_times_a_huge_table_entry_are_certified_or_refused() {
    let prob = Problem {
        batch: 1,
        hq: 1,
        hk: 1,
        nq: 1,
        nk: 1,
        d: 2,
        dv: 1,
        scale: std::f64::consts::FRAC_1_SQRT_2,
        causal: true,
        window: Some((14, 14)),
        q_offset: -11,
        k_offset: -11,
    };
    let q = Array4::from_shape_vec((1, 1, 1, 2), vec![0.0104, 1e-310]).unwrap();
    let k = Array4::from_elem((1, 1, 1, 2), 1e-310);
    let v = Array4::from_elem((1, 1, 1, 1), 1e-310);
    let values = Array3::from_shape_vec((1, 1, 4), vec![1e-310, 1e300, 1e-310, 1e-310]).unwrap();
    let pos = Position::Sparse(SparseW {
        support: vec![(0, 0), (0, 1), (1, 0), (1, 1)],
        values: values.view(),
        index: vec![0],
    });
    let bvals = Array2::from_elem((1, 1), 0.904);
    let bias = Bias {
        values: bvals.view(),
        index: vec![0],
    };
    let want = 0.904 + prob.scale * 0.0104 * 1e300 * 1e-310; // the one score, + the bias
    let ctl = Control::new();
    let (_, lse) =
        attention_forward(&prob, &pos, Some(&bias), q.view(), k.view(), v.view(), &ctl).unwrap();
    assert!(
        (lse[[0, 0, 0]] - want).abs() < 1e-15,
        "exact lse {}",
        lse[[0, 0, 0]]
    );
    let limits = FastLimits {
        max_degree: 24,
        max_terms: 20_000,
        max_working_bytes: 1 << 26,
    };
    let mut ran = 0;
    for route in [Route::Auto, Route::Toeplitz, Route::LowRank] {
        let Ok(call) = plan_fast(
            &prob,
            &pos,
            Some(&bias),
            q.view(),
            k.view(),
            v.view(),
            1e-5,
            &limits,
            1,
            route,
        ) else {
            continue;
        };
        match run_fast(
            &call,
            &prob,
            &pos,
            Some(&bias),
            q.view(),
            k.view(),
            v.view(),
            &limits,
            &ctl,
        ) {
            Ok((_, lse)) => {
                ran += 1;
                let err = (lse[[0, 0, 0]] - want).abs();
                assert!(
                    err <= call.certified_lse_error,
                    "{route:?}: lse off by {err:e}, certified {:e}",
                    call.certified_lse_error
                );
            }
            Err(crate::Error::Approximation(m)) => {
                assert!(
                    m.contains("subnormal"),
                    "{route:?}: refused for another reason: {m}"
                );
            }
            Err(e) => panic!("{route:?}: {e}"),
        }
    }
    eprintln!("fast runs within their certificate: {ran}");
}

/// Rotary rotates by absolute positions (fuzz/regressions/exact/crash-2bd331…, crash-57577f…):
/// a call whose relative positions fit in i64 but whose absolute ones (`q_offset + n_q - 1`) do
/// not overflowed the rotation's `offset + i`; a frequency of 1e300 at position 2^63 made every
/// angle infinite and the scores NaN. Both are now refused with a message; `w = None` (zero
/// frequencies) at the same offsets too, the position arithmetic being shared.
#[test]
fn rotary_positions_past_i64_and_infinite_angles_are_refused() {
    use crate::position::{Position, RotaryW};
    use crate::problem::{Control, Problem};
    let prob = |q_offset: i64, k_offset: i64| Problem {
        batch: 1,
        hq: 1,
        hk: 1,
        nq: 3,
        nk: 2,
        d: 2,
        dv: 1,
        scale: 1.0,
        causal: false,
        window: None,
        q_offset,
        k_offset,
    };
    let rot = |theta: f64| RotaryW {
        theta: vec![theta],
        factor: 1.0,
        pairs: vec![(0, 1)],
    };
    let q = ndarray::Array4::<f64>::ones((1, 1, 3, 2));
    let k = ndarray::Array4::<f64>::ones((1, 1, 2, 2));
    let v = ndarray::Array4::<f64>::ones((1, 1, 2, 1));
    let run = |p: &Problem, r: RotaryW| {
        attention_forward(
            p,
            &Position::Rotary(r),
            None,
            q.view(),
            k.view(),
            v.view(),
            &Control::new(),
        )
    };
    for theta in [0.0, 1.0] {
        let p = prob(i64::MAX - 1, i64::MAX - 1);
        p.validate().unwrap();
        let e = run(&p, rot(theta)).unwrap_err();
        assert!(e.to_string().contains("absolute positions"), "{e}");
    }
    let e = run(&prob((1 << 52) - 2, 0), rot(1e300)).unwrap_err();
    assert!(e.to_string().contains("angles"), "{e}");
    // zero frequencies do not rotate: any position that fits in i64 runs
    let (out, _) = run(&prob(i64::MAX - 2, i64::MAX - 1), rot(0.0)).unwrap();
    assert!(out.iter().all(|x| x.is_finite()));
    assert!(run(&prob(1 << 40, 1 << 40), rot(1e200)).is_ok());
}

/// Rotary at absolute positions of 2^53 and beyond (fuzz/regressions/exact/crash-2718964…,
/// crash-15c8e5…, crash-3fdf28…): float64 no longer holds every integer, neighbouring positions
/// share an angle and `p θ` rounds by a radian or more, so the results had no accuracy (`dv`
/// -1 where the reference's is 0). A non-zero frequency at `|p| >= 2^53` is refused, naming
/// the offsets; up to `2^53 - 1` (both signs) the call runs and stays finite.
#[test]
fn rotary_positions_of_2_pow_53_and_beyond_are_refused() {
    use crate::position::{Position, RotaryW, MAX_ROTARY_POSITION};
    use crate::problem::{Control, Problem};
    let prob = |q_offset: i64, k_offset: i64| Problem {
        batch: 1,
        hq: 1,
        hk: 1,
        nq: 3,
        nk: 2,
        d: 2,
        dv: 1,
        scale: 1.0,
        causal: false,
        window: None,
        q_offset,
        k_offset,
    };
    let rot = RotaryW {
        theta: vec![1.0],
        factor: 1.0,
        pairs: vec![(0, 1)],
    };
    let q = ndarray::Array4::<f64>::ones((1, 1, 3, 2));
    let k = ndarray::Array4::<f64>::ones((1, 1, 2, 2));
    let v = ndarray::Array4::<f64>::ones((1, 1, 2, 1));
    let run = |p: &Problem| {
        attention_forward(
            p,
            &Position::Rotary(rot.clone()),
            None,
            q.view(),
            k.view(),
            v.view(),
            &Control::new(),
        )
    };
    let m = MAX_ROTARY_POSITION;
    for (qo, ko) in [
        (m - 2, 0),
        (0, m - 1),
        (-m, 3),
        (-m - 5, 20),
        (i64::MAX / 2, -11),
    ] {
        let p = prob(qo, ko);
        if p.validate().is_err() {
            continue; // relative positions that do not fit in i64: refused by Problem
        }
        let e = run(&p).unwrap_err().to_string();
        assert!(
            e.contains("q_offset, k_offset") && e.contains("2^53"),
            "{e}"
        );
    }
    for (qo, ko) in [(m - 3, 0), (0, m - 2), (-m + 1, 3), (-m + 1, m - 2)] {
        let (out, lse) = run(&prob(qo, ko)).unwrap();
        assert!(
            out.iter().chain(lse.iter()).all(|x| x.is_finite()),
            "{qo} {ko}"
        );
    }
}

/// At huge scores the backward's recomputed `S` rounds differently from the forward's by far
/// more than 1 (here `|S|` ~ 3e297), so `exp(S - lse)` was up to `e^709` and `dv` 1e308 where
/// the one key has `P = 1` (fuzz/regressions/exact/crash-275f69…). The exponent is now capped
/// at 0: `P <= 1`, as for any softmax weight.
#[test]
fn backward_probabilities_stay_at_most_one_at_huge_scores() {
    use crate::arch::Isa;
    use crate::position::{Position, RotaryW};
    use crate::problem::{Control, Problem};
    let prob = Problem {
        batch: 1,
        hq: 4,
        hk: 2,
        nq: 1,
        nk: 1,
        d: 2,
        dv: 1,
        scale: 1e300,
        causal: true,
        window: None,
        q_offset: 10,
        k_offset: 10,
    };
    let pos = Position::Rotary(RotaryW {
        theta: vec![1.0],
        factor: 1.0,
        pairs: vec![(0, 1)],
    });
    let q = ndarray::Array4::<f64>::from_elem((1, 4, 1, 2), -0.038);
    let k = ndarray::Array4::from_elem((1, 2, 1, 2), -0.038);
    let v = ndarray::Array4::from_elem((1, 2, 1, 1), -0.76);
    let dout = ndarray::Array4::from_elem((1, 4, 1, 1), -0.76);
    let ctl = Control::new();
    for isa in [Isa::Baseline, Isa::Avx2, Isa::Avx512] {
        if isa > crate::arch::simd::isa() {
            continue;
        }
        crate::arch::simd::with_isa(isa, || {
            let (out, lse) =
                attention_forward(&prob, &pos, None, q.view(), k.view(), v.view(), &ctl).unwrap();
            let inp = BackwardInputs {
                out: out.view(),
                lse: lse.view(),
                dout: dout.view(),
                want_dw: false,
                want_dbias: false,
                threads: 2,
            };
            let g = attention_backward(&prob, &pos, None, q.view(), k.view(), v.view(), &inp, &ctl)
                .unwrap();
            // two query heads per kv head, P = 1 each: dv = 2 dout
            for &x in g.dv.iter() {
                assert!((x - 2.0 * -0.76f64).abs() < 1e-12, "{isa:?}: dv = {x}");
            }
        });
    }
}
