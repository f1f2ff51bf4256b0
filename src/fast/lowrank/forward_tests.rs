use super::certificate::feature_count;
use super::forward::{lowrank_head, rotate, rotate_pair};
use super::plan::lowrank_plan;
use crate::fast::bounds::FastBounds;
use crate::fast::common::{FastLimits, FastShape};
use crate::fast::plans::{Band, LowRank};
use crate::poly::Polynomial;
use crate::position::RotaryW;
use crate::problem::Control;
use crate::test_util::Lcg;
use ndarray::{Array1, Array2};

#[allow(clippy::too_many_arguments)]
/// `Σ_j p(M_ij) [v_j, 1]` by the definition, `M_ij = scale q_iᵀ W_δ k_j` with Rotary `W_δ`.
fn naive(
    rot: &RotaryW,
    poly: &Polynomial,
    q: &Array2<f64>,
    k: &Array2<f64>,
    v: &Array2<f64>,
    scale: f64,
    c: i64,
    causal: bool,
) -> (Array2<f64>, Array1<f64>) {
    naive_band(rot, poly, q, k, v, scale, c, causal, None, 0.0)
}

#[allow(clippy::too_many_arguments)]
/// [`naive`] with a window `(left, right)` and the ALiBi weight `e^{-s|δ|}` of each pair.
fn naive_band(
    rot: &RotaryW,
    poly: &Polynomial,
    q: &Array2<f64>,
    k: &Array2<f64>,
    v: &Array2<f64>,
    scale: f64,
    c: i64,
    causal: bool,
    window: Option<(i64, i64)>,
    slope: f64,
) -> (Array2<f64>, Array1<f64>) {
    let (nq, nk, dv) = (q.nrows(), k.nrows(), v.ncols());
    let f2 = rot.factor * rot.factor;
    let mut out = Array2::zeros((nq, dv));
    let mut lse = Array1::from_elem(nq, f64::NEG_INFINITY);
    for i in 0..nq {
        let (mut num, mut den) = (vec![0.0; dv], 0.0);
        for j in 0..nk {
            let delta = c + i as i64 - j as i64;
            if causal && delta < 0 {
                continue;
            }
            if window.is_some_and(|(l, r)| delta > l || delta < -r) {
                continue;
            }
            let mut m = 0.0;
            for (t, &(p, r)) in rot.pairs.iter().enumerate() {
                let (sn, cs) = (delta as f64 * rot.theta[t]).sin_cos();
                m += f2
                    * (cs * (q[[i, p]] * k[[j, p]] + q[[i, r]] * k[[j, r]])
                        + sn * (q[[i, p]] * k[[j, r]] - q[[i, r]] * k[[j, p]]));
            }
            let a = poly.eval(scale * m) * (-slope * delta.unsigned_abs() as f64).exp();
            den += a;
            for (x, vv) in num.iter_mut().zip(v.row(j)) {
                *x += a * vv;
            }
        }
        if den > 0.0 {
            for (o, x) in out.row_mut(i).iter_mut().zip(&num) {
                *o = x / den;
            }
            lse[i] = den.ln();
        }
    }
    (out, lse)
}

/// A plan at eps = 1e-6 for heads with `|M| <= 2` (`R_abs = 4`) and `|v| <= 1`.
fn unit_plan(shape: FastShape, lr: LowRank) -> crate::fast::plans::FastPlan {
    let bounds = FastBounds {
        r: 2.0,
        r_abs: 4.0,
        v_max: 1.0,
        factor_sum: 1.0,
        factor_norm2: 1.0,
        min_row_mass: 1.0,
    };
    let limits = FastLimits {
        max_degree: 12,
        max_terms: 5000,
        max_working_bytes: 1 << 30,
    };
    lowrank_plan(shape, &bounds, lr, 1e-6, &limits).unwrap()
}

