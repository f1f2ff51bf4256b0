#!/usr/bin/env python
"""Benchmark the fast backward (issue #4) against the exact backward and the fast forward.

For each grid point (d, n) -- one head, float64, Rotary (interleaved), non-causal, d_v = d,
R = 1, eps = 1e-3 by default:

* **inputs**: q, k, v, dout uniform in [-1, 1]; q and k are multiplied by ``1/sqrt(R0)``, with
  ``R0`` the planner's ``bound_r`` of the raw draw, so that the certified score bound is R = 1.
* **fast backward**: ``fastrope.attention_grad(..., eps, method="fast")`` (it recomputes the
  approximate forward it differentiates: no ``out``/``lse`` needed).
* **fast forward**: ``fastrope.attention(..., eps, method="fast")`` at the same settings (for the
  "backward <= 4x forward" target).
* **exact backward**: ``fastrope.attention_grad(..., method="exact", out=out, lse=lse)`` with the
  exact forward's ``out``/``lse`` passed in (not timed): the backward alone.  Measured while its
  predicted time (the ``c n^2`` curve through the largest measured point of the same d) is at
  most ``--exact-max-seconds``; beyond, its time is ``c n^2`` fitted (least squares in log space,
  slope fixed at 2) on the measured points with n >= 2^14 (or all of them) and marked
  **extrapolated**.
* every point runs in its **own subprocess** (fresh allocator; the peak RSS it reports is its
  own).  Times are medians of 3 calls when a call takes < 2 s, else a single call.  The 1-minute
  load average is recorded with each point.
* **error**: where the exact backward ran, ``max |fast - exact|`` of each gradient (must be
  <= eps: the certified guarantee).
* a point is skipped (and the skip recorded) when the fast plan's working set exceeds 80% of the
  available memory, when the planner refuses (e.g. too many terms), when its predicted time
  exceeds ``--fast-max-seconds``, or when the total budget ``--budget`` is spent.

Summary per d: fitted exponents of time vs n over measured points with 2^14 <= n <= 2^20, the
largest backward/forward ratio, the crossover n (fast backward = exact backward; log-interpolated
between grid points, extrapolated times marked) and the speed-up at the largest n where the exact
backward was measured.

Examples::

    PYTHONPATH=python python benchmarks/bench_fast_backward.py --quick
    PYTHONPATH=python python benchmarks/bench_fast_backward.py --budget 1200 \\
        --json benchmarks/fast_backward_results.json --markdown /tmp/fast_backward.md
    PYTHONPATH=python python benchmarks/bench_fast_backward.py --from-json \\
        benchmarks/fast_backward_results.json --markdown /tmp/fast_backward.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common as C  # noqa: E402

T_START = time.perf_counter()
GIB = float(1 << 30)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Time fastrope's fast backward against its exact backward (issue #4).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--d", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--log2n-min", type=int, default=12)
    p.add_argument("--log2n-max", type=int, default=20)
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--dv", type=int, default=0, help="d_v (0: d_v = d)")
    p.add_argument("--causal", action="store_true", help="causal mask (default: none)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--exact-max-seconds", type=float, default=120.0)
    p.add_argument("--fast-max-seconds", type=float, default=240.0)
    p.add_argument("--budget", type=float, default=1200.0, help="total seconds for the grid")
    p.add_argument("--max-load", type=float, default=0.0, help="wait for the load to fall below")
    p.add_argument("--quick", action="store_true", help="d in {2, 4}, n in 2^12..2^14")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--from-json", default=None, help="re-render a previous run")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.d, a.log2n_min, a.log2n_max = [2, 4], 12, 14
    return a


# --------------------------------------------------------------------------------------------------
# one point, in a subprocess


def _vm(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / GIB
    return float("nan")


def _timed(fn, single_above=2.0):
    t0 = time.perf_counter()
    res = fn()
    t = time.perf_counter() - t0
    if t >= single_above:
        return t, res, 1
    ts = [t]
    for _ in range(2):
        t0 = time.perf_counter()
        res = fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)), res, 3


def worker(spec: dict) -> dict:
    import fastrope
    from fastrope._api import prepare
    from fastrope._plan import _backward_probe

    d, n, eps, th = spec["d"], spec["n"], spec["eps"], spec["threads"]
    dv = spec.get("dv") or d
    mask = dict(causal=True) if spec.get("causal") else {}
    rng = np.random.default_rng(1000 * d + int(math.log2(n)))
    q = rng.uniform(-1, 1, (n, d))
    k = rng.uniform(-1, 1, (n, d))
    v = rng.uniform(-1, 1, (n, dv))
    dout = rng.uniform(-1, 1, (n, dv))
    w = fastrope.Rotary()
    out = {"d": d, "n": n, "eps": eps, "dv": dv, "causal": bool(mask)}
    try:
        r0 = fastrope.plan(q, k, v, w, eps, method="fast", **mask).bound_r
    except fastrope.ApproximationError:
        r0 = fastrope.plan(q, k, v, w, 1.0, method="fast", **mask).bound_r
    q /= math.sqrt(r0)
    k /= math.sqrt(r0)
    rss0 = _vm("VmRSS")
    call = prepare(q, k, v, w, **mask)
    try:
        info = _backward_probe(call, None, dout.reshape(1, 1, n, dv), th)(eps, 1 << 62)
        out["bwd_plan"] = {
            key: info[key]
            for key in ("degree", "poly_kind", "poly_family", "n_pairs", "n_alpha", "n_beta",
                        "terms", "flops", "working_bytes", "bound_r", "deferred", "path")
        }  # fmt: skip
        out["bwd_plan"]["certified"] = info["certified"]
    except fastrope.ApproximationError as e:
        out["bwd_refused"] = str(e)
    try:
        pf = fastrope.plan(q, k, v, w, eps, method="fast", **mask)
        out["fwd_plan"] = {"degree": pf.degree, "n_pairs": pf.n_pairs, "kind": pf.poly_kind,
                           "working_bytes": pf.fast_working_set_bytes,
                           "path": pf.details.get("path")}  # fmt: skip
    except fastrope.ApproximationError as e:
        out["fwd_refused"] = str(e)
    from fastrope._plan import available_memory

    avail = 0.8 * available_memory()
    for key in ("bwd_plan", "fwd_plan"):
        if key in out and out[key]["working_bytes"] > avail:
            out[key.replace("plan", "refused")] = (
                f"working set {out[key]['working_bytes'] / GIB:.1f} GiB > 80% of the available"
                f" memory ({avail / GIB:.1f} GiB)"
            )
            del out[key]
    grads = None
    if "bwd" in spec["what"] and "bwd_plan" in out:
        try:
            t, grads, reps = _timed(
                lambda: fastrope.attention_grad(
                    q, k, v, w, dout, eps, method="fast", num_threads=th, **mask
                )
            )
            out["t_bwd"], out["reps_bwd"] = t, reps
        except (fastrope.ApproximationError, MemoryError) as e:
            out["bwd_refused"] = str(e)
    if "fwd" in spec["what"] and "fwd_plan" in out:
        try:
            t, _, reps = _timed(
                lambda: fastrope.attention(q, k, v, w, eps, method="fast", num_threads=th, **mask)
            )
            out["t_fwd"], out["reps_fwd"] = t, reps
        except (fastrope.ApproximationError, MemoryError) as e:
            out["fwd_refused"] = str(e)
    if "exact" in spec["what"]:
        o, lse = fastrope.attention(
            q, k, v, w, method="exact", return_lse=True, num_threads=th, **mask
        )
        t, ex, reps = _timed(
            lambda: fastrope.attention_grad(
                q, k, v, w, dout, method="exact", out=o, lse=lse, num_threads=th, **mask
            )
        )
        out["t_exact"], out["reps_exact"] = t, reps
        if grads is not None:
            out["err"] = {
                name: float(np.abs(a - b).max())
                for name, a, b in zip(("dq", "dk", "dv"), grads[:3], ex[:3])
            }
    out["peak_gib"] = _vm("VmHWM") - rss0
    out["load1"] = (C.loadavg() or [None])[0]
    return out


def run_point(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"d": spec["d"], "n": spec["n"], "error": f"timeout after {timeout:.0f} s"}
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    if r.returncode != 0 or not lines:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        return {"d": spec["d"], "n": spec["n"], "error": f"exit {r.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


# --------------------------------------------------------------------------------------------------
# fits and summary


def fit_exponent(points):
    """Least-squares slope of log t vs log n."""
    if len(points) < 2:
        return None
    x = np.log([p[0] for p in points])
    y = np.log([p[1] for p in points])
    return float(np.polyfit(x, y, 1)[0])


def fit_n2(points):
    """c in t = c n^2 (least squares in log space), on n >= 2^14 if there are two such points."""
    big = [p for p in points if p[0] >= 1 << 14]
    use = big if len(big) >= 2 else points
    if not use:
        return None
    return float(np.exp(np.mean([math.log(t) - 2 * math.log(n) for n, t in use])))


def summarize(results: list, eps: float) -> dict:
    out = {}
    for d in sorted({r["d"] for r in results}):
        rows = sorted((r for r in results if r["d"] == d), key=lambda r: r["n"])
        ex = [(r["n"], r["t_exact"]) for r in rows if "t_exact" in r]
        c = fit_n2(ex)
        for r in rows:
            if "t_exact" not in r and c is not None:
                r["t_exact_extrapolated"] = c * r["n"] ** 2
        in_fit = lambda r: (1 << 14) <= r["n"] <= (1 << 20)  # noqa: E731
        s = {
            "exponent_fast_backward": fit_exponent(
                [(r["n"], r["t_bwd"]) for r in rows if "t_bwd" in r and in_fit(r)]
            ),
            "exponent_fast_forward": fit_exponent(
                [(r["n"], r["t_fwd"]) for r in rows if "t_fwd" in r and in_fit(r)]
            ),
            "exponent_exact_backward": fit_exponent(ex),
            "exact_c_n2": c,
        }
        ratios = [(r["n"], r["t_bwd"] / r["t_fwd"]) for r in rows if "t_bwd" in r and "t_fwd" in r]
        s["bwd_over_fwd"] = ratios
        s["max_bwd_over_fwd"] = max((x[1] for x in ratios), default=None)
        # Crossover: first n where fast backward beats exact (measured or extrapolated).
        pts = []
        for r in rows:
            te = r.get("t_exact", r.get("t_exact_extrapolated"))
            if "t_bwd" in r and te is not None:
                pts.append((r["n"], r["t_bwd"], te, "t_exact" not in r))
        cross = None
        for (n0, f0, e0, x0), (n1, f1, e1, x1) in zip(pts, pts[1:]):
            if f0 >= e0 and f1 < e1:
                g0, g1 = math.log(f0 / e0), math.log(f1 / e1)
                t = g0 / (g0 - g1)
                cross = {"n": float(math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0)))),
                         "extrapolated": bool(x0 or x1)}  # fmt: skip
                break
        if cross is None and pts and pts[0][1] < pts[0][2]:
            cross = {"n": None, "below_grid": True, "extrapolated": pts[0][3]}
        s["crossover"] = cross
        meas = [r for r in rows if "t_exact" in r and "t_bwd" in r]
        if meas:
            r = meas[-1]
            s["speedup_at_largest_measured_exact"] = {
                "n": r["n"],
                "speedup": r["t_exact"] / r["t_bwd"],
            }
        errs = [max(r["err"].values()) for r in rows if "err" in r]
        s["max_error"] = max(errs) if errs else None
        s["errors_within_eps"] = all(e <= eps for e in errs)
        out[str(d)] = s
    return out


def render(doc: dict) -> str:
    res, summ, eps = doc["results"], doc["summary"], doc["args"]["eps"]
    header = ["d", "n", "path f/b", "deg f/b", "pairs or features f/b", "fast fwd s",
              "fast bwd s", "bwd/fwd", "exact bwd s", "speed-up", "max err (dq,dk,dv)",
              "peak GiB", "load1"]  # fmt: skip
    rows = []
    for r in sorted(res, key=lambda r: (r["d"], r["n"])):
        fp, bp = r.get("fwd_plan", {}), r.get("bwd_plan", {})
        te = r.get("t_exact")
        tx = r.get("t_exact_extrapolated")
        exact = C.fmt(te, ".2f") if te is not None else (f"{tx:.3g} (extrap.)" if tx else "-")
        tb = r.get("t_bwd")
        sp = (te or tx) / tb if tb and (te or tx) else None
        note = ""
        if "error" in r:
            note = r["error"][:60]
        elif "skipped" in r:
            note = "skipped: " + r["skipped"][:80]
        elif "bwd_refused" in r and tb is None:
            note = "refused: " + r["bwd_refused"][:80]
        err = r.get("err")
        rows.append([
            r["d"], f"2^{int(math.log2(r['n']))}",
            f"{fp.get('path', 'toeplitz')}/{bp.get('path', 'toeplitz')}",
            f"{fp.get('degree', '-')}/{bp.get('degree', '-')}",
            f"{fp.get('n_pairs', '-')}/{bp.get('n_pairs', '-')}",
            C.fmt(r.get("t_fwd"), ".3f"), C.fmt(tb, ".3f"),
            C.fmt(tb / r["t_fwd"] if tb and r.get("t_fwd") else None, ".2f"),
            exact, (C.fmt(sp, ".1f") + "x" + ("*" if te is None else "")) if sp else "-",
            ", ".join(f"{err[k]:.1e}" for k in ("dq", "dk", "dv")) if err else note or "-",
            C.fmt(r.get("peak_gib"), ".2f"), C.fmt(r.get("load1"), ".1f"),
        ])  # fmt: skip
    lines = [C.format_table(header, rows, markdown=True), ""]
    for d, s in summ.items():
        cr = s.get("crossover")
        if cr is None:
            cross = "none on the grid"
        elif cr.get("below_grid"):
            cross = "below the grid (fast already faster at the smallest n)"
        else:
            cross = f"n ~ {cr['n']:.3g}" + (
                " (uses extrapolated exact times)" if cr["extrapolated"] else ""
            )
        sp = s.get("speedup_at_largest_measured_exact")
        fe = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        lines.append(
            f"* d = {d}: exponent fast backward {fe(s['exponent_fast_backward'])}, fast forward "
            f"{fe(s['exponent_fast_forward'])}, exact backward {fe(s['exponent_exact_backward'])} "
            f"(fits over measured 2^14..2^20); max backward/forward "
            f"{C.fmt(s['max_bwd_over_fwd'], '.2f')}; crossover {cross}; "
            + (
                f"speed-up {sp['speedup']:.1f}x at n = 2^{int(math.log2(sp['n']))}"
                " (largest measured exact)"
                if sp
                else "no exact point with a fast one"
            )
            + f"; max error {C.fmt(s['max_error'], '.2e')} (eps = {eps:g}: "
            + ("within" if s["errors_within_eps"] else "NOT within") + ")."
        )  # fmt: skip
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# driver


def main(argv=None):
    a = parse_args(argv)
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker)), default=float), flush=True)
        return
    if a.from_json:
        with open(a.from_json) as f:
            doc = json.load(f)
        doc["summary"] = summarize(doc["results"], doc["args"]["eps"])
        md = render(doc)
        print(md)
        if a.markdown:
            with open(a.markdown, "w") as f:
                f.write(md + "\n")
        return
    doc = {"args": vars(a), "machine": C.machine_info(a.threads), "results": []}
    results = doc["results"]
    for d in a.d:
        last_fast, last_exact = None, None  # (n, seconds) of the previous measured points
        stop = None
        for e in range(a.log2n_min, a.log2n_max + 1):
            n = 1 << e
            left = a.budget - (time.perf_counter() - T_START)
            rec = {"d": d, "n": n}
            if stop:
                rec["skipped"] = stop
                results.append(rec)
                continue
            # Memory and refusals are decided in the worker, from the plans for the actual data.
            pred_fast = None if last_fast is None else last_fast[1] * (n / last_fast[0]) * 1.15
            if pred_fast is not None and (pred_fast > a.fast_max_seconds or pred_fast > left):
                stop = f"predicted fast time {pred_fast:.0f} s exceeds the limit/budget"
                rec["skipped"] = stop
                results.append(rec)
                C.log(f"d={d} n=2^{e}: {stop}")
                continue
            what = ["bwd", "fwd"]
            pred_exact = None if last_exact is None else last_exact[1] * (n / last_exact[0]) ** 2
            if pred_exact is None or (pred_exact <= a.exact_max_seconds and pred_exact < left / 2):
                what.append("exact")
            C.wait_for_load(a.max_load, 60)
            spec = {
                "d": d,
                "n": n,
                "eps": a.eps,
                "threads": a.threads,
                "what": what,
                "dv": a.dv,
                "causal": a.causal,
            }
            timeout = max(60.0, min(left, 3 * ((pred_fast or 10) * 4 + (pred_exact or 10))))
            r = run_point(spec, timeout)
            results.append(r)
            if "t_bwd" in r:
                last_fast = (n, r["t_bwd"] + r.get("t_fwd", 0.0))
            if "t_exact" in r:
                last_exact = (n, r["t_exact"])
            C.log(
                f"d={d} n=2^{e}: fwd {C.fmt(r.get('t_fwd'), '.3f')} s, "
                f"bwd {C.fmt(r.get('t_bwd'), '.3f')} s, "
                f"exact {C.fmt(r.get('t_exact'), '.2f')} s, degrees "
                f"{r.get('fwd_plan', {}).get('degree')}/{r.get('bwd_plan', {}).get('degree')}, "
                f"err {r.get('err')}, peak {C.fmt(r.get('peak_gib'), '.2f')} GiB"
                + (f" [{r['error']}]" if "error" in r else "")
                + (f" [refused: {r['bwd_refused'][:120]}]" if "bwd_refused" in r else "")
            )  # fmt: skip
            if "t_bwd" not in r:
                stop = f"no fast backward at n = 2^{e}: {r.get('bwd_refused', r.get('error', '?'))}"
    doc["machine"]["loadavg_end"] = C.loadavg()
    doc["machine"]["seconds"] = time.perf_counter() - T_START
    doc["summary"] = summarize(results, a.eps)
    if a.json:
        C.save_json(a.json, doc)
    md = render(doc)
    print(md)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(md + "\n")


if __name__ == "__main__":
    main()
