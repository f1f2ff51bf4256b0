//! Slow, obviously-correct twins of the fast method, `O(nq nk (|S| + dv))`: the test oracles.

use crate::fast::common::HeadProblem;
use ndarray::{Array1, Array2};

/// `M_ij = scale Σ_s q[i,l1_s] seqs[s,g] k[j,l2_s]` with `g = j - i + nq - 1`.
pub fn score(prob: &HeadProblem, i: usize, j: usize) -> f64 {
    let g = j + prob.nq() - 1 - i;
    let m: f64 = prob
        .support
        .iter()
        .enumerate()
        .map(|(s, &(a, b))| prob.q[[i, a]] * prob.seqs[[s, g]] * prob.k[[j, b]])
        .sum();
    prob.scale * m
}

/// Exact attention by the definition: `out_i = Σ_j A_ij v_j / Σ_j A_ij`, `A_ij = e^{M_ij} f_ij`,
/// `lse_i = ln Σ_j A_ij` (stabilised by the row maximum of `M_ij + ln f_ij`); rows with no
/// visible key give 0 and `-inf`. Expects a validated problem.
pub fn exact_head(prob: &HeadProblem) -> (Array2<f64>, Array1<f64>) {
    let (nq, nk) = (prob.nq(), prob.nk());
    let mut out = Array2::zeros((nq, prob.dv()));
    let mut lse = Array1::from_elem(nq, f64::NEG_INFINITY);
    for i in 0..nq {
        let logits: Vec<(usize, f64)> = (0..nk)
            .filter_map(|j| {
                let f = prob.factor[j + nq - 1 - i];
                (f > 0.0).then(|| (j, score(prob, i, j) + f.ln()))
            })
            .collect();
        let Some(m) = logits.iter().map(|x| x.1).reduce(f64::max) else {
            continue;
        };
        let mut l = 0.0;
        for &(j, s) in &logits {
            let a = (s - m).exp();
            l += a;
            out.row_mut(i).scaled_add(a, &prob.v.row(j));
        }
        out.row_mut(i).mapv_inplace(|x| x / l);
        lse[i] = m + l.ln();
    }
    (out, lse)
}

/// The same with `exp` replaced by the polynomial `coeffs`: weights `p(M_ij) f_ij`. This is what
/// the fast method computes before rounding, whatever the expansion and grouping.
pub fn polynomial_head(prob: &HeadProblem, coeffs: &[f64]) -> (Array2<f64>, Array1<f64>) {
    let (nq, nk) = (prob.nq(), prob.nk());
    let p = |x: f64| coeffs.iter().rev().fold(0.0, |a, c| a * x + c);
    let mut out = Array2::zeros((nq, prob.dv()));
    let mut lse = Array1::from_elem(nq, f64::NEG_INFINITY);
    for i in 0..nq {
        let mut l = 0.0;
        let mut any = false;
        for j in 0..nk {
            let f = prob.factor[j + nq - 1 - i];
            if f > 0.0 {
                any = true;
                let a = p(score(prob, i, j)) * f;
                l += a;
                out.row_mut(i).scaled_add(a, &prob.v.row(j));
            }
        }
        if any {
            out.row_mut(i).mapv_inplace(|x| x / l);
            lse[i] = l.ln();
        }
    }
    (out, lse)
}
