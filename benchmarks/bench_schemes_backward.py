"""The fast backward of every position scheme against the exact backward.

    PYTHONPATH=python python benchmarks/bench_schemes_backward.py --d 2 4 --json out.json

The schemes and inputs of ``bench_schemes.py`` (causal, eps = 1e-3, ``d_v = 64``, one head,
float64, q and k scaled to a certified score bound R = 1); ``dout`` uniform in [-1, 1]. The bias
of the ALiBi schemes is fixed (``bias_grad=False``), so the low-rank route may serve them. For
each point: the route and degree the planner picks, the fast and the exact backward's time (one
call each, after one warm-up call of the fast one; exact measured while its fit predicts at most
``--exact-max-seconds``, beyond that fitted on the visible pairs and marked ``(fit)``), the
largest error of ``dq``, ``dk``, ``dv`` against exact where exact ran, and the plan's certified
bound.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_schemes import SCHEMES, scheme_call  # noqa: E402


def pairs(n: int, kw: dict) -> float:
    """Visible pairs of a causal call (with its window)."""
    w = kw.get("window")
    if w is None:
        return n * (n + 1) / 2
    left = w[0]
    return n * (left + 1) - left * (left + 1) / 2 if left < n else n * (n + 1) / 2


def measure(spec: dict) -> dict:
    import fastrope
    from fastrope._bench import unit_bound

    n, d, dv, eps = spec["n"], spec["d"], spec["dv"], spec["eps"]
    rng = np.random.default_rng([spec["seed"], SCHEMES.index(spec["scheme"]), d, n])
    q = rng.uniform(-1.0, 1.0, (n, d))
    k = rng.uniform(-1.0, 1.0, (n, d))
    v = rng.uniform(-1.0, 1.0, (n, dv))
    dout = rng.uniform(-1.0, 1.0, (n, dv))
    w, kw = scheme_call(fastrope, spec, rng)
    s = 1.0 / math.sqrt(unit_bound(q, k, v, w, eps))
    q *= s
    k *= s
    if "bias" in kw:
        kw["bias_grad"] = False
    res: dict = {"scheme": spec["scheme"], "d": d, "n": n}
    try:
        p = fastrope.plan(q, k, v, w, eps, method="fast", backward=True, **kw)
    except fastrope.ApproximationError as e:
        res["skipped"] = str(e)
        return res
    res.update(route=p.route, degree=p.degree, terms=p.terms, certified=p.certified_error)
    if p.fast_seconds > spec["max_seconds"]:
        res["skipped"] = f"predicted {p.fast_seconds:.0f} s"
        return res

    def fast():
        return fastrope.attention_grad(q, k, v, w, dout, eps, method="fast", **kw)

    fast()
    t = time.perf_counter()
    g = fast()
    res["fast"] = time.perf_counter() - t
    if spec["exact_ok"]:
        t = time.perf_counter()
        e = fastrope.attention_grad(q, k, v, w, dout, method="exact", **kw)
        res["exact"] = time.perf_counter() - t
        res["err"] = max(float(np.abs(a - b).max()) for a, b in zip(g[:3], e[:3]))
    res["pairs"] = pairs(n, kw)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--schemes", nargs="+", choices=SCHEMES, default=list(SCHEMES))
    ap.add_argument("--d", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--n-exps", type=int, nargs="+", default=list(range(12, 19)))
    ap.add_argument("--dv", type=int, default=64)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--slope", type=float, default=2.0**-4)
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--exact-max-seconds", type=float, default=30.0)
    ap.add_argument("--max-seconds", type=float, default=60.0, help="skip slower fast points")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = []
    for scheme in a.schemes:
        for d in a.d:
            rate = None  # exact seconds per visible pair, from the last measured point
            for e in a.n_exps:
                n = 1 << e
                spec = dict(scheme=scheme, d=d, n=n, dv=a.dv, eps=a.eps, slope=a.slope,
                            window=a.window, seed=a.seed, max_seconds=a.max_seconds)  # fmt: skip
                _, kw = scheme_call(__import__("fastrope"), spec, np.random.default_rng(0))
                predicted = None if rate is None else rate * pairs(n, kw)
                spec["exact_ok"] = predicted is None or predicted <= a.exact_max_seconds
                r = measure(spec)
                if "exact" in r:
                    rate = r["exact"] / r["pairs"]
                elif rate is not None and "fast" in r:
                    r["exact_fit"] = rate * r["pairs"]
                rows.append(r)
                ex = r.get("exact", r.get("exact_fit"))
                fit = "" if "exact" in r else " (fit)"
                if "skipped" in r:
                    print(f"{scheme:>14} d={d} n=2^{e}: skipped: {r['skipped']}", flush=True)
                    continue
                ratio = f"{ex / r['fast']:.3g}x{'*' if fit else ''}" if ex else "-"
                err = f"{r['err']:.1e}" if "err" in r else "-"
                print(
                    f"{scheme:>14} d={d} n=2^{e}: {r['route']:>8} degree {r['degree']} "
                    f"fast {r['fast']:.3g} s exact {ex:.3g} s{fit} ratio {ratio} "
                    f"err {err} certified {r['certified']:.1e}",
                    flush=True,
                )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
