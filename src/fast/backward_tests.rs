//! The fast backward against its naive twins, the exact gradient and finite differences of the
//! fast forward (fixed seeds; tolerances are the certificate itself).

use super::grad::*;
use super::grad_bounds::*;
use super::naive::polynomial_head;
use super::naive_backward::{exact_head_grad, polynomial_head_grad, NaiveGrads};
use super::plans::*;
use super::toeplitz::backward::*;
use super::toeplitz::*;
use super::*;
use crate::poly::{taylor, WNorms};
use crate::test_util::head::{mask, rotary, Owned};
use crate::test_util::rng;
use ndarray::{Array2, ArrayView2};

fn sparse(nq: usize, nk: usize, d: usize, dv: usize, ns: usize, seed: u64) -> Owned {
    let mut u = rng(seed);
    let glen = nq + nk - 1;
    let mut support: Vec<(usize, usize)> = Vec::new();
    while support.len() < ns {
        let e = (
            ((u() + 1.0) * 0.5 * d as f64) as usize % d,
            ((u() + 1.0) * 0.5 * d as f64) as usize % d,
        );
        if !support.contains(&e) {
            support.push(e);
        }
    }
    Owned {
        q: Array2::from_shape_fn((nq, d), |_| 0.8 * u()),
        k: Array2::from_shape_fn((nk, d), |_| 0.8 * u()),
        v: Array2::from_shape_fn((nk, dv), |_| 2.0 * u()),
        dout: Array2::from_shape_fn((nq, dv), |_| u()),
        scale: 0.7,
        seqs: Array2::from_shape_fn((ns, glen), |_| 0.8 * u()),
        support,
        factor: vec![1.0; glen],
    }
}

fn max_diff(a: ArrayView2<f64>, b: ArrayView2<f64>) -> f64 {
    assert_eq!(a.shape(), b.shape());
    a.iter()
        .zip(b.iter())
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
}

fn vmax_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
}

/// Errors of a fast result against a naive one, per gradient (dw/db only where visible).
fn errors(f: &FastGrads, n: &NaiveGrads, factor: &[f64]) -> Grad5 {
    let mut e = Grad5 {
        dq: max_diff(f.dq.view(), n.dq.view()),
        dk: max_diff(f.dk.view(), n.dk.view()),
        dv: max_diff(f.dv.view(), n.dv.view()),
        dw: 0.0,
        db: 0.0,
    };
    if let Some(dw) = &f.dw {
        for s in 0..dw.nrows() {
            for (g, &fg) in factor.iter().enumerate() {
                let x = (dw[[s, g]] - n.dw[[s, g]]).abs();
                assert!(
                    fg > 0.0 || dw[[s, g]].abs() < 1e-9,
                    "masked dw {}",
                    dw[[s, g]]
                );
                e.dw = e.dw.max(x);
            }
        }
    }
    if let Some(db) = &f.dbias {
        e.db = vmax_diff(db, &n.dbias);
    }
    e
}

fn magnitude(n: &NaiveGrads) -> f64 {
    [&n.dq, &n.dk, &n.dv, &n.dw]
        .iter()
        .map(|a| a.iter().fold(0.0f64, |m, x| m.max(x.abs())))
        .fold(n.dbias.iter().fold(0.0f64, |m, x| m.max(x.abs())), f64::max)
}

const ALL: Want = Want { dw: true, db: true };

/// Fast backward with a forced Taylor polynomial against the gradient of the polynomial
/// forward: the same function, so only rounding separates them.
fn check_polynomial(o: &Owned, degree: usize, want: Want) {
    let p = o.prob();
    let b = FastBounds::from_problem(&p).unwrap();
    let poly = taylor(b.r, degree).unwrap();
    let f =
        fast_backward_head(&p, o.dout(), 1e6, want, &FastLimits::default(), Some(&poly)).unwrap();
    let n = polynomial_head_grad(&p, &poly.coeffs, o.dout());
    let tol = 1e-10 * magnitude(&n).max(1.0);
    let e = errors(&f, &n, &o.factor);
    assert!(e.max_entry() <= tol, "errors {e:?} > {tol:e}");
    let (out, _) = polynomial_head(&p, &poly.coeffs);
    assert!(max_diff(f.out.view(), out.view()) < 1e-11);
    assert_eq!(f.dw.is_some(), want.dw);
    assert_eq!(f.dbias.is_some(), want.db);
}

