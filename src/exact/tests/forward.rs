//! The forward against the naive twin: rotary, sparse and BlockW `W`, masks, biases, tables,
//! float32 on every instruction set (and a timing, ignored).

use super::*;

#[test]
fn rotary_matches_naive_with_gqa_offsets_and_causal() {
    let mut prob = problem(70, 141, 4, 4, 2);
    prob.causal = true;
    prob.q_offset = 71;
    check(&prob, &Position::Rotary(rotary(4)), None, 1);
    prob.causal = false;
    prob.window = Some((5, 130));
    prob.q_offset = -3;
    check(&prob, &Position::Rotary(rotary(4)), None, 2);
}

#[test]
pub(super) fn sparse_matches_naive_with_bias_window_and_per_head_tables() {
    let prob = Problem {
        window: Some((40, 9)),
        q_offset: 5,
        k_offset: 2,
        ..problem(67, 131, 3, 2, 1)
    };
    let mut rng = Rng(7);
    let l = 140usize;
    let support = vec![(0, 0), (0, 2), (1, 1), (2, 0), (2, 1)];
    let values = Array3::from_shape_fn((2, 2 * l - 1, support.len()), |_| rng.next());
    let sp = SparseW {
        support,
        values: values.view(),
        index: vec![0, 1, 1, 0],
    };
    let bvals = Array2::from_shape_fn((1, 2 * l - 1), |_| rng.next());
    let bias = Bias {
        values: bvals.view(),
        index: vec![0; 4],
    };
    check(&prob, &Position::Sparse(sp), Some(&bias), 3);
}

#[test]
fn fully_masked_rows_give_zero_and_neg_inf() {
    let prob = Problem {
        causal: true,
        q_offset: -5,
        ..problem(9, 4, 2, 1, 1)
    };
    let mut rng = Rng(9);
    let q = rng.array4((2, 1, 9, 2));
    let k = rng.array4((2, 1, 4, 2));
    let v = rng.array4((2, 1, 4, 3));
    let (out, lse) = attention_forward(
        &prob,
        &Position::Rotary(rotary(2)),
        None,
        q.view(),
        k.view(),
        v.view(),
        &Control::new(),
    )
    .unwrap();
    for i in 0..5 {
        assert_eq!(lse[[0, 0, i]], f64::NEG_INFINITY);
        assert!(out
            .slice(ndarray::s![0, 0, i, ..])
            .iter()
            .all(|&x| x == 0.0));
    }
    assert!(lse[[0, 0, 5]].is_finite());
}

#[test]
fn table_too_short_is_an_error_not_a_panic() {
    let prob = problem(10, 10, 2, 1, 1);
    let values = Array3::<f64>::zeros((1, 5, 1));
    let sp = SparseW {
        support: vec![(0, 0)],
        values: values.view(),
        index: vec![0, 0],
    };
    let z = Array4::<f64>::zeros((2, 1, 10, 2));
    let v = Array4::<f64>::zeros((2, 1, 10, 3));
    let e = attention_forward(
        &prob,
        &Position::Sparse(sp),
        None,
        z.view(),
        z.view(),
        v.view(),
        &Control::new(),
    );
    assert!(matches!(e, Err(crate::Error::Value(m)) if m.contains("δ in [-9, 9]")));
}

#[test]
fn rotary_several_tiles_causal_and_window() {
    // More rows and keys than one block and one tile of every instruction set.
    let mut prob = problem(150, 290, 8, 2, 1);
    prob.dv = 20;
    prob.causal = true;
    prob.q_offset = 7;
    check(&prob, &Position::Rotary(rotary(8)), None, 11);
    // dv a multiple of every micro-tile width: the forward reads v in place.
    prob.dv = 32;
    prob.causal = false;
    prob.window = Some((40, 3));
    check(&prob, &Position::Rotary(rotary(8)), None, 12);
}

