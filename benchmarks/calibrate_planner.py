"""Measure the constants of the planner's cost model (src/plan/cost.rs) on this machine.

    PYTHONPATH=python python benchmarks/calibrate_planner.py

Prints nanoseconds per (query, key) pair of the exact method (single thread) for a few shapes
and the fitted ``a + b (d + d_v) + c |S|``, and the fast method's throughput in the flop model
of ``fastrope::fast::certify``.  Update the per-pair rates (ROTARY_F32, ..., SUPPORT_F64) and
FAST_FLOPS_PER_SECOND in src/plan/cost.rs with them.
"""

from __future__ import annotations

import os
import time

import numpy as np

import fastrope


def best(f, repeats: int = 3) -> float:
    f()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def main() -> None:
    rng = np.random.default_rng(0)
    n = 2048
    print("load", os.getloadavg())
    for dt in (np.float32, np.float64):
        for form in ("rotary", "sparse"):
            rows = []
            for d, dv in ((4, 64), (64, 64), (128, 128)):
                q = rng.standard_normal((1, n, d)).astype(dt)
                v = rng.standard_normal((1, n, dv)).astype(dt)
                if form == "rotary":
                    w, ns = fastrope.Rotary(), 0
                else:
                    w = fastrope.BlockW(rng.standard_normal((2 * n - 1, d // 2, 2, 2)).astype(dt))
                    ns = 2 * d
                s = best(
                    lambda q=q, v=v, w=w: fastrope.attention(
                        q, q, v, w, method="exact", num_threads=1
                    )
                )
                rows.append((1.0, d + dv, ns, s / n / n * 1e9))
            a = np.array(rows)
            cols = a[:, :3] if form == "sparse" else a[:, :2]
            coef, *_ = np.linalg.lstsq(cols, a[:, 3], rcond=None)
            name = np.dtype(dt).name
            print(name, form, "ns/pair", np.round(a[:, 3], 2), "fit", np.round(coef, 3))
    q = rng.uniform(-1, 1, (1, 8192, 4)) * 0.5
    v = rng.standard_normal((1, 8192, 64))
    p = fastrope.plan(q, q, v, fastrope.Rotary(), 1e-3, method="fast")
    s = best(lambda: fastrope.attention(q, q, v, fastrope.Rotary(), 1e-3, method="fast"), 1)
    print(f"fast: {p.fast_flops:.3g} model flops in {s:.3g} s = {p.fast_flops / s:.3g} flop/s")


if __name__ == "__main__":
    main()