#[test]
fn gradient_of_the_polynomial_forward_rotary_and_sparse() {
    check_polynomial(&rotary(37, 41, 4, 3, 0, 1.0, 1), 5, ALL);
    check_polynomial(&rotary(30, 30, 2, 2, 3, 1.0, 2), 7, Want::default());
    check_polynomial(&sparse(29, 23, 3, 4, 5, 3), 4, ALL);
    check_polynomial(
        &sparse(16, 20, 2, 1, 4, 4),
        6,
        Want {
            dw: true,
            db: false,
        },
    );
}

#[test]
fn gradient_of_the_polynomial_forward_masks_bias_offsets() {
    let mut o = rotary(40, 40, 2, 3, 0, 1.0, 5);
    mask(&mut o, 0, true, Some((12, 0)), 0.05);
    check_polynomial(&o, 6, ALL);
    // Offsets and a window that leaves the first rows without keys.
    let mut o = sparse(25, 31, 2, 2, 3, 6);
    mask(&mut o, -5, true, None, 0.0);
    check_polynomial(&o, 5, ALL);
    let mut o = rotary(17, 43, 4, 2, 26, 0.8, 7);
    mask(&mut o, 26, false, Some((30, 2)), 0.1);
    check_polynomial(&o, 4, ALL);
    // Degrees 1 and 2 (degree 0 has rho >= 1: positive weights are not guaranteed).
    let o = sparse(9, 11, 2, 2, 3, 8);
    check_polynomial(&o, 1, ALL);
    check_polynomial(&o, 2, ALL);
}

/// Fast backward at `eps` against the true gradient: every error within its certificate.
fn check_exact(o: &Owned, eps: f64, want: Want) -> BackwardReport {
    let p = o.prob();
    let f = fast_backward_head(&p, o.dout(), eps, want, &FastLimits::default(), None).unwrap();
    let n = exact_head_grad(&p, o.dout());
    let c = f.report.cert;
    assert!(
        c.certified.over(&Grad5::splat(eps), 1.0, want).is_none(),
        "{c:?}"
    );
    let e = errors(&f, &n, &o.factor);
    assert!(
        e.over(&c.certified, 1.0, want).is_none(),
        "eps {eps}: errors {e:?} vs certified {:?}",
        c.certified
    );
    f.report
}

#[test]
fn matches_the_exact_gradient_within_the_certificate() {
    let o = rotary(48, 48, 4, 5, 0, 1.0, 11);
    let mut last = 0;
    for eps in [1e-2, 1e-4, 1e-6] {
        let r = check_exact(&o, eps, Want::default());
        assert!(r.degree >= last);
        last = r.degree;
    }
    let o = sparse(40, 33, 3, 4, 5, 12);
    for eps in [1e-2, 1e-4, 1e-6] {
        check_exact(&o, eps, ALL);
    }
    let mut o = rotary(45, 45, 2, 3, 0, 1.0, 13);
    mask(&mut o, 0, true, Some((10, 0)), 0.05);
    for eps in [1e-2, 1e-4, 1e-6] {
        check_exact(&o, eps, ALL);
    }
    let mut o = rotary(20, 20, 2, 3, -5, 1.0, 14);
    mask(&mut o, -5, true, None, 0.0);
    let r = check_exact(&o, 1e-4, ALL);
    println!("{r:?}");
}

#[test]
fn certificate_is_reasonably_tight() {
    // The measured error should not be absurdly far below the bound at eps = 1e-2 (a sanity
    // check that the bound is of the right order, not a guarantee).
    let o = rotary(64, 64, 2, 4, 0, 1.0, 21);
    let p = o.prob();
    let f = fast_backward_head(
        &p,
        o.dout(),
        1e-2,
        Want::default(),
        &FastLimits::default(),
        None,
    )
    .unwrap();
    let n = exact_head_grad(&p, o.dout());
    let e = errors(&f, &n, &o.factor);
    let c = f.report.cert.certified;
    println!("errors {e:?}\ncertified {c:?}\n{:?}", f.report);
    assert!(e.dq > 0.0 && e.dq <= c.dq);
}

