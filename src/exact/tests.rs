//! The exact kernels against a naive twin that materialises every score from the definition.

use super::backward::BackwardInputs;
use super::{attention_backward, attention_forward};
use crate::position::{Bias, Position, RotaryW, SparseW};
use crate::problem::{Control, Problem};
use ndarray::{Array2, Array3, Array4};

/// xorshift64*: deterministic test data without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
    fn array4(&mut self, s: (usize, usize, usize, usize)) -> Array4<f64> {
        Array4::from_shape_fn(s, |_| self.next())
    }
}

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
    };
    for b in 0..prob.batch {
        for h in 0..prob.hq {
            let bh = b * prob.hq + h;
            let kh = h / prob.group();
            let mut a = Array2::<f64>::zeros((nq, nk));
            let mut ws = Vec::new();
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
                    ws.push(w);
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
                    let w = &ws[i * nk + j];
                    for c in 0..dv {
                        r.dv[[b, kh, j, c]] += p[j] * dout[[b, h, i, c]];
                    }
                    for x in 0..d {
                        for y in 0..d {
                            r.dq[[b, h, i, x]] += prob.scale * ds * w[[x, y]] * k[[b, kh, j, y]];
                            r.dk[[b, kh, j, y]] += prob.scale * ds * w[[x, y]] * q[[b, h, i, x]];
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

fn check<'a>(prob: &Problem, pos: &Position<'a, f64>, bias: Option<&Bias<'a, f64>>, seed: u64) {
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
        "out differs by {}",
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
        threads: 2,
    };
    let g = attention_backward(prob, pos, bias, q.view(), k.view(), v.view(), &inp, &ctl).unwrap();
    assert!(
        max_diff(&g.dq, &nv.dq) < 1e-11,
        "dq differs by {}",
        max_diff(&g.dq, &nv.dq)
    );
    assert!(
        max_diff(&g.dk, &nv.dk) < 1e-11,
        "dk differs by {}",
        max_diff(&g.dk, &nv.dk)
    );
    assert!(
        max_diff(&g.dv, &nv.dv) < 1e-11,
        "dv differs by {}",
        max_diff(&g.dv, &nv.dv)
    );
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
