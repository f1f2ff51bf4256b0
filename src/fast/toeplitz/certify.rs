//! The certificate and the cost model of the fast method: which polynomial, how many terms, how
//! much work and memory, and a bound on `max |out - exact|` — all before any heavy computation.
//!
//! # Error budget
//!
//! *Approximation.* `|p(x) - e^x| <= ρ e^x` on `[-R, R]` makes every weight `A_ij` wrong by a
//! relative `ρ`, so each output (a weighted mean of the `v_jc`) moves by at most
//! `2ρ/(1-ρ) max_j |v_jc|`.
//!
//! *Rounding (a-priori).* Let `P = Σ_t |c_t| R_abs^t`: since `Σ_s |a_s| <= R_abs`, the expanded
//! terms satisfy `Σ_{α,β} max|q^α| G_αβ max|k^β| <= P`, with `G_αβ` the magnitude of the kernel
//! `|C_αβ(g)| <= G_αβ f(g)`. For one column `x` (`|x| <= X`) and one `α`, the product
//! `z = Σ_β T[C_αβ](k^β ∘ x)` is `G_N^{-1}(Σ_β a_β ⊙ b_β)`, `a = FFT(rev C)/N`, `b = FFT(k^β∘x)`.
//! A computed FFT of length N has normwise relative error `ε_f = 8u (⌈log2 N⌉ + 2)` (Higham,
//! *Accuracy and Stability*, Thm 24.2: `log2 N · η` with `η = μ + γ_4(√2 + μ) ≈ 7.7u` per radix-2
//! stage; rustfft's radix-3/4/5 passes and realfft's real-to-complex pass are covered by the two
//! extra stages — a model of the library, not a proof about its code). Using
//! `||FFT c||_∞ <= ||c||_1`, `||FFT y||_2 = √N ||y||_2` and `||·||_∞ <= ||·||_2`, the error of one
//! output entry of `z` is at most
//!
//! ```text
//! Σ_β [ ε_f ||C||_2 ||y||_1 + (2 ε_f + (3 + 2 n_β) u) ||C||_1 ||y||_2 ]
//! ```
//!
//! (forward FFTs of both operands, the product, the frequency-domain sum over `n_β` pairs, the
//! inverse FFT). With `||C||_1 <= G F1`, `||C||_2 <= G F2` (`F1`, `F2`: 1- and 2-norms of the
//! factor), `||y||_1 <= K nk X`, `||y||_2 <= K √nk X`, and adding the rounding of the kernels
//! (`(g + 3 + terms per pair) u`), of `k^β ∘ x` and `q^α` (`(2g + 1) u`) and of the sum over the
//! `n_α` groups, each entry of the numerator (column x) and of the denominator (`x = 1`) is off by
//!
//! ```text
//! E X,   E = 1.01 P [ ε_f F2 nk + (2 ε_f + (3 + 2 n_β) u) F1 √nk + (3g + 4 + n_α + terms/pair) u F1 ].
//! ```
//!
//! This bound is global (FFT errors spread over all rows), while a row's denominator can be as
//! small as `L = (1-ρ) e^{-R} F_min` (`F_min`: the smallest visible row mass — 1 for the first
//! row of a causal mask). Hence `|out - out_p| <= (E V + V E) / (L - E)` and
//!
//! ```text
//! certified_error = V (2ρ/(1-ρ) + 2E/(L-E)),   certified_lse_error = ρ/(1-ρ) + E/(L-E).
//! ```
//!
//! # Two tiers
//!
//! The a-priori `E` above needs only the bounds (`R`, `R_abs`, `max|v|`, factor norms), so the
//! planner can predict it without data — but `Σ_t |c_t| R_abs^t` ignores all cancellation, and
//! `R_abs` (sums of per-coordinate maxima) can be 2-3x `R`, i.e. a factor `e^{R_abs - R}`.
//! [`data_rounding`] evaluates the same estimate with the measured `max_i |q^α_i|`,
//! `||C_αβ||_{1,2}` and `||k^β||_{1,2,∞}` (all `O(n_α nq + n_β nk + n_pairs)` once the monomials
//! and kernels exist) and is what [`super::FastKernel::apply`] certifies each head with, before
//! any FFT. [`fast_plan`] therefore accepts a polynomial either when the a-priori total fits
//! `eps`, or when its approximation error fits `15/16 eps` and an estimate of the cancellation
//! floor of the expansion at a score of `-R`, `2 V ε_f Σ|c_t| R^t e^R`, fits `eps/16`; a head
//! whose data-dependent total still exceeds `eps` is refused (`Error::Approximation`).
//!
//! Both bounds remain pessimistic (normwise FFT bounds used per entry, a global error against
//! the smallest row's mass): measured rounding is typically 1e-8 of the per-head bound. That is
//! the price of certifying; the exact method serves what is refused.

