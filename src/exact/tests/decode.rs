//! The decode path (`n_q <= decode::MAX_ROWS`) against the naive twin: rotary layouts, GQA,
//! masks, bias, strided keys and values, float32, the calling thread, finiteness checks.

use super::*;

fn rotary_layout(d: usize, layout: &str, factor: f64) -> RotaryW {
    let h = d / 2;
    let pairs = match layout {
        "interleaved" => (0..h).map(|m| (2 * m, 2 * m + 1)).collect(),
        "half" => (0..h).map(|m| (m, m + h)).collect(),
        // any partition: pair m is (m, d - 1 - m), reversed every other pair
        _ => (0..h)
            .map(|m| {
                if m % 2 == 0 {
                    (m, d - 1 - m)
                } else {
                    (d - 1 - m, m)
                }
            })
            .collect(),
    };
    RotaryW {
        theta: (0..h)
            .map(|m| 10000f64.powf(-2.0 * m as f64 / d as f64))
            .collect(),
        factor,
        pairs,
    }
}

/// The forward for every instruction set against the naive twin (computed once).
fn check_forward<'a>(
    prob: &Problem,
    pos: &Position<'a, f64>,
    bias: Option<&Bias<'a, f64>>,
    seed: u64,
) {
    let mut rng = Rng(seed);
    let q = rng.array4((prob.batch, prob.hq, prob.nq, prob.d));
    let k = rng.array4((prob.batch, prob.hk, prob.nk, prob.d));
    let v = rng.array4((prob.batch, prob.hk, prob.nk, prob.dv));
    let dout = Array4::zeros((prob.batch, prob.hq, prob.nq, prob.dv));
    let nv = naive(prob, pos, bias, &q, &k, &v, &dout);
    for isa in isas() {
        crate::arch::simd::with_isa(isa, || {
            let (out, lse) = attention_forward(
                prob,
                pos,
                bias,
                q.view(),
                k.view(),
                v.view(),
                &Control::new(),
            )
            .unwrap();
            let e = max_diff(&out, &nv.out);
            assert!(e < 1e-12, "{isa:?} {prob:?}: out differs by {e}");
            for (x, y) in lse.iter().zip(nv.lse.iter()) {
                assert!((x == y) || (x - y).abs() < 1e-12, "{isa:?}: lse {x} vs {y}");
            }
        });
    }
}

#[test]
fn decode_matches_naive_for_layouts_gqa_masks_and_bias() {
    let mut seed = 100;
    for (nq, d, layout) in [
        (1, 4, "interleaved"),
        (4, 6, "half"),
        (2, 18, "interleaved"),
        (1, 32, "half"),
        (3, 20, "half"),
        (1, 10, "general"),
        (2, 16, "identity"),
        (1, 6, "identity"),
    ] {
        let pos = if layout == "identity" {
            RotaryW {
                theta: vec![0.0; d / 2],
                ..rotary_layout(d, "interleaved", 1.3)
            }
        } else {
            rotary_layout(d, layout, 1.1)
        };
        let pos = Position::Rotary(pos);
        // 700 keys: two spans per kv head, merged.
        let base = Problem {
            dv: if d % 4 == 0 { 16 } else { 5 },
            ..problem(nq, 700, d, 4, 2)
        };
        seed += 1;
        check_forward(&base, &pos, None, seed);
        let causal = Problem {
            causal: true,
            q_offset: 700 - nq as i64 + 7,
            k_offset: 7,
            ..base
        };
        seed += 1;
        check_forward(&causal, &pos, None, seed);
        let window = Problem {
            window: Some((300, 2)),
            q_offset: 500,
            ..base
        };
        seed += 1;
        check_forward(&window, &pos, None, seed);
        let l = 800usize;
        let mut rng = Rng(seed);
        let bvals = Array2::from_shape_fn((2, 2 * l - 1), |_| rng.next());
        let bias = Bias {
            values: bvals.view(),
            index: vec![0, 1, 1, 0, 1, 1, 0, 0],
        };
        seed += 1;
        check_forward(&base, &pos, Some(&bias), seed);
    }
    // The backward of a one-row call (the GEMM path's), with GQA and a bias.
    let prob = Problem {
        causal: true,
        q_offset: 90,
        ..problem(1, 100, 8, 4, 2)
    };
    check(
        &prob,
        &Position::Rotary(rotary_layout(8, "interleaved", 1.0)),
        None,
        9,
    );
}

