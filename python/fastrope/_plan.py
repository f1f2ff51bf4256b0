"""The planner: which method a call runs, what it costs, and why.

The exact method's cost is ``n_q n_k`` score entries times the work per entry (``2d`` flops for
rotary's ``Q K^T`` GEMM, ``2|S|`` for a general support, plus ``2 d_v`` for ``P V`` and the
exponentials), counted over visible pairs only (masked tiles are skipped).  The fast method's
cost comes from the native planner once it is available (DESIGN.md §5.5).  The working set is
predicted before anything is allocated: a call that would exceed ``memory_limit`` raises
``MemoryError`` up front.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ._types import ApproximationError

# Sustained throughput of the exact kernels on the reference machine (2 cores, AVX-512), in
# flop/s; used only to turn flops into the predicted seconds a Plan reports.
EXACT_FLOPS_PER_SECOND = {"rotary": 40e9, "sparse": 4e9}


@dataclass(frozen=True)
class Plan:
    """A plain-data description of what a call will do.

    ``method`` is ``"exact"`` or ``"fast"``; ``degree``, ``poly_kind``, ``bound_r``, ``terms``,
    ``n_alpha``, ``n_beta``, ``n_pairs`` describe the fast method's polynomial and expansion (None
    when it was not considered); ``certified_error`` bounds ``max|out - exact|`` (0 for exact up to
    rounding); costs are predicted flops and seconds; ``working_set_bytes`` is the memory the
    chosen method allocates beyond its inputs; ``why`` says why it was chosen.
    """

    method: str
    eps: float
    certified_error: float
    exact_flops: float
    exact_seconds: float
    working_set_bytes: int
    memory_limit: int
    why: str
    fast_flops: Optional[float] = None
    fast_seconds: Optional[float] = None
    fast_working_set_bytes: Optional[int] = None
    degree: Optional[int] = None
    poly_kind: Optional[str] = None
    bound_r: Optional[float] = None
    terms: Optional[int] = None
    n_alpha: Optional[int] = None
    n_beta: Optional[int] = None
    n_pairs: Optional[int] = None
    details: dict = field(default_factory=dict, compare=False)

    def __str__(self) -> str:
        lines = [
            f"method: {self.method}  (eps={self.eps:g}, certified error {self.certified_error:.3g})"
        ]
        lines.append(
            f"exact: {self.exact_flops:.3g} flop, ~{self.exact_seconds:.3g} s"
            + (
                f"; fast: {self.fast_flops:.3g} flop, ~{self.fast_seconds:.3g} s"
                if self.fast_flops
                else ""
            )
        )
        if self.degree is not None:
            lines.append(
                f"polynomial: {self.poly_kind} degree {self.degree} on [-R, R],"
                f" R = {self.bound_r:.4g};"
                f" {self.terms} terms, {self.n_alpha} α x {self.n_beta} β, {self.n_pairs} pairs"
            )
        lines.append(
            f"working set: {self.working_set_bytes / 2**20:.1f} MiB"
            f" of {self.memory_limit / 2**20:.0f} MiB"
        )
        lines.append(f"why: {self.why}")
        return "\n".join(lines)


def available_memory() -> int:
    """Bytes of memory available now (MemAvailable on Linux), or 8 GiB when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def resolve_memory_limit(memory_limit: Any) -> int:
    if memory_limit is None:
        return int(0.8 * available_memory())
    if isinstance(memory_limit, bool) or not isinstance(memory_limit, (int, np.integer, float)):
        raise TypeError(
            f"memory_limit: expected a number of bytes or None, got {type(memory_limit).__name__}"
        )
    if not memory_limit > 0:
        raise ValueError(f"memory_limit: expected a positive number of bytes, got {memory_limit!r}")
    return int(memory_limit)


def visible_pairs(call) -> float:
    """Number of visible (query, key) pairs per head."""
    batch, hq, hk, nq, nk, d, dv = call.shape
    rng = call.visible_delta_range
    if rng is None:
        return 0.0
    c = call.q_offset - call.k_offset
    t = np.arange(rng[0], rng[1] + 1, dtype=np.int64) - c  # i - j on each visible diagonal
    lo = np.maximum(t, 0)
    hi = np.minimum(nq - 1, nk - 1 + t)
    return float(np.maximum(hi - lo + 1, 0).sum())


def exact_cost(call, backward: bool) -> tuple:
    """``(flops, seconds, working_set_bytes)`` of the exact method."""
    batch, hq, hk, nq, nk, d, dv = call.shape
    pairs = visible_pairs(call) * batch * hq
    item = call.dtype.itemsize
    if call.rotary is not None:
        per_pair, kind = 2 * d + 2 * dv + 4, "rotary"
        tables = 0
    else:
        ns = call.support.shape[0]
        per_pair, kind = 4 * ns + 2 * dv + 4, "sparse"
        n_tables = int(np.unique(call.w_index).size)
        tables = n_tables * ns * (nq + nk) * item
    flops = pairs * per_pair * (2.5 if backward else 1.0)
    seconds = flops / EXACT_FLOPS_PER_SECOND[kind]
    outputs = batch * hq * nq * (dv + 1) * item
    keys = batch * hk * nk * d * item
    ws = (
        outputs
        + keys
        + tables
        + (nq + nk) * 8 * (1 + (0 if call.bias is None else call.bias.shape[0]))
    )
    if backward:
        grads = (batch * hq * nq * d + batch * hk * nk * (d + dv)) * item
        ws += grads + batch * hq * nq * d * item + min(256 << 20, 4 * grads)
        if call.values is not None:
            ws += call.values.size * 16
    return flops, seconds, int(ws)


def make_plan(call, eps: float, method: str, memory_limit: Any, backward: bool = False) -> Plan:
    limit = resolve_memory_limit(memory_limit)
    flops, seconds, ws = exact_cost(call, backward)
    if method == "fast":
        raise ApproximationError(
            "method='fast': the polynomial + FFT method is not available in this build; use"
            " method='exact' or 'auto'"
        )
    why = (
        (
            "eps = 0 asks for the exact result"
            if eps == 0.0
            else "exact is the only method in this build; it meets any eps >= 0"
        )
        if method == "auto"
        else "method='exact' was requested"
    )
    if ws > limit:
        raise MemoryError(
            f"fastrope: the exact method needs a working set of {ws / 2**20:.1f} MiB, more than"
            f" memory_limit = {limit / 2**20:.1f} MiB (shapes {call.shape})"
        )
    return Plan(
        method="exact",
        eps=eps,
        certified_error=0.0,
        exact_flops=flops,
        exact_seconds=seconds,
        working_set_bytes=ws,
        memory_limit=limit,
        why=why,
    )
