//! The backward pass of the fast method (docs/DESIGN.md §5.6): the gradient of the approximate
//! forward, by differentiating its expansion, in the same FFT machinery as [`super::forward`].
//!
//! # The products
//!
//! With `Ã_ij = p(M_ij) F_ij = Σ_{(α,β)} q_i^α C_αβ(δ_ij) k_j^β`, `l̃ = Ã 1`, `Õ = Ã V / l̃` and
//! `D_i = dO_i·Õ_i`, the gradient of `Σ dO ∘ Õ` with respect to `Ã_ij` is the rank-`(dv+1)` matrix
//!
//! ```text
//! G_ij = (dO_i·v_j - D_i) / l̃_i = Σ_c a_ic b_jc,   a = [dO / l̃, -D / l̃],   b = [V, 1].
//! ```
//!
//! Every gradient is then a contraction of `G` with a derivative of the expansion:
//!
//! * **dq** (`∂q^α/∂q[l] = α_l q^{α-e_l}`): `dq_i[l] = Σ_c a_ic Y_c,l,i`,
//!   `Y_c,l = Σ_α α_l q^{α-e_l} ∘ z_α,c` with `z_α,c = Σ_β T[C_αβ](k^β ∘ b_c)` — exactly the
//!   per-α inverse FFTs of the forward. **Pass 1** is the forward over the columns of `[V, 1]`
//!   (it also yields `l̃`, `Õ`, hence `a`; the caller's `out`/`lse` are not needed), contracting
//!   each `z_α,c` with `q^α` (numerators) and with `α_l q^{α-e_l}` (dq). `q^{α-e_l}` is itself one
//!   of the `α` monomials, so nothing new is stored.
//! * **dk, dv**: `dV_jc = Σ_β k_j^β w_β,c,j` and `dk_j[l] = Σ_c b_jc Σ_β β_l k_j^{β-e_l} w_β,c,j`
//!   with `w_β,c = Σ_α T[C_αβ]^T (q^α ∘ a_c)`. **Pass 2** runs the transposed products: the
//!   input spectra are `conj(FFT(q^α ∘ a_c))`, so the *same* kernel spectra `Ĉ_αβ` (of
//!   `rev(C)`) give the correlation `Σ_i r[i + L] x_i` whose entry `L = nk-1-j` is
//!   `(T^T x)_j` (no wrap-around for FFT lengths `>= nq + nk - 1`); spectra are summed per `β`.
//! * **dw, dbias**: `db(g) = Σ_p C_p(g) H_p(g)` and
//!   `dW_s(g) = scale Σ_{p'} C'_{p'}(g) H_{(α'+e_{l1_s}, β'+e_{l2_s})}(g)`, where
//!   `H_αβ(g) = Σ_c Σ_{j-i+nq-1=g} (q^α a_c)_i (k^β b_c)_j` are diagonal correlations (one inverse
//!   FFT per pair, of `Σ_c conj(FFT(q^α a_c)) ⊙ FFT(k^β b_c)`, accumulated over the columns *and
//!   over every head sharing the kernel*) and `C'` are the kernels of the expansion of `p'`
//!   (`∂/∂w_s` of `p(M)` is `p'(M) scale q[l1] k[l2]`, and `q^{α'} q[l1] = q^{α'+e_{l1}}`): no
//!   division by `w_s`, and entries with `w_s = 0` get their gradient. Contractions run over
//!   blocks of diagonals, recomputing `C_p(g)` and `C'_{p'}(g)` there, so only the correlation
//!   spectra (the size of the kernel spectra) are held.
//!
//! The result is the exact gradient of the approximate forward up to rounding; its distance to
//! the true gradient and the rounding are certified per head before any FFT runs
//! ([`crate::fast::grad_bounds`], [`super::backward_certify`]). Cost: two forward-sized passes (`2 (n_α + n_β)(dv+1)` FFTs and
//! `2 n_pairs (dv+1)` spectrum products per frequency), plus, for dw/dbias, `n_β (dv+1)` FFTs and
//! `n_pairs (dv+1)` products per head and `n_pairs` inverse FFTs per group.