#[test]
fn lowrank_head_matches_the_definition() {
    let mut g = Lcg(7);
    let rot = RotaryW {
        theta: vec![0.9, 0.05],
        factor: 1.1,
        pairs: vec![(0, 2), (1, 3)],
    };
    let (nq, nk, d, dv, scale) = (300, 280, 4, 3, 0.5);
    let q = g.mat(nq, d, 0.7);
    let k = g.mat(nk, d, 0.7);
    let v = g.mat(nk, dv, 1.0);
    for (shift, causal) in [(0, false), (0, true), (-5, true), (3, true), (400, true)] {
        let lr = LowRank {
            r2: 4.0,
            psi_max: 1000.0,
            causal_shift: causal.then_some(shift),
            band: Default::default(),
        };
        let plan = unit_plan(FastShape { nq, nk, d, dv }, lr);
        assert_eq!(plan.counts.terms as f64, feature_count(d, plan.poly.degree));
        let x = rotate(&rot, q.view(), shift, scale * rot.factor * rot.factor);
        let y = rotate(&rot, k.view(), 0, 1.0);
        let got = lowrank_head(&plan, x.view(), y.view(), v.view(), &Control::new()).unwrap();
        let (out, lse) = naive(&rot, &plan.poly, &q, &k, &v, scale, shift, causal);
        for i in 0..nq {
            assert_eq!(got.lse[i].is_finite(), lse[i].is_finite(), "row {i}");
            if lse[i].is_finite() {
                assert!((got.lse[i] - lse[i]).abs() < 1e-12, "lse row {i}");
                for c in 0..dv {
                    assert!((got.out[[i, c]] - out[[i, c]]).abs() < 1e-12, "out {i} {c}");
                }
            }
        }
    }
}

#[test]
fn banded_head_matches_the_definition() {
    // d = 2 and dv = 3 give blocks of 32 rows: many blocks, segments and partial tiles
    let mut g = Lcg(11);
    let rot = RotaryW {
        theta: vec![0.3],
        factor: 1.0,
        pairs: vec![(0, 1)],
    };
    let (nq, nk, d, dv, scale) = (333, 301, 2, 3, 0.7);
    let q = g.mat(nq, d, 0.7);
    let k = g.mat(nk, d, 0.7);
    let v = g.mat(nk, dv, 1.0);
    let bounds = FastBounds {
        r: 1.0,
        r_abs: 1.0,
        v_max: 1.0,
        factor_sum: 1.0,
        factor_norm2: 1.0,
        min_row_mass: 1.0,
    };
    let shape = FastShape { nq, nk, d, dv };
    let limits = FastLimits {
        max_degree: 12,
        max_terms: 5000,
        max_working_bytes: 1 << 30,
    };
    let windows = [
        None,
        Some((0, 0)),
        Some((5, 0)),
        Some((40, 13)),
        Some((63, 64)),
        Some((95, 31)),
        Some((200, 7)),
        Some((3, 250)),
    ];
    let mut cases = 0;
    for causal in [false, true] {
        for shift in [0i64, -37, 45, 290, -290] {
            for window in windows {
                for slope in [0.0, 0.02, 0.7] {
                    if window.is_none() && slope == 0.0 {
                        continue; // the plain path
                    }
                    let band = Band {
                        shift,
                        window,
                        slope,
                        min_mass: 1.0,
                        ..Band::default()
                    };
                    let lr = LowRank {
                        r2: 1.0,
                        psi_max: 1000.0,
                        causal_shift: causal.then_some(shift),
                        band,
                    };
                    let plan = lowrank_plan(shape, &bounds, lr, 1e-6, &limits).unwrap();
                    let x = rotate(&rot, q.view(), shift, scale);
                    let y = rotate(&rot, k.view(), 0, 1.0);
                    let got =
                        lowrank_head(&plan, x.view(), y.view(), v.view(), &Control::new()).unwrap();
                    let (out, lse) = naive_band(
                        &rot, &plan.poly, &q, &k, &v, scale, shift, causal, window, slope,
                    );
                    let tag =
                        format!("causal {causal} shift {shift} window {window:?} slope {slope}");
                    for i in 0..nq {
                        assert_eq!(got.lse[i].is_finite(), lse[i].is_finite(), "row {i} {tag}");
                        if lse[i].is_finite() {
                            assert!((got.lse[i] - lse[i]).abs() < 1e-11, "lse row {i} {tag}");
                            for c in 0..dv {
                                let e = (got.out[[i, c]] - out[[i, c]]).abs();
                                assert!(e < 1e-11, "out {i} {c} {tag}: {e:e}");
                            }
                        }
                    }
                    cases += 1;
                }
            }
        }
    }
    assert!(cases > 200);
}