#[test]
fn pass_one_is_the_fast_forward() {
    let mut o = rotary(33, 39, 4, 3, 2, 1.0, 31);
    mask(&mut o, 2, true, None, 0.03);
    let p = o.prob();
    let b = FastBounds::from_problem(&p).unwrap();
    let poly = taylor(b.r, 6).unwrap();
    let lim = FastLimits::default();
    let shape = FastShape {
        nq: 33,
        nk: 39,
        d: 4,
        dv: 3,
    };
    let fplan = plan_for_polynomial(shape, &o.support, &b, &poly, &lim).unwrap();
    let fk = FastKernel::new(&fplan, &o.support, p.seqs, &o.factor, o.scale, &lim).unwrap();
    let fwd = fk.apply(p.q, p.k, p.v).unwrap();
    let g = fast_backward_head(&p, o.dout(), 1e6, ALL, &lim, Some(&poly)).unwrap();
    assert!(max_diff(fwd.out.view(), g.out.view()) < 1e-13);
    for (a, b) in fwd.lse.iter().zip(g.lse.iter()) {
        assert!(a == b || (a - b).abs() < 1e-13, "{a} {b}");
    }
}

/// Central differences of the fast forward ([`FastKernel::apply`] with the same polynomial)
/// against the fast backward, for entries of q, k, v, the W sequences and the bias.
#[test]
fn finite_differences_of_the_fast_forward() {
    let mut o = sparse(14, 17, 3, 2, 4, 41);
    mask(&mut o, 0, false, Some((9, 6)), 0.07);
    let p = o.prob();
    let b = FastBounds::from_problem(&p).unwrap();
    // Taylor coefficients do not depend on R, so the forward is one smooth function.
    let poly = taylor(2.0 * b.r, 7).unwrap();
    let lim = FastLimits::default();
    let g = fast_backward_head(&p, o.dout(), 1e6, ALL, &lim, Some(&poly)).unwrap();
    let loss = |o: &Owned| -> f64 {
        let p = o.prob();
        let b = FastBounds::from_problem(&p).unwrap();
        let pl = taylor(b.r.max(1e-9), 7).unwrap();
        let shape = FastShape {
            nq: p.nq(),
            nk: p.nk(),
            d: p.d(),
            dv: p.dv(),
        };
        let fplan = plan_for_polynomial(shape, &o.support, &b, &pl, &lim).unwrap();
        let fk = FastKernel::new(&fplan, &o.support, p.seqs, &o.factor, o.scale, &lim).unwrap();
        let out = fk.apply(p.q, p.k, p.v).unwrap().out;
        (&out * &o.dout).sum()
    };
    let h = 1e-5;
    let fd = |f: &dyn Fn(&mut Owned, f64)| -> f64 {
        let (mut a, mut b) = (o.clone(), o.clone());
        f(&mut a, h);
        f(&mut b, -h);
        (loss(&a) - loss(&b)) / (2.0 * h)
    };
    let close = |x: f64, y: f64, what: &str| {
        assert!(
            (x - y).abs() <= 1e-7 * (1.0 + y.abs()),
            "{what}: fd {x} vs backward {y}"
        );
    };
    for &(i, l) in &[(0, 0), (5, 2), (13, 1)] {
        close(fd(&|o, e| o.q[[i, l]] += e), g.dq[[i, l]], "dq");
    }
    for &(j, l) in &[(0, 1), (8, 0), (16, 2)] {
        close(fd(&|o, e| o.k[[j, l]] += e), g.dk[[j, l]], "dk");
    }
    for &(j, c) in &[(3, 0), (16, 1)] {
        close(fd(&|o, e| o.v[[j, c]] += e), g.dv[[j, c]], "dv");
    }
    let dw = g.dw.as_ref().unwrap();
    let db = g.dbias.as_ref().unwrap();
    for &(s, gg) in &[(0, 13), (2, 10), (3, 20)] {
        close(fd(&|o, e| o.seqs[[s, gg]] += e), dw[[s, gg]], "dw");
    }
    for &gg in &[13usize, 9, 19] {
        if o.factor[gg] > 0.0 {
            // d/db of factor = exp(b): perturb the factor multiplicatively.
            close(fd(&|o, e| o.factor[gg] *= e.exp()), db[gg], "dbias");
        }
    }
}

