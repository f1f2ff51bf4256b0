"""Prototype (NumPy, not part of the package): the fast method for ``Rotary`` through a low-rank
feature map instead of Toeplitz products and FFTs.

Why it works: for RoPE, ``W_δ = R(p_i θ)^T R(p'_j θ)`` (a rotation by the relative angle is the
product of rotations by the absolute ones), so ``M_ij = scale f² q'_i · k'_j`` with q, k rotated
once by their absolute positions. ``p(M_ij) = Σ_t c_t (x_i·y_j)^t = Σ_{|α|<=g} c_|α| (|α| choose
α) x_i^α y_j^α``: a rank-``r`` matrix, ``r = C(d+g, g)`` (126 for d = 4, g = 5), against the
Toeplitz expansion's ``n_pairs`` kernel spectra (966 for d = 4, g = 5) of length ``2n`` each. So

* no mask: ``out = Φq (Φkᵀ [V, 1])``: two GEMMs, ``O(n r d_v)`` time, ``O(r d_v)`` extra memory
  when streamed over row blocks;
* causal: the same in row blocks with a running state ``S = Σ_{earlier blocks} Φk_jᵀ [v_j, 1]``
  and the diagonal block computed directly as ``p(M)`` (chunked linear attention);

with the same certificate as the Toeplitz path for the polynomial (``2ρ/(1-ρ) max|v|``) and a
plain summation bound for rounding (no FFT). Windows need prefix differences; biases other than
the mask (ALiBi, learned) and general ``W`` (BlockW, sparse) keep the Toeplitz path.

    python benchmarks/prototypes/lowrank_rotary.py --n 65536 --d 4 --dv 64

prints the time of this prototype (single process, NumPy BLAS), fastrope's fast forward and a
sample of exact rows, the errors against exact on those rows, and the feature count.
"""

from __future__ import annotations

import argparse
import itertools
import math
import resource
import time

import numpy as np
from numpy.polynomial import chebyshev as C
from numpy.polynomial import polynomial as P

import fastrope


def rotate_absolute(x: np.ndarray, theta: np.ndarray, start: int) -> np.ndarray:
    """Interleaved pairs (2m, 2m+1) rotated by (start + i) θ_m: q'·k' = qᵀ W_δ k for Rotary."""
    pos = (start + np.arange(x.shape[0]))[:, None] * theta[None, :]
    c, s = np.cos(pos), np.sin(pos)
    a, b = x[:, 0::2], x[:, 1::2]
    out = np.empty_like(x)
    out[:, 0::2] = a * c - b * s
    out[:, 1::2] = a * s + b * c
    return out


def exp_poly(r: float, degree: int) -> np.ndarray:
    """Chebyshev interpolant of exp on [-r, r] in monomial coefficients (c_0 .. c_g)."""
    cheb = C.Chebyshev.interpolate(np.exp, degree, domain=[-r, r])
    return cheb.convert(kind=P.Polynomial).coef


def features(x: np.ndarray, coef: np.ndarray, with_coef: bool) -> np.ndarray:
    """Φ(x)_α = [c_|α| (|α| choose α)] x^α over all |α| <= g (monomials built incrementally)."""
    n, d = x.shape
    mono = {(): np.ones(n)}
    cols = []
    for t in range(len(coef)):
        for combo in itertools.combinations_with_replacement(range(d), t):
            if t:
                mono[combo] = mono[combo[:-1]] * x[:, combo[-1]]
            col = mono[combo]
            if with_coef:
                alpha = np.bincount(np.array(combo, dtype=int), minlength=d)
                mult = math.factorial(t) / np.prod([math.factorial(int(a)) for a in alpha])
                col = coef[t] * mult * col
            cols.append(col)
    return np.stack(cols, axis=1)


