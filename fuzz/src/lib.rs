//! What the fuzz targets share: a call drawn from the fuzzer's bytes ([`Case::draw`]) and a naive
//! reference that materialises every score from the definition ([`reference`]).
//!
//! Calls are small (at most 2 x 6 heads of 14 x 14 scores) so the reference stays cheap and the
//! fuzzer spends its time in the kernels' branches: shapes that sometimes disagree with the
//! problem, offsets up to `i64::MAX`, windows, causal masks, every `w` form (rotary with both
//! layouts, 2x2 blocks, a sparse support, a dense table), bias tables, and values that are now
//! and then NaN, infinite, huge or subnormal.

use arbitrary::{Result, Unstructured};
use fastrope::{Bias, Position, Problem, RotaryW, SparseW};
use ndarray::{Array2, Array3, Array4};

/// The `w` forms the Python layer produces.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum WForm {
    Rotary,
    Block,
    Sparse,
    Dense,
}

/// One call: the problem, its arrays and its tables, owned.
#[derive(Debug)]
pub struct Case {
    pub prob: Problem,
    pub q: Array4<f64>,
    pub k: Array4<f64>,
    pub v: Array4<f64>,
    pub dout: Array4<f64>,
    pub form: WForm,
    pub rotary: RotaryW,
    pub support: Vec<(usize, usize)>,
    pub w_values: Array3<f64>,
    pub w_index: Vec<usize>,
    pub bias_values: Option<Array2<f64>>,
    pub bias_index: Vec<usize>,
    /// The fast method's accuracy target.
    pub eps: f64,
}

/// A value of magnitude about `amp`, or (when `wild`, one draw in 43) NaN, ±inf, ±1e300 or a
/// subnormal.
fn value(u: &mut Unstructured<'_>, amp: f64, wild: bool) -> Result<f64> {
    let b: u8 = u.arbitrary()?;
    if wild && b >= 250 {
        return Ok([f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1e300, -1e300, 1e-310][b as usize - 250]);
    }
    Ok((b as f64 - 125.0) / 125.0 * amp)
}

fn array4(u: &mut Unstructured<'_>, s: (usize, usize, usize, usize), amp: f64, wild: bool) -> Result<Array4<f64>> {
    let n = s.0 * s.1 * s.2 * s.3;
    let mut xs = Vec::with_capacity(n);
    for _ in 0..n {
        xs.push(value(u, amp, wild)?);
    }
    Ok(Array4::from_shape_vec(s, xs).expect("length matches"))
}

/// `x`, or (one draw in 16) `x + 1`: an array that disagrees with the problem.
fn jitter(u: &mut Unstructured<'_>, x: usize) -> Result<usize> {
    Ok(if u.ratio(1, 16)? { x + 1 } else { x })
}

fn offset(u: &mut Unstructured<'_>) -> Result<i64> {
    Ok(if u.ratio(1, 12)? {
        *u.choose(&[i64::MAX, i64::MIN, i64::MAX / 2, i64::MIN / 2, 1 << 40, -(1 << 53)])?
    } else {
        u.int_in_range(-20..=20)?
    })
}

/// Rotary pairs: `(m, m + d/2)` (half-split) or `(2m, 2m + 1)` (interleaved).
fn pairs(d: usize, interleaved: bool) -> Vec<(usize, usize)> {
    (0..d / 2)
        .map(|m| if interleaved { (2 * m, 2 * m + 1) } else { (m, m + d / 2) })
        .collect()
}

/// Rows `2L - 1` of a table along `δ`: usually enough for the call, sometimes too few or even.
fn table_rows(u: &mut Unstructured<'_>, prob: &Problem) -> Result<usize> {
    let need = match prob.visible_delta_range() {
        Some((lo, hi)) => lo.unsigned_abs().max(hi.unsigned_abs()).min(64) as usize,
        None => 0,
    };
    Ok(match u.int_in_range(0..=15)? {
        0 => 2 * u.int_in_range(0..=8usize)?,
        1 => 2 * u.int_in_range(0..=8usize)? + 1,
        _ => 2 * need + 1,
    })
}

fn table_index(u: &mut Unstructured<'_>, heads: usize, tables: usize) -> Result<Vec<usize>> {
    let len = jitter(u, heads)?;
    (0..len)
        .map(|_| Ok(if u.ratio(1, 40)? { tables } else { u.int_in_range(0..=tables - 1)? }))
        .collect()
}