#[test]
fn heads_share_one_correlation_accumulator() {
    let o1 = sparse(21, 19, 2, 3, 4, 51);
    let mut o2 = o1.clone();
    let mut u = rng(52);
    o2.q.mapv_inplace(|x| 0.5 * x + 0.2 * u());
    o2.dout.mapv_inplace(|x| -x + 0.1 * u());
    let lim = FastLimits::default();
    let b = FastBounds::from_problem(&o1.prob())
        .unwrap()
        .worst(&FastBounds::from_problem(&o2.prob()).unwrap());
    let poly = taylor(b.r, 5).unwrap();
    let g1 = fast_backward_head(&o1.prob(), o1.dout(), 1e6, ALL, &lim, Some(&poly)).unwrap();
    let g2 = fast_backward_head(&o2.prob(), o2.dout(), 1e6, ALL, &lim, Some(&poly)).unwrap();
    // One plan for both heads, one accumulator.
    let p1 = o1.prob();
    let norms = WNorms::new(2, &o1.support, p1.seqs, &o1.factor).unwrap();
    let gb = crate::fast::grad_bounds::GradBounds::new(
        &norms,
        &o1.support,
        o1.scale,
        p1.q,
        p1.k,
        p1.v,
        o1.dout(),
    )
    .worst(&crate::fast::grad_bounds::GradBounds::new(
        &norms,
        &o2.support,
        o2.scale,
        o2.q.view(),
        o2.k.view(),
        o2.v.view(),
        o2.dout(),
    ));
    let req = BackwardRequest {
        shape: FastShape {
            nq: 21,
            nk: 19,
            d: 2,
            dv: 3,
        },
        support: &o1.support,
        bounds: b,
        grad: gb,
        fstats: crate::fast::grad_bounds::FactorStats::new(21, 19, &o1.factor).unwrap(),
        psums: crate::fast::grad_bounds::PSums::from_factor(
            &crate::fast::grad_bounds::FactorStats::new(21, 19, &o1.factor).unwrap(),
            b.r,
        ),
        eps: Grad5::splat(1e6),
        want: ALL,
        out_rel: 0.0,
        heads: 2,
    };
    let plan = backward_plan(&req, &lim, Some(&poly)).unwrap();
    let k = BackwardKernel::new(&plan, &o1.support, p1.seqs, &o1.factor, o1.scale, &lim).unwrap();
    let mut acc = k.accumulator().unwrap();
    let h1 = k
        .apply(p1.q, p1.k, p1.v, o1.dout(), Some(&mut acc), None)
        .unwrap();
    let p2 = o2.prob();
    let h2 = k
        .apply(p2.q, p2.k, p2.v, o2.dout(), Some(&mut acc), None)
        .unwrap();
    let (dw, db) = k.finish(acc).unwrap();
    let dw = dw.unwrap();
    let want_dw = g1.dw.unwrap() + g2.dw.unwrap();
    assert!(max_diff(dw.view(), want_dw.view()) < 1e-11);
    let want_db: Vec<f64> = g1
        .dbias
        .unwrap()
        .iter()
        .zip(g2.dbias.unwrap())
        .map(|(a, b)| a + b)
        .collect();
    assert!(vmax_diff(&db.unwrap(), &want_db) < 1e-11);
    assert!(max_diff(h1.dq.view(), g1.dq.view()) < 1e-12);
    assert!(max_diff(h2.dk.view(), g2.dk.view()) < 1e-12);
}

#[test]
fn refusals_and_bad_input_are_errors() {
    let o = rotary(30, 30, 2, 2, 0, 1.0, 61);
    let p = o.prob();
    let lim = FastLimits::default();
    let msg = |r: crate::Result<FastGrads>| match r {
        Err(crate::Error::Approximation(m)) => m,
        other => panic!("expected a refusal, got {:?}", other.map(|g| g.report)),
    };
    assert!(msg(fast_backward_head(
        &p,
        o.dout(),
        0.0,
        Want::default(),
        &lim,
        None
    ))
    .contains("eps = 0"));
    let tiny = FastLimits {
        max_working_bytes: 1 << 12,
        ..lim
    };
    assert!(msg(fast_backward_head(
        &p,
        o.dout(),
        1e-3,
        Want::default(),
        &tiny,
        None
    ))
    .contains("memory_limit"));
    // Scores far too wide for double precision.
    let mut wide = o.clone();
    wide.q.mapv_inplace(|x| 40.0 * x);
    wide.k.mapv_inplace(|x| 40.0 * x);
    msg(fast_backward_head(
        &wide.prob(),
        wide.dout(),
        1e-3,
        Want::default(),
        &lim,
        None,
    ));
    let bad = Array2::<f64>::zeros((3, 2));
    assert!(matches!(
        fast_backward_head(&p, bad.view(), 1e-3, Want::default(), &lim, None),
        Err(crate::Error::Value(_))
    ));
}

