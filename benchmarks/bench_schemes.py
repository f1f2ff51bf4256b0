"""The fast forward for every position scheme against the exact forward, n = 2^12..2^20.

Schemes (one head, float64, causal, eps = 1e-3 by default, d_v = 64):

* ``rotary``: ``Rotary()``;
* ``rotary+alibi``: ``Rotary()`` and ``bias = alibi([s], n)`` (one slope, ``--slope``);
* ``none+alibi``: ``w=None`` (plain dot products) and the same ALiBi bias;
* ``rotary+window``: ``Rotary()`` and ``window = (--window, 0)``;
* ``blockw``: ``BlockW`` whose 2x2 blocks are RoPE's rotations times ``1 + u``, ``u`` uniform in
  ``±0.1`` per entry and per δ (rotation-like, not Toeplitz-structured along δ);
* ``sparsew``: ``SparseW`` on the support (0,0), (0,1), (1,1), (d-1,0) with values uniform in
  ``±0.8`` per δ.

Inputs: q, k, v uniform in [-1, 1]; q and k scaled so that the planner's score bound is R = 1
(:func:`fastrope._bench.unit_bound`, as ``bench_fast.py`` and ``fastrope bench`` do).

Every measurement runs in its own subprocess: inputs are built, then the call is timed (the
median of 3 calls below 2 s, else one call) and the peak resident memory of the whole process
(``VmHWM`` from ``/proc/self/status``, inputs included) is read after it.  The fast method runs
on the route its planner picks (``route`` column).  The exact method is measured while its
curve ``c pairs(n)`` through the measured points of the same configuration predicts at most
``--exact-max-seconds``; beyond, its time is that fitted curve (least squares of
``log t - log pairs(n)`` over the measured points with n >= 2^14, or all of them if fewer than
two), marked ``fit``.  ``pairs(n)`` is the number of visible (query, key) pairs, what the exact
method's time is proportional to: ``n(n+1)/2`` causal (an ``n^2`` fit), ``~n (w+1)`` with a
window ``(w, 0)``.  ``max err`` is ``max|fast - exact|`` over every row where the exact method
was measured, else over ``--subset-rows`` rows (the first and last 4 and random others) whose
exact values come from single-row exact calls with ``q_offset = row`` (marked ``rows``).

Examples::

    PYTHONPATH=python python benchmarks/bench_schemes.py --quick
    PYTHONPATH=python python benchmarks/bench_schemes.py --d 2 4 --json /tmp/schemes.json \\
        --markdown /tmp/schemes.md
    PYTHONPATH=python python benchmarks/bench_schemes.py --from-json /tmp/schemes.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common as C  # noqa: E402

SCHEMES = ("rotary", "rotary+alibi", "none+alibi", "rotary+window", "blockw", "sparsew")
GIB = float(1 << 30)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Time the fast forward of every position scheme against the exact forward.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--schemes", nargs="+", choices=SCHEMES, default=list(SCHEMES))
    p.add_argument("--d", type=int, nargs="+", default=[2, 4, 8], help="head dims")
    p.add_argument("--dv", type=int, default=64, help="value dim")
    p.add_argument("--n-exps", type=int, nargs="+", default=list(range(12, 21)), help="log2 n")
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--slope", type=float, default=2.0**-4, help="the ALiBi slope")
    p.add_argument("--window", type=int, default=4096, help="left width of rotary+window")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--exact-max-seconds", type=float, default=20.0)
    p.add_argument(
        "--fast-max-seconds",
        type=float,
        default=120.0,
        help="skip a fast point whose predicted time (the planner's, times the measured/"
        "predicted ratio of the configuration's earlier points) is above this",
    )
    p.add_argument(
        "--budget-minutes",
        type=float,
        default=25.0,
        help="skip the remaining points (and say so) past this",
    )
    p.add_argument("--subset-rows", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="n = 2^12..2^14, d = 2 4")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--markdown", help="write the markdown table here")
    p.add_argument("--from-json", help="re-render the tables from an earlier --json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.n_exps = [e for e in a.n_exps if e <= 14] or [12]
        a.d = [d for d in a.d if d <= 4] or [2]
        a.exact_max_seconds = min(a.exact_max_seconds, 5.0)
    return a


# --------------------------------------------------------------------------------------------------
# one measurement (in its own process)


def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def scheme_call(fastrope, spec: dict, rng: np.random.Generator):
    """``(w, kw)`` of a scheme at length n: the position matrices and the call's keywords."""
    scheme, n, d = spec["scheme"], spec["n"], spec["d"]
    kw: dict = {"causal": True}
    w = None if scheme.startswith("none") else fastrope.Rotary()
    if scheme.endswith("+alibi"):
        kw["bias"] = fastrope.alibi(np.array([spec["slope"]]), n)[0]
    if scheme.endswith("+window"):
        kw["window"] = (spec["window"], 0)
    if scheme == "blockw":
        blocks = C.rotary_blocks(n, d, "float64")  # (2n-1, d/2, 2, 2) RoPE rotations
        blocks *= 1.0 + rng.uniform(-0.1, 0.1, blocks.shape)
        w = fastrope.BlockW(blocks)
    if scheme == "sparsew":
        support = np.array([[0, 0], [0, 1], [1, 1], [d - 1, 0]])
        w = fastrope.SparseW(support, rng.uniform(-0.8, 0.8, (2 * n - 1, 4)))
    return w, kw


