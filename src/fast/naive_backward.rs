//! Slow, obviously-correct gradients, `O(nq nk (|S| + dv))`: the test oracles of the fast
//! backward ([`crate::fast::toeplitz::backward`]), twins of [`super::naive`].

use super::naive::score;
use crate::fast::common::HeadProblem;
use ndarray::{Array2, ArrayView2};

/// Gradients of `Σ dout ∘ out` along the diagonals: `dw[[s, g]] = ∂/∂seqs[[s, g]]`,
/// `dbias[g] = ∂/∂b(δ(g))` with `factor = exp(b)`.
#[derive(Clone, Debug)]
pub struct NaiveGrads {
    pub dq: Array2<f64>,
    pub dk: Array2<f64>,
    pub dv: Array2<f64>,
    pub dw: Array2<f64>,
    pub dbias: Vec<f64>,
}

/// The gradient of the attention with weights `φ(M_ij) f_ij`: `phi` returns `(φ(x), φ'(x))`
/// relative to a per-row shift (the shift cancels in the normalised weights).
fn grad_with(
    prob: &HeadProblem,
    dout: ArrayView2<f64>,
    phi: &dyn Fn(f64, f64) -> (f64, f64),
    stabilise: bool,
) -> NaiveGrads {
    let (nq, nk, d, dv) = (prob.nq(), prob.nk(), prob.d(), prob.dv());
    let glen = prob.glen();
    let ns = prob.support.len();
    let mut g = NaiveGrads {
        dq: Array2::zeros((nq, d)),
        dk: Array2::zeros((nk, d)),
        dv: Array2::zeros((nk, dv)),
        dw: Array2::zeros((ns, glen)),
        dbias: vec![0.0; glen],
    };
    for i in 0..nq {
        let vis: Vec<(usize, f64, f64)> = (0..nk)
            .filter_map(|j| {
                let f = prob.factor[j + nq - 1 - i];
                (f > 0.0).then(|| (j, score(prob, i, j), f))
            })
            .collect();
        if vis.is_empty() {
            continue;
        }
        let shift = if stabilise {
            vis.iter()
                .map(|&(_, m, f)| m + f.ln())
                .fold(f64::NEG_INFINITY, f64::max)
        } else {
            0.0
        };
        // Weights a_ij = φ(M) f e^{-shift} and their M-derivatives.
        let w: Vec<(usize, f64, f64, f64)> = vis
            .iter()
            .map(|&(j, m, f)| {
                let (p, dp) = phi(m, shift - f.ln());
                (j, p, dp, m)
            })
            .collect();
        let l: f64 = w.iter().map(|x| x.1).sum();
        let mut o = vec![0.0; dv];
        for &(j, a, _, _) in &w {
            for (c, oc) in o.iter_mut().enumerate() {
                *oc += a * prob.v[[j, c]] / l;
            }
        }
        let dd: f64 = (0..dv).map(|c| dout[[i, c]] * o[c]).sum();
        for &(j, a, da, _) in &w {
            let gij = ((0..dv).map(|c| dout[[i, c]] * prob.v[[j, c]]).sum::<f64>() - dd) / l;
            for c in 0..dv {
                g.dv[[j, c]] += a / l * dout[[i, c]];
            }
            let gg = j + nq - 1 - i;
            g.dbias[gg] += gij * a;
            let dm = gij * da * prob.scale;
            for (s, &(l1, l2)) in prob.support.iter().enumerate() {
                let wv = prob.seqs[[s, gg]];
                g.dq[[i, l1]] += dm * wv * prob.k[[j, l2]];
                g.dk[[j, l2]] += dm * wv * prob.q[[i, l1]];
                g.dw[[s, gg]] += dm * prob.q[[i, l1]] * prob.k[[j, l2]];
            }
        }
    }
    g
}

/// The true gradient (weights `e^{M} f`).
pub fn exact_head_grad(prob: &HeadProblem, dout: ArrayView2<f64>) -> NaiveGrads {
    let phi = |m: f64, shift: f64| {
        let a = (m - shift).exp();
        (a, a)
    };
    grad_with(prob, dout, &phi, true)
}

/// The gradient of the polynomial forward [`super::naive::polynomial_head`] (weights
/// `p(M) f`): what the fast backward computes before rounding.
pub fn polynomial_head_grad(
    prob: &HeadProblem,
    coeffs: &[f64],
    dout: ArrayView2<f64>,
) -> NaiveGrads {
    let p = |x: f64| coeffs.iter().rev().fold(0.0, |a, c| a * x + c);
    let dp = |x: f64| {
        coeffs
            .iter()
            .enumerate()
            .skip(1)
            .rev()
            .fold(0.0, |a, (t, c)| a * x + t as f64 * c)
    };
    let phi = |m: f64, neg_log_f: f64| {
        let f = (-neg_log_f).exp();
        (p(m) * f, dp(m) * f)
    };
    grad_with(prob, dout, &phi, false)
}
