//! The fast backward for RoPE without Toeplitz products: the low-rank feature map of
//! [`super`], differentiated.
//!
//! With `x_i = scale f² R(p_i θ) q_i`, `y_j = R(p'_j θ) k_j` and `M_ij = x_i · y_j`, the
//! approximate forward is `Ã_ij = p(M_ij) = Φq(x_i) · Φk(y_j)` over the visible pairs,
//! `l̃ = Ã 1`, `Õ = Ã V / l̃`. As in [`super::backward`], the gradient of `Σ dO ∘ Õ` with respect
//! to `Ã_ij` is `G_ij = a_i · b_j` with `a = [dO / l̃, -D / l̃]`, `D_i = dO_i · Õ_i`, `b = [V, 1]`.
//! Since `∇_x p(x · y) = J_Φq(x)^T Φk(y)` and `∇_y p(x · y) = J_Φk(y)^T Φq(x)`:
//!
//! ```text
//! dx_i = J_Φq(x_i)^T S_i a_i,      S_i = Σ_{j visible to i} Φk(y_j) b_j^T      (r x (dv+1))
//! dy_j = J_Φk(y_j)^T T_j b_j,      T_j = Σ_{i that see j} Φq(x_i) a_i^T
//! dV_j = T_j[:, :dv]^T Φk(y_j),    dq_i = scale f² R(p_i θ)^T dx_i,   dk_j = R(p'_j θ)^T dy_j.
//! ```
//!
//! `S` is the forward's own running state (so pass 1 is the forward plus `z = S a_i` and one
//! reverse sweep through the monomial products per row); `T` is a suffix sum over query rows
//! (pass 2, key blocks in reverse). With a causal mask, the pairs a block sees only in part go
//! through `p(M)` and `p'(M)` themselves on diagonal blocks ([`block_rows`]: 32 to 256 rows), as in the forward. Time
//! `O((nq + nk) r (dv + 1))` (about three forwards), memory `O(block r + r dv)` besides the
//! inputs, `a` and the outputs. It is the exact gradient of the approximate forward
//! [`super::lowrank_head`] computes (up to rounding).

use super::band_backward::band_backward_head;
use super::forward::{horner_in_place, sub_blocks, tri_acc, with_ones, Features};
use super::plan::block_rows;
use crate::error::{Error, Result};
use crate::fast::common::{chunk_len, chunk_ranges, consecutive, range_sums, scan};
use crate::fast::grad::HeadGrads;
use crate::fast::grad_bounds::derivative_coeffs;
use crate::fast::plans::BackwardPlan;
use crate::problem::Control;
use crate::profile::{self, Phase};
use ndarray::linalg::general_mat_mul;
use ndarray::{s, Array1, Array2, ArrayView1, ArrayView2, ArrayViewMut1, ArrayViewMut2, Axis};
use rayon::prelude::*;

/// One chunk of pass 1's outputs: `(chunk, a, out, lse, dx)` rows.
type Pass1Rows<'a> = (
    usize,
    ArrayViewMut2<'a, f64>,
    ArrayViewMut2<'a, f64>,
    ArrayViewMut1<'a, f64>,
    ArrayViewMut2<'a, f64>,
);

/// Pass 1's row `i` from its sums `acc = [Ã V, l̃]`: `out_i = (Ã V)_i / l̃_i`, `a_i = [dO_i / l̃_i,
/// (dlse_i - D_i) / l̃_i]` (`d lse_i / d Ã_ij = 1 / l̃_i`: the cotangent `g` of lse joins `-D_i`);
/// returns `lse_i`, or an error when the denominator is not positive.
pub(super) fn finish_row(
    i: usize,
    acc: ArrayView1<f64>,
    dout: ArrayView1<f64>,
    g: f64,
    mut out: ArrayViewMut1<f64>,
    mut a: ArrayViewMut1<f64>,
) -> Result<f64> {
    let dv = out.len();
    let den = acc[dv];
    if !(den.is_finite() && den > 0.0) {
        return Err(Error::Approximation(format!(
            "fast backward (low-rank): row {i} has denominator {den:e} despite the certificate; \
             use the exact method"
        )));
    }
    let mut dsum = 0.0;
    for col in 0..dv {
        let val = acc[col] / den;
        out[col] = val;
        dsum += dout[col] * val;
        a[col] = dout[col] / den;
    }
    a[dv] = (g - dsum) / den;
    Ok(den.ln())
}