def worker(spec: dict) -> dict:
    import fastrope
    from fastrope._bench import unit_bound

    n, d, dv, eps = spec["n"], spec["d"], spec["dv"], spec["eps"]
    rng = np.random.default_rng([spec["seed"], SCHEMES.index(spec["scheme"]), d, n])
    q = rng.uniform(-1.0, 1.0, (n, d))
    k = rng.uniform(-1.0, 1.0, (n, d))
    v = rng.uniform(-1.0, 1.0, (n, dv))
    w, kw = scheme_call(fastrope, spec, rng)
    s = 1.0 / math.sqrt(unit_bound(q, k, v, w, eps))
    q *= s
    k *= s
    res: dict = {}
    fast = spec["method"] == "fast"
    try:
        p = fastrope.plan(q, k, v, w, eps if fast else 0.0, method=spec["method"], **kw)
    except Exception as e:  # ApproximationError / MemoryError: the reason
        res["skipped"] = f"{type(e).__name__}: {e}"
        return res
    res.update(route=p.route if fast else None, degree=p.degree, terms=p.terms)
    res["certified_error"] = p.certified_error
    res["predicted_seconds"] = p.fast_seconds if fast else p.exact_seconds
    if fast and p.fast_seconds * spec.get("calib", 1.0) > spec["max_seconds"]:
        res["skipped"] = f"predicted {p.fast_seconds * spec.get('calib', 1.0):.0f} s"
        return res
    method = spec["method"]

    def run():
        return fastrope.attention(
            q, k, v, w, eps if fast else 0.0, method=method, num_threads=spec["threads"], **kw
        )

    res["load_before"] = C.loadavg()
    times = []
    t = time.perf_counter()
    out = run()
    times.append(time.perf_counter() - t)
    res["peak_bytes"] = _status()["VmHWM"]  # the whole process, inputs included
    while times[0] < 2.0 and len(times) < 3:
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    res["times"] = times
    res["median"] = float(np.median(times))
    res["load_after"] = C.loadavg()
    if spec.get("save"):
        np.save(spec["save"], out)
    if fast:
        if spec.get("exact_path") and os.path.exists(spec["exact_path"]):
            res["err"] = float(np.abs(out - np.load(spec["exact_path"])).max())
            res["err_kind"] = "full"
        else:
            ends = np.r_[np.arange(4), np.arange(n - 4, n)]
            rest = np.setdiff1d(np.arange(n), ends)
            pick = rng.choice(rest, size=min(spec["subset_rows"], rest.size), replace=False)
            rows = np.unique(np.r_[ends, pick])
            ex = np.concatenate(
                [
                    fastrope.attention(
                        q[i : i + 1], k, v, w, method="exact", q_offset=int(i), **kw
                    )
                    for i in rows
                ]
            )
            res["err"] = float(np.abs(out[rows] - ex).max())
            res["err_kind"] = f"{rows.size} rows"
    return res