impl Case {
    /// A call from the fuzzer's bytes. `wild` lets values be non-finite, huge or subnormal.
    pub fn draw(u: &mut Unstructured<'_>, wild: bool) -> Result<Case> {
        let batch = u.int_in_range(1..=2)?;
        let hk = u.int_in_range(1..=2)?;
        let hq = hk * u.int_in_range(1..=3)? + usize::from(u.ratio(1, 20)?);
        let (nq, nk) = (u.int_in_range(0..=14)?, u.int_in_range(0..=14)?);
        let d = u.int_in_range(1..=6)?;
        let dv = u.int_in_range(0..=4)?;
        let scale = if wild && u.ratio(1, 20)? {
            *u.choose(&[f64::NAN, f64::INFINITY, 1e300, 0.0])?
        } else {
            *u.choose(&[1.0 / (d as f64).sqrt(), 0.3, -0.7, 1.0, 2.5])?
        };
        let window = if u.arbitrary()? {
            Some((u.int_in_range(-1..=14)?, u.int_in_range(-1..=14)?))
        } else {
            None
        };
        let prob = Problem {
            batch,
            hq,
            hk,
            nq,
            nk,
            d,
            dv,
            scale,
            causal: u.arbitrary()?,
            window,
            q_offset: offset(u)?,
            k_offset: offset(u)?,
        };
        let amp = *u.choose(&[0.05, 0.3, 1.0, 2.0, 6.0])?;
        let (qn, kd, vn) = (jitter(u, nq)?, jitter(u, d)?, jitter(u, nk)?);
        let q = array4(u, (batch, hq, qn, d), amp, wild)?;
        let k = array4(u, (batch, hk, nk, kd), amp, wild)?;
        let v = array4(u, (batch, hk, vn, dv), 1.0, wild)?;
        let dout = array4(u, (batch, hq, nq, dv), 1.0, wild)?;

        let form = *u.choose(&[WForm::Rotary, WForm::Block, WForm::Sparse, WForm::Dense])?;
        let interleaved: bool = u.arbitrary()?;
        let mut rot_pairs = pairs(d, interleaved);
        if u.ratio(1, 30)? && !rot_pairs.is_empty() {
            rot_pairs[0].1 = rot_pairs[0].0; // not a partition
        }
        let base = *u.choose(&[10000.0, 10.0, 1.0])?;
        let mut theta: Vec<f64> =
            (0..d / 2).map(|m| f64::powf(base, -2.0 * m as f64 / d as f64)).collect();
        if wild && u.ratio(1, 20)? && !theta.is_empty() {
            theta[0] = *u.choose(&[f64::NAN, f64::INFINITY, 1e300])?;
        }
        let factor = if wild && u.ratio(1, 30)? { f64::NAN } else { *u.choose(&[1.0, 0.5, 1.5])? };
        let rotary = RotaryW { theta, factor, pairs: rot_pairs };

        let support: Vec<(usize, usize)> = match form {
            WForm::Rotary => Vec::new(),
            WForm::Block => pairs(d, interleaved)
                .into_iter()
                .flat_map(|(p, r)| [(p, p), (p, r), (r, p), (r, r)])
                .collect(),
            WForm::Sparse => (0..u.int_in_range(0..=6)?)
                .map(|_| Ok((u.int_in_range(0..=d)?, u.int_in_range(0..=d - 1)?)))
                .collect::<Result<_>>()?,
            WForm::Dense => (0..d * d).map(|e| (e / d, e % d)).collect(),
        };
        let tables = u.int_in_range(1..=2)?;
        let rows = table_rows(u, &prob)?;
        let ns = jitter(u, support.len())?;
        let mut w_values = Array3::zeros((tables, rows, ns));
        let wamp = *u.choose(&[0.1, 0.5, 1.0])?;
        for x in w_values.iter_mut() {
            *x = value(u, wamp, wild)?;
        }
        let w_index = table_index(u, batch * hq, tables)?;

        let (bias_values, bias_index) = if u.arbitrary()? {
            let tables = u.int_in_range(1..=2)?;
            let rows = table_rows(u, &prob)?;
            let mut b = Array2::zeros((tables, rows));
            for x in b.iter_mut() {
                // -inf is a legal bias (it masks that δ)
                *x = if u.ratio(1, 30)? { f64::NEG_INFINITY } else { value(u, 1.0, wild)? };
            }
            (Some(b), table_index(u, batch * hq, tables)?)
        } else {
            (None, Vec::new())
        };
        let eps = *u.choose(&[0.1, 1e-2, 1e-3, 1e-5, 0.0, -1.0, f64::NAN])?;
        Ok(Case { prob, q, k, v, dout, form, rotary, support, w_values, w_index, bias_values, bias_index, eps })
    }

