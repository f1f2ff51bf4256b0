//! The fast forward against its naive twins (fixed seeds; tolerances are the certificate itself).

use super::naive::{exact_head, polynomial_head};
use super::*;
use crate::error::Error;
use crate::fast::toeplitz::certify;
use crate::poly::taylor;
use crate::test_util::head::{mask, rotary, Owned};
use crate::test_util::rng;
use ndarray::Array2;

/// Random sparse support on d coordinates with random sequences.
fn sparse(nq: usize, nk: usize, d: usize, dv: usize, ns: usize, seed: u64) -> Owned {
    let mut u = rng(seed);
    let glen = nq + nk - 1;
    let support: Vec<(usize, usize)> = (0..ns)
        .map(|_| {
            (
                ((u() + 1.0) * 0.5 * d as f64) as usize % d,
                ((u() + 1.0) * 0.5 * d as f64) as usize % d,
            )
        })
        .collect();
    Owned {
        q: Array2::from_shape_fn((nq, d), |_| u()),
        k: Array2::from_shape_fn((nk, d), |_| u()),
        v: Array2::from_shape_fn((nk, dv), |_| 2.0 * u()),
        scale: 0.7,
        seqs: Array2::from_shape_fn((ns, glen), |_| u()),
        support,
        factor: vec![1.0; glen],
        dout: Array2::from_shape_fn((nq, dv), |_| u()),
    }
}

/// Runs the fast method and checks it against the exact twin within the certificate.
fn check(o: &Owned, eps: f64) -> FastReport {
    let p = o.prob();
    let fast = fast_forward_head(&p, eps, &FastLimits::default()).unwrap();
    let (out, lse) = exact_head(&p);
    let r = fast.report.clone();
    assert!(r.certified_error <= eps, "{r:?}");
    let err = (&fast.out - &out).fold(0.0f64, |m, x| m.max(x.abs()));
    assert!(
        err <= r.certified_error,
        "error {err:e} > certified {:e} ({r:?})",
        r.certified_error
    );
    for (a, b) in fast.lse.iter().zip(lse.iter()) {
        if b.is_infinite() {
            assert_eq!(*a, f64::NEG_INFINITY);
        } else {
            assert!(
                (a - b).abs() <= r.certified_lse_error,
                "lse {a} vs {b} ({r:?})"
            );
        }
    }
    r
}

#[test]
fn rotary_support_matches_exact_within_certificate() {
    let o = rotary(48, 48, 4, 5, 0, 1.0, 1);
    for eps in [1e-2, 1e-4, 1e-6] {
        check(&o, eps);
    }
}

#[test]
fn random_sparse_support_matches_exact() {
    let o = sparse(40, 33, 3, 4, 5, 2);
    for eps in [1e-2, 1e-4, 1e-6] {
        check(&o, eps);
    }
}

#[test]
fn causal_window_and_bias_mask_every_term() {
    let mut o = rotary(45, 45, 2, 3, 0, 1.0, 3);
    mask(&mut o, 0, true, Some((10, 0)), 0.05);
    for eps in [1e-2, 1e-4, 1e-6] {
        check(&o, eps);
    }
    // A window that leaves the first rows without keys: out 0, lse -inf.
    let mut o = rotary(20, 20, 2, 3, -5, 1.0, 4);
    mask(&mut o, -5, true, None, 0.0);
    let fast = fast_forward_head(&o.prob(), 1e-4, &FastLimits::default()).unwrap();
    for i in 0..5 {
        assert_eq!(fast.lse[i], f64::NEG_INFINITY);
        assert!(fast.out.row(i).iter().all(|&x| x == 0.0));
    }
    check(&o, 1e-4);
}

#[test]
fn odd_prime_sizes_and_offsets() {
    for &(nq, nk, offset) in &[
        (37, 101, 5),
        (101, 37, -13),
        (1, 53, 52),
        (53, 1, 0),
        (97, 89, 1000),
    ] {
        let mut o = rotary(nq, nk, 4, 3, offset, 0.9, nq as u64);
        check(&o, 1e-4);
        mask(&mut o, offset, false, Some((40, 3)), 0.02);
        if o.factor.iter().any(|&f| f > 0.0) {
            check(&o, 1e-4);
        }
    }
}

