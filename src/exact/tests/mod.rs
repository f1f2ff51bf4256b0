//! The exact kernels against a naive twin that materialises every score from the definition
//! (the twin and the fixtures here; the tests by topic in the submodules).

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
    // A small call's forward on the calling thread alone: the same units, bit for bit.
    let serial = Control::serial();
    let (out_s, lse_s) =
        attention_forward(prob, pos, bias, q.view(), k.view(), v.view(), &serial).unwrap();
    assert!(
        out_s == out && lse_s == lse,
        "{isa:?}: the serial forward differs"
    );
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

/// BlockW's support: per pair `(p,p), (p,r), (r,p), (r,r)`.
fn block_support(pairs: &[(usize, usize)]) -> Vec<(usize, usize)> {
    pairs
        .iter()
        .flat_map(|&(p, r)| [(p, p), (p, r), (r, p), (r, r)])
        .collect()
}

mod backward;
mod decode;
mod forward;
mod miri;

/// The finiteness scan (`check_rows_of`, SIMD lanes over contiguous rows) finds a NaN or an Inf
/// at any position, the tail after the last whole vector included, and passes the largest
/// finite values, in both dtypes and on strided rows.
#[test]
fn the_finiteness_scan_finds_every_bad_entry_and_passes_huge_finite_ones() {
    fn run<T: crate::arch::Real>(big: T) {
        let (b, h, n, d) = (1, 2, 7, 19); // 7 x 19 = 133 entries a head: not a multiple of W
        let x = Array4::from_elem((b, h, n, d), big);
        assert!(super::check_rows_of("k", &x.view(), 0, n, true).is_ok());
        let bad = [T::nan(), T::infinity(), T::neg_infinity()];
        for (i, &v) in bad.iter().enumerate() {
            for at in [0, 15, 16, 17, 64, 127, 128, 132] {
                let mut y = x.clone();
                y[[0, 1, at / d, at % d]] = v;
                let e = super::check_rows_of("k", &y.view(), 0, n, i % 2 == 0);
                assert!(e.is_err(), "entry {at} = {v:?} not found");
                // outside the rows scanned it is not looked at
                assert!(super::check_rows_of("k", &y.view(), 0, at / d, true).is_ok());
                // strided rows (every other column) take the element-wise scan
                let s = y.slice(ndarray::s![.., .., .., ..;2]);
                let found = super::check_rows_of("k", &s, 0, n, true).is_err();
                assert_eq!(found, (at % d) % 2 == 0, "strided entry {at}");
            }
        }
    }
    run::<f32>(f32::MAX);
    run::<f64>(-f64::MAX);
}
