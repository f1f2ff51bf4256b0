//! The low-rank forward: rotate, map to features, and sum through running states (see the
//! parent module).

use super::band::{band_sums, row_sees};
use crate::arch::Real;
use crate::error::{Error, Result};
use crate::fast::common::{
    chunk_len, chunk_ranges, consecutive, range_sums, scan, FastOutput, FastReport,
};
use crate::fast::plans::{FastPlan, LowRank};
use crate::poly::Polynomial;
use crate::position::RotaryW;
use crate::problem::Control;
use crate::profile::{self, Phase};
use ndarray::linalg::general_mat_mul;
use ndarray::{s, Array1, Array2, ArrayView2, ArrayViewMut1, ArrayViewMut2, Axis, ShapeBuilder};
use rayon::prelude::*;
use std::collections::HashMap;

/// Query rows per block (and the largest number of partially visible keys per block).
pub const BLOCK: usize = 256;

/// Rows per block of the low-rank forward with a causal mask: each row meets up to a block of
/// keys through `p(M)` directly (about `block (d + g + dv + 1)` flops on average) against
/// `4 r (dv + 1)` through the states; a multiple of 16 in `32..=BLOCK`.
pub fn forward_block(r: f64, d: usize, g: usize, dv: usize) -> usize {
    let cols = (dv + 1) as f64;
    let balance = 4.0 * r * cols / (d as f64 + g as f64 + cols);
    ((balance / 16.0).ceil() as usize * 16).clamp(32, BLOCK)
}

/// `p(x)` for each `x` of `xs`, in place: Horner's rule with the loop over the elements inside
/// (vectorised), the same operations in the same order as [`Polynomial::eval`].
pub(super) fn horner_in_place(c: &[f64], xs: &mut [f64], m: &mut Vec<f64>) {
    m.clear();
    m.extend_from_slice(xs);
    xs.fill(0.0);
    for &ct in c.iter().rev() {
        xs.iter_mut()
            .zip(m.iter())
            .for_each(|(a, &x)| *a = *a * x + ct);
    }
}

/// Some rows of a head's `out` and `lse`.
type Rows<'a, T> = (ArrayViewMut2<'a, T>, ArrayViewMut1<'a, T>);

/// Rows per sub-block of a causal block's partially visible keys: each sub-block multiplies only
/// the keys its rows can see, so the masked half of the tile costs (almost) nothing.
const DIAGONAL_ROWS: usize = 32;

/// The sub-blocks `(s0, s1, lim)` of a tile of `rows` rows whose row `a` sees its first
/// `seen(a)` columns (`seen` nondecreasing): `lim = seen(s1 - 1)`, empty ones left out.
pub(super) fn sub_blocks(
    rows: usize,
    seen: impl Fn(usize) -> usize,
) -> impl Iterator<Item = (usize, usize, usize)> {
    (0..rows).step_by(DIAGONAL_ROWS).filter_map(move |s0| {
        let s1 = (s0 + DIAGONAL_ROWS).min(rows);
        let lim = seen(s1 - 1);
        (lim > 0).then_some((s0, s1, lim))
    })
}

/// `c += a b` for a tile `a` that is zero beyond `seen(row)` in each row.
pub(super) fn tri_acc(
    a: ArrayView2<f64>,
    b: ArrayView2<f64>,
    mut c: ArrayViewMut2<f64>,
    seen: impl Fn(usize) -> usize,
) {
    for (s0, s1, lim) in sub_blocks(a.nrows(), seen) {
        general_mat_mul(
            1.0,
            &a.slice(s![s0..s1, ..lim]),
            &b.slice(s![..lim, ..]),
            1.0,
            &mut c.slice_mut(s![s0..s1, ..]),
        );
    }
}

/// Rows per block of the low-rank forward without a mask or band (no partially visible keys):
/// as many as keep a block of `r` features near 256 KiB, a multiple of 64 in `BLOCK..=4096`.
pub fn unmasked_block(r: usize) -> usize {
    ((32768 / r.max(1)) / 64 * 64).clamp(BLOCK, 4096)
}

