//! The exact kernels against a naive twin that materialises every score from the definition.

use super::backward::BackwardInputs;
use super::{attention_backward, attention_forward};
use crate::arch::Isa;
use crate::position::{Bias, Position, RotaryW, SparseW};
use crate::problem::{Control, Problem};
use crate::test_util::Rng;
use ndarray::{Array2, Array3, Array4};

/// `W_δ` as a dense `d x d` matrix, straight from the definitions.
fn w_dense(pos: &Position<'_, f64>, bh: usize, delta: i64, d: usize) -> Array2<f64> {
    let mut w = Array2::zeros((d, d));
    match pos {
        Position::Rotary(r) => {
            let f2 = r.factor * r.factor;
            for (&(p, q), &th) in r.pairs.iter().zip(&r.theta) {
                let (s, c) = (delta as f64 * th).sin_cos();
                w[[p, p]] = f2 * c;
                w[[q, q]] = f2 * c;
                w[[p, q]] = f2 * s;
                w[[q, p]] = -f2 * s;
            }
        }
        Position::Sparse(sp) => {
            let rows = sp.values.dim().1 as i64;
            let row = delta + (rows - 1) / 2;
            if (0..rows).contains(&row) {
                for (s, &(a, b)) in sp.support.iter().enumerate() {
                    w[[a, b]] = sp.values[[sp.index[bh], row as usize, s]];
                }
            }
        }
    }
    w
}

struct Naive {
    out: Array4<f64>,
    lse: Array3<f64>,
    dq: Array4<f64>,
    dk: Array4<f64>,
    dv: Array4<f64>,
    /// dW `(tables, 2L-1, |S|)` for sparse `W`, db `(tables, 2L_b-1)` with a bias.
    dw: Option<Array3<f64>>,
    db: Option<Array2<f64>>,
}

fn naive<'a>(
    prob: &Problem,
    pos: &Position<'a, f64>,
    bias: Option<&Bias<'a, f64>>,
    q: &Array4<f64>,
    k: &Array4<f64>,
    v: &Array4<f64>,
    dout: &Array4<f64>,
) -> Naive {
    let (nq, nk, d, dv) = (prob.nq, prob.nk, prob.d, prob.dv);
    let mut r = Naive {
        out: Array4::zeros((prob.batch, prob.hq, nq, dv)),
        lse: Array3::zeros((prob.batch, prob.hq, nq)),
        dq: Array4::zeros(q.dim()),
        dk: Array4::zeros(k.dim()),
        dv: Array4::zeros(v.dim()),
        dw: match pos {
            Position::Sparse(sp) => Some(Array3::zeros(sp.values.dim())),
            Position::Rotary(_) => None,
        },
        db: bias.map(|bi| Array2::zeros(bi.values.dim())),
    };
    for b in 0..prob.batch {
        for h in 0..prob.hq {
            let bh = b * prob.hq + h;
            let kh = h / prob.group();
            let mut a = Array2::<f64>::zeros((nq, nk));
            for i in 0..nq {
                for j in 0..nk {
                    let delta = prob.q_offset + i as i64 - prob.k_offset - j as i64;
                    let w = w_dense(pos, bh, delta, d);
                    if prob.keeps(delta) {
                        let mut m = 0.0;
                        for x in 0..d {
                            for y in 0..d {
                                m += q[[b, h, i, x]] * w[[x, y]] * k[[b, kh, j, y]];
                            }
                        }
                        let bb = bias.map_or(0.0, |bi| {
                            let rows = bi.values.dim().1 as i64;
                            bi.values[[bi.index[bh], (delta + (rows - 1) / 2) as usize]]
                        });
                        a[[i, j]] = (prob.scale * m + bb).exp();
                    }
                }
            }
            for i in 0..nq {
                let l: f64 = a.row(i).sum();
                r.lse[[b, h, i]] = l.ln();
                if l == 0.0 {
                    continue;
                }
                let p: Vec<f64> = a.row(i).iter().map(|x| x / l).collect();
                for c in 0..dv {
                    r.out[[b, h, i, c]] = (0..nk).map(|j| p[j] * v[[b, kh, j, c]]).sum();
                }
                let di: f64 = (0..dv)
                    .map(|c| dout[[b, h, i, c]] * r.out[[b, h, i, c]])
                    .sum();
                for j in 0..nk {
                    let dp: f64 = (0..dv).map(|c| dout[[b, h, i, c]] * v[[b, kh, j, c]]).sum();
                    let ds = p[j] * (dp - di);
                    for c in 0..dv {
                        r.dv[[b, kh, j, c]] += p[j] * dout[[b, h, i, c]];
                    }
                    if ds == 0.0 {
                        continue;
                    }
                    let w = &w_dense(
                        pos,
                        bh,
                        prob.q_offset + i as i64 - prob.k_offset - j as i64,
                        d,
                    );
                    for x in 0..d {
                        for y in 0..d {
                            r.dq[[b, h, i, x]] += prob.scale * ds * w[[x, y]] * k[[b, kh, j, y]];
                            r.dk[[b, kh, j, y]] += prob.scale * ds * w[[x, y]] * q[[b, h, i, x]];
                        }
                    }
                    let delta = prob.q_offset + i as i64 - prob.k_offset - j as i64;
                    if let (Position::Sparse(sp), Some(dw)) = (pos, r.dw.as_mut()) {
                        let row = delta + (sp.values.dim().1 as i64 - 1) / 2;
                        if (0..sp.values.dim().1 as i64).contains(&row) {
                            for (si, &(l1, l2)) in sp.support.iter().enumerate() {
                                dw[[sp.index[bh], row as usize, si]] +=
                                    prob.scale * ds * q[[b, h, i, l1]] * k[[b, kh, j, l2]];
                            }
                        }
                    }
                    if let (Some(bi), Some(db)) = (bias, r.db.as_mut()) {
                        let row = delta + (bi.values.dim().1 as i64 - 1) / 2;
                        if (0..bi.values.dim().1 as i64).contains(&row) {
                            db[[bi.index[bh], row as usize]] += ds;
                        }
                    }
                }
            }
        }
    }
    r
}