/// `f(M)` (coefficients `c`, by Horner: the operations of `Polynomial::eval`) on the first
/// `seen(a)` entries of each row `a` of `m`, in place, and 0 on the rest (the pairs a causal
/// mask hides), one vectorised pass per coefficient.
fn eval_seen(
    c: &[f64],
    m: &mut Array2<f64>,
    seen: impl Fn(usize) -> usize,
    scratch: &mut Vec<f64>,
) {
    for (a, mut row) in m.outer_iter_mut().enumerate() {
        let row = row.as_slice_mut().expect("a fresh row-major product");
        let (vis, masked) = row.split_at_mut(seen(a).min(row.len()));
        horner_in_place(c, vis, scratch);
        masked.fill(0.0);
    }
}

/// `a b^T` on the entries row `i` sees (its first `seen(i)` columns, up to the sub-block's
/// `lim`); the rest is zero or a value the caller multiplies by zero.
fn tri_abt(a: ArrayView2<f64>, b: ArrayView2<f64>, seen: impl Fn(usize) -> usize) -> Array2<f64> {
    let mut c = Array2::<f64>::zeros((a.nrows(), b.nrows()));
    for (s0, s1, lim) in sub_blocks(a.nrows(), seen) {
        general_mat_mul(
            1.0,
            &a.slice(s![s0..s1, ..]),
            &b.slice(s![..lim, ..]).t(),
            0.0,
            &mut c.slice_mut(s![s0..s1, ..lim]),
        );
    }
    c
}

/// `c += a^T b` for a tile `a` that is zero beyond `seen(row)` in each row.
fn tri_atb(
    a: ArrayView2<f64>,
    b: ArrayView2<f64>,
    mut c: ArrayViewMut2<f64>,
    seen: impl Fn(usize) -> usize,
) {
    for (s0, s1, lim) in sub_blocks(a.nrows(), seen) {
        general_mat_mul(
            1.0,
            &a.slice(s![s0..s1, ..lim]).t(),
            &b.slice(s![s0..s1, ..]),
            1.0,
            &mut c.slice_mut(s![..lim, ..]),
        );
    }
}

/// `p'` evaluated by Horner.
pub(super) fn derivative(coeffs: &[f64]) -> impl Fn(f64) -> f64 {
    let dc = derivative_coeffs(coeffs);
    move |x| dc.iter().rev().fold(0.0, |acc, &c| acc * x + c)
}