/// `mul R(ψ_i) x_i` with `ψ_i = (start + i) θ` per pair: `x = rotate(q, c, scale f²)` and
/// `y = rotate(k, 0, 1)` give `M_ij = x_i · y_j` (see the module docs; any sign of `scale`).
pub fn rotate(rot: &RotaryW, x: ArrayView2<f64>, start: i64, mul: f64) -> Array2<f64> {
    rotate_rows(rot, &[(x, mul)], start)
        .pop()
        .expect("one input, one output")
}

/// [`rotate`] of `q` at positions `start + i` (times `mul_q`) and of `k` at `j`: without an
/// offset (`start = 0`) both take each position's `sin_cos` from one evaluation.
pub fn rotate_pair(
    rot: &RotaryW,
    q: ArrayView2<f64>,
    k: ArrayView2<f64>,
    start: i64,
    mul_q: f64,
) -> (Array2<f64>, Array2<f64>) {
    let mut out = if start == 0 {
        rotate_rows(rot, &[(q, mul_q), (k, 1.0)], 0)
    } else {
        let mut x = rotate_rows(rot, &[(q, mul_q)], start);
        x.append(&mut rotate_rows(rot, &[(k, 1.0)], 0));
        x
    };
    let y = out.pop().expect("two outputs");
    (out.pop().expect("two outputs"), y)
}

/// Each `(x, mul)` rotated with row `i` at position `start + i`; the angles of a position are
/// evaluated once for every input that has that row. Rows by chunks in parallel (each row's
/// result depends on that row only).
fn rotate_rows(rot: &RotaryW, inputs: &[(ArrayView2<f64>, f64)], start: i64) -> Vec<Array2<f64>> {
    const PER: usize = 4096;
    let mut outs: Vec<Array2<f64>> = inputs
        .iter()
        .map(|(x, _)| Array2::zeros(x.raw_dim()))
        .collect();
    let rows = inputs.iter().map(|(x, _)| x.nrows()).max().unwrap_or(0);
    let mut jobs: Vec<Vec<Option<ArrayViewMut2<f64>>>> =
        (0..rows.div_ceil(PER)).map(|_| Vec::new()).collect();
    for o in outs.iter_mut() {
        let mut chunks = o.axis_chunks_iter_mut(Axis(0), PER);
        for job in jobs.iter_mut() {
            job.push(chunks.next());
        }
    }
    jobs.into_par_iter().enumerate().for_each(|(c, mut views)| {
        let mut angles = vec![(0.0, 0.0); rot.pairs.len()];
        for ii in 0..PER.min(rows - c * PER) {
            let i = c * PER + ii;
            let pos = (start + i as i64) as f64;
            for (a, &th) in angles.iter_mut().zip(&rot.theta) {
                *a = (pos * th).sin_cos();
            }
            for ((x, mul), view) in inputs.iter().zip(views.iter_mut()) {
                let Some(view) = view.as_mut().filter(|_| i < x.nrows()) else {
                    continue;
                };
                let (row, mut o) = (x.row(i), view.row_mut(ii));
                for (&(p, r), &(sn, cs)) in rot.pairs.iter().zip(&angles) {
                    let (a, b) = (row[p], row[r]);
                    o[p] = mul * (a * cs - b * sn);
                    o[r] = mul * (a * sn + b * cs);
                }
            }
        }
    });
    outs
}

