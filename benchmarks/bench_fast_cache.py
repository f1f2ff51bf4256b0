"""The fast method's kernel-spectra cache: first call (spectra built) against repeated calls.

For each configuration (Rotary, head dim d, n = n_q = n_k, one head of q/k/v, float64, eps, R = 1
as in ``bench_fast.py``) this measures

* **first**: one call on a cold cache (``fastrope.clear_cache()`` first): plan, kernel spectra,
  FFT work;
* **repeat**: the same call again (median of ``--repeats``): the spectra come from the cache;
* **new data**: a call on other q, k, v with the same bound R (a training step): also a hit;
* **uncached**: the repeat with the cache disabled (``set_cache_limit(0)``), for reference.

It checks that the repeated and uncached outputs are bitwise equal and prints a Markdown table.

    python benchmarks/bench_fast_cache.py                      # d in {2, 4}, n = 2^14..2^16
    python benchmarks/bench_fast_cache.py --d 2 --n-exp 14 15 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

import fastrope


def inputs(rng, n: int, d: int, dv: int):
    q = rng.uniform(-1, 1, (1, n, d))
    k = rng.uniform(-1, 1, (1, n, d))
    v = rng.uniform(-1, 1, (1, n, dv))
    return q, k, v


def normalise(q, k, v, eps: float):
    """Scale q and k so that the planner's bound is R = 1 (as bench_fast.py does)."""
    r = fastrope.plan(q, k, v, fastrope.Rotary(), eps, method="fast").bound_r
    s = 1.0 / np.sqrt(r)
    return q * s, k * s


def timed(f):
    t = time.perf_counter()
    out = f()
    return time.perf_counter() - t, out


def run(d: int, n: int, dv: int, eps: float, repeats: int, threads: int) -> dict:
    rng = np.random.default_rng(1000 * d + n)
    q, k, v = inputs(rng, n, d, dv)
    q, k = normalise(q, k, v, eps)
    q2, k2, v2 = inputs(rng, n, d, dv)
    q2, k2 = normalise(q2, k2, v2, eps)

    def call(q, k, v):
        return fastrope.attention(
            q, k, v, fastrope.Rotary(), eps, method="fast", num_threads=threads
        )

    plan = fastrope.plan(q, k, v, fastrope.Rotary(), eps, method="fast")
    plan2 = fastrope.plan(q2, k2, v2, fastrope.Rotary(), eps, method="fast")
    fastrope.clear_cache()
    first, out = timed(lambda: call(q, k, v))
    held = fastrope.cache_info()["bytes"]
    rep = []
    for _ in range(repeats):
        t, again = timed(lambda: call(q, k, v))
        rep.append(t)
        assert np.array_equal(again, out)
    h0 = fastrope.cache_info()["hits"]
    new_data, _ = timed(lambda: call(q2, k2, v2))
    new_hit = fastrope.cache_info()["hits"] > h0
    limit = fastrope.cache_info()["limit"]
    fastrope.set_cache_limit(0)
    try:
        unc = []
        for _ in range(max(1, repeats // 2)):
            t, cold = timed(lambda: call(q, k, v))
            unc.append(t)
            assert np.array_equal(cold, out)
    finally:
        fastrope.set_cache_limit(limit)
    return dict(
        d=d,
        n=n,
        dv=dv,
        eps=eps,
        degree=plan.degree,
        poly_kind=plan.poly_kind,
        n_pairs=plan.n_pairs,
        bound_r=plan.bound_r,
        bound_r_new=plan2.bound_r,
        first=first,
        repeat=statistics.median(rep),
        repeats=rep,
        new_data=new_data,
        new_data_hit=new_hit,
        uncached=statistics.median(unc),
        cached_bytes=held,
        load=[round(x, 2) for x in os.getloadavg()],
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, nargs="+", default=[2, 4])
    p.add_argument("--n-exp", type=int, nargs="+", default=[14, 15, 16])
    p.add_argument("--dv", type=int, default=16)
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="write the rows to this file")
    a = p.parse_args()
    print(f"fastrope {fastrope.__version__} from {os.path.dirname(fastrope.__file__)}")
    print(f"load before: {os.getloadavg()}")
    rows = []
    print(
        "| d | n | degree | pairs | spectra held | first (s) | repeat (s) | new data (s) "
        "| uncached (s) | first / repeat | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for d in a.d:
        for e in a.n_exp:
            r = run(d, 2**e, a.dv, a.eps, a.repeats, a.threads)
            rows.append(r)
            hit = "" if r["new_data_hit"] else " (miss)"
            print(
                f"| {d} | 2^{e} | {r['degree']} ({r['poly_kind']}) | {r['n_pairs']} "
                f"| {r['cached_bytes'] / 2**20:.1f} MiB | {r['first']:.3f} | {r['repeat']:.3f} "
                f"| {r['new_data']:.3f}{hit} | {r['uncached']:.3f} "
                f"| {r['first'] / r['repeat']:.2f}x | {r['load'][0]} |",
                flush=True,
            )
    print(f"load after: {os.getloadavg()}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