#[test]
pub(super) fn blockw_matches_naive_with_bias_and_masks() {
    let mut rng = Rng(21);
    let d = 8;
    for (pairs, causal, window) in [
        (
            (0..d / 2).map(|m| (2 * m, 2 * m + 1)).collect::<Vec<_>>(),
            true,
            None,
        ),
        (
            (0..d / 2).map(|m| (m, m + d / 2)).collect(),
            false,
            Some((60, 25)),
        ),
    ] {
        let prob = Problem {
            causal,
            window,
            q_offset: 3,
            k_offset: 1,
            dv: 5,
            ..problem(161, 203, d, 2, 2)
        };
        let l = 210usize;
        let support = block_support(&pairs);
        let values = Array3::from_shape_fn((2, 2 * l - 1, support.len()), |_| rng.next());
        let sp = SparseW {
            support,
            values: values.view(),
            index: vec![1, 0, 0, 1],
        };
        let bvals = Array2::from_shape_fn((2, 2 * l - 1), |_| 0.3 * rng.next());
        let bias = Bias {
            values: bvals.view(),
            index: vec![0, 1, 1, 0],
        };
        check(&prob, &Position::Sparse(sp.clone()), Some(&bias), 22);
        check(&prob, &Position::Sparse(sp), None, 23);
    }
}

#[test]
fn float32_matches_naive_every_isa() {
    let mut prob = problem(150, 170, 16, 2, 1);
    prob.causal = true;
    prob.q_offset = 20;
    let pos64 = Position::Rotary(rotary(16));
    let pos32: Position<'_, f32> = Position::Rotary(rotary(16));
    let mut rng = Rng(31);
    let q = rng.array4((2, 2, 150, 16));
    let k = rng.array4((2, 1, 170, 16));
    let v = rng.array4((2, 1, 170, 3));
    let dout = rng.array4((2, 2, 150, 3));
    let nv = naive(&prob, &pos64, None, &q, &k, &v, &dout);
    let f = |x: &Array4<f64>| x.mapv(|y| y as f32);
    let (q32, k32, v32, do32) = (f(&q), f(&k), f(&v), f(&dout));
    for isa in isas() {
        crate::arch::simd::with_isa(isa, || {
            let ctl = Control::new();
            let (out, lse) = attention_forward(
                &prob,
                &pos32,
                None,
                q32.view(),
                k32.view(),
                v32.view(),
                &ctl,
            )
            .unwrap();
            let out64 = out.mapv(|x| x as f64);
            assert!(
                max_diff(&out64, &nv.out) < 2e-6,
                "{isa:?}: out {}",
                max_diff(&out64, &nv.out)
            );
            let inp = BackwardInputs {
                out: out.view(),
                lse: lse.view(),
                dout: do32.view(),
                want_dw: false,
                want_dbias: false,
                threads: 2,
            };
            let g = attention_backward(
                &prob,
                &pos32,
                None,
                q32.view(),
                k32.view(),
                v32.view(),
                &inp,
                &ctl,
            )
            .unwrap();
            for (name, a, b) in [
                ("dq", &g.dq, &nv.dq),
                ("dk", &g.dk, &nv.dk),
                ("dv", &g.dv, &nv.dv),
            ] {
                let e = max_diff(&a.mapv(|x| x as f64), b);
                assert!(e < 1e-5, "{isa:?}: {name} differs by {e}");
            }
        });
    }
}

#[test]
fn empty_sparse_support_scores_zero() {
    let mut prob = problem(13, 12, 4, 2, 2);
    prob.causal = true;
    let values = ndarray::Array2::<f64>::zeros((2 * 13 - 1, 0));
    let sp = SparseW {
        support: Vec::new(),
        values: values.view().insert_axis(ndarray::Axis(0)),
        index: vec![0; 4],
    };
    check(&prob, &Position::Sparse(sp), None, 41);
}