#[test]
fn decode_reads_strided_keys_and_values() {
    let prob = Problem {
        dv: 16,
        causal: true,
        q_offset: 700,
        ..problem(2, 900, 32, 2, 2)
    };
    let mut rng = Rng(77);
    let q = rng.array4((2, 2, 2, 32));
    let k = rng.array4((2, 2, 900, 32));
    let v = rng.array4((2, 2, 900, 16));
    // The same values with rows that are not contiguous (columns 900 apart).
    let kt = k
        .view()
        .permuted_axes([0, 1, 3, 2])
        .as_standard_layout()
        .into_owned();
    let vt = v
        .view()
        .permuted_axes([0, 1, 3, 2])
        .as_standard_layout()
        .into_owned();
    let ks = kt.view().permuted_axes([0, 1, 3, 2]);
    let vs = vt.view().permuted_axes([0, 1, 3, 2]);
    assert!(ks.strides()[3] != 1 && vs.strides()[3] != 1);
    for pos in [
        Position::Rotary(rotary_layout(32, "interleaved", 1.0)),
        Position::Rotary(RotaryW {
            theta: vec![0.0; 16],
            ..rotary_layout(32, "half", 1.0)
        }),
    ] {
        for isa in isas() {
            crate::arch::simd::with_isa(isa, || {
                let ctl = Control::new();
                let (a, la) =
                    attention_forward(&prob, &pos, None, q.view(), k.view(), v.view(), &ctl)
                        .unwrap();
                let (b, lb) = attention_forward(&prob, &pos, None, q.view(), ks, vs, &ctl).unwrap();
                assert!(max_diff(&a, &b) < 1e-13, "{isa:?}: {}", max_diff(&a, &b));
                assert!(la.iter().zip(lb.iter()).all(|(x, y)| (x - y).abs() < 1e-13));
            });
        }
    }
}

#[test]
fn decode_float32_matches_naive_every_isa() {
    for (d, layout) in [(64, "interleaved"), (128, "half"), (24, "interleaved")] {
        let prob = Problem {
            dv: 64,
            causal: true,
            q_offset: 1199,
            ..problem(1, 1200, d, 8, 2)
        };
        let rot = rotary_layout(d, layout, 1.0);
        let pos64 = Position::Rotary(rot.clone());
        let pos32: Position<'_, f32> = Position::Rotary(rot);
        let mut rng = Rng(5 + d as u64);
        let q = rng.array4((2, 8, 1, d));
        let k = rng.array4((2, 2, 1200, d));
        let v = rng.array4((2, 2, 1200, 64));
        let nv = naive(
            &prob,
            &pos64,
            None,
            &q,
            &k,
            &v,
            &Array4::zeros((2, 8, 1, 64)),
        );
        let f = |x: &Array4<f64>| x.mapv(|y| y as f32);
        let (q32, k32, v32) = (f(&q), f(&k), f(&v));
        for isa in isas() {
            crate::arch::simd::with_isa(isa, || {
                let (out, _) = attention_forward(
                    &prob,
                    &pos32,
                    None,
                    q32.view(),
                    k32.view(),
                    v32.view(),
                    &Control::new(),
                )
                .unwrap();
                let e = max_diff(&out.mapv(|x| x as f64), &nv.out);
                assert!(e < 2e-6, "{isa:?} d={d}: out differs by {e}");
            });
        }
    }
}