use super::blocks::{spectrum_blocks, BLOCK};
use super::expansion::{term_count, Expansion};
use crate::error::{Error, Result};
use crate::fast::bounds::FastBounds;
use crate::fast::common::{
    fft_flops, fft_relative_error, spectrum_bytes, ExpansionCounts, FastLimits, FastShape,
};
use crate::fast::plans::FastPlan;
use crate::poly::{search_degree, Family, Pick, Polynomial, Verdict, U};
use crate::toeplitz::fft_len;

/// Bytes per column of `[V, 1]` in a tile: the key spectra and accumulators of
/// [`super::forward`] (`n_α + n_β` spectra of `N/2 + 1` frequencies) plus each thread's
/// cache-resident block buffers.
fn per_column_bytes(c: &ExpansionCounts, n: usize) -> usize {
    let threads = rayon::current_num_threads();
    (c.n_alpha + c.n_beta)
        .saturating_mul(n / 2 + 1 + threads * BLOCK)
        .saturating_mul(16)
}

/// `(kernel spectra bytes, total working bytes)` for a column tile.
fn working_bytes(
    shape: &FastShape,
    ns: usize,
    c: &ExpansionCounts,
    n: usize,
    tile: usize,
) -> (usize, usize) {
    let glen = shape.nq.saturating_add(shape.nk).saturating_sub(1);
    let threads = rayon::current_num_threads();
    let mul = |a: usize, b: usize| a.saturating_mul(b);
    // Kernel spectra are stored in blocks of BLOCK frequencies, padded.
    let kernel = mul(mul(c.n_pairs, spectrum_blocks(n) * BLOCK), 16);
    let fixed = [
        kernel,
        mul(
            8,
            mul(c.n_alpha, shape.nq).saturating_add(mul(c.n_beta, shape.nk)),
        ), // q^α, k^β
        mul(8, mul(ns + 2, glen)), // contiguous seqs, one kernel and scratch
        mul(8, mul(shape.nq, shape.dv + 1)), // numerators and denominators
        mul(threads, mul(56, n).saturating_add(mul(8, shape.nk))), // per-thread FFT buffers
    ]
    .iter()
    .fold(0usize, |a, &b| a.saturating_add(b));
    (
        kernel,
        fixed.saturating_add(per_column_bytes(c, n).saturating_mul(tile)),
    )
}

/// Bytes per kernel worker of a streamed plan (one per thread): the kernel and its scratch
/// (`2 glen` reals), its spectrum (`N/2 + 1` complex) and an FFT scratch.
pub(crate) fn worker_bytes(n: usize, glen: usize) -> usize {
    16usize
        .saturating_mul(n / 2 + 1)
        .saturating_add(16usize.saturating_mul(glen))
        .saturating_add(32usize.saturating_mul(n))
}

/// How a streamed plan holds its kernel spectra: `tile` columns of `[V, 1]` at a time, `chunk`
/// pairs' spectra at a time, predicted to cost `flops` per head beyond the held plan's column
/// work, in `bytes` in all.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Streaming {
    pub(crate) tile: usize,
    pub(crate) chunk: usize,
    pub(crate) flops: f64,
    pub(crate) bytes: usize,
}

/// What a streamed layout is chosen from: `fixed` bytes, `per_col` per column of a tile,
/// `per_pair` per pair of a chunk, `n_pairs` pairs and `cols` columns; per column tile every
/// kernel is rebuilt (`recompute` flops), and every chunk of pairs passes once over the tile's
/// accumulators and input spectra (`pass` flops per column).
#[derive(Clone, Copy, Debug)]
pub(crate) struct StreamCost {
    pub(crate) fixed: usize,
    pub(crate) per_col: usize,
    pub(crate) per_pair: usize,
    pub(crate) n_pairs: usize,
    pub(crate) cols: usize,
    pub(crate) recompute: f64,
    pub(crate) pass: f64,
}