fn max_diff(a: &Array4<f64>, b: &Array4<f64>) -> f64 {
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// [`check_isa`] with every instruction set this CPU has.
fn check<'a>(prob: &Problem, pos: &Position<'a, f64>, bias: Option<&Bias<'a, f64>>, seed: u64) {
    for isa in isas() {
        crate::arch::simd::with_isa(isa, || check_isa(prob, pos, bias, seed));
    }
}

fn isas() -> Vec<Isa> {
    [Isa::Baseline, Isa::Avx2, Isa::Avx512]
        .into_iter()
        .filter(|&i| i <= crate::arch::simd::isa())
        .collect()
}

fn check_isa<'a>(prob: &Problem, pos: &Position<'a, f64>, bias: Option<&Bias<'a, f64>>, seed: u64) {
    check_threads(prob, pos, bias, seed, 2);
}

/// The forward and the backward run for `threads` (which sets the backward's key chunks and
/// waves) against the naive twin; the backward twice, bit for bit the same.
fn check_threads<'a>(
    prob: &Problem,
    pos: &Position<'a, f64>,
    bias: Option<&Bias<'a, f64>>,
    seed: u64,
    threads: usize,
) {
    let isa = crate::arch::simd::call_isa();
    let mut rng = Rng(seed);
    let q = rng.array4((prob.batch, prob.hq, prob.nq, prob.d));
    let k = rng.array4((prob.batch, prob.hk, prob.nk, prob.d));
    let v = rng.array4((prob.batch, prob.hk, prob.nk, prob.dv));
    let dout = rng.array4((prob.batch, prob.hq, prob.nq, prob.dv));
    let ctl = Control::new();
    let (out, lse) =
        attention_forward(prob, pos, bias, q.view(), k.view(), v.view(), &ctl).unwrap();
    let nv = naive(prob, pos, bias, &q, &k, &v, &dout);
    assert!(
        max_diff(&out, &nv.out) < 1e-12,
        "{isa:?}: out differs by {}",
        max_diff(&out, &nv.out)
    );
    for (x, y) in lse.iter().zip(nv.lse.iter()) {
        assert!((x == y) || (x - y).abs() < 1e-12, "lse {x} vs {y}");
    }
    let inp = BackwardInputs {
        out: out.view(),
        lse: lse.view(),
        dout: dout.view(),
        want_dw: true,
        want_dbias: true,
        threads,
    };
    let g = attention_backward(prob, pos, bias, q.view(), k.view(), v.view(), &inp, &ctl).unwrap();
    let again =
        attention_backward(prob, pos, bias, q.view(), k.view(), v.view(), &inp, &ctl).unwrap();
    assert!(g.dq == again.dq && g.dk == again.dk && g.dv == again.dv);
    assert!(g.dw == again.dw && g.dbias == again.dbias);
    assert!(
        max_diff(&g.dq, &nv.dq) < 1e-11,
        "{isa:?}: dq differs by {}",
        max_diff(&g.dq, &nv.dq)
    );
    assert!(
        max_diff(&g.dk, &nv.dk) < 1e-11,
        "{isa:?}: dk differs by {}",
        max_diff(&g.dk, &nv.dk)
    );
    assert!(
        max_diff(&g.dv, &nv.dv) < 1e-11,
        "{isa:?}: dv differs by {}",
        max_diff(&g.dv, &nv.dv)
    );
    let diff = |a: &Array3<f64>, b: &Array3<f64>| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    };
    match (&g.dw, &nv.dw) {
        (Some(a), Some(b)) => assert!(diff(a, b) < 1e-11, "{isa:?}: dw differs by {}", diff(a, b)),
        (None, None) => {}
        _ => panic!("{isa:?}: dw presence differs"),
    }
    match (&g.dbias, &nv.db) {
        (Some(a), Some(b)) => {
            let e = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max);
            assert!(e < 1e-11, "{isa:?}: dbias differs by {e}");
        }
        (None, None) => {}
        _ => panic!("{isa:?}: dbias presence differs"),
    }
}