#[test]
fn empty_support_and_a_zero_w_entry() {
    // Empty support: scores 0, weights constant; dw of nothing, db still flows.
    let mut o = sparse(12, 10, 2, 2, 1, 71);
    o.support.clear();
    o.seqs = Array2::zeros((0, 21));
    mask(&mut o, 0, false, Some((4, 4)), 0.2);
    let p = o.prob();
    let f = fast_backward_head(&p, o.dout(), 1e-6, ALL, &FastLimits::default(), None).unwrap();
    let n = exact_head_grad(&p, o.dout());
    let e = errors(&f, &n, &o.factor);
    assert!(e.max_entry() < 1e-9, "{e:?}");
    // An entry that is zero everywhere still gets its gradient (no division by w_s).
    let mut o = sparse(15, 15, 2, 2, 3, 72);
    o.seqs.row_mut(1).fill(0.0);
    check_exact(&o, 1e-4, ALL);
    let f =
        fast_backward_head(&o.prob(), o.dout(), 1e-4, ALL, &FastLimits::default(), None).unwrap();
    assert!(f.dw.unwrap().row(1).iter().any(|x| x.abs() > 1e-3));
}

/// Timing of one head (rotary, R scaled to 1, eps = 1e-3, dv = d). Run with
/// `cargo test --release --lib fast::backward_tests::timing -- --ignored --nocapture`; sizes from
/// `FASTROPE_TIMING_N` (default `4096,65536`) and `FASTROPE_TIMING_D` (default `2,4`).
#[test]
#[ignore]
fn timing_backward_one_head() {
    let list = |var: &str, default: &str| -> Vec<usize> {
        std::env::var(var)
            .unwrap_or_else(|_| default.into())
            .split(',')
            .filter_map(|x| x.trim().parse().ok())
            .collect()
    };
    let lim = FastLimits {
        max_working_bytes: 8 << 30,
        ..FastLimits::default()
    };
    for d in list("FASTROPE_TIMING_D", "2,4") {
        for n in list("FASTROPE_TIMING_N", "4096,65536") {
            let mut o = rotary(n, n, d, d, 0, 1.0, 42);
            let r = FastBounds::from_problem(&o.prob()).unwrap().r;
            o.q.mapv_inplace(|x| x / r.sqrt());
            o.k.mapv_inplace(|x| x / r.sqrt());
            let t0 = std::time::Instant::now();
            let fwd = fast_forward_head(&o.prob(), 1e-3, &lim).unwrap();
            let tf = t0.elapsed().as_secs_f64();
            let t0 = std::time::Instant::now();
            let g =
                fast_backward_head(&o.prob(), o.dout(), 1e-3, Want::default(), &lim, None).unwrap();
            let tb = t0.elapsed().as_secs_f64();
            println!(
                "n={n} d={d}: forward {tf:.3} s (degree {}), backward {tb:.3} s (degree {}, {} pairs), ratio {:.2}; cert {:?}",
                fwd.report.degree,
                g.report.degree,
                g.report.n_pairs,
                tb / tf,
                g.report.cert.certified
            );
        }
    }
}

/// The certified backward plan of one head (as [`fast_backward_head`] makes it).
fn backward_plan_of(o: &Owned, eps: f64, want: Want) -> BackwardPlan {
    backward_plan(
        &backward_request_of(o, eps, want),
        &FastLimits::default(),
        None,
    )
    .unwrap()
}

fn backward_request_of(o: &Owned, eps: f64, want: Want) -> BackwardRequest<'_> {
    let p = o.prob();
    let (nq, nk, d, dv) = (p.nq(), p.nk(), p.d(), p.dv());
    let bounds = FastBounds::from_problem(&p).unwrap();
    let norms = WNorms::new(d, p.support, p.seqs, p.factor).unwrap();
    let grad = GradBounds::new(&norms, p.support, p.scale, p.q, p.k, p.v, o.dout());
    let fstats = FactorStats::new(nq, nk, p.factor).unwrap();
    let psums = PSums::from_data(
        p.q,
        p.k,
        p.scale,
        p.support,
        p.seqs,
        p.factor,
        bounds.r,
        &fstats,
        want.dw || want.db,
    )
    .unwrap();
    BackwardRequest {
        shape: FastShape { nq, nk, d, dv },
        support: p.support,
        bounds,
        grad,
        fstats,
        psums,
        eps: Grad5::splat(eps),
        want,
        out_rel: 0.0,
        heads: 1,
    }
}