/// The streamed layout of least predicted time within `budget`, or None when even one column
/// and one pair exceed it (or when streaming cannot help: a single pair). Fewer, wider tiles
/// save kernel rebuilds, larger chunks save passes, and the budget trades one against the
/// other. Within `budget = layout.bytes` the same layout is chosen again.
pub(crate) fn stream_layout(budget: usize, c: &StreamCost) -> Option<Streaming> {
    let (np, cols) = (c.n_pairs, c.cols);
    let mut best: Option<Streaming> = None;
    let mut last_tile = 0;
    for tiles in 1..=cols {
        let tile = cols.div_ceil(tiles);
        if tile == last_tile {
            continue;
        }
        last_tile = tile;
        let Some(spare) = budget
            .checked_sub(c.fixed)
            .and_then(|b| b.checked_sub(c.per_col.saturating_mul(tile)))
        else {
            continue;
        };
        let fit = (spare / c.per_pair.max(1)).min(np.saturating_sub(1));
        if fit == 0 {
            continue;
        }
        // Chunks evened out: the same number of passes with the least memory.
        let chunks = np.div_ceil(fit);
        let chunk = np.div_ceil(chunks);
        let flops = cols.div_ceil(tile) as f64 * c.recompute + chunks as f64 * cols as f64 * c.pass;
        let bytes = c
            .fixed
            .saturating_add(c.per_col.saturating_mul(tile))
            .saturating_add(c.per_pair.saturating_mul(chunk));
        if best.is_none_or(|b| flops < b.flops) {
            best = Some(Streaming {
                tile,
                chunk,
                flops,
                bytes,
            });
        }
    }
    best
}

/// The plan for a given polynomial: counts, cost, memory tile and certificate (no `eps` test).
/// Refuses with `Error::Approximation` when even one column at a time (and, streamed, one
/// pair's spectrum at a time) exceeds `limits.max_working_bytes`.
pub fn plan_for_polynomial(
    shape: FastShape,
    support: &[(usize, usize)],
    bounds: &FastBounds,
    poly: &Polynomial,
    limits: &FastLimits,
) -> Result<FastPlan> {
    let plan = plan_unchecked(shape, support, bounds, poly, limits)?;
    if plan.column_tile == 0 {
        return Err(memory_refusal(&plan, limits));
    }
    Ok(plan)
}

fn memory_refusal(plan: &FastPlan, limits: &FastLimits) -> Error {
    let c = &plan.counts;
    Error::Approximation(format!(
        "fast method: degree {} needs at least {:.3} GB ({} spectra of {} frequencies per column of \
         [V, 1], plus the {} kernel spectra streamed one at a time) but the memory limit \
         (memory_limit per thread) allows {:.3} GB; raise memory_limit or use the exact method",
        plan.poly.degree,
        plan.working_bytes as f64 / 1e9,
        c.n_alpha + c.n_beta,
        plan.fft_len / 2 + 1,
        c.n_pairs,
        limits.max_working_bytes as f64 / 1e9
    ))
}

