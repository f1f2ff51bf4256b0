//! Exact forward: online softmax over key tiles.
//!
//! Per query row, with running max `m`, running sum `l` and accumulator `o`, each key tile does
//! `m' = max(m, max_j S_ij)`, `P_ij = exp(S_ij - m')`, `l = l e^{m-m'} + Σ_j P_ij`,
//! `o = o e^{m-m'} + P V`. At the end `O = o / l`, `lse = m + ln l`; a row that saw no visible
//! key keeps `l = 0` and returns `O = 0`, `lse = -inf`.

use super::{pack_queries, Shared, BK, BQ};
use crate::error::{Error, Result};
use crate::position::{Bias, Position};
use crate::problem::{Control, Problem};
use crate::real::Real;
use crate::simd;
use ndarray::{Array3, Array4, ArrayView4};
use rayon::prelude::*;

/// Checks that the arrays agree with `prob`.
pub(crate) fn check_shapes<T: Real>(
    prob: &Problem,
    q: &ArrayView4<'_, T>,
    k: &ArrayView4<'_, T>,
    v: &ArrayView4<'_, T>,
) -> Result<()> {
    prob.validate()?;
    let want = [
        ("q", q.dim(), (prob.batch, prob.hq, prob.nq, prob.d)),
        ("k", k.dim(), (prob.batch, prob.hk, prob.nk, prob.d)),
        ("v", v.dim(), (prob.batch, prob.hk, prob.nk, prob.dv)),
    ];
    for (name, got, exp) in want {
        if got != exp {
            return Err(Error::Value(format!(
                "{name}: expected shape {exp:?}, got {got:?}"
            )));
        }
    }
    Ok(())
}

/// `(out, lse)` of shapes `(batch, hq, nq, dv)` and `(batch, hq, nq)`.
pub fn attention_forward<'a, T: Real>(
    prob: &Problem,
    pos: &Position<'a, T>,
    bias: Option<&Bias<'a, T>>,
    q: ArrayView4<'_, T>,
    k: ArrayView4<'_, T>,
    v: ArrayView4<'_, T>,
    ctl: &Control,
) -> Result<(Array4<T>, Array3<T>)> {
    check_shapes(prob, &q, &k, &v)?;
    pos.validate(prob)?;
    if let Some(b) = bias {
        b.validate(prob)?;
    }
    let (nq, dv) = (prob.nq, prob.dv);
    let mut out = Array4::<T>::zeros((prob.batch, prob.hq, nq, dv));
    let mut lse = Array3::<T>::from_elem((prob.batch, prob.hq, nq), T::neg_infinity());
    if nq == 0 || prob.nk == 0 || dv == 0 || prob.batch * prob.hq == 0 {
        return Ok((out, lse));
    }
    let shared = Shared::new(prob, pos, bias, &k);
    let (Some(out_s), Some(lse_s)) = (out.as_slice_mut(), lse.as_slice_mut()) else {
        return Err(Error::Value("internal: output not contiguous".into()));
    };
    out_s
        .par_chunks_mut(nq * dv)
        .zip(lse_s.par_chunks_mut(nq))
        .enumerate()
        .for_each(|(bh, (o_head, l_head))| {
            o_head
                .par_chunks_mut(BQ * dv)
                .zip(l_head.par_chunks_mut(BQ))
                .enumerate()
                .for_each(|(qb, (o, l))| forward_block(&shared, &q, &v, bh, qb * BQ, o, l, ctl));
        });
    ctl.check()?;
    Ok((out, lse))
}

/// One query block of one head: rows `i0..i0 + lse.len()`.
#[allow(clippy::too_many_arguments)]
fn forward_block<T: Real>(
    sh: &Shared<'_, '_, T>,
    q: &ArrayView4<'_, T>,
    v: &ArrayView4<'_, T>,
    bh: usize,
    i0: usize,
    out: &mut [T],
    lse: &mut [T],
    ctl: &Control,
) {
    let prob = sh.prob;
    let (nk, dv) = (prob.nk, prob.dv);
    let nb = lse.len();
    let kvh = (bh / prob.hq) * prob.hk + (bh % prob.hq) / prob.group();
    let mut qb = Vec::with_capacity(nb * prob.d);
    pack_queries(prob, sh.pos, q, bh, i0, nb, &mut qb);
    let vh = v.slice(ndarray::s![kvh / prob.hk, kvh % prob.hk, .., ..]);
    let (vrs, vcs) = (vh.strides()[0], vh.strides()[1]);

    let mut m = vec![T::neg_infinity(); nb];
    let mut l = vec![T::zero(); nb];
    let mut s = vec![T::zero(); nb * BK];
    for j0 in (0..nk).step_by(BK) {
        if ctl.cancelled() {
            return;
        }
        let nbk = BK.min(nk - j0);
        let (g_lo, g_hi) = sh.tile_diagonals(i0, nb, j0, nbk);
        if !sh.logf.any_visible(g_lo, g_hi) {
            continue;
        }
        sh.tile_scores(bh, kvh, &qb, i0, nb, j0, nbk, &mut s);
        for i in 0..nb {
            let row = &mut s[i * nbk..(i + 1) * nbk];
            let mx = simd::max(row);
            if mx == T::neg_infinity() {
                row.iter_mut().for_each(|x| *x = T::zero());
                continue;
            }
            let m_new = m[i].max(mx);
            let alpha = (m[i] - m_new).exp();
            let sum = simd::exp_shift_sum(row, m_new);
            l[i] = l[i] * alpha + sum;
            if alpha != T::one() {
                out[i * dv..(i + 1) * dv]
                    .iter_mut()
                    .for_each(|x| *x = *x * alpha);
            }
            m[i] = m_new;
        }
        // SAFETY: `vh` rows j0..j0+nbk exist (nbk <= nk - j0); `out` is nb x dv, distinct memory.
        unsafe {
            let vp = vh.as_ptr().offset(j0 as isize * vrs);
            T::gemm(
                nb,
                nbk,
                dv,
                T::one(),
                s.as_ptr(),
                nbk as isize,
                1,
                vp,
                vrs,
                vcs,
                T::one(),
                out.as_mut_ptr(),
                dv as isize,
                1,
            );
        }
    }
    for i in 0..nb {
        let row = &mut out[i * dv..(i + 1) * dv];
        if l[i] > T::zero() {
            let inv = T::one() / l[i];
            row.iter_mut().for_each(|x| *x = *x * inv);
            lse[i] = m[i] + l[i].ln();
        } else {
            row.iter_mut().for_each(|x| *x = T::zero());
            lse[i] = T::neg_infinity();
        }
    }
}
