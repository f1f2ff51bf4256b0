"""Helpers shared by the benchmark scripts: machine description, timing, RoPE inputs, flop models,
tables and JSON.

Nothing here imports torch at module level; :func:`try_torch` returns it or None.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

# --------------------------------------------------------------------------------------------------
# machine


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> Optional[list]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def snapshot_package(name: str = "fastrope") -> dict:
    """Copy the package (with its compiled extension) to a private temporary directory and put
    that first on ``sys.path``, so that a rebuild of the extension in place during a long run
    (``maturin develop`` rewrites the ``.so``, and a rewritten mapped library kills the process
    with SIGBUS) cannot crash or change the benchmark.  Call before importing the package.
    Returns where it came from, the extension's mtime and sha256 (to tie results to a build)."""
    import hashlib
    import importlib.util
    import shutil
    import tempfile

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{name} not found (run with PYTHONPATH=python from the repo root)")
    src = list(spec.submodule_search_locations)[0]
    tmp = tempfile.mkdtemp(prefix=f"{name}-bench-")
    shutil.copytree(
        src, os.path.join(tmp, name), ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    sys.path.insert(0, tmp)
    import atexit

    atexit.register(shutil.rmtree, tmp, True)
    info = {"source": os.path.abspath(src), "snapshot": tmp}
    for f in sorted(os.listdir(src)):
        if f.endswith((".so", ".pyd")):
            path = os.path.join(src, f)
            with open(os.path.join(tmp, name, f), "rb") as fh:
                info["extension"] = f
                info["extension_sha256"] = hashlib.sha256(fh.read()).hexdigest()[:16]
            info["extension_mtime"] = (
                _dt.datetime.fromtimestamp(os.path.getmtime(path))
                .astimezone()
                .isoformat(timespec="seconds")
            )
    return info


def wait_for_load(max_load: float, max_wait: float) -> float:
    """Sleep (up to ``max_wait`` s) until the 1-minute load average is below ``max_load``.
    Returns the seconds waited.  ``max_load <= 0`` disables it."""
    if max_load <= 0:
        return 0.0
    t0 = time.perf_counter()
    while True:
        la = loadavg()
        waited = time.perf_counter() - t0
        if la is None or la[0] < max_load or waited >= max_wait:
            return waited
        time.sleep(5.0)


def try_torch():
    """The torch module, or None when it is not importable."""
    try:
        import torch  # noqa: F401

        return torch
    except Exception:  # ImportError, or a broken install failing on shared libraries
        return None


def machine_info(threads: int) -> dict:
    import fastrope

    info = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "threads": threads,
        "loadavg_start": loadavg(),
        "steal_s_start": cpu_steal_seconds(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "fastrope": getattr(fastrope, "__version__", "?"),
        "argv": " ".join(sys.argv),
    }
    torch = try_torch()
    info["torch"] = None if torch is None else torch.__version__
    return info


def cpu_steal_seconds() -> float | None:
    """CPU time the hypervisor gave to other guests (``steal`` in /proc/stat), in seconds summed
    over cores: on a shared VM it is load that the load average does not show."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def set_threads(threads: int) -> None:
    """Set torch's intra-op threads (fastrope takes ``num_threads=`` per call)."""
    torch = try_torch()
    if torch is not None:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------
# inputs


def make_qkv(batch: int, heads: int, n: int, d: int, dtype: str, seed: int = 0):
    """Standard-normal q, k, v of shape ``(batch, heads, n, d)``."""
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((batch, heads, n, d)).astype(dtype) for _ in range(3))


def rope_angles(n: int, d: int, base: float = 10000.0) -> np.ndarray:
    """float64 angles ``p * θ_m`` of shape ``(n, d/2)`` for positions ``p = 0..n-1``."""
    import fastrope

    theta, _ = fastrope.Rotary(base=base).frequencies(d)
    return np.arange(n, dtype=np.float64)[:, None] * theta[None, :]