/// [`plan_for_polynomial`] with `column_tile = 0` (and the least working set: one column, one
/// streamed pair) when the memory limit cannot be met.
///
/// The kernel spectra are cached (built once per group of heads, held whole) when they fit
/// with at least one column; otherwise they are streamed ([`FastPlan::streamed`]) with the
/// layout of [`stream_layout`].
fn plan_unchecked(
    shape: FastShape,
    support: &[(usize, usize)],
    bounds: &FastBounds,
    poly: &Polynomial,
    limits: &FastLimits,
) -> Result<FastPlan> {
    if shape.nq == 0 || shape.nk == 0 || shape.nq > 1 << 40 || shape.nk > 1 << 40 {
        return Err(Error::Value(format!(
            "fast plan: expected 1 <= nq, nk <= 2^40, got ({}, {})",
            shape.nq, shape.nk
        )));
    }
    let ns = support.len();
    let expansion = Expansion::build(support, shape.d, &poly.coeffs, 1.0, true, limits.max_terms)?;
    let counts = expansion.counts();
    let (nq, nk, g) = (shape.nq, shape.nk, poly.degree);
    let glen = nq + nk - 1;
    let n = fft_len(glen);
    let cols = shape.dv + 1;
    let (kernel_bytes, min_bytes) = working_bytes(&shape, ns, &counts, n, 1);
    let per_col = per_column_bytes(&counts, n);
    // Each tile reads all kernel spectra once and writes/reads its own spectra once: tiles of
    // about kernel_bytes / per_col columns (at least 4) balance the two, and smaller buffers
    // are reused instead of faulting in gigabytes of fresh pages. Tiles are then evened out.
    let cached_tile = match limits.max_working_bytes.checked_sub(min_bytes) {
        Some(spare) => {
            let fit = 1 + spare / per_col.max(1);
            let balanced = kernel_bytes.div_ceil(per_col.max(1)).max(4);
            let tile = fit.min(balanced).min(cols);
            cols.div_ceil(cols.div_ceil(tile))
        }
        None => 0,
    };
    let fft = fft_flops(n);
    let build = counts.terms as f64 * glen as f64 * (g + 2) as f64;
    let recompute = counts.n_pairs as f64 * fft + build;
    let per_pair = spectrum_bytes(n);
    let stream = if cached_tile == 0 {
        let threads = rayon::current_num_threads();
        let fixed = min_bytes
            .saturating_sub(kernel_bytes)
            .saturating_sub(per_col)
            .saturating_add(threads.saturating_mul(worker_bytes(n, glen)));
        let cost = StreamCost {
            fixed,
            per_col,
            per_pair,
            n_pairs: counts.n_pairs,
            cols,
            recompute,
            pass: 4.0 * (counts.n_alpha + counts.n_beta) as f64 * (n / 2 + 1) as f64,
        };
        let layout = stream_layout(limits.max_working_bytes, &cost);
        // Refused: report the least working set, one column and one pair.
        Some(layout.unwrap_or(Streaming {
            tile: 0,
            chunk: 1,
            flops: 0.0,
            bytes: min_bytes.min(fixed.saturating_add(per_col).saturating_add(per_pair)),
        }))
    } else {
        None
    };
    let (column_tile, working, kernel_bytes, kernel_flops, stream_flops) = match stream {
        None => {
            let (_, working) = working_bytes(&shape, ns, &counts, n, cached_tile);
            (cached_tile, working, kernel_bytes, recompute, 0.0)
        }
        // Streamed: only the norms pass (the kernels without their FFTs) is shared; every
        // head rebuilds the spectra once per tile.
        Some(s) => (s.tile, s.bytes, per_pair * s.chunk, build, s.flops),
    };

    let (na, nb, np) = (
        counts.n_alpha as f64,
        counts.n_beta as f64,
        counts.n_pairs as f64,
    );
    let (nq_f, nk_f, cols_f) = (nq as f64, nk as f64, cols as f64);
    let column_flops = (na + nb) * cols_f * fft
        + np * cols_f * (n / 2 + 1) as f64 * 8.0
        + cols_f * (2.0 * na * nq_f + nb * nk_f)
        + (na * nq_f + nb * nk_f) * g.max(1) as f64
        + stream_flops;

    // The a-priori certificate (module docs).
    let rho = poly.rho;
    let (f1, f2) = (bounds.factor_sum, bounds.factor_norm2);
    let eps_f = fft_relative_error(n);
    let p_abs = poly.abs_eval(bounds.r_abs);
    let sqrt_nk = nk_f.sqrt();
    let e = 1.01
        * p_abs
        * (eps_f * f2 * nk_f
            + (2.0 * eps_f + (3 + 2 * counts.max_betas_per_alpha) as f64 * U) * f1 * sqrt_nk
            + (3 * g + 4 + counts.n_alpha + counts.max_terms_per_pair) as f64 * U * f1);
    let cert = Certificate::new(bounds, rho, e);
    Ok(FastPlan {
        shape,
        bounds: *bounds,
        poly: poly.clone(),
        counts,
        fft_len: n,
        column_tile,
        flops: kernel_flops + column_flops,
        kernel_flops,
        working_bytes: working,
        kernel_bytes,
        eps: f64::INFINITY,
        approximation_error: cert.approximation_error,
        rounding_error: cert.rounding_error,
        certified_error: cert.certified_error,
        certified_lse_error: cert.certified_lse_error,
        lowrank: None,
    })
}

/// The error bounds for a relative polynomial error `rho` and a rounding bound `e` per unit
/// column (`E` in the module docs), given the data's bounds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Certificate {
    pub approximation_error: f64,
    pub rounding_error: f64,
    pub certified_error: f64,
    pub certified_lse_error: f64,
}

