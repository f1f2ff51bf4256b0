"""Timing pieces shared by ``fastrope bench`` (:mod:`fastrope.cli`) and ``benchmarks/``.

``fastrope bench`` is a small front over :func:`sweep`; ``benchmarks/bench_fast.py`` builds its
inputs with :func:`random_w` and :func:`unit_bound` too, so the CLI and the full benchmark time
the same kind of problem: bounded random inputs on one head, q and k scaled so that the certified
score bound R is 1.  Needs only NumPy (and the package's own modules).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ._attention import attention, plan
from ._position import BlockW, Rotary
from ._types import ApproximationError

FORMS = ("rotary", "blockw")
TABLE_HEAD = ["n", "method", "time (s)", "predicted (s)", "max err", "plan"]
TABLE_WIDTHS = [9, 7, 10, 14, 10, 30]


def best_time(fn: Callable[[], object], repeats: int = 3) -> float:
    """The best wall time of ``repeats`` calls of ``fn``, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def text_row(cols: Sequence[str], widths: Sequence[int]) -> str:
    """One line of a plain-text table, each column padded to its width."""
    return "  ".join(c.ljust(w) for c, w in zip(cols, widths))


def random_w(form: str, rng: np.random.Generator, n: int, d: int, scale: float = 1.0) -> Any:
    """``Rotary()`` or a random ``BlockW`` table for length ``n`` (entries in ``±scale``)."""
    if form == "rotary":
        return Rotary()
    if form == "blockw":
        return BlockW(rng.uniform(-1.0, 1.0, (2 * n - 1, d // 2, 2, 2)) * scale)
    raise ValueError(f"form: expected one of {FORMS}, got {form!r}")


def unit_bound(q: np.ndarray, k: np.ndarray, v: np.ndarray, w: Any, eps: float) -> float:
    """The planner's score bound ``R0`` of ``q, k``: ``q, k / sqrt(R0)`` have ``R = 1``.

    A draw too wide for the planner to bound at all is shrunk (up to 4 halvings) and the bound
    scaled back; RuntimeError when even that fails.
    """

    def bound(q_, k_):
        p = plan(q_, k_, v, w, eps, method="fast", memory_limit=1 << 60)
        return float(p.bound_r)

    shrink = 1.0
    for _ in range(4):
        try:
            return bound(q * shrink, k * shrink) / shrink**2
        except Exception:
            shrink *= 0.5
    raise RuntimeError("could not get a bound R from the planner")


def _table_line(e: dict) -> str:
    t = f"{e['seconds']:.3g}" if "seconds" in e else "-"
    pr = "-" if e["predicted_seconds"] is None else f"{e['predicted_seconds']:.3g}"
    err = f"{e['max_error']:.1e}" if "max_error" in e else "-"
    plan_s = (
        f"degree {e['degree']}, {e['pairs']} pairs" if "degree" in e else e.get("skipped", "")
    )[:30]
    return text_row([str(e["n"]), e["method"], t, pr, err, plan_s], TABLE_WIDTHS)


def sweep(
    ns: Sequence[int],
    *,
    d: int,
    dv: int,
    form: str,
    eps: float,
    methods: Sequence[str],
    max_seconds: float,
    rng: np.random.Generator,
    say: Callable[[str], Any] = print,
    tick: Optional[Callable[[], Any]] = None,
) -> list:
    """Time each method at each ``n`` (one head, q and k scaled to ``R = 1``) next to the
    planner's prediction; a run predicted above ``max_seconds`` (or refused) is skipped.

    Prints a table through ``say`` as it goes, calls ``tick`` after each run, and returns one
    dict per (n, method); the last of each n carries ``max_error`` (fast against exact).
    """
    rows = []
    say(text_row(TABLE_HEAD, TABLE_WIDTHS))
    for n in ns:
        q = rng.uniform(-1, 1, (1, n, d))
        k = rng.uniform(-1, 1, (1, n, d))
        v = rng.standard_normal((1, n, dv))
        w = random_w(form, rng, n, d, scale=0.5)
        s = 1.0 / math.sqrt(unit_bound(q, k, v, w, eps))  # bounded entries: R about 1
        q, k = q * s, k * s
        outs = {}
        for method in methods:
            p = plan(q, k, v, w, eps if method == "fast" else 0.0, method="auto")
            predicted = p.fast_seconds if method == "fast" else p.exact_seconds
            entry = {
                "n": n,
                "d": d,
                "dv": dv,
                "form": form,
                "method": method,
                "predicted_seconds": predicted,
                "load": os.getloadavg()[0],
            }
            if predicted is None or predicted > max_seconds:
                entry["skipped"] = (
                    "refused" if predicted is None else f"predicted {predicted:.3g} s"
                )
            else:
                e = eps if method == "fast" else 0.0
                t0 = time.perf_counter()
                try:
                    outs[method] = attention(q, k, v, w, e, method=method)
                    entry["seconds"] = time.perf_counter() - t0
                except ApproximationError as err:
                    entry["skipped"] = str(err)
                if method == "fast" and "seconds" in entry:
                    entry.update(degree=p.degree, terms=p.terms, pairs=p.n_pairs)
            rows.append(entry)
            if tick is not None:
                tick()
        if "exact" in outs and "fast" in outs:
            rows[-1]["max_error"] = float(np.abs(outs["exact"] - outs["fast"]).max())
        for e in rows[-len(methods) :]:
            say(_table_line(e))
    return rows


def plot_sweep(plt: Any, rows: list, methods: Sequence[str], title: str, path: str) -> None:
    """A log-log plot of measured and predicted seconds against n, saved to ``path``."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in methods:
        pts = [(e["n"], e["seconds"]) for e in rows if e["method"] == method and "seconds" in e]
        if pts:
            ax.loglog(*zip(*pts), "o-", label=f"{method} (measured)")
        pred = [
            (e["n"], e["predicted_seconds"])
            for e in rows
            if e["method"] == method and e["predicted_seconds"]
        ]
        if pred:
            ax.loglog(*zip(*pred), ":", label=f"{method} (planner)")
    ax.set_xlabel("n")
    ax.set_ylabel("seconds")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