#[test]
fn aligned_queries_and_keys_reach_the_bound() {
    // Every q_i and k_j equal: with W = identity (diagonal support, seqs = 1) M_ij = scale |q|^2,
    // which is exactly the spectral bound.
    let (n, d) = (64, 2);
    let mut o = sparse(n, n, d, 3, 2, 9);
    o.support = vec![(0, 0), (1, 1)];
    o.seqs = Array2::ones((2, 2 * n - 1));
    o.q = Array2::from_shape_fn((n, d), |(_, l)| [1.2, 0.9][l]);
    o.k = o.q.clone();
    o.scale = 1.0;
    let r = check(&o, 1e-5);
    assert!(
        o.max_score() >= 0.999 * r.r,
        "max score {} vs R {}",
        o.max_score(),
        r.r
    );
    // Anti-aligned keys reach -R.
    o.k.mapv_inplace(|x| -x);
    check(&o, 1e-5);
}

fn plan_with_degree(o: &Owned, degree: usize) -> FastPlan {
    let p = o.prob();
    let b = FastBounds::from_problem(&p).unwrap();
    let shape = FastShape {
        nq: p.nq(),
        nk: p.nk(),
        d: p.d(),
        dv: p.dv(),
    };
    plan_for_polynomial(
        shape,
        &o.support,
        &b,
        &taylor(b.r, degree).unwrap(),
        &FastLimits::default(),
    )
    .unwrap()
}

fn max_err(o: &Owned, plan: &FastPlan, grouped: bool) -> f64 {
    let p = o.prob();
    let kern = FastKernel::build(
        plan,
        &o.support,
        p.seqs,
        &o.factor,
        o.scale,
        &FastLimits::default(),
        grouped,
    )
    .unwrap();
    let fast = kern.apply(p.q, p.k, p.v).unwrap();
    (&fast.out - &exact_head(&p).0).fold(0.0f64, |m, x| m.max(x.abs()))
}

#[test]
fn high_degree_matches_exact_and_error_falls_with_degree() {
    let mut o = rotary(50, 61, 2, 4, 3, 1.0, 5);
    mask(&mut o, 3, true, None, 0.1);
    assert!(max_err(&o, &plan_with_degree(&o, 24), true) < 1e-12);
    let errs: Vec<f64> = (0..=12)
        .map(|g| max_err(&o, &plan_with_degree(&o, g), true))
        .collect();
    for w in errs.windows(2) {
        assert!(w[1] <= w[0] + 1e-14, "{errs:?}");
    }
    assert!(errs[12] < 1e-8 * errs[0], "{errs:?}");
}

#[test]
fn grouped_and_ungrouped_forwards_agree_with_the_polynomial() {
    let mut o = sparse(30, 41, 3, 3, 4, 6);
    mask(&mut o, 0, false, Some((15, 20)), 0.0);
    let plan = plan_with_degree(&o, 5);
    let p = o.prob();
    let (want, want_lse) = polynomial_head(&p, &plan.poly.coeffs);
    for grouped in [true, false] {
        let kern = FastKernel::build(
            &plan,
            &o.support,
            p.seqs,
            &o.factor,
            o.scale,
            &FastLimits::default(),
            grouped,
        )
        .unwrap();
        let fast = kern.apply(p.q, p.k, p.v).unwrap();
        let err = (&fast.out - &want).fold(0.0f64, |m, x| m.max(x.abs()));
        let lerr = (&fast.lse - &want_lse).fold(0.0f64, |m, x| m.max(x.abs()));
        assert!(
            err < 1e-12 && lerr < 1e-12,
            "grouped={grouped}: {err:e} {lerr:e}"
        );
    }
}