impl Certificate {
    pub fn new(bounds: &FastBounds, rho: f64, e: f64) -> Self {
        let v = bounds.v_max;
        let l = (1.0 - rho) * (-bounds.r).exp() * bounds.min_row_mass;
        let (a, r, lse) = if rho.is_nan() || rho >= 1.0 {
            (f64::INFINITY, f64::INFINITY, f64::INFINITY)
        } else if bounds.min_row_mass == f64::INFINITY {
            // No visible row: every output is exactly 0 and every lse exactly -inf.
            (0.0, 0.0, 0.0)
        } else if e.is_nan() || e >= l {
            (v * 2.0 * rho / (1.0 - rho), f64::INFINITY, f64::INFINITY)
        } else {
            let a = 2.0 * rho / (1.0 - rho);
            (
                v * a,
                v * 2.0 * e / (l - e),
                rho / (1.0 - rho) + e / (l - e),
            )
        };
        Certificate {
            approximation_error: a,
            rounding_error: r,
            certified_error: a + r,
            certified_lse_error: lse,
        }
    }
}

/// Per-pair norms of a kernel `C_αβ`: `||C||_1`, `||C||_2` and `Σ_g Σ_τ |γ_τ c_τ(g)|` (the
/// magnitude its own rounding is relative to).
pub type PairNorms = [f64; 3];

/// Per-`β` norms of `k^β`: `||k^β||_1`, `||k^β||_2`, `max |k^β|`.
pub type BetaNorms = [f64; 3];

/// The rounding bound `E` (per unit column) from the actual norms of one head's data: the
/// module docs' estimate with `max_i |q^α_i|`, `||C_αβ||`, `||k^β||` measured instead of
/// bounded through per-coordinate maxima and `Σ_t |c_t| R_abs^t`. `O(n_pairs)` once the norms
/// are known; always at most the a-priori `E`, and typically orders of magnitude smaller
/// (the a-priori bound ignores every cancellation inside the kernels and between rows).
pub fn data_rounding(
    e: &Expansion,
    pair_norms: &[PairNorms],
    q_max: &[f64],
    k_norms: &[BetaNorms],
    fft_len: usize,
) -> f64 {
    let eps_f = fft_relative_error(fft_len);
    let (g, na) = (e.degree as f64, e.alphas.len() as f64);
    let mut total = 0.0;
    for (alpha, qa) in q_max.iter().enumerate() {
        let range = e.pairs_of_alpha(alpha);
        let nb_alpha = range.len() as f64;
        let mut sum = 0.0;
        for p in range {
            let [c1, c2, cabs] = pair_norms[p];
            let [k1, k2, kinf] = k_norms[e.pairs[p].beta];
            let tp = e.terms_of_pair(p) as f64;
            sum += eps_f * c2 * k1
                + (2.0 * eps_f + (3.0 + 2.0 * nb_alpha) * U) * c1 * k2
                + ((g + 3.0 + tp) * U * cabs + (2.0 * g + 1.0 + na) * U * c1) * kinf;
        }
        total += qa * sum;
    }
    1.01 * total
}

/// The absolute rounding of the subnormal range (per unit column, next to [`data_rounding`]'s
/// relative model): a rounded product whose result falls below `2^-1022` is off by up to
/// `2^-1075` (not by a relative `u`), and later products can amplify that by anything up to
/// the kernel's magnitude (a `W` entry of `1e300` times keys of `1e-310` is a normal score).
/// With `η = 2^-1074` per operation and, for an FFT of length `N`, at most `8 η N` in 2-norm
/// (each stage adds `2η` per entry; a stage scales the 2-norm by at most `√radix`), one entry of
/// `z_α` is off by at most
///
/// ```text
/// Σ_β  η [ ||C||_1 A_k (8 √N + g + 2) + ||k^β||_1 (g + 3 + terms + √N (8 + √N)) + 10 N ]
/// ```
///
/// (monomials and `k^β ∘ x`, whose errors the kernel's row sums `||C||_1` carry; the kernel's
/// entries and its spectrum, carried by `||y||_1`; the product of spectra and the inverse FFT),
/// and the numerator `Σ_α q^α z_α` adds `η A_q (2g + 2) Σ_β ||C||_1 max|k^β|` for the monomials
/// of `q` and `η (1 + n_β)` for its own products. `A_q`, `A_k` (`max(1, max |monomial|)`) bound
/// what a monomial's later factors multiply an early underflow by. For data of ordinary
/// magnitudes this is below `1e-300` (it does not change a certificate); it matters exactly
/// when a huge table entry meets tiny keys or queries. A model of the computation, like
/// [`fft_relative_error`], not a proof about rustfft's code.
pub fn underflow_rounding(
    e: &Expansion,
    pair_norms: &[PairNorms],
    q_max: &[f64],
    k_norms: &[BetaNorms],
    fft_len: usize,
) -> f64 {
    const ETA: f64 = 5e-324;
    let (n, g) = (fft_len as f64, e.degree as f64);
    let a_q = q_max.iter().fold(1.0f64, |m, &x| m.max(x));
    let a_k = k_norms.iter().fold(1.0f64, |m, x| m.max(x[2]));
    let mut total = 0.0;
    for (alpha, qa) in q_max.iter().enumerate() {
        let range = e.pairs_of_alpha(alpha);
        let nb = range.len() as f64;
        let (mut z, mut mono) = (0.0, 0.0);
        for p in range {
            let [c1, _, _] = pair_norms[p];
            let [k1, _, kinf] = k_norms[e.pairs[p].beta];
            let tp = e.terms_of_pair(p) as f64;
            z += c1 * a_k * (8.0 * n.sqrt() + g + 2.0)
                + k1 * (g + 3.0 + tp + n.sqrt() * (8.0 + n.sqrt()))
                + 10.0 * n;
            mono += c1 * kinf;
        }
        total += qa * z + a_q * (2.0 * g + 2.0) * mono + (1.0 + nb);
    }
    // In units of η (so that the sums above do not underflow themselves).
    1.01 * total * ETA
}