def run_worker(spec: dict, timeout: float = 1800.0) -> dict:
    p = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if p.returncode != 0:
        return {"skipped": f"worker failed ({p.returncode}): {p.stderr.strip()[-300:]}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# the grid


def visible_pairs(n: int, window) -> int:
    """(query, key) pairs a causal call visits: n(n+1)/2, or with a window (w, 0) n(w+1) less
    the first rows' missing keys.  The exact method's time is proportional to it."""
    if window is None or window >= n - 1:
        return n * (n + 1) // 2
    return (window + 1) * (window + 2) // 2 + (n - window - 1) * (window + 1)


def pairs_fit(points: list, window) -> float | None:
    """``c`` of ``t = c pairs(n)`` (``c n^2 / 2`` without a window) by least squares in log
    space, over the points with n >= 2^14 when two such exist."""
    big = [(n, t) for n, t in points if n >= 1 << 14]
    use = big if len(big) >= 2 else points
    if not use:
        return None
    logs = [math.log(t) - math.log(visible_pairs(n, window)) for n, t in use]
    return float(np.exp(np.mean(logs)))


def scheme_window(scheme: str, a) -> int | None:
    return a["window"] if scheme.endswith("+window") else None


def refit_exact(rows: list, a: dict) -> None:
    """Set every row's ``exact_seconds``: measured, else the fit of its configuration's
    measured points."""
    for key in {(r["scheme"], r["d"]) for r in rows}:
        mine = [r for r in rows if (r["scheme"], r["d"]) == key]
        pts = [(r["n"], r["exact"]["median"]) for r in mine if "median" in r.get("exact", {})]
        c = pairs_fit(pts, scheme_window(key[0], a))
        for r in mine:
            if "median" in r.get("exact", {}):
                r["exact_seconds"], r["exact_kind"] = r["exact"]["median"], "measured"
            elif c is not None:
                r["exact_seconds"] = c * visible_pairs(r["n"], scheme_window(key[0], a))
                r["exact_kind"] = "fit"


def run_grid(a) -> list:
    rows = []
    t_start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="bench-schemes-")
    for d in a.d:
        for scheme in a.schemes:
            exact_pts: list = []
            calib: list = []
            for e in sorted(a.n_exps):
                n = 1 << e
                base = dict(scheme=scheme, d=d, dv=a.dv, n=n, eps=a.eps, slope=a.slope,
                            window=a.window, threads=a.threads, seed=a.seed,
                            subset_rows=a.subset_rows)  # fmt: skip
                row = dict(scheme=scheme, d=d, n=n)
                if (time.perf_counter() - t_start) / 60 > a.budget_minutes:
                    row["skipped"] = f"past the {a.budget_minutes:g}-minute budget"
                    rows.append(row)
                    C.log(f"{scheme} d={d} n=2^{e}: {row['skipped']}")
                    continue
                win = scheme_window(scheme, vars(a))
                c = pairs_fit(exact_pts, win)
                exact_path = os.path.join(tmp, f"exact_{scheme}_{d}_{e}.npy")
                if c is None or c * visible_pairs(n, win) <= a.exact_max_seconds:
                    ex = run_worker(dict(base, method="exact", save=exact_path))
                    row["exact"] = ex
                    if "median" in ex:
                        exact_pts.append((n, ex["median"]))
                        row["exact_seconds"], row["exact_kind"] = ex["median"], "measured"
                if "exact_seconds" not in row:
                    c = pairs_fit(exact_pts, win)
                    if c is not None:
                        row["exact_seconds"] = c * visible_pairs(n, win)
                        row["exact_kind"] = "fit"
                spec = dict(base, method="fast", max_seconds=a.fast_max_seconds,
                            calib=float(np.median(calib)) if calib else 1.0,
                            exact_path=exact_path)  # fmt: skip
                fa = run_worker(spec)
                row["fast"] = fa
                if "median" in fa and fa.get("predicted_seconds"):
                    calib.append(fa["median"] / fa["predicted_seconds"])
                if os.path.exists(exact_path):
                    os.remove(exact_path)
                rows.append(row)
                C.log(line_of(row, a.eps))
    return rows