#[test]
fn one_kernel_serves_several_heads() {
    fn shared_across_threads<T: Send + Sync>() {}
    shared_across_threads::<FastKernel>();
    let a = rotary(33, 40, 4, 3, 0, 1.0, 7);
    let mut b = rotary(33, 40, 4, 3, 0, 1.0, 8);
    b.q.mapv_inplace(|x| 0.5 * x);
    let lim = FastLimits::default();
    let bounds = FastBounds::from_problem(&a.prob())
        .unwrap()
        .worst(&FastBounds::from_problem(&b.prob()).unwrap());
    let shape = FastShape {
        nq: 33,
        nk: 40,
        d: 4,
        dv: 3,
    };
    let plan = fast_plan(shape, &a.support, &bounds, 1e-5, &lim).unwrap();
    let kern = FastKernel::new(&plan, &a.support, a.seqs.view(), &a.factor, a.scale, &lim).unwrap();
    for o in [&a, &b] {
        let fast = kern.apply(o.q.view(), o.k.view(), o.v.view()).unwrap();
        let err = (&fast.out - &exact_head(&o.prob()).0).fold(0.0f64, |m, x| m.max(x.abs()));
        assert!(err <= plan.certified_error && plan.certified_error <= 1e-5);
    }
    // A head beyond the certified bounds is refused, not computed.
    let big = a.q.mapv(|x| 3.0 * x);
    assert!(matches!(
        kern.apply(big.view(), a.k.view(), a.v.view()),
        Err(Error::Approximation(_))
    ));
}

#[test]
fn column_tiles_give_the_same_result() {
    let o = rotary(40, 40, 2, 7, 0, 1.0, 10);
    let p = o.prob();
    let full = fast_forward_head(&p, 1e-6, &FastLimits::default()).unwrap();
    let plan = plan_with_degree(&o, full.report.degree);
    let small = FastLimits {
        max_working_bytes: plan.working_bytes - plan.working_bytes / 3,
        ..FastLimits::default()
    };
    let tiled = fast_forward_head(&p, 1e-6, &small).unwrap();
    let b = FastBounds::from_problem(&p).unwrap();
    let tplan = fast_plan(
        FastShape {
            nq: 40,
            nk: 40,
            d: 2,
            dv: 7,
        },
        &o.support,
        &b,
        1e-6,
        &small,
    )
    .unwrap();
    assert!(tplan.column_tile < 8);
    assert!((&full.out - &tiled.out).fold(0.0f64, |m, x| m.max(x.abs())) < 1e-13);
}

#[test]
fn refusals_and_bad_input_are_errors() {
    let o = rotary(16, 16, 2, 2, 0, 1.0, 11);
    let lim = FastLimits::default();
    assert!(matches!(
        fast_forward_head(&o.prob(), 0.0, &lim),
        Err(Error::Approximation(_))
    ));
    assert!(matches!(
        fast_forward_head(&o.prob(), -1.0, &lim),
        Err(Error::Value(_))
    ));
    let big = rotary(16, 16, 2, 2, 0, 40.0, 11);
    assert!(matches!(
        fast_forward_head(&big.prob(), 1e-3, &lim),
        Err(Error::Approximation(_))
    ));
    let mut bad = rotary(16, 16, 2, 2, 0, 1.0, 11);
    bad.q[[3, 1]] = f64::NAN;
    assert!(matches!(
        fast_forward_head(&bad.prob(), 1e-3, &lim),
        Err(Error::Value(_))
    ));
    let mut bad = rotary(16, 16, 2, 2, 0, 1.0, 11);
    bad.factor[4] = -1.0;
    assert!(matches!(
        fast_forward_head(&bad.prob(), 1e-3, &lim),
        Err(Error::Value(_))
    ));
    let mut bad = rotary(16, 16, 2, 2, 0, 1.0, 11);
    bad.factor.pop();
    assert!(matches!(
        fast_forward_head(&bad.prob(), 1e-3, &lim),
        Err(Error::Value(_))
    ));
    let mut bad = rotary(16, 16, 2, 2, 0, 1.0, 11);
    bad.support[0] = (2, 0);
    assert!(matches!(
        fast_forward_head(&bad.prob(), 1e-3, &lim),
        Err(Error::Value(_))
    ));
    let bad = rotary(16, 15, 2, 2, 0, 1.0, 11);
    let p = HeadProblem {
        v: o.v.view(),
        ..bad.prob()
    };
    assert!(matches!(
        fast_forward_head(&p, 1e-3, &lim),
        Err(Error::Value(_))
    ));
}