/// The transpose of [`rotate`]: `mul R(ψ_i)^T g_i` with `ψ_i = (start + i) θ` per pair (the
/// chain rule back from rotated coordinates: `dq = rotate_back(dx, c, scale f²)`).
pub fn rotate_back(rot: &RotaryW, g: ArrayView2<f64>, start: i64, mul: f64) -> Array2<f64> {
    let mut out = Array2::zeros(g.raw_dim());
    for (i, row) in g.outer_iter().enumerate() {
        let pos = (start + i as i64) as f64;
        for (m, &(p, r)) in rot.pairs.iter().enumerate() {
            let (sn, cs) = (pos * rot.theta[m]).sin_cos();
            let (a, b) = (row[p], row[r]);
            out[[i, p]] = mul * (a * cs + b * sn);
            out[[i, r]] = mul * (b * cs - a * sn);
        }
    }
    out
}

/// The monomials `x^α`, `|α| <= g`, built one product at a time, with the weights
/// `c_|α| (|α| choose α)` of the query side.
pub(crate) struct Features {
    /// `(parent, coordinate)`: monomial `m` is monomial `parent` times `x[coordinate]`.
    pub(crate) steps: Vec<(usize, usize)>,
    pub(crate) weight: Vec<f64>,
}

impl Features {
    pub(crate) fn new(d: usize, poly: &Polynomial) -> Self {
        let mut index: HashMap<Vec<usize>, usize> = HashMap::new();
        let mut list: Vec<Vec<usize>> = vec![Vec::new()];
        index.insert(Vec::new(), 0);
        let mut steps = vec![(0, 0)];
        let mut weight = vec![poly.coeffs[0]];
        let mut layer: Vec<Vec<usize>> = vec![Vec::new()];
        for t in 1..=poly.degree {
            let mut next = Vec::new();
            for combo in &layer {
                let from = combo.last().copied().unwrap_or(0);
                for l in from..d {
                    let mut c = combo.clone();
                    c.push(l);
                    let parent = index[combo];
                    index.insert(c.clone(), list.len());
                    steps.push((parent, l));
                    // t! / Π α_l!
                    let mut counts = vec![0usize; d];
                    for &x in &c {
                        counts[x] += 1;
                    }
                    let denom: f64 = counts
                        .iter()
                        .map(|&a| (1..=a).map(|x| x as f64).product::<f64>())
                        .product();
                    let multinom = (1..=t).map(|x| x as f64).product::<f64>() / denom;
                    weight.push(poly.coeffs[t] * multinom);
                    list.push(c.clone());
                    next.push(c);
                }
            }
            layer = next;
        }
        Features { steps, weight }
    }

    pub(crate) fn len(&self) -> usize {
        self.steps.len()
    }

    /// `rows x r` monomials of `x` (weighted for the query side), in column-major order: each
    /// monomial is one pass over the rows (`parent ∘ x_l`, vectorised), and the transposed
    /// `r x rows` matrix the key states need is contiguous.
    pub(crate) fn fill(&self, x: ArrayView2<f64>, weighted: bool) -> Array2<f64> {
        let _s = profile::span(Phase::Features);
        let (rows, d, r) = (x.nrows(), x.ncols(), self.len());
        let mut xc = vec![0.0; d * rows];
        for (i, row) in x.outer_iter().enumerate() {
            for (l, &a) in row.iter().enumerate() {
                xc[l * rows + i] = a;
            }
        }
        let mut f = vec![0.0; r * rows];
        f[..rows].fill(1.0);
        for (m, &(parent, l)) in self.steps.iter().enumerate().skip(1) {
            // every monomial's parent comes before it
            let (done, rest) = f.split_at_mut(m * rows);
            let src = &done[parent * rows..(parent + 1) * rows];
            let xl = &xc[l * rows..(l + 1) * rows];
            rest[..rows]
                .iter_mut()
                .zip(src.iter().zip(xl))
                .for_each(|(o, (&a, &b))| *o = a * b);
        }
        if weighted {
            for (col, &w) in f.chunks_exact_mut(rows.max(1)).zip(&self.weight) {
                col.iter_mut().for_each(|a| *a *= w);
            }
        }
        Array2::from_shape_vec((rows, r).f(), f).expect("r x rows values")
    }