#[test]
fn refusals_name_the_reason() {
    let shape = FastShape {
        nq: 10,
        nk: 10,
        d: 64,
        dv: 1,
    };
    let bounds = FastBounds {
        r: 1.0,
        r_abs: 1.0,
        v_max: 1.0,
        factor_sum: 1.0,
        factor_norm2: 1.0,
        min_row_mass: 1.0,
    };
    let lr = LowRank {
        r2: 1.0,
        psi_max: 0.0,
        causal_shift: None,
        band: Default::default(),
    };
    let limits = FastLimits {
        max_degree: 12,
        max_terms: 2000,
        max_working_bytes: 1 << 30,
    };
    let e = lowrank_plan(shape, &bounds, lr, 1e-3, &limits).unwrap_err();
    assert!(format!("{e}").contains("features"), "{e}");
    assert!(lowrank_plan(shape, &bounds, lr, 0.0, &limits).is_err());
}

#[test]
fn rotate_pair_is_rotate_of_each() {
    let mut g = Lcg(11);
    let rot = RotaryW {
        theta: vec![0.9, 0.05, 1e-3],
        factor: 1.0,
        pairs: vec![(0, 3), (1, 4), (2, 5)],
    };
    // more rows than a chunk of the parallel rotation, q and k of different lengths
    let (q, k) = (g.mat(9000, 6, 1.0), g.mat(5000, 6, 1.0));
    for (start, mul) in [(0, 0.7), (13, 1.0), (-4, 2.0)] {
        let (x, y) = rotate_pair(&rot, q.view(), k.view(), start, mul);
        assert_eq!(x, rotate(&rot, q.view(), start, mul));
        assert_eq!(y, rotate(&rot, k.view(), 0, 1.0));
        let (y2, x2) = rotate_pair(&rot, k.view(), q.view(), start, mul);
        assert_eq!(y2, rotate(&rot, k.view(), start, mul));
        assert_eq!(x2, rotate(&rot, q.view(), 0, 1.0));
    }
}

#[test]
fn unmasked_head_in_several_chunks_matches_the_definition() {
    // Enough rows for several parallel chunks of unmasked blocks.
    let mut g = Lcg(5);
    let rot = RotaryW {
        theta: vec![0.9, 0.05],
        factor: 1.0,
        pairs: vec![(0, 2), (1, 3)],
    };
    let (nq, nk, d, dv, scale) = (2600, 2100, 4, 2, 0.5);
    let (q, k, v) = (g.mat(nq, d, 0.6), g.mat(nk, d, 0.6), g.mat(nk, dv, 1.0));
    let lr = LowRank {
        r2: 4.0,
        psi_max: 3000.0,
        causal_shift: None,
        band: Default::default(),
    };
    let plan = unit_plan(FastShape { nq, nk, d, dv }, lr);
    let rows = super::forward::unmasked_block(plan.counts.terms);
    assert!(
        nq >= 8 * rows,
        "{rows} rows per block: too few blocks for two chunks"
    );
    let (x, y) = rotate_pair(&rot, q.view(), k.view(), 0, scale);
    let got = lowrank_head(&plan, x.view(), y.view(), v.view(), &Control::new()).unwrap();
    let (out, lse) = naive(&rot, &plan.poly, &q, &k, &v, scale, 0, false);
    for i in 0..nq {
        assert!((got.lse[i] - lse[i]).abs() < 1e-11, "lse row {i}");
        for c in 0..dv {
            assert!((got.out[[i, c]] - out[[i, c]]).abs() < 1e-11, "out {i} {c}");
        }
    }
}