    pub fn position(&self) -> Position<'_, f64> {
        match self.form {
            WForm::Rotary => Position::Rotary(self.rotary.clone()),
            _ => Position::Sparse(SparseW {
                support: self.support.clone(),
                values: self.w_values.view(),
                index: self.w_index.clone(),
            }),
        }
    }

    pub fn bias(&self) -> Option<Bias<'_, f64>> {
        self.bias_values.as_ref().map(|b| Bias { values: b.view(), index: self.bias_index.clone() })
    }

    /// Every input value finite (a `-inf` bias counts as finite: it masks).
    pub fn finite(&self) -> bool {
        let fin = |a: &[f64]| a.iter().all(|x| x.is_finite());
        fin(self.q.as_slice().unwrap())
            && fin(self.k.as_slice().unwrap())
            && fin(self.v.as_slice().unwrap())
            && fin(self.dout.as_slice().unwrap())
            && (self.form == WForm::Rotary || fin(self.w_values.as_slice().unwrap()))
            && self.bias_values.as_ref().is_none_or(|b| b.iter().all(|x| !x.is_nan() && *x != f64::INFINITY))
            && self.prob.scale.is_finite()
    }

    /// Some input entry (`q`, `k`, `v`, `dout`, the `w` table, a finite bias, `scale`) has
    /// magnitude 1e100 or more: only such a call may overflow an intermediate (every other
    /// value is at most 6 in magnitude), so only it may get the library's overflow error.
    pub fn extreme(&self) -> bool {
        fn big<'a>(mut a: impl Iterator<Item = &'a f64>) -> bool {
            a.any(|x| x.is_finite() && x.abs() >= 1e100)
        }
        big(self.q.iter())
            || big(self.k.iter())
            || big(self.v.iter())
            || big(self.dout.iter())
            || (self.form != WForm::Rotary && big(self.w_values.iter()))
            || self.bias_values.as_ref().is_some_and(|b| big(b.iter()))
            || big([self.prob.scale].iter())
    }
}

/// Whether `e` is the library's error for a result that overflowed (`exact::overflow_error`).
pub fn is_overflow_error(e: &fastrope::Error) -> bool {
    e.to_string().contains("not finite: the scores or an intermediate of them")
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
                    // a support entry listed twice adds (M = Σ_s w_s q_l1 k_l2)
                    w[[a, b]] += sp.values[[sp.index[bh], row as usize, s]];
                }
            }
        }
    }
    w
}

/// `|W_δ|` for the tolerances: for rotary every entry of a pair's 2x2 block is `f²`, not
/// `f² |cos δθ|` or `f² |sin δθ|`. The kernels rotate `q` and `k` by their absolute angles
/// (`p θ`), whose product equals `W_δ` only up to rounding, so an entry picks up its pair
/// partner's terms at rounding level even where `sin δθ` or `cos δθ` is 0 (δ = 0).
fn w_abs(pos: &Position<'_, f64>, bh: usize, delta: i64, d: usize) -> Array2<f64> {
    match pos {
        Position::Rotary(r) => {
            let f2 = r.factor * r.factor;
            let mut w = Array2::zeros((d, d));
            for &(p, q) in &r.pairs {
                for (a, b) in [(p, p), (p, q), (q, p), (q, q)] {
                    w[[a, b]] = f2.abs();
                }
            }
            w
        }
        // A support entry listed twice: the kernels add its terms one by one (`Σ_s |w_s|`, not
        // `|Σ_s w_s|`: 1e300 and -1e300 on one entry cancel in the table's sum but not in the
        // products' rounding, fuzz/regressions/exact/crash-74efac…).
        Position::Sparse(sp) => {
            let mut w = Array2::zeros((d, d));
            let rows = sp.values.dim().1 as i64;
            let row = delta + (rows - 1) / 2;
            if (0..rows).contains(&row) {
                for (s, &(a, b)) in sp.support.iter().enumerate() {
                    w[[a, b]] += sp.values[[sp.index[bh], row as usize, s]].abs();
                }
            }
            w
        }
    }
}