# --------------------------------------------------------------------------------------------------
# output

HEADER = ["scheme", "d", "n", "route", "fast (s)", "exact (s)", "ratio", "peak RSS (GiB)",
          "max err", "certified", "eps"]  # fmt: skip


def cells(row: dict, eps: float) -> list:
    fa = row.get("fast", {})
    e = int(round(math.log2(row["n"])))
    if "median" not in fa:
        why = row.get("skipped") or fa.get("skipped", "-")
        return [row["scheme"], str(row["d"]), f"2^{e}", fa.get("route") or "-",
                "skipped: " + why[:60], "-", "-", "-", "-", "-", f"{eps:g}"]  # fmt: skip
    ex = row.get("exact_seconds")
    fit = row.get("exact_kind") == "fit"
    exact_s = "-" if ex is None else f"{ex:.3g}" + (" (fit)" if fit else "")
    ratio = "-" if ex is None else f"{ex / fa['median']:.3g}" + ("*" if fit else "")
    peak = fa.get("peak_bytes")
    err = f"{fa['err']:.1e}" + ("" if fa.get("err_kind") == "full" else " (rows)")
    return [row["scheme"], str(row["d"]), f"2^{e}", fa["route"], f"{fa['median']:.3g}",
            exact_s, ratio, "-" if peak is None else f"{peak / GIB:.2f}", err,
            f"{fa['certified_error']:.1e}", f"{eps:g}"]  # fmt: skip


def line_of(row: dict, eps: float) -> str:
    return "  ".join(cells(row, eps))


def exponents(rows: list) -> list:
    """Fitted exponent of the fast time over 2^14..2^20 (measured points), per (scheme, d)."""
    out = []
    keys = sorted({(r["scheme"], r["d"]) for r in rows}, key=lambda k: (k[1], SCHEMES.index(k[0])))
    for scheme, d in keys:
        pts = [(r["n"], r["fast"]["median"]) for r in rows
               if (r["scheme"], r["d"]) == (scheme, d) and r["n"] >= 1 << 14
               and "median" in r.get("fast", {})]  # fmt: skip
        if len(pts) >= 2:
            x, y = np.log2([p[0] for p in pts]), np.log2([p[1] for p in pts])
            slope = float(np.polyfit(x, y, 1)[0])
            span = f"2^{int(x.min())}..2^{int(x.max())}"
            out.append([scheme, str(d), span, f"{slope:.2f}"])
    return out


def render(doc: dict) -> str:
    a = doc["args"]
    rows = doc["rows"]
    refit_exact(rows, a)
    parts = [C.format_table(HEADER, [cells(r, a["eps"]) for r in rows], markdown=True)]
    ex = exponents(rows)
    if ex:
        parts.append("")
        parts.append(
            C.format_table(["scheme", "d", "n", "fast time exponent"], ex, markdown=True)
        )
    return "\n".join(parts)


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return
    if a.from_json:
        with open(a.from_json) as f:
            doc = json.load(f)
    else:
        doc = {"machine": C.machine_info(a.threads), "args": vars(a), "rows": run_grid(a)}
    text = render(doc)
    print(text)
    if a.json and not a.from_json:
        C.save_json(a.json, doc)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
