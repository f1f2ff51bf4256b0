//! The banded low-rank backward: [`super::backward`]'s two passes over the block states of
//! [`super::band`], for windows and ALiBi decays.
//!
//! Pass 1 runs over query blocks with the key states `S` (values `b = [V, 1]`, unweighted key
//! features): the forward's sums give `out`, `lse` and `a = [dO / l̃, (dlse - D) / l̃]`, and
//! `dx_i = J_Φq(x_i)^T S_i a_i` with `S_i` the row-scaled full-tile states, plus `p'(M) w` on
//! the partial tiles. Pass 2 runs over key blocks with the band seen from the keys
//! ([`Geometry::transposed`]: `δ' = -δ`, the same weights `λ^|δ|`) and the query states `T`
//! (values `a`, weighted query features): `dV_j = T_j[:, :dv]^T Φk(y_j)`, `dy_j = J_Φk(y_j)^T
//! T_j b_j`, plus `p(M) w` and `p'(M) w` on its partial tiles. Blocks of either pass are
//! independent (run in parallel; the same bits for any thread count).

use super::backward::{derivative, finish_row};
use super::band::{row_sees, BandStates, Geometry};
use super::forward::{with_ones, Features};
use super::plan::block_rows;
use crate::error::Result;
use crate::fast::grad::HeadGrads;
use crate::fast::plans::{BackwardPlan, LowRank};
use crate::problem::Control;
use ndarray::{s, Array1, Array2, ArrayView1, ArrayView2, ArrayViewMut1, ArrayViewMut2, Axis};
use rayon::prelude::*;

/// One block of pass 1's outputs: `(block, a, out, lse, dx)` rows.
type Pass1Rows<'a> = (
    usize,
    ArrayViewMut2<'a, f64>,
    ArrayViewMut2<'a, f64>,
    ArrayViewMut1<'a, f64>,
    ArrayViewMut2<'a, f64>,
);