fn problem(nq: usize, nk: usize, d: usize, hq: usize, hk: usize) -> Problem {
    Problem {
        batch: 2,
        hq,
        hk,
        nq,
        nk,
        d,
        dv: 3,
        scale: 0.4,
        causal: false,
        window: None,
        q_offset: 0,
        k_offset: 0,
    }
}

fn rotary(d: usize) -> RotaryW {
    RotaryW {
        theta: (0..d / 2)
            .map(|m| 10000f64.powf(-2.0 * m as f64 / d as f64))
            .collect(),
        factor: 1.1,
        pairs: (0..d / 2).map(|m| (m, m + d / 2)).collect(),
    }
}

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
fn sparse_matches_naive_with_bias_window_and_per_head_tables() {
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

/// BlockW's support: per pair `(p,p), (p,r), (r,p), (r,r)`.
fn block_support(pairs: &[(usize, usize)]) -> Vec<(usize, usize)> {
    pairs
        .iter()
        .flat_map(|&(p, r)| [(p, p), (p, r), (r, p), (r, r)])
        .collect()
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
fn blockw_matches_naive_with_bias_and_masks() {
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

#[test]
fn backward_for_every_thread_count_matches_naive_and_repeats_exactly() {
    // Many key tiles: the key chunks and the waves (direct dq and partials) vary with threads.
    let mut prob = problem(60, 400, 8, 4, 2);
    prob.dv = 16;
    prob.causal = true;
    prob.q_offset = 340;
    let d = 8;
    let l = 460usize;
    let support = block_support(&(0..d / 2).map(|m| (2 * m, 2 * m + 1)).collect::<Vec<_>>());
    let mut rng = Rng(31);
    let values = Array3::from_shape_fn((1, 2 * l - 1, support.len()), |_| rng.next());
    let sp = SparseW {
        support,
        values: values.view(),
        index: vec![0; 8],
    };
    for threads in [1, 2, 3] {
        check_threads(&prob, &Position::Rotary(rotary(d)), None, 32, threads);
        check_threads(&prob, &Position::Sparse(sp.clone()), None, 33, threads);
    }
}

#[test]
fn segmented_tables_match_naive() {
    // The forward builds the diagonal sequences per tile, as it does for long calls.
    super::sparse::FORCE_SEGMENTS.with(|f| f.set(1));
    blockw_matches_naive_with_bias_and_masks();
    sparse_matches_naive_with_bias_window_and_per_head_tables();
    super::sparse::FORCE_SEGMENTS.with(|f| f.set(2));
    let mut prob = problem(60, 400, 8, 4, 2);
    prob.dv = 16;
    prob.window = Some((300, 40));
    prob.q_offset = 200;
    let d = 8;
    let l = 460usize;
    let support = block_support(&(0..d / 2).map(|m| (m, m + d / 2)).collect::<Vec<_>>());
    let mut rng = Rng(41);
    let values = Array3::from_shape_fn((2, 2 * l - 1, support.len()), |_| rng.next());
    let sp = SparseW {
        support,
        values: values.view(),
        index: vec![0, 1, 1, 0, 1, 1, 0, 0],
    };
    check(&prob, &Position::Sparse(sp.clone()), None, 42);
    prob.nk = 1100;
    prob.q_offset = 1000;
    check(&prob, &Position::Sparse(sp), None, 43);
    super::sparse::FORCE_SEGMENTS.with(|f| f.set(0));
}

#[test]
fn backward_in_query_chunks_and_tile_segments_matches_naive() {
    // Query chunks of one block (units of a key chunk against a query chunk, some fully
    // masked), with the sparse sequences whole and built per tile.
    super::backward::PART_BUDGET_OVERRIDE.with(|b| b.set(Some(1)));
    let d = 8;
    let l = 400usize;
    let support = block_support(&(0..d / 2).map(|m| (2 * m, 2 * m + 1)).collect::<Vec<_>>());
    let mut rng = Rng(51);
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
    for seg in [0, 1] {
        super::sparse::FORCE_SEGMENTS.with(|f| f.set(seg));
        let mut prob = problem(300, 270, d, 4, 2);
        prob.batch = 1;
        prob.dv = 16;
        prob.causal = true;
        check_threads(&prob, &Position::Rotary(rotary(d)), None, 52, 2);
        check_threads(&prob, &Position::Sparse(sp.clone()), Some(&bias), 53, 3);
        prob.causal = false;
        prob.window = Some((100, 20));
        prob.q_offset = -20;
        check_threads(&prob, &Position::Sparse(sp.clone()), None, 54, 2);
    }
    super::sparse::FORCE_SEGMENTS.with(|f| f.set(0));
    super::backward::PART_BUDGET_OVERRIDE.with(|b| b.set(None));
}

// ------------------------------------------------------------------------------------------------
// The decode path (n_q <= decode::MAX_ROWS).

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
    use super::attention_forward_checked;
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
    use super::attention_forward_checked;
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
        assert!(super::decode::applies(
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
    assert!(!super::decode::applies(
        1,
        &Position::Sparse(SparseW {
            support: overlap.clone(),
            values: Array3::<f64>::zeros((1, 1, overlap.len())).view(),
            index: vec![0],
        })
    ));
}