/// `d_v = 0` (fuzz/regressions/exact/crash-13aaa9…): `lse` does not depend on `v`, so it is the
/// scores' own (finite), not `-inf`; `out` is empty and, with no cotangent for `lse`, every
/// gradient is zero. Rotary with GQA and a causal offset, a decode row, sparse `W` with a bias.
#[test]
fn dv_zero_still_gives_the_lse_of_the_scores() {
    let mut prob = Problem {
        dv: 0,
        causal: true,
        q_offset: 6,
        ..problem(19, 23, 4, 4, 2)
    };
    check(&prob, &Position::Rotary(rotary(4)), None, 51);
    prob.nq = 1; // the decode path
    check(&prob, &Position::Rotary(rotary(4)), None, 52);
    let prob = Problem {
        dv: 0,
        window: Some((7, 3)),
        ..problem(15, 17, 3, 2, 1)
    };
    let mut rng = Rng(53);
    let support = vec![(0, 0), (1, 2), (2, 1)];
    let values = Array3::from_shape_fn((1, 2 * 17 - 1, support.len()), |_| rng.next());
    let sp = SparseW {
        support,
        values: values.view(),
        index: vec![0; 4],
    };
    let bvals = Array2::from_shape_fn((1, 2 * 17 - 1), |_| rng.next());
    let bias = Bias {
        values: bvals.view(),
        index: vec![0; 4],
    };
    check(&prob, &Position::Sparse(sp), Some(&bias), 54);
    // The same lse as a call with values, in f32 too.
    let prob = Problem {
        dv: 0,
        causal: true,
        ..problem(15, 17, 4, 2, 1)
    };
    let with_v = Problem {
        dv: 2,
        ..prob.clone()
    };
    let q = rng.array4((2, 2, 15, 4));
    let k = rng.array4((2, 1, 17, 4));
    let v = rng.array4((2, 1, 17, 2));
    let v0 = Array4::<f64>::zeros((2, 1, 17, 0));
    let pos = Position::Rotary(rotary(4));
    let ctl = Control::new();
    let (_, want) =
        attention_forward(&with_v, &pos, None, q.view(), k.view(), v.view(), &ctl).unwrap();
    let (out, lse) =
        attention_forward(&prob, &pos, None, q.view(), k.view(), v0.view(), &ctl).unwrap();
    assert_eq!(out.dim(), (2, 2, 15, 0));
    assert!(lse.iter().all(|x| x.is_finite()), "{lse:?}");
    assert_eq!(lse, want);
    let f = |x: &Array4<f64>| x.mapv(|y| y as f32);
    let pos32: Position<'_, f32> = Position::Rotary(rotary(4));
    let (_, lse32) = attention_forward(
        &prob,
        &pos32,
        None,
        f(&q).view(),
        f(&k).view(),
        f(&v0).view(),
        &ctl,
    )
    .unwrap();
    for (a, b) in lse32.iter().zip(want.iter()) {
        assert!(
            (*a as f64 - b).abs() < 1e-5 * b.abs().max(1.0),
            "f32 lse {a} vs {b}"
        );
    }
}

/// Forward and backward throughput, float32, batch 1, 8 heads, per instruction set (run with
/// `--ignored --nocapture`).
#[test]
#[ignore]
fn timing_rotary_f32() {
    for (n, d, causal) in [(1024, 64, false), (4096, 128, false), (4096, 64, true)] {
        let mut prob = problem(n, n, d, 8, 8);
        prob.batch = 1;
        prob.dv = d;
        prob.causal = causal;
        prob.scale = 1.0 / (d as f64).sqrt();
        let pos: Position<'_, f32> = Position::Rotary(rotary(d));
        let mut rng = Rng(5);
        let f = |x: Array4<f64>| x.mapv(|y| y as f32);
        let q = f(rng.array4((1, 8, n, d)));
        let k = f(rng.array4((1, 8, n, d)));
        let v = f(rng.array4((1, 8, n, d)));
        let dout = f(rng.array4((1, 8, n, d)));
        let flops = 4.0 * (n * n * d * 8) as f64 * if causal { 0.5 } else { 1.0 };
        // FASTROPE_TIMING_ISA=Avx512 (or Avx2, Baseline) times one instruction set only.
        let only = std::env::var("FASTROPE_TIMING_ISA").ok();
        for isa in isas() {
            if only.as_ref().is_some_and(|o| *o != format!("{isa:?}")) {
                continue;
            }
            crate::arch::simd::with_isa(isa, || {
                let ctl = Control::new();
                let (mut tf, mut tb) = (f64::MAX, f64::MAX);
                for _ in 0..3 {
                    let t0 = std::time::Instant::now();
                    let (out, lse) =
                        attention_forward(&prob, &pos, None, q.view(), k.view(), v.view(), &ctl)
                            .unwrap();
                    tf = tf.min(t0.elapsed().as_secs_f64());
                    let inp = BackwardInputs {
                        out: out.view(),
                        lse: lse.view(),
                        dout: dout.view(),
                        want_dw: false,
                        want_dbias: false,
                        threads: 2,
                    };
                    let t0 = std::time::Instant::now();
                    attention_backward(&prob, &pos, None, q.view(), k.view(), v.view(), &inp, &ctl)
                        .unwrap();
                    tb = tb.min(t0.elapsed().as_secs_f64());
                }
                println!(
                    "n={n} d={d} causal={causal} {isa:?}: fwd {:.1} ms {:.0} GF/s, bwd {:.1} ms {:.0} GF/s",
                    tf * 1e3,
                    flops / tf / 1e9,
                    tb * 1e3,
                    2.5 * flops / tb / 1e9
                );
            });
        }
    }
}