use crate::error::{Error, Result};
use crate::fast::bounds::FastBounds;
use crate::fast::common::{FastLimits, FastShape, HeadProblem};
use crate::fast::grad::{Grad5, GradCertificate, Want};
use crate::fast::grad_bounds::{FactorStats, GradBounds, PSums};
use crate::fast::plans::BackwardRequest;
use crate::poly::{PolyKind, Polynomial, WNorms};
use ndarray::{Array1, Array2, ArrayView2};

mod kernel;
mod passes;
mod plan;
mod spectra;
mod stage;

pub use self::kernel::BackwardKernel;
#[cfg(test)]
pub(crate) use self::plan::force_streaming;
pub use self::plan::{backward_pair_chunk, backward_plan};
pub use self::spectra::{BackwardSpectra, CorrelationAccumulator};

/// What the fast backward did and what it guarantees (per head).
#[derive(Clone, Debug, PartialEq)]
pub struct BackwardReport {
    pub degree: usize,
    pub kind: PolyKind,
    pub r: f64,
    pub rho: f64,
    pub rho_d: f64,
    pub terms: usize,
    pub n_alpha: usize,
    pub n_beta: usize,
    pub n_pairs: usize,
    pub fft_len: usize,
    pub cert: GradCertificate,
}

/// Gradients of one head from [`fast_backward_head`]: `dw` along the diagonals (`|S| x glen`,
/// `dw[[s, g]] = ∂/∂ seqs[[s, g]]`), `dbias` along the diagonals (`glen`, the gradient with
/// respect to `b(δ(g))` where `factor = exp(b)`).
#[derive(Clone, Debug)]
pub struct FastGrads {
    pub dq: Array2<f64>,
    pub dk: Array2<f64>,
    pub dv: Array2<f64>,
    pub dw: Option<Array2<f64>>,
    pub dbias: Option<Vec<f64>>,
    pub out: Array2<f64>,
    pub lse: Array1<f64>,
    pub report: BackwardReport,
}

/// The fast backward for one head: bounds → certified plan → kernel → apply (→ finish). Every
/// gradient is certified to `eps`; `Error::Approximation` says why when it cannot be.
pub fn fast_backward_head(
    prob: &HeadProblem,
    dout: ArrayView2<f64>,
    eps: f64,
    want: Want,
    limits: &FastLimits,
    forced: Option<&Polynomial>,
) -> Result<FastGrads> {
    let bounds = FastBounds::from_problem(prob)?;
    let (nq, nk, d, dv) = (prob.nq(), prob.nk(), prob.d(), prob.dv());
    if dout.shape() != [nq, dv] {
        return Err(Error::Value(format!(
            "dout: expected shape ({nq}, {dv}), got {:?}",
            dout.shape()
        )));
    }
    if nq == 0 || nk == 0 {
        return Err(Error::Approximation(
            "fast backward: nothing to approximate (an empty axis)".into(),
        ));
    }
    let norms = WNorms::new(d, prob.support, prob.seqs, prob.factor)?;
    let grad = GradBounds::new(
        &norms,
        prob.support,
        prob.scale,
        prob.q,
        prob.k,
        prob.v,
        dout,
    );
    let fstats = FactorStats::new(nq, nk, prob.factor)?;
    let psums = PSums::from_data(
        prob.q,
        prob.k,
        prob.scale,
        prob.support,
        prob.seqs,
        prob.factor,
        bounds.r,
        &fstats,
        want.dw || want.db,
    )?;
    let req = BackwardRequest {
        shape: FastShape { nq, nk, d, dv },
        support: prob.support,
        bounds,
        grad,
        fstats,
        psums,
        eps: Grad5::splat(eps),
        want,
        out_rel: 0.0,
        heads: 1,
    };
    let plan = backward_plan(&req, limits, forced)?;
    let kernel = BackwardKernel::new(
        &plan,
        prob.support,
        prob.seqs,
        prob.factor,
        prob.scale,
        limits,
    )?;
    let mut corr = if want.dw || want.db {
        Some(kernel.accumulator()?)
    } else {
        None
    };
    let g = kernel.apply(prob.q, prob.k, prob.v, dout, corr.as_mut(), Some(&psums))?;
    let (dw, dbias) = match corr {
        Some(c) => kernel.finish(c)?,
        None => (None, None),
    };
    Ok(FastGrads {
        dq: g.dq,
        dk: g.dk,
        dv: g.dv,
        dw,
        dbias,
        out: g.out,
        lse: g.lse,
        report: kernel.report(g.cert),
    })
}