#[test]
fn empty_sides_and_empty_support() {
    let o = rotary(5, 7, 2, 3, 0, 1.0, 12);
    let lim = FastLimits::default();
    let e = Array2::<f64>::zeros((0, 2));
    let p = HeadProblem {
        q: e.view(),
        ..o.prob()
    };
    let r = fast_forward_head(&p, 1e-3, &lim).unwrap();
    assert_eq!((r.out.shape(), r.lse.len()), (&[0, 3][..], 0));
    let (ek, ev) = (Array2::<f64>::zeros((0, 2)), Array2::<f64>::zeros((0, 3)));
    let p = HeadProblem {
        k: ek.view(),
        v: ev.view(),
        ..o.prob()
    };
    let r = fast_forward_head(&p, 1e-3, &lim).unwrap();
    assert!(r.lse.iter().all(|x| *x == f64::NEG_INFINITY) && r.out.iter().all(|x| *x == 0.0));
    // No support: M = 0, plain (masked, biased) averaging, degree 0.
    let mut z = sparse(9, 11, 2, 2, 0, 13);
    mask(&mut z, 0, false, Some((3, 3)), 0.3);
    assert_eq!(check(&z, 1e-9).degree, 0);
}

/// Timing of one head (rotary, no mask, R scaled to 1, eps = 1e-3, dv = 64). Run with
/// `cargo test --release --lib fast::tests::timing -- --ignored --nocapture`; sizes from
/// `FASTROPE_TIMING_N` (comma-separated, default `4096,65536`) and `FASTROPE_TIMING_D`
/// (default `2,4`).
#[test]
#[ignore]
fn timing_one_head() {
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
            let mut o = rotary(n, n, d, 64, 0, 1.0, 42);
            let r = FastBounds::from_problem(&o.prob()).unwrap().r;
            o.q.mapv_inplace(|x| x / r.sqrt());
            o.k.mapv_inplace(|x| x / r.sqrt());
            let t0 = std::time::Instant::now();
            let fast = fast_forward_head(&o.prob(), 1e-3, &lim).unwrap();
            let dt = t0.elapsed().as_secs_f64();
            let p = fast_plan(
                FastShape {
                    nq: n,
                    nk: n,
                    d,
                    dv: 64,
                },
                &o.support,
                &FastBounds::from_problem(&o.prob()).unwrap(),
                1e-3,
                &lim,
            )
            .unwrap();
            println!(
                "n={n} d={d}: {dt:.3} s, predicted {:.3e} flops ({:.2} GFlop/s), {:.2} GB, {:?}",
                p.flops,
                p.flops / dt / 1e9,
                p.working_bytes as f64 / 1e9,
                fast.report
            );
        }
    }
}

#[test]
fn rounding_stays_within_its_bounds() {
    // Wide scores (R ≈ 6.5, R_abs ≈ 13) and a causal first row make rounding visible and the
    // a-priori bound useless; a fixed polynomial makes rounding the only difference from the
    // exact-arithmetic p(M) attention, and the head's data-dependent bound must cover it.
    let mut o = rotary(120, 131, 2, 3, 0, 2.2, 14);
    mask(&mut o, 0, true, None, 0.0);
    let p = o.prob();
    let b = FastBounds::from_problem(&p).unwrap();
    assert!(b.r > 6.0, "R = {}", b.r);
    let shape = FastShape {
        nq: 120,
        nk: 131,
        d: 2,
        dv: 3,
    };
    let poly = crate::poly::chebyshev(b.r, 30).unwrap();
    let lim = FastLimits::default();
    let plan = plan_for_polynomial(shape, &o.support, &b, &poly, &lim).unwrap();
    let kern = FastKernel::new(&plan, &o.support, p.seqs, &o.factor, o.scale, &lim).unwrap();
    let fast = kern.apply(p.q, p.k, p.v).unwrap();
    let r = &fast.report;
    let (want, _) = polynomial_head(&p, &poly.coeffs);
    let err = (&fast.out - &want).fold(0.0f64, |m, x| m.max(x.abs()));
    assert!(
        err > 0.0 && err <= r.rounding_error,
        "rounding {err:e} > bound {:e}",
        r.rounding_error
    );
    assert!(
        r.rounding_error < 1e-3 && r.rounding_error <= plan.rounding_error,
        "{r:?}"
    );
    println!(
        "rounding: actual {err:.2e}, head bound {:.2e}, a-priori {:.2e}",
        r.rounding_error, plan.rounding_error
    );
    let exact = (&fast.out - &exact_head(&p).0).fold(0.0f64, |m, x| m.max(x.abs()));
    assert!(exact <= r.certified_error, "{exact:e} vs {r:?}");
    // Planned for an eps, the same head is certified and computed.
    let eps = 2.0 * r.certified_error;
    let planned = fast_plan(shape, &o.support, &b, eps, &lim).unwrap();
    assert!(planned.certified_error > eps); // deferred to the head's data
    let out = fast_forward_head(&p, eps, &lim).unwrap();
    assert!(out.report.certified_error <= eps);
}