    /// `Σ_{i in rows} Φ(x_i) w_i^T` (`r x w.ncols()`), `blk` rows of features at a time, polling
    /// `ctl` between blocks: the running states of the low-rank forward and backward.
    pub(crate) fn state(
        &self,
        x: ArrayView2<f64>,
        w: ArrayView2<f64>,
        weighted: bool,
        rows: std::ops::Range<usize>,
        blk: usize,
        ctl: &Control,
    ) -> Result<Array2<f64>> {
        let mut st = Array2::zeros((self.len(), w.ncols()));
        for r0 in rows.clone().step_by(blk.max(1)) {
            ctl.check()?;
            let r1 = (r0 + blk).min(rows.end);
            let f = self.fill(x.slice(s![r0..r1, ..]), weighted);
            let _s = profile::span(Phase::Gemm);
            general_mat_mul(1.0, &f.t(), &w.slice(s![r0..r1, ..]), 1.0, &mut st);
        }
        Ok(st)
    }

    /// `Σ_{i in rows} Φ(x_i) [w_i, 1]^T` (`r x (w.ncols() + 1)`, unweighted features): the key
    /// state of the forward without a copy of `[V, 1]`.
    pub(crate) fn state_ones(
        &self,
        x: ArrayView2<f64>,
        w: ArrayView2<f64>,
        rows: std::ops::Range<usize>,
        blk: usize,
        ctl: &Control,
    ) -> Result<Array2<f64>> {
        let mut st = Array2::zeros((self.len(), w.ncols() + 1));
        self.state_ones_into(&mut st, x, w, rows, blk, ctl)?;
        Ok(st)
    }

    /// [`Features::state_ones`] added to `st`.
    pub(crate) fn state_ones_into(
        &self,
        st: &mut Array2<f64>,
        x: ArrayView2<f64>,
        w: ArrayView2<f64>,
        rows: std::ops::Range<usize>,
        blk: usize,
        ctl: &Control,
    ) -> Result<()> {
        let dw = w.ncols();
        for r0 in rows.clone().step_by(blk.max(1)) {
            ctl.check()?;
            let r1 = (r0 + blk).min(rows.end);
            let f = self.fill(x.slice(s![r0..r1, ..]), false);
            let _s = profile::span(Phase::Gemm);
            general_mat_mul(
                1.0,
                &f.t(),
                &w.slice(s![r0..r1, ..]),
                1.0,
                &mut st.slice_mut(s![.., ..dw]),
            );
            st.column_mut(dw)
                .zip_mut_with(&f.sum_axis(Axis(0)), |a, &b| *a += b);
        }
        Ok(())
    }

    /// Row by row, the gradient `Σ_m coef[m] ∂(x^α_m)/∂x` (`rows x d`), with `mono` the
    /// unweighted monomials of `x` ([`Features::fill`] with `weighted = false`): reverse mode
    /// through the product steps, so each entry is a sum of products `coef[m] α_l x^{α_m - e_l}`.
    /// The adjoints are held feature by feature (column-major, as `fill` builds the monomials), so
    /// each step is one vectorised pass over the rows.
    pub(crate) fn backprop(
        &self,
        x: ArrayView2<f64>,
        mono: ArrayView2<f64>,
        coef: ArrayView2<f64>,
    ) -> Array2<f64> {
        let _s = profile::span(Phase::Backprop);
        let (rows, d) = x.dim();
        let mut out = Array2::zeros((rows, d));
        // chunks of rows small enough that a chunk's adjoints (`r x chunk`) stay in cache
        let chunk = (BACKPROP_BYTES / (8 * self.len().max(1))).clamp(8, 256);
        for c0 in (0..rows).step_by(chunk) {
            let c1 = (c0 + chunk).min(rows);
            self.backprop_rows(
                x.slice(s![c0..c1, ..]),
                mono.slice(s![c0..c1, ..]),
                coef.slice(s![c0..c1, ..]),
                out.slice_mut(s![c0..c1, ..]),
            );
        }
        out
    }