/// The reference's values and, for tolerances, the magnitude of what each entry sums
/// (`Σ |term|`): an entry computed in floating point is within a few `u` times that of its value.
pub struct Reference {
    pub out: Array4<f64>,
    pub lse: Array3<f64>,
    pub dq: Array4<f64>,
    pub dk: Array4<f64>,
    pub dv: Array4<f64>,
    pub dw: Option<Array3<f64>>,
    pub db: Option<Array2<f64>>,
    pub dq_abs: Array4<f64>,
    pub dk_abs: Array4<f64>,
    pub dv_abs: Array4<f64>,
    pub dw_abs: Option<Array3<f64>>,
    pub db_abs: Option<Array2<f64>>,
    /// Absolute error floors of the gradients for underflow (see [`underflow_floor`]).
    pub dq_floor: Array4<f64>,
    pub dk_floor: Array4<f64>,
    pub dv_floor: Array4<f64>,
    pub dw_floor: Option<Array3<f64>>,
    pub db_floor: Option<Array2<f64>>,
    /// `max |scale| Σ |q_x W_xy k_y| + |b|` over the visible pairs: the scores' condition.
    pub score_abs: f64,
    /// `max |v|`.
    pub v_max: f64,
}

/// The absolute error that underflow may add to one gradient term `f_1 f_2 ... f_m`, evaluated
/// in any grouping, when `m1` is `Π max(1, |f_i|)` over its factors and `ops` bounds the
/// multiplications that may underflow on the way (those of the term and of what its `dS` sums).
///
/// Derivation: below 2^-1022 a product is rounded to a multiple of `η = 2^-1074`, an absolute
/// error of at most `η/2` instead of `u` relative (a sum of two doubles whose exact value is
/// subnormal is exact). The factors multiplied in after that product have magnitude at most
/// `Π max(1, |f_i|)` (1 + O(u)) whatever the grouping, so each underflowing multiplication adds
/// at most `η/2 · m1 (1 + O(u))`: `ops η m1` bounds them all with a factor 2 for the `O(u)`.
/// The relative tolerances (`Σ |term|`) cannot cover this: a term ~6e-21 made of 2.5 `dS` ~
/// 2.5e-11, `w` = 1e300 and `q` = 1e-310 loses 1e-5 relative when the kernels form `dS q`
/// (~6e-321, 1,265 multiples of `η`) before multiplying by `w`; the reference's grouping
/// `((sc dS) w) q` does not underflow there, and would where `w` is tiny and `q` huge
/// (fuzz/regressions/exact/crash-6bf37e…, crash-0612c8…).
pub fn underflow_floor(ops: usize, m1: f64) -> f64 {
    const ETA: f64 = 4.9406564584124654e-324; // 2^-1074
    ops as f64 * ETA * m1
}

/// `max(1, |x|)`.
fn m1(x: f64) -> f64 {
    x.abs().max(1.0)
}