def rotate_interleaved(x: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Apply RoPE (interleaved pairs ``(2m, 2m+1)``) to ``x[..., n, d]``: each pair is rotated by
    ``+angle``: ``(x0 cos - x1 sin, x0 sin + x1 cos)``.  Computed in float64, returned in x's
    dtype."""
    c, s = np.cos(angles), np.sin(angles)
    x0 = x[..., 0::2].astype(np.float64)
    x1 = x[..., 1::2].astype(np.float64)
    out = np.empty(x.shape, np.float64)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x0 * s + x1 * c
    return out.astype(x.dtype)


def rotary_blocks(L: int, d: int, dtype: str, base: float = 10000.0) -> np.ndarray:
    """BlockW blocks ``(2L-1, d/2, 2, 2)`` equal to ``Rotary(base)``:
    ``[[cos, sin], [-sin, cos]](δθ_m)`` for ``δ = -(L-1) .. L-1`` (row ``δ + L - 1``)."""
    import fastrope

    theta, _ = fastrope.Rotary(base=base).frequencies(d)
    phi = np.arange(-(L - 1), L, dtype=np.float64)[:, None] * theta[None, :]
    c, s = np.cos(phi), np.sin(phi)
    row0 = np.stack([c, s], axis=-1)
    row1 = np.stack([-s, c], axis=-1)
    return np.stack([row0, row1], axis=-2).astype(dtype)


# --------------------------------------------------------------------------------------------------
# flop models


def attention_flops(
    batch: int, heads: int, n_q: int, n_k: int, d: int, causal: bool, backward: bool = False
) -> float:
    """Forward: ``4 n_q n_k d`` per head (QK^T and PV), half that when causal.  Backward: 2.5x the
    forward (five n x n x d matmuls instead of two; the FlashAttention benchmark convention)."""
    f = 4.0 * n_q * n_k * d * batch * heads
    if causal:
        f *= 0.5
    if backward:
        f *= 2.5
    return f


# --------------------------------------------------------------------------------------------------
# timing


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    r = fn()
    return time.perf_counter() - t0, r


def run_rounds(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    min_repeats: int,
    budget: float,
    warmup_below: float,
    settle: float = 0.0,
    fill: float = 0.0,
    max_repeats: int = 0,
    prime_below: float = 0.0,
) -> tuple[dict[str, list], dict[str, Any]]:
    """Time every function of ``fns`` in interleaved rounds (one call of each per round), so that
    load from other processes hits all of them alike.

    Round 0 also returns each function's result (for correctness checks).  It is discarded as a
    warm-up when the whole round took less than ``warmup_below`` seconds; otherwise it counts as a
    sample.  More rounds follow until ``repeats`` samples are collected, stopping early (but not
    below ``min_repeats`` samples) when the next round would exceed ``budget`` seconds in total.
    Returns ``(samples, first_results)``; samples in seconds.

    ``settle`` seconds of sleep precede every call, so that no call starts while the previous
    one's library still holds the cores: PyTorch's OpenMP threads spin for several ms after each
    op (libgomp's default wait policy), and a call started in that window runs on a shared core
    (measured: fastrope's n = 1024 forward 16-18 ms right after SDPA, 13.2-14.0 ms after 10 ms).

    ``fill`` seconds: once ``repeats`` samples are in, rounds go on until the rounds have taken
    ``fill`` seconds in all (or ``max_repeats`` samples), so that fast points get many samples:
    on a shared VM single calls of 25 ms take 45 ms now and then, for every library alike, and a
    median of 5 moves with them.

    ``prime_below`` seconds: a function whose first call took less is called once more, untimed,
    right before each of its timed calls (after the settle), so that short calls are timed in
    steady state, as in a loop over layers. Measured with the variants interleaved (n = 512,
    d = 64, 8 heads, 2 threads, medians of 40): back to back 4.6 ms; after a 20 ms sleep 5.7 ms,
    or 5.0 ms with the untimed call; after two SDPA calls and the sleep, 5.35 ms with it.
    """
    samples: dict = {k: [] for k in fns}
    first: dict = {}
    prime: dict = {}
    start = time.perf_counter()
    round_t = 0.0
    for name, fn in fns.items():
        if settle:
            time.sleep(settle)
        t, r = timed(fn)
        first[name] = r
        samples[name].append(t)
        prime[name] = t < prime_below
        round_t += t
    if round_t < warmup_below:
        samples = {k: [] for k in fns}
    while True:
        have = min(len(v) for v in samples.values())
        if have >= repeats:
            timed_s = sum(sum(v) for v in samples.values())
            if have >= max(max_repeats, repeats) or timed_s + round_t > fill:
                break
        spent = time.perf_counter() - start
        if have >= min_repeats and spent + round_t > budget:
            break
        round_t = 0.0
        for name, fn in fns.items():
            if settle:
                time.sleep(settle)
            if prime[name]:
                fn()
            t, _ = timed(fn)
            samples[name].append(t)
            round_t += t
    return samples, first


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


# --------------------------------------------------------------------------------------------------
# output


def fmt(x: Optional[float], spec: str = ".1f") -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-"
    return format(x, spec)


def format_table(
    header: Sequence[str], rows: Iterable[Sequence[str]], markdown: bool = False
) -> str:
    rows = [list(map(str, r)) for r in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    if markdown:
        lines = [
            "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
            "|" + "|".join("-" * (w + 2) for w in widths) + "|",
        ]
        lines += ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    else:
        lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
        lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def save_json(path: str, obj: Any) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=float)
        f.write("\n")


def log(msg: str) -> None:
    print(msg, flush=True)