    /// [`Features::backprop`] of a chunk of rows, into `out` (`rows x d`).
    fn backprop_rows(
        &self,
        x: ArrayView2<f64>,
        mono: ArrayView2<f64>,
        coef: ArrayView2<f64>,
        mut out: ArrayViewMut2<f64>,
    ) {
        let (rows, d) = x.dim();
        let r = self.len();
        let mut adj = vec![0.0f64; r * rows];
        for (i, row) in coef.outer_iter().enumerate() {
            for (m, &c) in row.iter().enumerate() {
                adj[m * rows + i] = c;
            }
        }
        let xc: Vec<Vec<f64>> = (0..d).map(|l| x.column(l).to_vec()).collect();
        let mut g = vec![vec![0.0f64; rows]; d];
        let mut owned = Vec::new();
        for (m, &(parent, l)) in self.steps.iter().enumerate().skip(1).rev() {
            // a monomial's parent comes before it: the parent's adjoint is still to be used
            let (before, from_m) = adj.split_at_mut(m * rows);
            let a = &from_m[..rows];
            let col = mono.column(parent);
            let mp = match col.as_slice() {
                Some(x) => x,
                None => {
                    owned.clear();
                    owned.extend(col.iter());
                    &owned[..]
                }
            };
            g[l].iter_mut()
                .zip(a.iter().zip(mp))
                .for_each(|(gv, (&av, &mv))| *gv += av * mv);
            before[parent * rows..(parent + 1) * rows]
                .iter_mut()
                .zip(a.iter().zip(&xc[l]))
                .for_each(|(p, (&av, &xv))| *p += av * xv);
        }
        for (l, gl) in g.iter().enumerate() {
            out.column_mut(l)
                .iter_mut()
                .zip(gl)
                .for_each(|(o, &v)| *o = v);
        }
    }
}

/// Bytes of adjoints a chunk of [`Features::backprop`] keeps (`r x rows` floats): about half an
/// L2 cache.
const BACKPROP_BYTES: usize = 256 * 1024;

/// `[V, 1]` (`nk x (dv + 1)`).
pub(crate) fn with_ones(v: ArrayView2<f64>) -> Array2<f64> {
    let (nk, dv) = v.dim();
    let mut vb = Array2::ones((nk, dv + 1));
    vb.slice_mut(s![.., ..dv]).assign(&v);
    vb
}

/// One head through the low-rank path: `x` (`nq x d`) and `y` (`nk x d`) rotated by
/// [`rotate`], `v` (`nk x dv`). Returns `out` and `lse` (`-inf` for rows with no visible key).
pub fn lowrank_head(
    plan: &FastPlan,
    x: ArrayView2<f64>,
    y: ArrayView2<f64>,
    v: ArrayView2<f64>,
    ctl: &Control,
) -> Result<FastOutput> {
    let (nq, dv) = (x.nrows(), v.ncols());
    let mut out = Array2::<f64>::zeros((nq, dv));
    let mut lse = Array1::<f64>::zeros(nq);
    let report = lowrank_head_into(plan, x, y, v, out.view_mut(), lse.view_mut(), ctl)?;
    Ok(FastOutput { out, lse, report })
}