/// [`super::lowrank_backward_head`] for a call with a band (window or ALiBi): the same inputs
/// and outputs, in rotated coordinates.
#[allow(clippy::too_many_arguments)]
pub(super) fn band_backward_head(
    plan: &BackwardPlan,
    lr: &LowRank,
    x: ArrayView2<f64>,
    y: ArrayView2<f64>,
    v: ArrayView2<f64>,
    dout: ArrayView2<f64>,
    dlse: Option<ArrayView1<f64>>,
    ctl: &Control,
) -> Result<HeadGrads> {
    let (nq, nk, d, dv) = (x.nrows(), y.nrows(), x.ncols(), v.ncols());
    let poly = &plan.poly;
    let dp = derivative(&poly.coeffs);
    let feats = Features::new(d, poly);
    let blk = block_rows(feats.len() as f64, d, poly.degree, dv);
    let wv = Array1::from(feats.weight.clone());
    let cols = dv + 1;
    let b = with_ones(v);
    let band = &lr.band;
    let causal = lr.causal_shift.is_some();
    let sees = row_sees(band, lr.causal_shift, nk);

    // Pass 1: query blocks, key states S.
    let geo = Geometry::new(band, causal, nq, nk, blk);
    let key_states = BandStates::new(geo, band.slope, blk, &feats, y, false, b.view(), ctl)?;
    let mut a_all = Array2::<f64>::zeros((nq, cols));
    let mut out = Array2::<f64>::zeros((nq, dv));
    let mut lse = Array1::<f64>::from_elem(nq, f64::NEG_INFINITY);
    let mut dx = Array2::<f64>::zeros((nq, d));
    let pass1 = |(qb, mut a_b, mut out, mut lse, mut dx): Pass1Rows| -> Result<()> {
        ctl.check()?;
        let i0 = qb * blk;
        let rows = out.nrows();
        let xb = x.slice(s![i0..i0 + rows, ..]);
        let mono = feats.fill(xb, false);
        let phi = &mono * &wv;
        let states = key_states.states(qb)?;
        let mut acc = key_states
            .apply(&states, &phi)
            .unwrap_or_else(|| Array2::zeros((rows, cols)));
        // the partial tiles: (keys, scores, weights)
        let tiles: Vec<(usize, usize, Array2<f64>, Array2<f64>)> = key_states
            .tiles(qb)
            .into_iter()
            .map(|(j0, j1)| {
                let m = xb.dot(&y.slice(s![j0..j1, ..]).t());
                let w =
                    Array2::from_shape_fn(m.dim(), |(a, jj)| key_states.weight(i0 + a, j0 + jj));
                (j0, j1, m, w)
            })
            .collect();
        for (j0, j1, m, w) in &tiles {
            let pm = Array2::from_shape_fn(m.dim(), |(a, jj)| {
                let w = w[[a, jj]];
                if w == 0.0 {
                    0.0
                } else {
                    poly.eval(m[[a, jj]]) * w
                }
            });
            acc += &pm.dot(&b.slice(s![*j0..*j1, ..]));
        }
        for a in 0..rows {
            let i = i0 + a;
            if !sees(i) {
                continue; // no visible key: no gradient flows through this row
            }
            let g = dlse.as_ref().map_or(0.0, |g| g[i]);
            lse[a] = finish_row(
                i,
                acc.row(a),
                dout.row(i),
                g,
                out.row_mut(a),
                a_b.row_mut(a),
            )?;
        }
        let ab = a_b.view();
        let mut gx = match key_states.apply_t(&states, ab) {
            Some(mut coef) => {
                coef *= &wv;
                feats.backprop(xb, mono.view(), coef.view())
            }
            None => Array2::zeros((rows, d)),
        };
        for (j0, j1, m, w) in &tiles {
            let gm = ab.dot(&b.slice(s![*j0..*j1, ..]).t());
            let dpm = Array2::from_shape_fn(m.dim(), |(a, jj)| {
                let w = w[[a, jj]];
                if w == 0.0 {
                    0.0
                } else {
                    dp(m[[a, jj]]) * w * gm[[a, jj]]
                }
            });
            gx += &dpm.dot(&y.slice(s![*j0..*j1, ..]));
        }
        dx.assign(&gx);
        Ok(())
    };
    let jobs: Vec<Pass1Rows> = a_all
        .axis_chunks_iter_mut(Axis(0), blk)
        .zip(out.axis_chunks_iter_mut(Axis(0), blk))
        .zip(lse.axis_chunks_iter_mut(Axis(0), blk))
        .zip(dx.axis_chunks_iter_mut(Axis(0), blk))
        .enumerate()
        .map(|(c, (((a, o), l), g))| (c, a, o, l, g))
        .collect();
    jobs.into_par_iter().map(pass1).collect::<Result<()>>()?;
    drop(key_states);

    // Pass 2: key blocks, query states T (the band seen from the keys).
    let a_all = a_all.view();
    let geo_t = Geometry::transposed(band, causal, nq, nk, blk);
    let row_states = BandStates::new(geo_t, band.slope, blk, &feats, x, true, a_all, ctl)?;
    let mut dy = Array2::<f64>::zeros((nk, d));
    let mut dvv = Array2::<f64>::zeros((nk, dv));
    let pass2 =
        |(kb, mut dy, mut dvv): (usize, ArrayViewMut2<f64>, ArrayViewMut2<f64>)| -> Result<()> {
            ctl.check()?;
            let k0 = kb * blk;
            let rows = dy.nrows();
            let yb = y.slice(s![k0..k0 + rows, ..]);
            let bb = b.slice(s![k0..k0 + rows, ..]);
            let mono = feats.fill(yb, false);
            let states = row_states.states(kb)?;
            let mut dvb = match row_states.apply(&states, &mono) {
                Some(t) => t.slice(s![.., ..dv]).to_owned(),
                None => Array2::zeros((rows, dv)),
            };
            let mut gy = match row_states.apply_t(&states, bb) {
                Some(coef) => feats.backprop(yb, mono.view(), coef.view()),
                None => Array2::zeros((rows, d)),
            };
            for (p0, p1) in row_states.tiles(kb) {
                let xp = x.slice(s![p0..p1, ..]);
                let ap = a_all.slice(s![p0..p1, ..]);
                let m = yb.dot(&xp.t());
                let gm = bb.dot(&ap.t());
                let mut pm = Array2::<f64>::zeros(m.dim());
                let mut dpm = Array2::<f64>::zeros(m.dim());
                for ((a, jj), &mv) in m.indexed_iter() {
                    let w = row_states.weight(k0 + a, p0 + jj);
                    if w != 0.0 {
                        pm[[a, jj]] = poly.eval(mv) * w;
                        dpm[[a, jj]] = dp(mv) * w * gm[[a, jj]];
                    }
                }
                dvb += &pm.dot(&ap.slice(s![.., ..dv]));
                gy += &dpm.dot(&xp);
            }
            dy.assign(&gy);
            dvv.assign(&dvb);
            Ok(())
        };
    let jobs: Vec<(usize, ArrayViewMut2<f64>, ArrayViewMut2<f64>)> = dy
        .axis_chunks_iter_mut(Axis(0), blk)
        .zip(dvv.axis_chunks_iter_mut(Axis(0), blk))
        .enumerate()
        .map(|(c, (g, v))| (c, g, v))
        .collect();
    jobs.into_par_iter().map(pass2).collect::<Result<()>>()?;
    Ok(HeadGrads {
        dq: dx,
        dk: dy,
        dv: dvv,
        out,
        lse,
        cert: Default::default(),
    })
}
