//! Small calls for Miri (`make miri`: names starting `miri_`), one per path through the unsafe
//! code of the exact method: the GEMM-path forward and backward (packed panels, score strips,
//! micro-kernels), sparse `W` (diagonal kernels, padded sequences, whole and segmented tables),
//! BlockW's 2x2-block kernel, the decode path (rotary and BlockW keys), float32, strided
//! inputs. Sizes a few rows past one micro-tile so the edge tiles run too; Miri is ~1000x
//! slower than a native test, so the other tests of this module are too big for it.

use super::*;
use crate::exact::sparse::FORCE_SEGMENTS;

/// One forward and one backward against the naive twin (`check` runs each twice and on every
/// instruction set: too slow under Miri).
fn once<'a>(prob: &Problem, pos: &Position<'a, f64>, bias: Option<&Bias<'a, f64>>, seed: u64) {
    let mut rng = Rng(seed);
    let q = rng.array4((prob.batch, prob.hq, prob.nq, prob.d));
    let k = rng.array4((prob.batch, prob.hk, prob.nk, prob.d));
    let v = rng.array4((prob.batch, prob.hk, prob.nk, prob.dv));
    let dout = rng.array4((prob.batch, prob.hq, prob.nq, prob.dv));
    let ctl = Control::new();
    let (out, lse) =
        attention_forward(prob, pos, bias, q.view(), k.view(), v.view(), &ctl).unwrap();
    let nv = naive(prob, pos, bias, &q, &k, &v, &dout);
    assert!(max_diff(&out, &nv.out) < 1e-12, "out");
    for (x, y) in lse.iter().zip(nv.lse.iter()) {
        assert!((x == y) || (x - y).abs() < 1e-12, "lse {x} vs {y}");
    }
    let inp = BackwardInputs {
        out: out.view(),
        lse: lse.view(),
        dout: dout.view(),
        want_dw: true,
        want_dbias: true,
        threads: 2,
    };
    let g = attention_backward(prob, pos, bias, q.view(), k.view(), v.view(), &inp, &ctl).unwrap();
    for (name, a, b) in [
        ("dq", &g.dq, &nv.dq),
        ("dk", &g.dk, &nv.dk),
        ("dv", &g.dv, &nv.dv),
    ] {
        assert!(
            max_diff(a, b) < 1e-11,
            "{name} differs by {}",
            max_diff(a, b)
        );
    }
}

#[test]
fn miri_rotary_forward_and_backward() {
    let prob = Problem {
        causal: true,
        q_offset: 4,
        batch: 1,
        ..problem(6, 9, 4, 2, 1)
    };
    once(&prob, &Position::Rotary(rotary(4)), None, 101);
}

/// Two random tables of `2l - 1` rows for a support of `ns` entries.
fn tables(rng: &mut Rng, ns: usize, l: usize) -> Array3<f64> {
    Array3::from_shape_fn((2, 2 * l - 1, ns), |_| rng.next())
}

#[test]
fn miri_sparse_with_bias_whole_and_segmented_tables() {
    let prob = Problem {
        window: Some((6, 3)),
        q_offset: 2,
        batch: 1,
        ..problem(5, 8, 3, 2, 1)
    };
    let mut rng = Rng(102);
    let support = vec![(0, 0), (0, 2), (1, 1), (2, 0), (2, 1)];
    let values = tables(&mut rng, support.len(), 16);
    let sp = SparseW {
        support,
        values: values.view(),
        index: vec![0, 1],
    };
    let bvals = Array2::from_shape_fn((1, 31), |_| rng.next());
    let bias = Bias {
        values: bvals.view(),
        index: vec![0; 2],
    };
    once(&prob, &Position::Sparse(sp.clone()), Some(&bias), 103);
    FORCE_SEGMENTS.with(|f| f.set(1));
    once(&prob, &Position::Sparse(sp), Some(&bias), 104);
    FORCE_SEGMENTS.with(|f| f.set(0));
}

#[test]
fn miri_blockw_forward_and_backward() {
    let prob = Problem {
        causal: true,
        k_offset: -2,
        batch: 1,
        ..problem(5, 8, 4, 2, 2)
    };
    let mut rng = Rng(105);
    let support = block_support(&[(0, 1), (2, 3)]);
    let values = tables(&mut rng, support.len(), 16);
    let sp = SparseW {
        support,
        values: values.view(),
        index: vec![1, 0],
    };
    once(&prob, &Position::Sparse(sp), None, 106);
}

#[test]
fn miri_decode_rotary_and_blockw() {
    let prob = Problem {
        q_offset: 8,
        batch: 1,
        ..problem(1, 9, 4, 2, 1)
    };
    once(&prob, &Position::Rotary(rotary(4)), None, 107);
    let mut rng = Rng(108);
    let support = block_support(&[(0, 2), (1, 3)]);
    let values = tables(&mut rng, support.len(), 16);
    let sp = SparseW {
        support,
        values: values.view(),
        index: vec![0, 1],
    };
    let prob = Problem {
        nq: 2,
        window: Some((9, 0)),
        q_offset: 9,
        ..prob
    };
    once(&prob, &Position::Sparse(sp), None, 109);
}

#[test]
fn miri_float32_and_strided_inputs() {
    let prob = Problem {
        causal: true,
        q_offset: 3,
        batch: 1,
        ..problem(5, 7, 4, 2, 1)
    };
    let mut rng = Rng(110);
    // q and k as views with a row stride of 2 (every other row of a taller array).
    let q2 = rng.array4((1, 2, 10, 4));
    let k2 = rng.array4((1, 1, 14, 4));
    let v = rng.array4((1, 1, 7, 3));
    let q = q2.slice(ndarray::s![.., .., ..;2, ..]);
    let k = k2.slice(ndarray::s![.., .., ..;2, ..]);
    let pos = Position::Rotary(rotary(4));
    let ctl = Control::new();
    let (out, lse) = attention_forward(&prob, &pos, None, q, k, v.view(), &ctl).unwrap();
    let (qc, kc) = (q.to_owned(), k.to_owned());
    let dout = Array4::zeros(out.dim());
    let nv = naive(&prob, &pos, None, &qc, &kc, &v, &dout);
    assert!(max_diff(&out, &nv.out) < 1e-12);
    for (x, y) in lse.iter().zip(nv.lse.iter()) {
        assert!((x == y) || (x - y).abs() < 1e-12, "lse {x} vs {y}");
    }
    let (q32, k32, v32) = (
        qc.mapv(|x| x as f32),
        kc.mapv(|x| x as f32),
        v.mapv(|x| x as f32),
    );
    let pos32: Position<'_, f32> = Position::Rotary(rotary(4));
    let (out32, _) = attention_forward(
        &prob,
        &pos32,
        None,
        q32.view(),
        k32.view(),
        v32.view(),
        &ctl,
    )
    .unwrap();
    let e = max_diff(&out32.mapv(|x| x as f64), &nv.out);
    assert!(e < 1e-5, "float32 out differs by {e}");
}