/// [`lowrank_head`] written into `out` (`nq x dv`) and `lse` (`nq`) of the call's own dtype:
/// each block of query rows is normalised and stored as soon as it is summed, so no `n x
/// (dv + 1)` array of numerators is ever held.
pub fn lowrank_head_into<T: Real>(
    plan: &FastPlan,
    x: ArrayView2<f64>,
    y: ArrayView2<f64>,
    v: ArrayView2<f64>,
    mut out: ArrayViewMut2<T>,
    mut lse: ArrayViewMut1<T>,
    ctl: &Control,
) -> Result<FastReport> {
    let lr = plan
        .lowrank
        .ok_or_else(|| Error::Value("lowrank_head: the plan is not a low-rank plan".into()))?;
    let (nq, nk, dv) = (x.nrows(), y.nrows(), v.ncols());
    if out.dim() != (nq, dv) || lse.len() != nq {
        return Err(Error::Value(format!(
            "lowrank_head: expected out ({nq}, {dv}) and lse ({nq}), got {:?} and ({})",
            out.dim(),
            lse.len()
        )));
    }
    let poly = &plan.poly;
    let feats = Features::new(x.ncols(), poly);
    let r = feats.len();
    let blk = match (lr.causal_shift, lr.band.is_plain()) {
        (None, true) => unmasked_block(r),
        _ => forward_block(r as f64, x.ncols(), poly.degree, dv),
    };
    let sees = row_sees(&lr.band, lr.causal_shift, nk);
    if lr.band.is_plain() {
        running_sums(&lr, &feats, poly, blk, x, y, v, out, lse, &sees, ctl)?;
    } else {
        // Each block's rows of `out` and `lse`, taken by the one job that sums that block.
        let views: Vec<std::sync::Mutex<Option<Rows<T>>>> = out
            .axis_chunks_iter_mut(Axis(0), blk)
            .zip(lse.axis_chunks_iter_mut(Axis(0), blk))
            .map(|v| std::sync::Mutex::new(Some(v)))
            .collect();
        let emit_block = |i0: usize, num: ArrayView2<f64>| -> Result<()> {
            let taken = views[i0 / blk].lock().ok().and_then(|mut v| v.take());
            let (o, l) = taken.ok_or_else(|| Error::Value("band_sums: a block twice".into()))?;
            emit(num, i0, o, l, &sees)
        };
        band_sums(
            &lr.band,
            lr.causal_shift.is_some(),
            &feats,
            poly,
            blk,
            x,
            y,
            with_ones(v).view(),
            ctl,
            &emit_block,
        )?;
    }
    Ok(FastReport {
        degree: poly.degree,
        kind: poly.kind,
        r: plan.bounds.r,
        rho: poly.rho,
        terms: plan.counts.terms,
        n_alpha: plan.counts.n_alpha,
        n_beta: plan.counts.n_beta,
        n_pairs: plan.counts.n_pairs,
        fft_len: 0,
        certified_error: plan.certified_error,
        approximation_error: plan.approximation_error,
        rounding_error: plan.rounding_error,
        certified_lse_error: plan.certified_lse_error,
    })
}

/// Rows `i0..` of numerators and denominators `num` (`rows x (dv + 1)`) normalised into `out`
/// and `lse`; a row that sees no key gets `out = 0`, `lse = -inf`.
fn emit<T: Real>(
    num: ArrayView2<f64>,
    i0: usize,
    mut out: ArrayViewMut2<T>,
    mut lse: ArrayViewMut1<T>,
    sees: &dyn Fn(usize) -> bool,
) -> Result<()> {
    let _s = profile::span(Phase::Output);
    let dv = out.ncols();
    for (a, (row, mut o)) in num.outer_iter().zip(out.outer_iter_mut()).enumerate() {
        if !sees(i0 + a) {
            o.fill(T::zero());
            lse[a] = T::neg_infinity();
            continue;
        }
        let den = row[dv];
        if den.is_nan() || den <= 0.0 {
            return Err(Error::Approximation(format!(
                "fast method (low-rank): a denominator came out {den:e}; its certificate failed"
            )));
        }
        let inv = 1.0 / den;
        o.iter_mut()
            .zip(row.iter())
            .for_each(|(o, &x)| *o = T::of(x * inv));
        lse[a] = T::of(den.ln());
    }
    Ok(())
}