/// One head through the low-rank backward, in rotated coordinates: `x` (`nq x d`) and `y`
/// (`nk x d`) from [`super::rotate`], `v` (`nk x dv`), `dout` (`nq x dv`). Returns
/// `dx`, `dy` (the gradients with respect to `x` and `y`; [`super::rotate_back`] turns
/// them into `dq`, `dk`), `dv`, and the approximate forward `(out, lse)`, in a [`HeadGrads`]
/// whose `cert` is left at its default.
pub fn lowrank_backward_head(
    plan: &BackwardPlan,
    x: ArrayView2<f64>,
    y: ArrayView2<f64>,
    v: ArrayView2<f64>,
    dout: ArrayView2<f64>,
    dlse: Option<ArrayView1<f64>>,
    ctl: &Control,
) -> Result<HeadGrads> {
    let lg = plan
        .lowrank
        .ok_or_else(|| Error::Value("lowrank_backward_head: not a low-rank plan".into()))?;
    let (nq, nk, d, dv) = (x.nrows(), y.nrows(), x.ncols(), v.ncols());
    for (name, a, rows, cols) in [
        ("x", &x, nq, d),
        ("y", &y, nk, d),
        ("v", &v, nk, dv),
        ("dout", &dout, nq, dv),
    ] {
        if a.dim() != (rows, cols) {
            return Err(Error::Value(format!(
                "{name}: expected shape ({rows}, {cols}), got {:?}",
                a.dim()
            )));
        }
    }
    if let Some(g) = &dlse {
        if g.len() != nq {
            return Err(Error::Value(format!(
                "dlse: expected shape ({nq},), got ({},)",
                g.len()
            )));
        }
    }
    if !lg.lr.band.is_plain() {
        return band_backward_head(plan, &lg.lr, x, y, v, dout, dlse, ctl);
    }
    let poly = &plan.poly;
    let dcoeffs = derivative_coeffs(&poly.coeffs);
    let feats = Features::new(d, poly);
    let r = feats.len();
    let blk = block_rows(r as f64, d, poly.degree, dv);
    let wv = Array1::from(feats.weight.clone());
    let cols = dv + 1;
    let shift = lg.lr.causal_shift;
    let visible = |i: usize| -> usize {
        match shift {
            None => nk,
            Some(c) => (i as i64 + c + 1).clamp(0, nk as i64) as usize,
        }
    };

    let first_full = |k1: usize| -> usize {
        match shift {
            None => 0,
            Some(c) => (k1 as i64 - 1 - c).clamp(0, nq as i64) as usize,
        }
    };
    let first_seen = |k0: usize| -> usize {
        match shift {
            None => 0,
            Some(c) => (k0 as i64 - c).clamp(0, nq as i64) as usize,
        }
    };
    let zero = Array2::<f64>::zeros((r, cols));
    // Σ_{j in [a, b)} Φk(y_j) b_j^T (and, in pass 2, Σ_{i in [a, b)} Φq(x_i) a_i^T)
    let key_state = |a: usize, b_: usize| feats.state_ones(y, v, a..b_, blk, ctl);

    // Pass 1: chunks of query blocks in parallel, each from the prefix state S of the keys its
    // first block sees in full; within a chunk, blocks in order (S grows by the keys between).
    let qchunks = chunk_ranges(nq, blk);
    let kbounds: Vec<usize> = qchunks.iter().map(|&(i0, _)| visible(i0)).collect();
    let pieces = range_sums(&consecutive(&kbounds), nk, blk, &zero, &key_state)?;
    let prefix = scan(pieces, &zero, false);
    let mut a_all = Array2::<f64>::zeros((nq, cols));
    let mut out = Array2::<f64>::zeros((nq, dv));
    let mut lse = Array1::<f64>::from_elem(nq, f64::NEG_INFINITY);
    let mut dx = Array2::<f64>::zeros((nq, d));
    let pass1 = |(c, mut a_ch, mut out, mut lse, mut dx): Pass1Rows| -> Result<()> {
        let (c0, c1) = qchunks[c];
        let mut state = prefix[c].clone();
        let mut in_state = kbounds[c];
        let mut scratch = Vec::with_capacity(blk);
        for i0 in (c0..c1).step_by(blk) {
            ctl.check()?;
            let i1 = (i0 + blk).min(c1);
            let (full, last) = (visible(i0), visible(i1 - 1));
            if in_state < full {
                state += &key_state(in_state, full)?;
                in_state = full;
            }
            let xb = x.slice(s![i0..i1, ..]);
            let mono = feats.fill(xb, false);
            let mut acc = profile::time(Phase::Gemm, || (&mono * &wv).dot(&state));
            // keys [full, last) are seen in part: row a sees the first seen1(a) of them
            let seen1 = |a: usize| visible(i0 + a).saturating_sub(full).min(last - full);
            let partial = (last > full).then(|| {
                let _s = profile::span(Phase::Diagonal);
                let yp = y.slice(s![full..last, ..]);
                let m = xb.dot(&yp.t());
                let mut pm = m.clone();
                eval_seen(&poly.coeffs, &mut pm, seen1, &mut scratch);
                let bp = with_ones(v.slice(s![full..last, ..]));
                tri_acc(pm.view(), bp.view(), acc.view_mut(), seen1);
                (m, bp)
            });
            for a in 0..i1 - i0 {
                let (i, o) = (i0 + a, i0 + a - c0);
                if visible(i) == 0 {
                    continue; // no visible key: no gradient flows through this row
                }
                let g = dlse.as_ref().map_or(0.0, |g| g[i]);
                lse[o] = finish_row(
                    i,
                    acc.row(a),
                    dout.row(i),
                    g,
                    out.row_mut(o),
                    a_ch.row_mut(o),
                )?;
            }
            let ab = a_ch.slice(s![i0 - c0..i1 - c0, ..]);
            let mut coef = profile::time(Phase::Gemm, || ab.dot(&state.t()));
            coef *= &wv;
            let mut gx = feats.backprop(xb, mono.view(), coef.view());
            if let Some((mut m, bp)) = partial {
                let _s = profile::span(Phase::Diagonal);
                let yp = y.slice(s![full..last, ..]);
                let gm = tri_abt(ab, bp.view(), seen1);
                eval_seen(&dcoeffs, &mut m, seen1, &mut scratch);
                m *= &gm;
                gx += &m.dot(&yp);
            }
            dx.slice_mut(s![i0 - c0..i1 - c0, ..]).assign(&gx);
        }
        Ok(())
    };
    let per = chunk_len(nq, blk);
    let jobs: Vec<Pass1Rows> = a_all
        .axis_chunks_iter_mut(Axis(0), per)
        .zip(out.axis_chunks_iter_mut(Axis(0), per))
        .zip(lse.axis_chunks_iter_mut(Axis(0), per))
        .zip(dx.axis_chunks_iter_mut(Axis(0), per))
        .enumerate()
        .map(|(c, (((a, o), l), g))| (c, a, o, l, g))
        .collect();
    jobs.into_par_iter().map(pass1).collect::<Result<()>>()?;

    // Pass 2: chunks of key blocks in parallel, each from the suffix state T of the query rows
    // that see its last block in full; within a chunk, blocks in reverse (T grows downwards).
    let a_all = a_all.view();
    let row_state = |a: usize, b_: usize| feats.state(x, a_all, true, a..b_, blk, ctl);
    let kchunks = chunk_ranges(nk, blk);
    let rbounds: Vec<usize> = kchunks.iter().map(|&(_, k1)| first_full(k1)).collect();
    // rows [rbounds[c], rbounds[c+1]) (and [last, nq)) as pieces; T_c sums the pieces from c on
    let mut row_ranges: Vec<(usize, usize)> = rbounds
        .iter()
        .zip(rbounds.iter().skip(1).chain(std::iter::once(&nq)))
        .map(|(&lo, &hi)| (lo, hi))
        .collect();
    if row_ranges.is_empty() {
        row_ranges.push((nq, nq));
    }
    let pieces = range_sums(&row_ranges, nq, blk, &zero, &row_state)?;
    let suffix = scan(pieces, &zero, true);
    let mut dy = Array2::<f64>::zeros((nk, d));
    let mut dvv = Array2::<f64>::zeros((nk, dv));
    let pass2 =
        |(c, mut dy, mut dvv): (usize, ArrayViewMut2<f64>, ArrayViewMut2<f64>)| -> Result<()> {
            let (c0, c1) = kchunks[c];
            let mut scratch = Vec::with_capacity(blk);
            let mut t = suffix[c].clone();
            let mut t_from = rbounds[c];
            let rows = c1 - c0;
            let nblocks = rows.div_ceil(blk);
            for kb in (0..nblocks).rev() {
                ctl.check()?;
                let (k0, k1) = (c0 + kb * blk, (c0 + (kb + 1) * blk).min(c1));
                let ff = first_full(k1);
                if t_from > ff {
                    t += &row_state(ff, t_from)?;
                    t_from = ff;
                }
                let yb = y.slice(s![k0..k1, ..]);
                let bb = with_ones(v.slice(s![k0..k1, ..]));
                let mono = feats.fill(yb, false);
                let (mut dvb, coef) = profile::time(Phase::Gemm, || {
                    (mono.dot(&t.slice(s![.., ..dv])), bb.dot(&t.t()))
                });
                let mut gy = feats.backprop(yb, mono.view(), coef.view());
                let p0 = first_seen(k0).min(ff);
                if ff > p0 {
                    let _s = profile::span(Phase::Diagonal);
                    let xp = x.slice(s![p0..ff, ..]);
                    let ap = a_all.slice(s![p0..ff, ..]);
                    // query p0 + a sees the first seen2(a) keys of the block
                    let seen2 = |a: usize| visible(p0 + a).saturating_sub(k0).min(k1 - k0);
                    let mut pm = xp.dot(&yb.t());
                    let mut dpm = pm.clone();
                    eval_seen(&poly.coeffs, &mut pm, seen2, &mut scratch);
                    eval_seen(&dcoeffs, &mut dpm, seen2, &mut scratch);
                    dpm *= &tri_abt(ap, bb.view(), seen2);
                    tri_atb(pm.view(), ap.slice(s![.., ..dv]), dvb.view_mut(), seen2);
                    tri_atb(dpm.view(), xp, gy.view_mut(), seen2);
                }
                dy.slice_mut(s![k0 - c0..k1 - c0, ..]).assign(&gy);
                dvv.slice_mut(s![k0 - c0..k1 - c0, ..]).assign(&dvb);
            }
            Ok(())
        };
    let per = chunk_len(nk, blk);
    let jobs: Vec<(usize, ArrayViewMut2<f64>, ArrayViewMut2<f64>)> = dy
        .axis_chunks_iter_mut(Axis(0), per)
        .zip(dvv.axis_chunks_iter_mut(Axis(0), per))
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