/// Forward and backward of every head from the definition (softmax with the row maximum taken
/// out, so it neither overflows nor underflows for moderate scores). Needs a validated call.
pub fn reference(case: &Case) -> Reference {
    let prob = &case.prob;
    let pos = case.position();
    let bias = case.bias();
    let (q, k, v, dout) = (&case.q, &case.k, &case.v, &case.dout);
    let (nq, nk, d, dv) = (prob.nq, prob.nk, prob.d, prob.dv);
    let sparse_dims = match &pos {
        Position::Sparse(sp) => Some(sp.values.dim()),
        Position::Rotary(_) => None,
    };
    let mut r = Reference {
        out: Array4::zeros((prob.batch, prob.hq, nq, dv)),
        lse: Array3::from_elem((prob.batch, prob.hq, nq), f64::NEG_INFINITY),
        dq: Array4::zeros(q.dim()),
        dk: Array4::zeros(k.dim()),
        dv: Array4::zeros(v.dim()),
        dw: sparse_dims.map(Array3::zeros),
        db: bias.as_ref().map(|b| Array2::zeros(b.values.dim())),
        dq_abs: Array4::zeros(q.dim()),
        dk_abs: Array4::zeros(k.dim()),
        dv_abs: Array4::zeros(v.dim()),
        dw_abs: sparse_dims.map(Array3::zeros),
        db_abs: bias.as_ref().map(|b| Array2::zeros(b.values.dim())),
        dq_floor: Array4::zeros(q.dim()),
        dk_floor: Array4::zeros(k.dim()),
        dv_floor: Array4::zeros(v.dim()),
        dw_floor: sparse_dims.map(Array3::zeros),
        db_floor: bias.as_ref().map(|b| Array2::zeros(b.values.dim())),
        score_abs: 0.0,
        v_max: v.iter().fold(0.0, |m, x| m.max(x.abs())),
    };
    // In i128: `q_offset + i` alone may overflow where the relative position (which
    // `Problem::validate` keeps within i64) does not.
    let delta = |i: usize, j: usize| {
        (prob.q_offset as i128 + i as i128 - prob.k_offset as i128 - j as i128) as i64
    };
    let bias_row = |bi: &Bias<'_, f64>, dl: i64| (dl + (bi.values.dim().1 as i64 - 1) / 2) as usize;
    for b in 0..prob.batch {
        for h in 0..prob.hq {
            let bh = b * prob.hq + h;
            let kh = h / prob.group();
            let mut s = Array2::from_elem((nq, nk), f64::NEG_INFINITY);
            for i in 0..nq {
                for j in 0..nk {
                    let dl = delta(i, j);
                    if !prob.keeps(dl) {
                        continue;
                    }
                    let w = w_dense(&pos, bh, dl, d);
                    let wa = w_abs(&pos, bh, dl, d);
                    let (mut m, mut a) = (0.0, 0.0);
                    for x in 0..d {
                        for y in 0..d {
                            let t = q[[b, h, i, x]] * w[[x, y]] * k[[b, kh, j, y]];
                            m += t;
                            a += (q[[b, h, i, x]] * wa[[x, y]] * k[[b, kh, j, y]]).abs();
                        }
                    }
                    let bb = bias.as_ref().map_or(0.0, |bi| bi.values[[bi.index[bh], bias_row(bi, dl)]]);
                    s[[i, j]] = prob.scale * m + bb;
                    if bb.is_finite() {
                        let sa = prob.scale.abs() * a + bb.abs();
                        // The reference's own sum overflows (scale 0 times an infinite sum is
                        // NaN, which `max` would skip): no relative tolerance exists.
                        r.score_abs = if a.is_finite() && !sa.is_nan() { r.score_abs.max(sa) } else { f64::INFINITY };
                    }
                }
            }
            for i in 0..nq {
                let mx = s.row(i).fold(f64::NEG_INFINITY, |m, &x| m.max(x));
                if mx == f64::NEG_INFINITY {
                    continue; // no visible key: out 0, lse -inf, no gradient
                }
                let e: Vec<f64> = s.row(i).iter().map(|&x| (x - mx).exp()).collect();
                let l: f64 = e.iter().sum();
                r.lse[[b, h, i]] = mx + l.ln();
                let p: Vec<f64> = e.iter().map(|x| x / l).collect();
                for c in 0..dv {
                    r.out[[b, h, i, c]] = (0..nk).map(|j| p[j] * v[[b, kh, j, c]]).sum();
                }
                let di: f64 = (0..dv).map(|c| dout[[b, h, i, c]] * r.out[[b, h, i, c]]).sum();
                // `D = Σ_c dout_c O_c` has the terms `dout_c P_j v_jc`: the kernels' `O` is off
                // by rounding relative to `Σ_j P_j |v_jc|`, not to `|O_c|` (which cancels to 0
                // when `P_1 v_1 = -P_2 v_2`: crash-c5f3e5…, where `dS` ~6e-21 times k = 1e300).
                let di_abs: f64 = (0..dv)
                    .map(|c| dout[[b, h, i, c]].abs() * (0..nk).map(|j| p[j] * v[[b, kh, j, c]].abs()).sum::<f64>())
                    .sum();
                for j in 0..nk {
                    // masked keys by their score (p is NaN when an overflowing score made l NaN)
                    if p[j] == 0.0 || s[[i, j]] == f64::NEG_INFINITY {
                        continue;
                    }
                    let dp: f64 = (0..dv).map(|c| dout[[b, h, i, c]] * v[[b, kh, j, c]]).sum();
                    let dp_abs: f64 = (0..dv).map(|c| (dout[[b, h, i, c]] * v[[b, kh, j, c]]).abs()).sum();
                    let ds = p[j] * (dp - di);
                    let ds_abs = p[j] * (dp_abs + di_abs);
                    // Multiplications that may underflow in a dq/dk/dW term: its own (scale,
                    // dS, W, q or k, with rotary's f and cos/sin folded in: at most 5) and those
                    // dS sums (dv products in dP, dv in D, P times their difference).
                    let ops = 2 * dv + 6;
                    let ds_m1 = m1(dp_abs + di_abs); // P <= 1
                    for c in 0..dv {
                        r.dv[[b, kh, j, c]] += p[j] * dout[[b, h, i, c]];
                        r.dv_abs[[b, kh, j, c]] += (p[j] * dout[[b, h, i, c]]).abs();
                        r.dv_floor[[b, kh, j, c]] += underflow_floor(2, m1(dout[[b, h, i, c]]));
                    }
                    let dl = delta(i, j);
                    let w = w_dense(&pos, bh, dl, d);
                    let wa = w_abs(&pos, bh, dl, d);
                    let sc = prob.scale;
                    for x in 0..d {
                        for y in 0..d {
                            r.dq[[b, h, i, x]] += sc * ds * w[[x, y]] * k[[b, kh, j, y]];
                            r.dk[[b, kh, j, y]] += sc * ds * w[[x, y]] * q[[b, h, i, x]];
                            r.dq_abs[[b, h, i, x]] += (sc * ds_abs * wa[[x, y]] * k[[b, kh, j, y]]).abs();
                            r.dk_abs[[b, kh, j, y]] += (sc * ds_abs * wa[[x, y]] * q[[b, h, i, x]]).abs();
                            let f = m1(sc) * ds_m1 * m1(wa[[x, y]]);
                            r.dq_floor[[b, h, i, x]] += underflow_floor(ops, f * m1(k[[b, kh, j, y]]));
                            r.dk_floor[[b, kh, j, y]] += underflow_floor(ops, f * m1(q[[b, h, i, x]]));
                        }
                    }
                    if let (Position::Sparse(sp), Some(dw), Some(dwa), Some(dwf)) =
                        (&pos, r.dw.as_mut(), r.dw_abs.as_mut(), r.dw_floor.as_mut())
                    {
                        let row = dl + (sp.values.dim().1 as i64 - 1) / 2;
                        if (0..sp.values.dim().1 as i64).contains(&row) {
                            for (si, &(l1, l2)) in sp.support.iter().enumerate() {
                                let t = sc * q[[b, h, i, l1]] * k[[b, kh, j, l2]];
                                dw[[sp.index[bh], row as usize, si]] += t * ds;
                                dwa[[sp.index[bh], row as usize, si]] += (t * ds_abs).abs();
                                let f = m1(sc) * m1(q[[b, h, i, l1]]) * m1(k[[b, kh, j, l2]]) * ds_m1;
                                dwf[[sp.index[bh], row as usize, si]] += underflow_floor(ops, f);
                            }
                        }
                    }
                    if let (Some(bi), Some(db), Some(dba), Some(dbf)) =
                        (bias.as_ref(), r.db.as_mut(), r.db_abs.as_mut(), r.db_floor.as_mut())
                    {
                        let row = bias_row(bi, dl);
                        db[[bi.index[bh], row]] += ds;
                        dba[[bi.index[bh], row]] += ds_abs;
                        dbf[[bi.index[bh], row]] += underflow_floor(ops, ds_m1);
                    }
                }
            }
        }
    }
    r
}

/// The first entry where `|got - want| > tol(index)`, as a message.
pub fn first_mismatch<D: ndarray::Dimension>(
    name: &str,
    got: &ndarray::Array<f64, D>,
    want: &ndarray::Array<f64, D>,
    tol: impl Fn(usize) -> f64,
) -> Option<String> {
    if got.shape() != want.shape() {
        return Some(format!("{name}: shape {:?}, reference {:?}", got.shape(), want.shape()));
    }
    for (n, (g, w)) in got.iter().zip(want.iter()).enumerate() {
        let ok = if w.is_infinite() { g == w } else { (g - w).abs() <= tol(n) };
        if !ok {
            return Some(format!("{name}[{n}]: {g:e}, reference {w:e} (tolerance {:e})", tol(n)));
        }
    }
    None
}

/// Every entry finite.
pub fn all_finite<D: ndarray::Dimension>(x: &ndarray::Array<f64, D>) -> bool {
    x.iter().all(|v| v.is_finite())
}