/// The plan and the fresh kernel for `o` at `eps`.
fn plan_of(o: &Owned, eps: f64) -> FastPlan {
    let shape = FastShape {
        nq: o.q.nrows(),
        nk: o.k.nrows(),
        d: o.q.ncols(),
        dv: o.v.ncols(),
    };
    let bounds = FastBounds::from_problem(&o.prob()).unwrap();
    fast_plan(shape, &o.support, &bounds, eps, &FastLimits::default()).unwrap()
}

fn key_of(o: &Owned, plan: &FastPlan) -> cache::KernelKey {
    cache::KernelKey::new(
        "forward",
        o.q.nrows(),
        o.k.nrows(),
        o.q.ncols(),
        &o.support,
        o.scale,
        &plan.poly.coeffs,
        o.seqs.view(),
        &o.factor,
    )
}

fn cached(c: &cache::KernelCache, o: &Owned, plan: &FastPlan) -> std::sync::Arc<FastSpectra> {
    c.get_or_build(key_of(o, plan), usize::MAX, || {
        let s = FastSpectra::build(
            &plan.poly.coeffs,
            (o.q.nrows(), o.k.nrows(), o.q.ncols()),
            &o.support,
            o.seqs.view(),
            &o.factor,
            o.scale,
            FastLimits::default().max_terms,
            true,
        )?;
        let b = s.bytes();
        Ok((s, b))
    })
    .unwrap()
}