/// Scores that overflow in the kernels' grouping (`scale q` = ±1e310 times `k` = 1e-300, where
/// `scale (q k)` = 1e10): `+inf` made `l` NaN and `-inf` made the row look fully masked, so the
/// row came back with `lse = -inf` and `out = 0`, silently (fuzz/regressions/exact/crash-833680…,
/// crash-a6874d…). Both are now an error naming the overflow, on the GEMM and decode paths, in
/// f64 and f32; fully masked rows (causal, a `-inf` bias) still give `lse = -inf`.
#[test]
fn overflowing_scores_are_an_error_not_a_masked_row() {
    let mut prob = Problem {
        batch: 1,
        scale: 1e10,
        ..problem(3, 2, 2, 1, 1)
    };
    fn run(
        prob: &Problem,
        q0: f64,
        bias: Option<&Bias<'_, f64>>,
    ) -> crate::Result<(Array4<f64>, ndarray::Array3<f64>)> {
        let pos = Position::Rotary(RotaryW {
            theta: vec![0.0],
            factor: 1.0,
            pairs: vec![(0, 1)],
        });
        let mut q = Array4::<f64>::zeros((1, 1, prob.nq, 2));
        q.slice_mut(ndarray::s![.., .., .., 0]).fill(q0);
        let k = Array4::from_elem((1, 1, 2, 2), 1e-300);
        let v = Array4::<f64>::ones((1, 1, 2, prob.dv));
        attention_forward(
            prob,
            &pos,
            bias,
            q.view(),
            k.view(),
            v.view(),
            &Control::new(),
        )
    }
    for nq in [3, 1] {
        prob.nq = nq; // GEMM path, decode path
        for q0 in [1e300, -1e300] {
            let e = run(&prob, q0, None).unwrap_err().to_string();
            assert!(
                e.contains("overflow float64") && e.contains("rescale"),
                "{e}"
            );
        }
        // the same scores of ordinary size
        let (out, lse) = run(&prob, 1e-20, None).unwrap();
        assert!(out.iter().chain(lse.iter()).all(|x| x.is_finite()));
        // a NaN input is the caller's to scan (check_finite): its result stays undefined, Ok
        assert!(run(&prob, f64::NAN, None).is_ok());
    }
    // Rows that see no key keep lse = -inf: past the causal edge, or masked by a -inf bias.
    let masked = Problem {
        causal: true,
        q_offset: -5,
        ..prob.clone()
    };
    let (out, lse) = run(&masked, 1.0, None).unwrap();
    assert!(lse.iter().all(|&x| x == f64::NEG_INFINITY) && out.iter().all(|&x| x == 0.0));
    let bvals = Array2::from_elem((1, 2 * 3 - 1), f64::NEG_INFINITY);
    let bias = Bias {
        values: bvals.view(),
        index: vec![0],
    };
    for nq in [3, 1] {
        let p = Problem { nq, ..prob.clone() };
        let (_, lse) = run(&p, 1.0, Some(&bias)).unwrap();
        assert!(lse.iter().all(|&x| x == f64::NEG_INFINITY));
    }
    // float32: 1e30 * 1e10 overflows there
    prob.nq = 3;
    let q = Array4::<f32>::from_elem((1, 1, 3, 2), 1e30);
    let k = Array4::<f32>::from_elem((1, 1, 2, 2), 1e-30);
    let v = Array4::<f32>::ones((1, 1, 2, prob.dv));
    let pos32 = Position::<f32>::Rotary(RotaryW {
        theta: vec![0.0],
        factor: 1.0,
        pairs: vec![(0, 1)],
    });
    let e = attention_forward(
        &prob,
        &pos32,
        None,
        q.view(),
        k.view(),
        v.view(),
        &Control::new(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("overflow float32"), "{e}");
}

/// `Σ P v` that overflows (v = ±1e308 on keys of equal weight, out = 1e308 exactly): `out`
/// came back inf; it is now the overflow error.
#[test]
fn overflowing_weighted_values_are_an_error() {
    let prob = Problem {
        batch: 1,
        ..problem(2, 3, 2, 1, 1)
    };
    let pos = Position::Rotary(rotary(2));
    let q = Array4::<f64>::zeros((1, 1, 2, 2));
    let k = Array4::<f64>::zeros((1, 1, 3, 2));
    let v = Array4::from_elem((1, 1, 3, prob.dv), 1e308);
    let e = attention_forward(
        &prob,
        &pos,
        None,
        q.view(),
        k.view(),
        v.view(),
        &Control::new(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("out, lse: not finite"), "{e}");
}
