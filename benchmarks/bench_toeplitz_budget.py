"""The Toeplitz route at a memory limit: BlockW (RoPE's blocks times 1 + u, u uniform in
[-0.1, 0.1] per entry and δ), d = 4, d_v = 64, causal, eps = 1e-3, one head, float64, q and k
scaled to the certified score bound R = 1. Prints the plan (held or streamed kernel spectra),
then with ``run`` the call's time and its error on 7 rows against single-row exact calls.

    PYTHONPATH=python /usr/bin/time -v python benchmarks/bench_toeplitz_budget.py 18 8e9 run
    PYTHONPATH=python /usr/bin/time -v python benchmarks/bench_toeplitz_budget.py 18 default run

Arguments: log2 n; ``memory_limit`` in bytes or ``default``; ``plan`` or ``run``.
"""
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
import numpy as np

import fastrope
from fastrope._bench import unit_bound

k_exp, limit, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]  # mode: plan | run
n, d, dv, eps = 2**k_exp, 4, 64, 1e-3
limit = None if limit == "default" else int(float(limit))
rng = np.random.default_rng([0, 4, d, n])
q = rng.uniform(-1.0, 1.0, (n, d))
k = rng.uniform(-1.0, 1.0, (n, d))
v = rng.uniform(-1.0, 1.0, (n, dv))
blocks = C.rotary_blocks(n, d, "float64")
blocks *= 1.0 + rng.uniform(-0.1, 0.1, blocks.shape)
w = fastrope.BlockW(blocks)
kw = {"causal": True}
s = 1.0 / math.sqrt(unit_bound(q, k, v, w, eps))
q *= s
k *= s
p = fastrope.plan(q, k, v, w, eps, method="fast", memory_limit=limit, **kw)
print(p)
print(
    "kernel_spectra:", p.details.get("kernel_spectra"), "column_tile:", p.details.get("column_tile")
)
sys.stdout.flush()
if mode == "run":
    t = time.perf_counter()
    out = fastrope.attention(q, k, v, w, eps, method="fast", memory_limit=limit, **kw)
    el = time.perf_counter() - t
    rows = np.r_[0, 1, 2, n // 3, n // 2, n - 2, n - 1]
    ex = np.concatenate(
        [
            fastrope.attention(q[i : i + 1], k, v, w, method="exact", q_offset=int(i), **kw)
            for i in rows
        ]
    )
    err = float(np.abs(out[rows] - ex).max())
    print(json.dumps({"n": n, "seconds": el, "err_rows": err, "certified": p.certified_error,
                      "load": os.getloadavg()}))