/// `Σ_{j visible} p(M_ij) [v_j, 1]` without a band, normalised into `out` and `lse` block by
/// block: running states over the keys every row of a block sees, `p(M)` on the keys it sees
/// in part (the module docs).
#[allow(clippy::too_many_arguments)]
fn running_sums<T: Real>(
    lr: &LowRank,
    feats: &Features,
    poly: &Polynomial,
    blk: usize,
    x: ArrayView2<f64>,
    y: ArrayView2<f64>,
    v: ArrayView2<f64>,
    mut out: ArrayViewMut2<T>,
    mut lse: ArrayViewMut1<T>,
    sees: &(dyn Fn(usize) -> bool + Sync),
    ctl: &Control,
) -> Result<()> {
    let (nq, nk, cols) = (x.nrows(), y.nrows(), v.ncols() + 1);
    let r = feats.len();
    // query i sees keys j < visible(i)
    let visible = |i: usize| -> usize {
        match lr.causal_shift {
            None => nk,
            Some(c) => (i as i64 + c + 1).clamp(0, nk as i64) as usize,
        }
    };
    let zero = Array2::<f64>::zeros((r, cols));
    let key_state = |a: usize, b: usize| feats.state_ones(y, v, a..b, blk, ctl);
    // Chunks of query blocks in parallel, each from the prefix state of the keys its first
    // block sees in full (the chunking depends on the shape only: the same bits for any thread
    // count); within a chunk, blocks in order.
    let qchunks = chunk_ranges(nq, blk);
    let kbounds: Vec<usize> = qchunks.iter().map(|&(i0, _)| visible(i0)).collect();
    let pieces = range_sums(&consecutive(&kbounds), nk, blk, &zero, &key_state)?;
    let prefix = scan(pieces, &zero, false);
    let chunk = |(c, (mut out, mut lse)): (usize, Rows<T>)| {
        let (c0, c1) = qchunks[c];
        let mut state = prefix[c].clone();
        let mut in_state = kbounds[c];
        let mut block = Array2::<f64>::zeros((blk, cols));
        let mut scratch = Vec::with_capacity(blk);
        for i0 in (c0..c1).step_by(blk) {
            ctl.check()?;
            let i1 = (i0 + blk).min(c1);
            let (full, last) = (visible(i0), visible(i1 - 1));
            if in_state < full {
                feats.state_ones_into(&mut state, y, v, in_state..full, blk, ctl)?;
                in_state = full;
            }
            let mut num = block.slice_mut(s![..i1 - i0, ..]);
            let fq = feats.fill(x.slice(s![i0..i1, ..]), true);
            profile::time(Phase::Gemm, || {
                general_mat_mul(1.0, &fq, &state, 0.0, &mut num);
            });
            if last > full {
                // partially visible keys: p(M) itself on the visible pairs (a triangle)
                let _s = profile::span(Phase::Diagonal);
                let part = last - full;
                let seen = |a: usize| visible(i0 + a).saturating_sub(full).min(part);
                let mut pm = x
                    .slice(s![i0..i1, ..])
                    .dot(&y.slice(s![full..last, ..]).t());
                for (a, mut pr) in pm.outer_iter_mut().enumerate() {
                    let pr = pr.as_slice_mut().expect("a fresh row-major product");
                    let (vis, masked) = pr.split_at_mut(seen(a));
                    horner_in_place(&poly.coeffs, vis, &mut scratch);
                    masked.fill(0.0);
                }
                // rows by sub-blocks, each against the keys its last row sees (`seen` grows)
                let vb = with_ones(v.slice(s![full..last, ..]));
                tri_acc(pm.view(), vb.view(), num.view_mut(), seen);
            }
            let rows = s![i0 - c0..i1 - c0, ..];
            emit(
                num.view(),
                i0,
                out.slice_mut(rows),
                lse.slice_mut(s![i0 - c0..i1 - c0]),
                sees,
            )?;
        }
        Ok(())
    };
    let per = chunk_len(nq, blk);
    let jobs: Vec<(usize, Rows<T>)> = out
        .axis_chunks_iter_mut(Axis(0), per)
        .zip(lse.axis_chunks_iter_mut(Axis(0), per))
        .enumerate()
        .collect();
    jobs.into_par_iter().map(chunk).collect::<Result<()>>()
}