/// The radius Chebyshev polynomials are built on for a score bound `r`: `r` rounded up to 7
/// significant bits (at most 1/64 larger, exact in binary). A polynomial certified on
/// `[-snap(r), snap(r)]` is certified on `[-r, r]`; its coefficients, and hence the kernel
/// spectra, are then the same for every call whose data-dependent `R` falls in the same step,
/// which is what lets the kernel cache ([`crate::fast::cache`]) hit across training steps.
pub fn snap_radius(r: f64) -> f64 {
    if !(r.is_finite() && r > 0.0) {
        return r;
    }
    let step = 2f64.powi(r.log2().floor() as i32 - 6);
    let snapped = (r / step).ceil() * step;
    if snapped >= r {
        snapped
    } else {
        snapped + step
    }
}

/// The least-degree plan whose certified error is at most `eps`, or `Error::Approximation` with
/// the reason (degree cap, term limit, memory limit, or rounding beyond `eps`).
///
/// At each degree Taylor is tried before Chebyshev (on [`snap_radius`]`(R)`, then on `R`); a polynomial is kept when its approximation
/// error *and* the rounding bound together fit `eps`. Rounding grows with the degree (larger
/// `Σ|c_t| R_abs^t` and more terms), so once it alone exceeds `eps` for both kinds we stop.
pub fn fast_plan(
    shape: FastShape,
    support: &[(usize, usize)],
    bounds: &FastBounds,
    eps: f64,
    limits: &FastLimits,
) -> Result<FastPlan> {
    if eps.is_nan() || eps < 0.0 {
        return Err(Error::Value(format!(
            "eps: expected a value >= 0, got {eps}"
        )));
    }
    if eps == 0.0 {
        return Err(Error::Approximation(
            "fast method: eps = 0 asks for exact results; the fast method is an approximation"
                .into(),
        ));
    }
    for (name, x) in [
        ("R", bounds.r),
        ("R_abs", bounds.r_abs),
        ("max |v|", bounds.v_max),
    ] {
        if !x.is_finite() {
            return Err(Error::Value(format!(
                "{name}: expected a finite bound, got {x}"
            )));
        }
    }
    // Taylor's coefficients do not depend on R; Chebyshev's are built on the snapped radius
    // first (so that calls whose R differs in the last bits share kernel spectra in the cache),
    // then, should that fail at a degree, on R itself.
    let snapped = snap_radius(bounds.r);
    let mut tries = vec![(Family::Taylor, bounds.r), (Family::Chebyshev, snapped)];
    if snapped != bounds.r {
        tries.push((Family::Chebyshev, bounds.r));
    }
    let admit = |degree: usize| {
        let count = term_count(support.len(), degree);
        (count > limits.max_terms as f64).then(|| {
            format!(
                "degree {degree} would need C({}, {degree}) = {count:.3e} terms, more than the limit of {}",
                support.len() + degree,
                limits.max_terms
            )
        })
    };
    let judge = |degree: usize, poly: Polynomial, _: &'static str| -> Result<Verdict<FastPlan>> {
        let approx = bounds.v_max * 2.0 * poly.rho / (1.0 - poly.rho);
        if poly.rho.is_nan() || poly.rho >= 1.0 || approx > eps {
            return Ok(Verdict::Reject {
                why: format!(
                    "at degree {degree} the polynomial error on [-{r:.4}, {r:.4}] is {:.3e} (relative {:.3e}), above eps = {eps:.3e}",
                    approx,
                    poly.rho,
                    r = bounds.r
                ),
                hopeless: false,
            });
        }
        let mut plan = plan_unchecked(shape, support, bounds, &poly, limits)?;
        plan.eps = eps;
        // Certified a priori, or (the a-priori rounding bound being very pessimistic) on
        // the approximation error with 1/16 of eps left for the per-head rounding bound —
        // unless even the cancellation floor of the expansion at a score of -R, about
        // `2 V ε_f Σ|c_t| R^t e^R`, leaves no room: then no head would pass.
        let floor = 2.0
            * bounds.v_max
            * fft_relative_error(plan.fft_len)
            * poly.abs_eval(bounds.r)
            * bounds.r.exp()
            / (1.0 - poly.rho);
        let deferred = approx <= eps * (15.0 / 16.0) && floor <= eps / 16.0;
        if plan.certified_error <= eps || deferred {
            // A higher degree only needs more memory: refuse now.
            if plan.column_tile == 0 {
                return Err(memory_refusal(&plan, limits));
            }
            return Ok(Verdict::Accept(plan));
        }
        Ok(Verdict::Reject {
            why: format!(
                "at degree {degree} the rounding bound is {:.3e} (its floor at a score of -R alone \
                 {floor:.3e}) on top of a polynomial error of {:.3e} (R = {:.4}, sum of |terms| {:.3e}, \
                 smallest visible row mass {:.3e}, FFT length {}); double precision cannot certify \
                 eps = {eps:.3e} here",
                plan.rounding_error,
                plan.approximation_error,
                bounds.r,
                poly.abs_eval(bounds.r_abs),
                bounds.min_row_mass,
                plan.fft_len
            ),
            hopeless: plan.rounding_error > eps && floor > eps / 16.0,
        })
    };
    search_degree(limits.max_degree, &tries, Pick::First, admit, judge)?.map_err(|why| {
        Error::Approximation(format!("fast method cannot certify eps = {eps:.3e}: {why}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(r: f64, n: usize, min_row_mass: f64) -> FastBounds {
        FastBounds {
            r,
            r_abs: 1.5 * r,
            v_max: 1.0,
            factor_sum: (2 * n - 1) as f64,
            factor_norm2: ((2 * n - 1) as f64).sqrt(),
            min_row_mass,
        }
    }

    const ROTARY2: [(usize, usize); 4] = [(0, 0), (0, 1), (1, 0), (1, 1)];

    #[test]
    fn plans_certify_eps_and_pick_the_least_degree() {
        let shape = FastShape {
            nq: 4096,
            nk: 4096,
            d: 2,
            dv: 64,
        };
        let lim = FastLimits::default();
        let mut last_degree = 0;
        for eps in [1e-2, 1e-4, 1e-6, 1e-8] {
            let p = fast_plan(shape, &ROTARY2, &bounds(1.0, 4096, 4096.0), eps, &lim).unwrap();
            assert!(p.certified_error <= eps && p.poly.degree >= last_degree);
            last_degree = p.poly.degree;
            assert_eq!(p.fft_len, 8192);
            assert!(p.flops > p.kernel_flops && p.working_bytes <= lim.max_working_bytes);
        }
    }

    #[test]
    fn refusals_say_why() {
        let shape = FastShape {
            nq: 65536,
            nk: 65536,
            d: 2,
            dv: 64,
        };
        let lim = FastLimits::default();
        let msg = |r: Result<FastPlan>| match r {
            Err(Error::Approximation(m)) => m,
            other => panic!("expected a refusal, got {other:?}"),
        };
        // R = 14 with a causal first row: double precision cannot certify.
        let m = msg(fast_plan(
            shape,
            &ROTARY2,
            &bounds(14.0, 65536, 1.0),
            1e-3,
            &lim,
        ));
        assert!(m.contains("rounding"), "{m}");
        assert!(msg(fast_plan(
            shape,
            &ROTARY2,
            &bounds(1.0, 65536, 1.0),
            0.0,
            &lim
        ))
        .contains("eps = 0"));
        let tight = FastLimits {
            max_working_bytes: 1 << 20,
            ..lim
        };
        assert!(msg(fast_plan(
            shape,
            &ROTARY2,
            &bounds(1.0, 65536, 1.0),
            1e-3,
            &tight
        ))
        .contains("memory limit"));
        let dense: Vec<(usize, usize)> =
            (0..64).flat_map(|a| (0..64).map(move |b| (a, b))).collect();
        let shape64 = FastShape { d: 64, ..shape };
        assert!(msg(fast_plan(
            shape64,
            &dense,
            &bounds(1.0, 65536, 65536.0),
            1e-3,
            &lim
        ))
        .contains("terms"));
    }

    #[test]
    fn memory_tiles_columns() {
        let shape = FastShape {
            nq: 4096,
            nk: 4096,
            d: 2,
            dv: 64,
        };
        let b = bounds(1.0, 4096, 4096.0);
        let full = fast_plan(shape, &ROTARY2, &b, 1e-3, &FastLimits::default()).unwrap();
        assert!(full.column_tile >= 4);
        let lim = FastLimits {
            max_working_bytes: full.working_bytes * 2 / 3,
            ..FastLimits::default()
        };
        let tiled = fast_plan(shape, &ROTARY2, &b, 1e-3, &lim).unwrap();
        assert!(tiled.column_tile < full.column_tile);
        assert!(tiled.working_bytes <= lim.max_working_bytes);
    }

    #[test]
    fn spectra_that_do_not_fit_are_streamed_within_the_limit() {
        // BlockW at d = 4 (two 2x2 blocks), degree 5, n = 2^20: the held spectra alone take
        // 16 GB.
        let blockw: Vec<(usize, usize)> = [0, 2]
            .iter()
            .flat_map(|&o| [(o, o), (o, o + 1), (o + 1, o), (o + 1, o + 1)])
            .collect();
        let n = 1 << 20;
        let shape = FastShape {
            nq: n,
            nk: n,
            d: 4,
            dv: 64,
        };
        let b = bounds(1.0, n, 1.0);
        let poly = crate::poly::taylor(1.0, 5).unwrap();
        let huge = FastLimits {
            max_working_bytes: 1 << 46,
            ..FastLimits::default()
        };
        let held = plan_for_polynomial(shape, &blockw, &b, &poly, &huge).unwrap();
        assert!(
            !held.streamed() && held.kernel_bytes > 16_000_000_000,
            "{held:?}"
        );
        let lim = FastLimits {
            max_working_bytes: 8 << 30,
            ..FastLimits::default()
        };
        let plan = plan_for_polynomial(shape, &blockw, &b, &poly, &lim).unwrap();
        assert!(plan.streamed(), "{plan:?}");
        let chunk = plan.pair_chunk();
        assert!(chunk >= 1 && chunk < plan.counts.n_pairs);
        assert!(plan.working_bytes <= lim.max_working_bytes);
        assert_eq!(plan.kernel_bytes, chunk * spectrum_bytes(plan.fft_len));
        assert_eq!(plan.shared_bytes(), 0);
        // Per tile every kernel FFT is redone: the per-head flops count them.
        let tiles = (shape.dv + 1).div_ceil(plan.column_tile) as f64;
        let kernel_ffts = plan.counts.n_pairs as f64 * fft_flops(plan.fft_len);
        assert!(
            plan.flops - plan.kernel_flops >= held.flops - held.kernel_flops + tiles * kernel_ffts
        );
        // A larger limit never predicts more time.
        let more = FastLimits {
            max_working_bytes: 16 << 30,
            ..lim
        };
        let wider = plan_for_polynomial(shape, &blockw, &b, &poly, &more).unwrap();
        assert!(wider.streamed() && wider.flops <= plan.flops);
        // Refused only when one column and one pair do not fit; the message says so.
        let least = plan_unchecked(
            shape,
            &blockw,
            &b,
            &poly,
            &FastLimits {
                max_working_bytes: 1 << 20,
                ..lim
            },
        )
        .unwrap();
        assert_eq!(least.column_tile, 0);
        let at_least = FastLimits {
            max_working_bytes: least.working_bytes,
            ..lim
        };
        let tightest = plan_for_polynomial(shape, &blockw, &b, &poly, &at_least).unwrap();
        assert!(tightest.streamed() && tightest.column_tile == 1 && tightest.pair_chunk() == 1);
        let below = FastLimits {
            max_working_bytes: least.working_bytes - 1,
            ..lim
        };
        match plan_for_polynomial(shape, &blockw, &b, &poly, &below) {
            Err(Error::Approximation(m)) => assert!(m.contains("streamed one at a time"), "{m}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}