#[test]
fn finiteness_check_names_the_array_and_skips_unseen_rows() {
    use crate::exact::attention_forward_checked;
    // n_q = 1 runs the decode path (checks as it reads), n_q = 20 the GEMM path (scans first).
    for nq in [1usize, 20] {
        let prob = Problem {
            causal: true,
            q_offset: 100,
            ..problem(nq, 200, 16, 2, 1)
        };
        for identity in [false, true] {
            let mut r = rotary_layout(16, "interleaved", 1.0);
            if identity {
                r.theta = vec![0.0; 8];
            }
            let pos = Position::Rotary(r);
            let mut rng = Rng(3);
            let q = rng.array4((2, 2, nq, 16));
            let k0 = rng.array4((2, 1, 200, 16));
            let v0 = rng.array4((2, 1, 200, 3));
            let run = |k: &Array4<f64>, v: &Array4<f64>| {
                attention_forward_checked(
                    &prob,
                    &pos,
                    None,
                    q.view(),
                    k.view(),
                    v.view(),
                    &Control::new(),
                    true,
                )
            };
            assert!(run(&k0, &v0).is_ok());
            for (name, row, bad, word) in [
                ("k", 50, f64::NAN, "NaN"),
                ("k", 100, f64::INFINITY, "Inf"),
                ("v", 3, f64::NEG_INFINITY, "Inf"),
                ("v", 0, f64::NAN, "NaN"),
            ] {
                let (mut k, mut v) = (k0.clone(), v0.clone());
                match name {
                    "k" => k[[1, 0, row, 5]] = bad,
                    _ => v[[1, 0, row, 2]] = bad,
                }
                let msg = match run(&k, &v) {
                    Err(crate::error::Error::Value(m)) => m,
                    other => panic!("nq {nq}: {name}[{row}] = {bad}: {:?}", other.map(|_| ())),
                };
                assert!(
                    msg.starts_with(&format!("{name}: ")) && msg.contains(word),
                    "{msg}"
                );
                // Without the check the call runs (the result is then undefined).
                assert!(attention_forward(
                    &prob,
                    &pos,
                    None,
                    q.view(),
                    k.view(),
                    v.view(),
                    &Control::new()
                )
                .is_ok());
            }
            // Keys after the last query's position are masked for every query: not read.
            let (mut k, mut v) = (k0.clone(), v0.clone());
            let last = 100 + nq - 1;
            k[[0, 0, last + 1, 0]] = f64::NAN;
            v[[0, 0, 199, 0]] = f64::INFINITY;
            assert!(run(&k, &v).is_ok(), "nq {nq}");
        }
    }
}

#[test]
fn decode_on_the_calling_thread_matches_the_pool() {
    use crate::exact::attention_forward_checked;
    let prob = Problem {
        dv: 8,
        causal: true,
        q_offset: 1999,
        ..problem(1, 2000, 16, 4, 2)
    };
    let pos = Position::Rotary(rotary_layout(16, "interleaved", 1.0));
    let mut rng = Rng(11);
    let q = rng.array4((2, 4, 1, 16));
    let k = rng.array4((2, 2, 2000, 16));
    let v = rng.array4((2, 2, 2000, 8));
    let run = |ctl: &Control| {
        attention_forward_checked(&prob, &pos, None, q.view(), k.view(), v.view(), ctl, true)
            .unwrap()
    };
    // One span per kv head against several spans merged.
    let (a, la) = run(&Control::serial());
    let (b, lb) = run(&Control::new());
    assert!(max_diff(&a, &b) < 1e-13, "{}", max_diff(&a, &b));
    assert!(la.iter().zip(lb.iter()).all(|(x, y)| (x - y).abs() < 1e-13));
}