#[test]
fn cached_spectra_give_bitwise_identical_results_and_per_call_certificates() {
    let a = rotary(57, 64, 4, 3, 5, 0.8, 21);
    let plan = plan_of(&a, 1e-4);
    let lim = FastLimits::default();
    let fresh = FastKernel::new(&plan, &a.support, a.seqs.view(), &a.factor, a.scale, &lim)
        .unwrap()
        .apply(a.q.view(), a.k.view(), a.v.view())
        .unwrap();
    let c = cache::KernelCache::new(1 << 30);
    let first = cached(&c, &a, &plan);
    let again = cached(&c, &a, &plan);
    assert!(std::sync::Arc::ptr_eq(&first, &again));
    let i = c.info();
    assert_eq!((i.hits, i.misses, i.entries), (1, 1, 1));
    assert!(i.bytes >= first.bytes() && i.bytes <= i.limit);
    let hit = FastKernel::with_spectra(&plan, again)
        .unwrap()
        .apply(a.q.view(), a.k.view(), a.v.view())
        .unwrap();
    let bits = |x: &Array2<f64>| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&fresh.out), bits(&hit.out));
    assert!(fresh
        .lse
        .iter()
        .zip(hit.lse.iter())
        .all(|(x, y)| x.to_bits() == y.to_bits()));
    assert_eq!(fresh.report, hit.report);

    // Other data, same W/mask/scale and a smaller R in the same snapping step: the same
    // polynomial, hence a hit, but the kernel carries *this* call's plan and certificate.
    let mut b = rotary(57, 64, 4, 3, 5, 0.8, 22);
    let rb = FastBounds::from_problem(&b.prob()).unwrap().r;
    let ra = FastBounds::from_problem(&a.prob()).unwrap().r;
    let t = ra / rb * (1.0 - 1e-9);
    b.q.mapv_inplace(|x| x * t);
    let plan_b = plan_of(&b, 1e-4);
    assert!(plan_b.bounds.r < plan.bounds.r && plan_b.bounds.r > 0.99 * plan.bounds.r);
    assert_eq!(plan_b.poly.coeffs, plan.poly.coeffs);
    let kb = FastKernel::with_spectra(&plan_b, cached(&c, &b, &plan_b)).unwrap();
    assert_eq!(c.info().hits, 2);
    let out_b = kb.apply(b.q.view(), b.k.view(), b.v.view()).unwrap();
    let fresh_b = FastKernel::new(&plan_b, &b.support, b.seqs.view(), &b.factor, b.scale, &lim)
        .unwrap()
        .apply(b.q.view(), b.k.view(), b.v.view())
        .unwrap();
    assert_eq!(bits(&out_b.out), bits(&fresh_b.out));
    assert_eq!(out_b.report, fresh_b.report);
    assert!(out_b.report.certified_error <= plan_b.certified_error);
    let err = (&out_b.out - &exact_head(&b.prob()).0).fold(0.0f64, |m, x| m.max(x.abs()));
    assert!(err <= out_b.report.certified_error && out_b.report.certified_error <= 1e-4);
    // The head bounds are checked against the current plan: a's data exceed b's plan.
    let big = a.q.mapv(|x| 1.01 * x);
    assert!(matches!(
        kb.apply(big.view(), a.k.view(), a.v.view()),
        Err(Error::Approximation(_))
    ));
    // Spectra of another polynomial or shape are refused.
    let plan_hi = plan_of(&a, 1e-8);
    assert!(plan_hi.poly.degree > plan.poly.degree);
    assert!(FastKernel::with_spectra(&plan_hi, cached(&c, &a, &plan)).is_err());
}

#[test]
fn cache_keys_separate_every_input() {
    let base = rotary(40, 48, 2, 2, 0, 0.9, 31);
    let plan = plan_of(&base, 1e-3);
    let c = cache::KernelCache::new(1 << 30);
    cached(&c, &base, &plan);
    let mut variants = Vec::new();
    // Another w table (another rotary frequency / offset).
    variants.push(rotary(40, 48, 2, 2, 3, 0.9, 31));
    // A bias.
    let mut v = rotary(40, 48, 2, 2, 0, 0.9, 31);
    v.factor
        .iter_mut()
        .enumerate()
        .for_each(|(g, f)| *f *= (-0.01 * g as f64).exp());
    variants.push(v);
    // Another scale.
    let mut v = rotary(40, 48, 2, 2, 0, 0.9, 31);
    v.scale *= 0.5;
    variants.push(v);
    // A causal mask.
    let mut v = rotary(40, 48, 2, 2, 0, 0.9, 31);
    let nq = 40;
    v.factor
        .iter_mut()
        .enumerate()
        .for_each(|(g, f)| *f = if g >= nq - 1 + 8 { 0.0 } else { *f });
    variants.push(v);
    // Another length.
    variants.push(rotary(41, 48, 2, 2, 0, 0.9, 31));
    for (i, o) in variants.iter().enumerate() {
        let p = plan_of(o, 1e-3);
        cached(&c, o, &p);
        assert_eq!(
            (c.info().misses, c.info().hits),
            (i as u64 + 2, 0),
            "variant {i}"
        );
    }
    // Another degree (a smaller eps).
    let p_hi = plan_of(&base, 1e-7);
    assert_ne!(p_hi.poly.degree, plan.poly.degree);
    cached(&c, &base, &p_hi);
    assert_eq!((c.info().misses, c.info().hits), (7, 0));
    // And the original again: a hit.
    cached(&c, &base, &plan);
    assert_eq!(
        (c.info().misses, c.info().hits, c.info().entries),
        (7, 1, 7)
    );
}