#[test]
fn cached_backward_spectra_give_bitwise_identical_gradients() {
    let a = rotary(45, 52, 2, 3, 2, 0.8, 61);
    let lim = FastLimits::default();
    let c = cache::KernelCache::new(1 << 30);
    let bits = |x: &Array2<f64>| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    for want in [
        Want {
            dw: false,
            db: false,
        },
        ALL,
    ] {
        let plan = backward_plan_of(&a, 1e-3, want);
        let p = a.prob();
        let run = |k: &BackwardKernel| {
            let mut acc = (want.dw || want.db).then(|| k.accumulator().unwrap());
            let h = k
                .apply(p.q, p.k, p.v, a.dout(), acc.as_mut(), None)
                .unwrap();
            let fin = acc.map(|x| k.finish(x).unwrap());
            (h, fin)
        };
        let fresh =
            BackwardKernel::new(&plan, &a.support, p.seqs, &a.factor, a.scale, &lim).unwrap();
        let kind = if want.dw { "backward+dw" } else { "backward" };
        let key = || {
            cache::KernelKey::new(
                kind,
                45,
                52,
                2,
                &a.support,
                a.scale,
                &plan.poly.coeffs,
                p.seqs,
                &a.factor,
            )
        };
        let build = || {
            let s = BackwardSpectra::build(
                &plan.poly.coeffs,
                (45, 52, 2),
                want.dw,
                &a.support,
                p.seqs,
                &a.factor,
                a.scale,
                lim.max_terms,
            )?;
            let b = s.bytes();
            Ok((s, b))
        };
        let h0 = c.info().hits;
        c.get_or_build(key(), usize::MAX, build).unwrap();
        let shared = c.get_or_build(key(), usize::MAX, build).unwrap();
        assert_eq!(c.info().hits, h0 + 1);
        let hit = BackwardKernel::with_spectra(&plan, shared).unwrap();
        let (g0, f0) = run(&fresh);
        let (g1, f1) = run(&hit);
        for (x, y) in [
            (&g0.dq, &g1.dq),
            (&g0.dk, &g1.dk),
            (&g0.dv, &g1.dv),
            (&g0.out, &g1.out),
        ] {
            assert_eq!(bits(x), bits(y));
        }
        assert_eq!(g0.cert, g1.cert);
        if let (Some((dw0, db0)), Some((dw1, db1))) = (f0, f1) {
            assert_eq!(bits(&dw0.unwrap()), bits(&dw1.unwrap()));
            assert_eq!(db0, db1);
        }
        // Spectra built without dw do not serve a plan that wants it (and vice versa).
        let other = Want {
            dw: !want.dw,
            db: want.db,
        };
        let plan_other = backward_plan_of(&a, 1e-3, other);
        if plan_other.poly.coeffs == plan.poly.coeffs {
            let s = c.get_or_build(key(), usize::MAX, build).unwrap();
            assert!(BackwardKernel::with_spectra(&plan_other, s).is_err());
        }
    }
    assert_eq!(c.info().entries, 2);
}