def lowrank_causal(x, y, v, coef, block=512):
    """Causal attention with p(x·y) in place of exp, chunked: O(n r d_v)."""
    n = x.shape[0]
    vb = np.concatenate([v, np.ones((n, 1))], axis=1)
    fq, fk = features(x, coef, True), features(y, coef, False)
    state = np.zeros((fq.shape[1], vb.shape[1]))
    out = np.empty_like(vb)
    tri = np.tril(np.ones((block, block), dtype=bool))
    for s in range(0, n, block):
        e = min(n, s + block)
        m = x[s:e] @ y[s:e].T
        pm = np.where(tri[: e - s, : e - s], P.polyval(m, coef), 0.0)
        out[s:e] = fq[s:e] @ state + pm @ vb[s:e]
        state += fk[s:e].T @ vb[s:e]
    return out[:, :-1] / out[:, -1:], fq.shape[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1 << 16)
    ap.add_argument("--d", type=int, default=4)
    ap.add_argument("--dv", type=int, default=64)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--rows", type=int, default=512, help="exact rows sampled at each end")
    ap.add_argument("--no-toeplitz", action="store_true", help="skip fastrope's fast forward")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    n, d, dv = a.n, a.d, a.dv
    q = rng.uniform(-1, 1, (n, d))
    k = rng.uniform(-1, 1, (n, d))
    v = rng.uniform(-1, 1, (n, dv))
    w = fastrope.Rotary()
    # |M_ij| <= scale |q_i| |k_j| (rotations keep norms): scale q, k so that R = 1
    scale = 1 / math.sqrt(d)
    r = scale * np.linalg.norm(q, axis=1).max() * np.linalg.norm(k, axis=1).max()
    q, k = q / math.sqrt(r), k / math.sqrt(r)
    # the degree fastrope's planner picks (on a prefix: at 2^20 the Toeplitz plan does not fit)
    m = min(n, 1 << 16)
    plan = fastrope.plan(q[:m], k[:m], v[:m], w, a.eps, method="fast", causal=True)
    theta, _ = w.frequencies(d, n)
    x = rotate_absolute(q, np.asarray(theta), 0) * math.sqrt(scale)
    y = rotate_absolute(k, np.asarray(theta), 0) * math.sqrt(scale)
    coef = exp_poly(plan.bound_r, plan.degree)

    t0 = time.perf_counter()
    out_lr, rank = lowrank_causal(x, y, v, coef)
    t_lr = time.perf_counter() - t0
    rss_lr = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out_fast, t_fast = None, float("nan")
    if not a.no_toeplitz:
        t0 = time.perf_counter()
        out_fast = fastrope.attention(q, k, v, w, a.eps, method="fast", causal=True)
        t_fast = time.perf_counter() - t0
    err_lr = err_fast = 0.0
    t_rows = 0.0
    for s in (0, n - a.rows):
        t0 = time.perf_counter()
        ex = fastrope.attention(q[s : s + a.rows], k, v, w, causal=True, q_offset=s)
        t_rows += time.perf_counter() - t0
        err_lr = max(err_lr, float(np.abs(out_lr[s : s + a.rows] - ex).max()))
        if out_fast is not None:
            err_fast = max(err_fast, float(np.abs(out_fast[s : s + a.rows] - ex).max()))
    t_exact = t_rows / (2 * a.rows) * n / 2  # causal: the sampled rows average half the keys
    print(
        f"n = {n}, d = {d}, d_v = {dv}, causal, R = 1 (planner's bound {plan.bound_r:.3g}),"
        f" eps = {a.eps:g}:"
        f" degree {plan.degree}, Toeplitz pairs {plan.n_pairs}, low-rank features {rank}"
    )
    print(
        f"low-rank prototype (NumPy): {t_lr:8.2f} s   max err on sampled rows {err_lr:.2e}"
        f"   (peak RSS so far {rss_lr:.2f} GiB)"
    )
    print(f"fastrope fast (Toeplitz):   {t_fast:8.2f} s   max err on sampled rows {err_fast:.2e}")
    print(f"fastrope exact (estimate):  {t_exact:8.2f} s   (from {2 * a.rows} rows)")


if __name__ == "__main__":
    main()