#[test]
fn cache_evicts_real_spectra_by_bytes() {
    let a = rotary(64, 64, 2, 2, 0, 0.9, 41);
    let b = rotary(64, 64, 2, 2, 1, 0.9, 41);
    let (pa, pb) = (plan_of(&a, 1e-3), plan_of(&b, 1e-3));
    let probe = cache::KernelCache::new(1 << 30);
    cached(&probe, &a, &pa);
    let one = probe.info().bytes;
    // Room for one entry (plus a little): the second evicts the first.
    let c = cache::KernelCache::new(one + one / 2);
    cached(&c, &a, &pa);
    cached(&c, &b, &pb);
    let i = c.info();
    assert_eq!((i.entries, i.evictions, i.misses), (1, 1, 2));
    assert!(i.bytes <= i.limit);
    cached(&c, &a, &pa);
    assert_eq!((c.info().misses, c.info().hits), (3, 0));
    // Limit 0: nothing held, every lookup builds.
    c.set_limit(0);
    cached(&c, &a, &pa);
    cached(&c, &a, &pa);
    let i = c.info();
    assert_eq!((i.entries, i.bytes, i.hits, i.misses), (0, 0, 0, 5));
}

#[test]
fn snapped_radius_is_a_safe_shared_interval() {
    for r in [1e-3, 0.3, 0.7, 1.0, 1.0 + 1e-15, 2.5, 7.9] {
        let s = certify::snap_radius(r);
        assert!(s >= r && s <= r * (1.0 + 1.0 / 64.0), "{r} -> {s}");
        assert_eq!(certify::snap_radius(s), s);
    }
    assert_eq!(certify::snap_radius(0.0), 0.0);
    // R differing in the last bits: the same polynomial, certified on an interval covering R.
    let shape = FastShape {
        nq: 256,
        nk: 256,
        d: 2,
        dv: 4,
    };
    let mk = |r: f64| FastBounds {
        r,
        r_abs: 1.3 * r,
        v_max: 1.0,
        factor_sum: 511.0,
        factor_norm2: 511f64.sqrt(),
        min_row_mass: 1.0,
    };
    let s2 = [(0, 0), (0, 1), (1, 0), (1, 1)];
    let lim = FastLimits::default();
    let p1 = fast_plan(shape, &s2, &mk(1.0 - 1e-12), 1e-3, &lim).unwrap();
    let p2 = fast_plan(shape, &s2, &mk(1.0 - 3e-13), 1e-3, &lim).unwrap();
    assert_eq!(p1.poly.coeffs, p2.poly.coeffs);
    assert!(p1.poly.r >= 1.0 - 1e-12 && p1.certified_error <= 1e-3);
    assert!(crate::poly::certify(&p1.poly.coeffs, 1.0 - 1e-12) <= p1.poly.rho);
}

/// `plan` with its kernel spectra streamed `chunk` pairs at a time over tiles of `tile`
/// columns (what the planner chooses under a tight memory limit, forced).
fn streamed(plan: &FastPlan, chunk: usize, tile: usize) -> FastPlan {
    let mut p = plan.clone();
    p.kernel_bytes = chunk * crate::fast::common::spectrum_bytes(p.fft_len);
    p.column_tile = tile;
    assert!(p.streamed() && p.pair_chunk() == chunk);
    p
}

fn apply_with(o: &Owned, plan: &FastPlan) -> FastOutput {
    let p = o.prob();
    FastKernel::new(
        plan,
        &o.support,
        p.seqs,
        &o.factor,
        o.scale,
        &FastLimits::default(),
    )
    .unwrap()
    .apply(p.q, p.k, p.v)
    .unwrap()
}