#[test]
fn streamed_backward_spectra_give_bitwise_identical_gradients() {
    // A random support (uneven α and β groups), a mask and a bias, odd sizes.
    let mut a = sparse(31, 40, 3, 3, 4, 71);
    mask(&mut a, 0, true, Some((25, 0)), 0.04);
    let lim = FastLimits::default();
    let bits = |x: &Array2<f64>| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    for want in [
        Want {
            dw: false,
            db: false,
        },
        ALL,
    ] {
        let plan = backward_plan_of(&a, 1e-3, want);
        let np = plan.counts.n_pairs;
        let ns = a.support.len();
        assert!(backward_pair_chunk(&plan, ns).is_none() && np > 8, "{np}");
        let p = a.prob();
        let run = |plan: &BackwardPlan| {
            let k =
                BackwardKernel::new(plan, &a.support, p.seqs, &a.factor, a.scale, &lim).unwrap();
            let mut acc = (want.dw || want.db).then(|| k.accumulator().unwrap());
            let h = k
                .apply(p.q, p.k, p.v, a.dout(), acc.as_mut(), None)
                .unwrap();
            let fin = acc.map(|x| k.finish(x).unwrap());
            (k, h, fin)
        };
        let (held_k, g0, f0) = run(&plan);
        let cols = 4;
        // One pair per chunk, uneven chunks, about half the pairs (a streamed plan holds less
        // than the held spectra, which more pairs and the kernel workers would exceed at this
        // size); one column per tile, uneven tiles, one tile.
        for chunk in [1, 3, np / 2 + 1] {
            for tile in [1, 3, cols] {
                let s = force_streaming(&plan, ns, chunk, tile);
                let (k, g1, f1) = run(&s);
                assert!(k.spectra().streamed());
                for (x, y) in [
                    (&g0.dq, &g1.dq),
                    (&g0.dk, &g1.dk),
                    (&g0.dv, &g1.dv),
                    (&g0.out, &g1.out),
                ] {
                    assert_eq!(bits(x), bits(y), "chunk {chunk}, tile {tile}, {want:?}");
                }
                assert_eq!(g0.cert, g1.cert);
                if let (Some((dw0, db0)), Some((dw1, db1))) = (&f0, &f1) {
                    assert_eq!(bits(dw0.as_ref().unwrap()), bits(dw1.as_ref().unwrap()));
                    assert_eq!(db0, db1);
                }
                // Held spectra do not serve a streamed plan, nor the reverse.
                assert!(BackwardKernel::with_spectra(&s, held_k.spectra().clone()).is_err());
                assert!(BackwardKernel::with_spectra(&plan, k.spectra().clone()).is_err());
                assert!(k.spectra().bytes() < held_k.spectra().bytes());
            }
        }
    }
}

#[test]
fn a_tight_memory_limit_streams_the_backward_spectra_within_it() {
    let mut a = rotary(200, 200, 4, 3, 0, 0.8, 72);
    mask(&mut a, 0, true, None, 0.0);
    let want = Want {
        dw: false,
        db: false,
    };
    let p = a.prob();
    let eps = 1e-3;
    let lim = FastLimits::default();
    let held = fast_backward_head(&p, a.dout(), eps, want, &lim, None).unwrap();
    let plan = backward_plan_of(&a, eps, want);
    assert!(backward_pair_chunk(&plan, a.support.len()).is_none());
    // Lower the limit until the held spectra no longer fit with one column.
    let mut limit = plan.working_bytes;
    let streamed = loop {
        let tight = FastLimits {
            max_working_bytes: limit,
            ..lim
        };
        match fast_backward_head(&p, a.dout(), eps, want, &tight, None) {
            Ok(g) => {
                let sp = backward_plan(&backward_request_of(&a, eps, want), &tight, None).unwrap();
                if backward_pair_chunk(&sp, a.support.len()).is_some() {
                    assert!(sp.working_bytes <= limit && sp.poly == plan.poly);
                    assert!(sp.flops > plan.flops && sp.kernel_flops < plan.kernel_flops);
                    break g;
                }
            }
            Err(e) => panic!("refused at {limit} bytes before streaming: {e}"),
        }
        limit -= limit / 32;
    };
    for (x, y) in [
        (&held.dq, &streamed.dq),
        (&held.dk, &streamed.dk),
        (&held.dv, &streamed.dv),
    ] {
        assert!(x
            .iter()
            .zip(y.iter())
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
    let exact = exact_head_grad(&p, a.dout());
    let c = streamed.report.cert.certified;
    assert!(max_diff(streamed.dq.view(), exact.dq.view()) <= c.dq);
    assert!(max_diff(streamed.dk.view(), exact.dk.view()) <= c.dk);
    assert!(max_diff(streamed.dv.view(), exact.dv.view()) <= c.dv);
    // Below one column and one pair: refused, saying what to do.
    let none = FastLimits {
        max_working_bytes: 4096,
        ..lim
    };
    match fast_backward_head(&p, a.dout(), eps, want, &none, None) {
        Err(crate::error::Error::Approximation(m)) => {
            assert!(
                m.contains("streamed one at a time") && m.contains("memory_limit"),
                "{m}"
            )
        }
        other => panic!("expected a refusal, got {:?}", other.map(|g| g.report)),
    }
}
