//! The plans of the fast method, forward and backward, as plain data both routes produce and the
//! dispatcher consumes: [`FastPlan`] (with [`LowRank`] for the low-rank route) and
//! [`BackwardPlan`] (with [`LowRankGrad`]), and the request a backward plan is made from
//! ([`BackwardRequest`]). How a plan is chosen is each route's business.

use crate::fast::bounds::FastBounds;
use crate::fast::common::{spectrum_bytes, ExpansionCounts, FastShape};
use crate::fast::grad::{Grad5, GradCertificate, GradEps, Want, GRAD_NAMES};
use crate::fast::grad_bounds::{FactorStats, GradBounds, PSums};
use crate::poly::Polynomial;

/// A certified plan for the fast method (plain data): the polynomial, the expansion's size,
/// predicted cost and memory, and the certificate.
#[derive(Clone, Debug, PartialEq)]
pub struct FastPlan {
    pub shape: FastShape,
    pub bounds: FastBounds,
    pub poly: Polynomial,
    pub counts: ExpansionCounts,
    pub fft_len: usize,
    /// Columns of `[V, 1]` processed together (memory tiling; 0 when even one column exceeds
    /// the memory limit — [`plan_for_polynomial`](crate::fast::toeplitz::plan_for_polynomial) and [`fast_plan`](crate::fast::toeplitz::fast_plan) never return such a plan).
    pub column_tile: usize,
    /// Predicted floating-point operations, kernel spectra included.
    pub flops: f64,
    /// The part of `flops` spent on kernel spectra (shared by heads with the same W, scale,
    /// mask/bias and shape).
    pub kernel_flops: f64,
    /// Peak bytes held at once, kernel spectra included.
    pub working_bytes: usize,
    /// Bytes of the kernel spectra held at once: all `n_pairs` of them, shared by the heads of a
    /// group, or — when they are streamed — one chunk of [`FastPlan::pair_chunk`] pairs per
    /// running head, recomputed for every column tile.
    pub kernel_bytes: usize,
    /// The `eps` this plan was chosen for (`inf` from [`plan_for_polynomial`](crate::fast::toeplitz::plan_for_polynomial)): a kernel built
    /// from it refuses heads whose data-dependent certificate exceeds it.
    pub eps: f64,
    /// `V 2ρ/(1-ρ)`.
    pub approximation_error: f64,
    /// `V 2E/(L-E)` with the a-priori `E` (an upper bound on what
    /// [`super::FastKernel::apply`] certifies from the head's actual norms).
    pub rounding_error: f64,
    /// A-priori bound on `max |out - exact|`. When it exceeds `eps` the plan was accepted on
    /// its approximation error alone (at most `15/16 eps`) and each head is certified by its
    /// data-dependent rounding bound before any FFT runs.
    pub certified_error: f64,
    pub certified_lse_error: f64,
    /// A plan for the low-rank path ([`super::lowrank`]: Rotary or `w=None`, any mask and
    /// window, no bias or an ALiBi one) rather than Toeplitz products.
    pub lowrank: Option<LowRank>,
}

impl FastPlan {
    /// Pairs whose kernel spectra are held at once (`kernel_bytes` over the bytes of one
    /// spectrum): `n_pairs` when the spectra are built once and kept, fewer when they are
    /// streamed. `n_pairs` for a low-rank plan (it has no spectra).
    pub fn pair_chunk(&self) -> usize {
        let n = self.counts.n_pairs;
        if self.lowrank.is_some() {
            return n;
        }
        (self.kernel_bytes / spectrum_bytes(self.fft_len)).min(n)
    }

    /// True when the kernel spectra are streamed: built in chunks of [`FastPlan::pair_chunk`]
    /// pairs and applied chunk by chunk, for every column tile of every head, because all of
    /// them do not fit the memory limit.
    pub fn streamed(&self) -> bool {
        self.lowrank.is_none() && self.pair_chunk() < self.counts.n_pairs
    }

    /// Bytes shared by every head of a group (the cached kernel spectra; 0 when streamed, each
    /// running head then holding its own chunk).
    pub fn shared_bytes(&self) -> usize {
        if self.streamed() {
            0
        } else {
            self.kernel_bytes
        }
    }
}

/// What a low-rank plan needs beyond [`FastPlan`]: the bounds its rounding certificate used.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LowRank {
    /// `R₂ >= scale f² max|q_i| max|k_j|`.
    pub r2: f64,
    /// Largest rotation angle `max |p| max θ`.
    pub psi_max: f64,
    /// Causal shift `c = q_offset - k_offset` (query `i` sees keys `j <= i + c`), or None.
    pub causal_shift: Option<i64>,
    /// A window that masks, an ALiBi decay, or neither ([`Band::default`]): the banded forward
    /// ([`super::lowrank`]'s "Windows and ALiBi").
    pub band: Band,
}