#[test]
fn streamed_spectra_agree_bitwise_with_held_ones() {
    // Uneven α groups (a random support), a mask and a bias, odd sizes.
    let mut o = sparse(29, 37, 3, 5, 4, 21);
    mask(&mut o, 0, true, Some((20, 0)), 0.03);
    let plan = plan_with_degree(&o, 4);
    let np = plan.counts.n_pairs;
    assert!(
        !plan.streamed() && plan.pair_chunk() == np && np > 8,
        "{np}"
    );
    let held = apply_with(&o, &plan);
    let cols = 6;
    // One pair per chunk, uneven chunks (np not a multiple), all but one pair; one column
    // tile, uneven tiles, one tile of all columns.
    for chunk in [1, 2, 5, np - 1] {
        for tile in [1, 4, cols] {
            let s = streamed(&plan, chunk, tile);
            let got = apply_with(&o, &s);
            assert!(
                got.out
                    .iter()
                    .zip(held.out.iter())
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "chunk {chunk}, tile {tile}"
            );
            assert!(
                got.lse
                    .iter()
                    .zip(held.lse.iter())
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "chunk {chunk}, tile {tile}"
            );
            assert_eq!(got.report.certified_error, held.report.certified_error);
        }
    }
    // Held spectra under a streamed plan (and the reverse) are refused, not misused.
    let s = streamed(&plan, 3, 2);
    let p = o.prob();
    let lim = FastLimits::default();
    let kern = FastKernel::new(&plan, &o.support, p.seqs, &o.factor, o.scale, &lim).unwrap();
    let skern = FastKernel::new(&s, &o.support, p.seqs, &o.factor, o.scale, &lim).unwrap();
    assert!(skern.spectra().streamed() && !kern.spectra().streamed());
    assert!(FastKernel::with_spectra(&s, kern.spectra().clone()).is_err());
    assert!(FastKernel::with_spectra(&plan, skern.spectra().clone()).is_err());
    // What a streamed kernel holds is small: no spectra, the sequences it rebuilds them from.
    assert!(skern.spectra().bytes() < kern.spectra().bytes());
    let seqs_bytes = 8 * (o.seqs.len() + o.factor.len());
    assert!(skern.spectra().bytes() >= seqs_bytes);
}

#[test]
fn a_tight_memory_limit_streams_the_spectra_within_it() {
    let mut o = rotary(300, 300, 4, 7, 0, 1.0, 22);
    mask(&mut o, 0, true, None, 0.02);
    let p = o.prob();
    let b = FastBounds::from_problem(&p).unwrap();
    let shape = FastShape {
        nq: 300,
        nk: 300,
        d: 4,
        dv: 7,
    };
    let eps = 1e-6;
    let lim = FastLimits::default();
    let full = fast_plan(shape, &o.support, &b, eps, &lim).unwrap();
    assert!(!full.streamed());
    // Lower the limit until the held spectra no longer fit with one column.
    let mut limit = full.working_bytes;
    while fast_plan(
        shape,
        &o.support,
        &b,
        eps,
        &FastLimits {
            max_working_bytes: limit,
            ..lim
        },
    )
    .map(|p| !p.streamed())
    .unwrap_or(false)
    {
        limit -= limit / 64;
    }
    let tight = FastLimits {
        max_working_bytes: limit,
        ..lim
    };
    let plan = fast_plan(shape, &o.support, &b, eps, &tight).unwrap();
    assert!(plan.streamed(), "{plan:?}");
    assert!(plan.working_bytes <= limit && plan.pair_chunk() >= 1);
    assert_eq!(plan.poly, full.poly);
    // Streaming rebuilds the spectra per tile: predicted dearer per head, cheaper shared.
    assert!(plan.flops > full.flops && plan.kernel_flops < full.kernel_flops);
    let fast = fast_forward_head(&p, eps, &tight).unwrap();
    let held = fast_forward_head(&p, eps, &lim).unwrap();
    assert!(fast
        .out
        .iter()
        .zip(held.out.iter())
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    let err = (&fast.out - &exact_head(&p).0).fold(0.0f64, |m, x| m.max(x.abs()));
    assert!(err <= fast.report.certified_error && fast.report.certified_error <= eps);
    // Below even one column and one pair: refused, saying what to do.
    let none = FastLimits {
        max_working_bytes: 4096,
        ..lim
    };
    match fast_plan(shape, &o.support, &b, eps, &none) {
        Err(Error::Approximation(m)) => {
            assert!(
                m.contains("memory limit") && m.contains("memory_limit"),
                "{m}"
            )
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}