#[test]
fn decode_blockw_matches_naive_for_layouts_tables_and_masks() {
    let mut rng = Rng(41);
    for (d, layout) in [
        (16, "interleaved"),
        (12, "half"),
        (10, "general"),
        (6, "partial"),
    ] {
        let pairs: Vec<(usize, usize)> = match layout {
            "interleaved" => (0..d / 2).map(|m| (2 * m, 2 * m + 1)).collect(),
            "half" => (0..d / 2).map(|m| (m, m + d / 2)).collect(),
            // any disjoint pairs, and (partial) lanes in no pair at all
            "general" => rotary_layout(d, "general", 1.0).pairs,
            _ => vec![(4, 1), (0, 5)],
        };
        let support = block_support(&pairs);
        assert!(crate::exact::decode::applies(
            1,
            &Position::Sparse(SparseW {
                support: support.clone(),
                values: Array3::<f64>::zeros((1, 1, support.len())).view(),
                index: vec![0],
            })
        ));
        let l = 700usize;
        // Strided values (every other δ row of a larger table) for one of the layouts.
        let big = Array3::from_shape_fn((3, 2 * (2 * l - 1), support.len()), |_| rng.next());
        let values = if layout == "half" {
            big.slice(ndarray::s![..2, ..;2, ..]).to_owned()
        } else {
            big.slice(ndarray::s![..2, ..2 * l - 1, ..]).to_owned()
        };
        for (nq, causal, window, q_offset) in [
            (1, true, None, 640),
            (3, false, Some((200, 4)), 400),
            (2, false, None, -20),
        ] {
            let prob = Problem {
                causal,
                window,
                q_offset,
                k_offset: 3,
                dv: 7,
                ..problem(nq, 650, d, 4, 2)
            };
            let sp = SparseW {
                support: support.clone(),
                values: values.view(),
                index: vec![1, 0, 0, 1, 1, 1, 0, 0],
            };
            let bvals = Array2::from_shape_fn((1, 2 * l - 1), |_| 0.3 * rng.next());
            let bias = Bias {
                values: bvals.view(),
                index: vec![0; 8],
            };
            check_forward(
                &prob,
                &Position::Sparse(sp.clone()),
                Some(&bias),
                50 + nq as u64,
            );
            check_forward(&prob, &Position::Sparse(sp), None, 60 + nq as u64);
        }
    }
    // Overlapping pairs are not 2x2 blocks on disjoint lanes: the GEMM path takes them.
    let overlap = block_support(&[(0, 1), (1, 2)]);
    assert!(!crate::exact::decode::applies(
        1,
        &Position::Sparse(SparseW {
            support: overlap.clone(),
            values: Array3::<f64>::zeros((1, 1, overlap.len())).view(),
            index: vec![0],
        })
    ));
}

/// A BlockW decode call whose table covers only the visible δ (fuzz/regressions/exact/
/// crash-2081f6…): a key chunk spans the keys any row of the unit sees, so for another row a
/// key of the chunk can lie outside the table (a δ its window drops). The table build asserted
/// every key's row was in the table; such keys now get a zero transform, masked as before.
#[test]
fn decode_blockw_with_a_table_that_covers_only_the_visible_deltas() {
    let mut rng = Rng(61);
    let support = block_support(&[(0, 1), (2, 3)]);
    for (nq, window, causal) in [(2, (2, 0), false), (4, (3, 1), false), (3, (5, 0), true)] {
        let prob = Problem {
            window: Some(window),
            causal,
            q_offset: 9,
            ..problem(nq, 16, 4, 2, 1)
        };
        // rows 2 L - 1 with L - 1 = max(left, right): exactly the visible δ range
        let half = window.0.max(window.1) as usize;
        let values = Array3::from_shape_fn((1, 2 * half + 1, support.len()), |_| rng.next());
        let sp = SparseW {
            support: support.clone(),
            values: values.view(),
            index: vec![0; 4],
        };
        assert!(crate::exact::decode::applies(
            nq,
            &Position::Sparse(sp.clone())
        ));
        check(&prob, &Position::Sparse(sp), None, 62);
    }
}

/// BlockW decode at `q_offset = k_offset = i64::MAX` (fuzz/regressions/exact/crash-1a827c…):
/// every relative position is small, but `q_offset + i` overflowed in the δ of a row. Only
/// relative positions matter to a table: the result is that of offsets 0, bit for bit.
#[test]
fn decode_blockw_at_offsets_near_i64_max_matches_offsets_zero() {
    let mut rng = Rng(63);
    let support = block_support(&[(0, 1)]);
    let values = Array3::from_shape_fn((1, 5, support.len()), |_| rng.next());
    let sp = SparseW {
        support,
        values: values.view(),
        index: vec![0],
    };
    let pos = Position::Sparse(sp);
    let base = Problem {
        batch: 1,
        hq: 1,
        hk: 1,
        ..problem(2, 2, 2, 1, 1)
    };
    let q = rng.array4((1, 1, 2, 2));
    let k = rng.array4((1, 1, 2, 2));
    let v = rng.array4((1, 1, 2, 3));
    let run = |p: &Problem| {
        attention_forward(p, &pos, None, q.view(), k.view(), v.view(), &Control::new()).unwrap()
    };
    let want = run(&base);
    let far = Problem {
        q_offset: i64::MAX,
        k_offset: i64::MAX,
        ..base
    };
    assert_eq!(run(&far), want);
}