/// The band of a low-rank call: which keys a query sees beyond the causal mask, and how much
/// each weighs. The pair `(i, j)` (`δ = i + shift - j`) is visible for `-right <= δ <= left`
/// (and `δ >= 0` when causal) and weighs `e^{-slope |δ|}`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Band {
    /// `c = q_offset - k_offset`, causal or not.
    pub shift: i64,
    /// `(left, right)` of a window that masks something, or None.
    pub window: Option<(i64, i64)>,
    /// The ALiBi slope `s >= 0` (0 without a bias).
    pub slope: f64,
    /// The bias table's deviation from `-s|δ|` where it matters: the computed weight of every
    /// visible pair with `s|δ| <= tail_from` is within a factor `e^{±bias_eta}` of `e^{b(δ)}`.
    pub bias_eta: f64,
    /// Where the tail starts (`s|δ| > tail_from`: every such pair weighs at most
    /// `tail_weight`, in the table and in the decay).
    pub tail_from: f64,
    /// The largest weight of a tail pair, `max(e^{b(δ)}, e^{-s|δ|})` (0 without a tail).
    pub tail_weight: f64,
    /// The least total weight `Σ_j e^{-s|δ_ij|}` of a row that sees a key, from below.
    pub min_mass: f64,
}

impl Band {
    /// Neither a window that masks nor a bias: the plain (running-state) forward.
    pub fn is_plain(&self) -> bool {
        self.window.is_none()
            && self.slope == 0.0
            && self.bias_eta == 0.0
            && self.tail_weight == 0.0
    }
}

/// What a backward plan needs to know about a call (or one group of heads sharing a kernel).
#[derive(Clone, Debug)]
pub struct BackwardRequest<'a> {
    pub shape: FastShape,
    pub support: &'a [(usize, usize)],
    /// Worst forward bounds over the heads (`R`, `R_abs`, `max|v|`, factor statistics).
    pub bounds: FastBounds,
    /// Worst gradient bounds over the heads.
    pub grad: GradBounds,
    pub fstats: FactorStats,
    /// Worst bounds on the column and diagonal sums of `P` over the heads.
    pub psums: PSums,
    /// Per-head error budget of each gradient.
    pub eps: GradEps,
    pub want: Want,
    /// Relative rounding of the results' dtype (`2^-24` for float32, 0 for float64).
    pub out_rel: f64,
    /// Heads whose correlations are accumulated together (dw/dbias rounding).
    pub heads: usize,
}

/// A certified plan for the fast backward (plain data).
#[derive(Clone, Debug, PartialEq)]
pub struct BackwardPlan {
    pub shape: FastShape,
    pub bounds: FastBounds,
    pub grad: GradBounds,
    pub fstats: FactorStats,
    pub psums: PSums,
    pub poly: Polynomial,
    /// `"taylor"`, `"chebyshev"` or `"integrated-chebyshev"` (see [`crate::poly::integrated_chebyshev`]).
    pub family: &'static str,
    /// Verified relative error of `p'` against `exp` on `[-R, R]`.
    pub rho_d: f64,
    pub counts: ExpansionCounts,
    /// The expansion of `p'` (dw only).
    pub d_counts: Option<ExpansionCounts>,
    pub want: Want,
    pub fft_len: usize,
    /// Columns of `[V, 1]` (and of `a`) processed together.
    pub column_tile: usize,
    /// Predicted flops of one head plus the shared kernel work.
    pub flops: f64,
    /// The shared part of `flops` (kernel spectra, correlation inverse FFTs, contractions).
    pub kernel_flops: f64,
    /// Peak bytes of one head plus the shared buffers.
    pub working_bytes: usize,
    /// Bytes of the shared buffers (kernel spectra, correlation accumulators).
    pub kernel_bytes: usize,
    pub eps: GradEps,
    pub out_rel: f64,
    pub heads: usize,
    pub approximation: Grad5,
    /// The a-priori rounding bound (each head is certified from its own norms, never larger).
    pub rounding: Grad5,
    /// float32 rounding of the results.
    pub output: Grad5,
    pub certified: Grad5,
    /// True when the a-priori certificate exceeds `eps` and the plan relies on each head's
    /// data-dependent rounding bound (approximation within `15/16` of each budget).
    pub deferred: bool,
    /// `Some` for a plan of the low-rank path ([`crate::fast::lowrank`]: no FFTs).
    pub lowrank: Option<LowRankGrad>,
}

impl BackwardPlan {
    /// A plain-text summary of why a gradient failed its budget.
    pub(crate) fn over_message(&self, c: &GradCertificate, what: &str) -> Option<String> {
        c.certified.over(&self.eps, 1.0, self.want).map(|i| {
            format!(
                "fast backward: {what} error bound of {} is {:.3e} (approximation {:.3e}, rounding {:.3e}, \
                 output dtype rounding {:.3e}), above its budget {:.3e}",
                GRAD_NAMES[i],
                c.certified.to_array()[i],
                c.approximation.to_array()[i],
                c.rounding.to_array()[i],
                c.output.to_array()[i],
                self.eps.to_array()[i]
            )
        })
    }
}

/// What a low-rank backward plan needs beyond [`BackwardPlan`]: the bounds of its rounding
/// certificate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LowRankGrad {
    /// The forward's parameters (`r2 >= kx ky`, `psi_max`, causal shift).
    pub lr: LowRank,
    /// `>= max_i |x_i|` (2-norms of the rotated, scaled queries: `|scale| f² max|q_i|`).
    pub kx: f64,
    /// `>= max_j |k_j|`.
    pub ky: f64,
    /// `|scale| f²` (the chain rule from `x` back to `q`).
    pub mul: f64,
}
