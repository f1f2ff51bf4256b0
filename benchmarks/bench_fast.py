#!/usr/bin/env python
"""Benchmark fastrope's fast method (issue #3) against its exact method, in the same run.

For each grid point (form, d, d_v, n) -- one head, float64, non-causal unless said, R = 1,
eps = 1e-3, ``num_threads`` = 2 by default:

* **inputs**: q, k uniform in [-1, 1], v uniform in [-1, 1] (so ``max|v| = 1``);
  ``w = Rotary()``, or ``BlockW`` with blocks uniform in [-1, 1] drawn independently for every
  δ.  q and k are then both multiplied by ``1/sqrt(R0)``, with ``R0`` the planner's
  ``plan(...).bound_r`` of the raw draw, so that the certified bound is ``R = 1`` (R is
  homogeneous of degree 2 in (q, k)).
* **exact**: ``fastrope.attention(..., method="exact")``; measured while the predicted time of
  one call (the n^2 curve through the largest measured point of the same configuration) is at
  most ``--exact-max-seconds``; beyond, its time is the fitted ``c n^2`` of the measured points
  (least squares of log t - 2 log n over the measured points with n >= 2^14, or all if fewer than
  two) and is marked **extrapolated**.
* **fast**: ``fastrope.attention(..., eps, method="fast")``; skipped (and said so) when the plan
  does not fit the default memory limit or available memory, or when its predicted time
  (``plan.fast_seconds`` times the measured/predicted ratio of the same configuration's smaller
  points) exceeds ``--fast-max-seconds``.
* every measurement runs in its **own subprocess** (fresh allocator, so that memory can be
  measured): inputs are built, the peak-RSS counter is reset (``/proc/self/clear_refs``), and
  the peak memory reported is ``VmHWM`` after the calls minus ``VmRSS`` before them.  Times are
  medians of 5 calls when a call takes < 0.5 s, of 3 when < 5 s, else a single call.  The
  1-minute load average is recorded with each point.
* **error**: ``max|fast - exact|`` over all rows where the exact method ran (its output is passed
  through a temporary .npy file), and always over a subset of ``--subset-rows`` query rows
  (the first 4, the last 4 and random others) whose exact values come from
  ``fastrope.attention`` on that single row with ``q_offset = row`` (the exact values for a row
  subset equal slicing q and setting q_offset).
  Where both exist, the subset check is compared with the full one.

Then: fitted exponents of time vs n (2^14..2^20, measured points only), crossover n per
(form, d, d_v) (log-interpolated; beyond the grid from the two fitted curves, marked), and for
``--breakdown`` points a breakdown of the fast time: CPU samples from ``perf record`` (when
``perf`` is available) attributed by call stack to kernel spectra / forward FFTs /
frequency-domain products / inverse FFTs / other, against the time of the same number of bare
real FFTs of that length (``scipy.fft.rfft``/``irfft`` on float64, numpy.fft without scipy).

Examples::

    PYTHONPATH=python python benchmarks/bench_fast.py --quick
    PYTHONPATH=python python benchmarks/bench_fast.py --json benchmarks/fast_results.json \\
        --plot benchmarks/fast_time_vs_n.png --markdown /tmp/fast_table.md
    PYTHONPATH=python python benchmarks/bench_fast.py --from-json benchmarks/fast_results.json \\
        --plot benchmarks/fast_time_vs_n.png
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common as C  # noqa: E402

FORM_ID = {"rotary": 1, "blockw": 2}
T_START = time.perf_counter()
GIB = float(1 << 30)


# --------------------------------------------------------------------------------------------------
# arguments


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Time fastrope's fast method against its exact method (issue #3).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--n-exp",
        type=int,
        nargs=2,
        default=[12, 20],
        metavar=("LO", "HI"),
        help="n = 2^LO .. 2^HI",
    )
    p.add_argument(
        "--n-exps", type=int, nargs="+", help="explicit n exponents (instead of --n-exp's range)"
    )
    p.add_argument("--d", type=int, nargs="+", default=[2, 4, 8], help="head dims")
    p.add_argument("--forms", nargs="+", choices=["rotary", "blockw"], default=["rotary", "blockw"])
    p.add_argument("--dv", nargs="+", default=["d", "64"], help="value dims; 'd' means d_v = d")
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--exact-max-seconds",
        type=float,
        default=120.0,
        help="measure exact while one call is predicted to take at most this",
    )
    p.add_argument(
        "--fast-max-seconds",
        type=float,
        default=600.0,
        help="skip a fast point predicted to take longer than this",
    )
    p.add_argument(
        "--cap",
        nargs="*",
        default=["rotary:8:13", "blockw:4:16", "blockw:8:12"],
        help="grid reduction FORM:D:MAXEXP: largest n exponent for that form and d "
        "(d = 8 cannot fit in memory beyond 2^14 anyway)",
    )
    p.add_argument(
        "--blockw-n-step",
        type=int,
        default=2,
        help="grid reduction: BlockW takes every STEP-th exponent",
    )
    p.add_argument(
        "--blockw-dv",
        nargs="+",
        default=["64"],
        help="grid reduction: value dims for BlockW ('d' means d_v = d)",
    )
    p.add_argument(
        "--exact-step",
        type=int,
        default=2,
        help="grid reduction: above 2^14, measure exact only every STEP-th exponent "
        "(the others come from its fitted n^2 curve)",
    )
    p.add_argument(
        "--budget-minutes",
        type=float,
        default=40.0,
        help="skip remaining fast/exact measurements (and say so) past this",
    )
    p.add_argument(
        "--causal-points",
        nargs="*",
        default=["rotary:2:64:16", "rotary:4:64:16"],
        help="extra causal points FORM:D:DV:NEXP (fast and exact)",
    )
    p.add_argument(
        "--breakdown",
        nargs="*",
        default=["rotary:2:64:20", "rotary:4:64:16"],
        help="breakdown points FORM:D:DV:NEXP (perf profile + bare-FFT floor)",
    )
    p.add_argument("--no-perf", action="store_true", help="breakdown without perf sampling")
    p.add_argument("--perf-freq", type=int, default=97, help="perf sampling frequency (Hz)")
    p.add_argument("--subset-rows", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny grid to validate the script (n = 2^12..2^14, d = 2 4)",
    )
    p.add_argument("--json", help="write raw results here")
    p.add_argument("--plot", help="write the log-log PNG here")
    p.add_argument("--markdown", help="write the markdown tables here")
    p.add_argument("--from-json", help="re-render tables/plot from an earlier --json")
    p.add_argument(
        "--rerun-breakdown",
        action="store_true",
        help="with --from-json: run the --breakdown points again (saved with --json)",
    )
    p.add_argument(
        "--no-snapshot",
        action="store_true",
        help="import fastrope in place rather than from a private copy",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.n_exp = [12, 14]
        a.d = [d for d in a.d if d <= 4] or [2]
        a.exact_max_seconds = min(a.exact_max_seconds, 10.0)
        a.fast_max_seconds = min(a.fast_max_seconds, 60.0)
        a.causal_points = ["rotary:2:64:13"]
        a.breakdown = ["rotary:2:64:14"]
        a.blockw_n_step = 2
        a.cap = ["blockw:4:12"]
    return a


def parse_point(s: str) -> dict:
    form, d, dv, e = s.split(":")
    return dict(form=form, d=int(d), dv=int(dv), n=1 << int(e))


# --------------------------------------------------------------------------------------------------
# worker (one measurement, in its own process)


def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def make_inputs(fastrope, form: str, d: int, dv: int, n: int, seed: int, eps: float):
    """q, k scaled so that the planner's bound is R = 1; returns (q, k, v, w, R0)."""
    from fastrope._bench import random_w, unit_bound  # the same inputs as `fastrope bench`

    rng = np.random.default_rng([seed, FORM_ID[form], d, dv, n])
    q = rng.uniform(-1.0, 1.0, (n, d))
    k = rng.uniform(-1.0, 1.0, (n, d))
    v = rng.uniform(-1.0, 1.0, (n, dv))
    w = random_w(form, rng, n, d)
    r0 = unit_bound(q, k, v, w, eps)
    s = 1.0 / math.sqrt(r0)
    q *= s
    k *= s
    return q, k, v, w, r0


def plan_fields(p) -> dict:
    keep = (
        "method",
        "degree",
        "poly_kind",
        "bound_r",
        "terms",
        "n_alpha",
        "n_beta",
        "n_pairs",
        "fast_flops",
        "fast_seconds",
        "exact_flops",
        "exact_seconds",
        "working_set_bytes",
        "fast_working_set_bytes",
        "memory_limit",
        "certified_error",
        "why",
    )
    out = {k: getattr(p, k) for k in keep}
    out["details"] = {
        k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
        for k, v in dict(p.details).items()
    }
    return out


def available_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 << 30


def worker(spec: dict) -> dict:
    import fastrope

    method, form = spec["method"], spec["form"]
    d, dv, n, causal = spec["d"], spec["dv"], spec["n"], spec["causal"]
    eps, threads = spec["eps"], spec["threads"]
    res: dict = {"method": method}
    t0 = time.perf_counter()
    q, k, v, w, r0 = make_inputs(fastrope, form, d, dv, n, spec["seed"], eps)
    res["r0"] = r0
    res["input_seconds"] = time.perf_counter() - t0
    if method == "fast":
        try:
            p = fastrope.plan(q, k, v, w, eps, causal=causal, method="fast")
            res["plan"] = plan_fields(p)
        except Exception as e:  # ApproximationError / MemoryError: what it would have needed
            res["skipped"] = f"{type(e).__name__}: {e}"
            try:
                p = fastrope.plan(
                    q, k, v, w, eps, causal=causal, method="fast", memory_limit=1 << 60
                )
                res["plan"] = plan_fields(p)
            except Exception as e2:
                res["plan_error"] = f"{type(e2).__name__}: {e2}"
            return res
        avail = available_memory()
        res["available_bytes"] = avail
        if p.working_set_bytes > 0.8 * avail:
            res["skipped"] = (
                f"working set {p.working_set_bytes / GIB:.1f} GiB > 80% of available "
                f"memory {avail / GIB:.1f} GiB"
            )
            return res
        pred = p.fast_seconds * spec.get("calib", 1.0)
        res["predicted_seconds"] = pred
        if pred > spec["max_seconds"]:
            res["skipped"] = (
                f"predicted {pred:.0f} s > {spec['max_seconds']:.0f} s (plan "
                f"{p.fast_seconds:.0f} s x calibration {spec.get('calib', 1):.2f})"
            )
            return res

        def run():
            return fastrope.attention(
                q, k, v, w, eps, causal=causal, method="fast", num_threads=threads
            )

    else:
        try:
            p = fastrope.plan(q, k, v, w, 0.0, causal=causal, method="exact")
            res["plan"] = plan_fields(p)
        except Exception as e:
            res["skipped"] = f"{type(e).__name__}: {e}"
            return res

        def run():
            return fastrope.attention(
                q, k, v, w, causal=causal, method="exact", num_threads=threads
            )

    gc.collect()
    res["peak_reset"] = _reset_peak()
    rss0 = _status()["VmRSS"]
    res["load_before"] = C.loadavg()
    times, cpu = [], []
    m0 = time.clock_gettime(time.CLOCK_MONOTONIC)
    c, t = time.process_time(), time.perf_counter()
    out = run()
    times.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
    res["window"] = [m0, time.clock_gettime(time.CLOCK_MONOTONIC)]
    reps = 5 if times[0] < 0.5 else 3 if times[0] < 5.0 else 1
    reps = min(reps, spec.get("max_reps", 5))
    st = _status()
    res["peak_bytes"] = st["VmHWM"] - rss0
    res["rss_before"] = rss0
    while len(times) < reps:
        c, t = time.process_time(), time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    res["times"] = times
    res["median"] = float(np.median(times))
    # process CPU seconds (all threads) per call: what the call cost, less sensitive than the
    # wall time to waiting for a core on a loaded machine
    res["cpu_times"] = cpu
    res["cpu_median"] = float(np.median(cpu))
    res["load_after"] = C.loadavg()
    if spec.get("save"):
        np.save(spec["save"], out)
    if method == "fast":
        if spec.get("exact_path") and os.path.exists(spec["exact_path"]):
            ex = np.load(spec["exact_path"])
            res["err_full"] = float(np.abs(out - ex).max())
        else:
            ex = None
        m = min(spec["subset_rows"], n)
        if m <= 0:
            return res
        rng = np.random.default_rng([spec["seed"], 7, n])
        # the first and last rows (where a causal row's mass is smallest) and random others
        ends = np.unique(np.r_[np.arange(min(4, n)), np.arange(max(n - 4, 0), n)])
        rest = np.setdiff1d(np.arange(n), ends)
        pick = rng.choice(rest, size=max(0, min(m - ends.size, rest.size)), replace=False)
        rows = np.sort(np.r_[ends, pick]).astype(np.int64)
        m = rows.size
        t = time.perf_counter()
        ex_rows = np.concatenate(
            [
                fastrope.attention(
                    q[i : i + 1],
                    k,
                    v,
                    w,
                    causal=causal,
                    q_offset=int(i),
                    method="exact",
                    num_threads=threads,
                )
                for i in rows
            ]
        )
        res["subset_seconds"] = time.perf_counter() - t
        res["err_subset"] = float(np.abs(out[rows] - ex_rows).max())
        res["subset_rows"] = int(m)
        if ex is not None:
            # the row-wise exact values must agree with the full exact run
            res["subset_vs_full_exact"] = float(np.abs(ex[rows] - ex_rows).max())
    return res


def run_worker(spec: dict, env: dict, timeout: float, prefix=None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    if prefix:
        cmd = list(prefix) + cmd
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"method": spec["method"], "skipped": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        tail = (r.stderr or "").strip().splitlines()[-3:]
        return {
            "method": spec["method"],
            "skipped": f"worker failed (rc {r.returncode}): " + " | ".join(tail),
        }
    return json.loads(lines[-1])


# --------------------------------------------------------------------------------------------------
# sweep


def grid(a) -> list:
    """[(form, d, dv, [n...])] after the grid reductions."""
    configs = []
    lo, hi = a.n_exp
    for form in a.forms:
        for d in a.d:
            dvs = []
            for x in a.blockw_dv if form == "blockw" else a.dv:
                dv = d if x == "d" else int(x)
                if dv not in dvs:
                    dvs.append(dv)
            for dv in dvs:
                top = hi
                for c in a.cap or []:
                    f_, d_, e_ = c.split(":")
                    if f_ == form and int(d_) == d:
                        top = min(top, int(e_))
                step = a.blockw_n_step if form == "blockw" else 1
                exps = (
                    range(lo, top + 1, step) if not a.n_exps else [e for e in a.n_exps if e <= top]
                )
                ns = [1 << e for e in exps]
                if ns:
                    configs.append((form, d, dv, ns))
    return configs


def fit_c(points) -> float:
    """c in t = c n^2 (least squares in log space) from [(n, t)]: n >= 2^14 if two such."""
    big = [(n, t) for n, t in points if n >= 1 << 14]
    use = big if len(big) >= 2 else points
    return float(math.exp(np.mean([math.log(t) - 2 * math.log(n) for n, t in use])))


def sweep_config(a, env, tmpdir, form, d, dv, ns, causal=False, log=C.log) -> list:
    rows = []
    exact_pts = []  # (n, t) measured
    calib = []  # fast measured / plan predicted
    fast_dead = None  # reason the fast method stopped (memory): larger n skip too
    base = dict(
        form=form,
        d=d,
        dv=dv,
        causal=causal,
        eps=a.eps,
        threads=a.threads,
        seed=a.seed,
        subset_rows=a.subset_rows,
    )
    for n in ns:
        row = dict(form=form, d=d, dv=dv, n=n, causal=causal)
        # ---- exact
        pred = None
        if exact_pts:
            n1, t1 = exact_pts[-1]
            pred = t1 * (n / n1) ** 2
        exact_path = None
        e = int(math.log2(n))
        on_step = e <= 14 or (e - 14) % max(a.exact_step, 1) == 0 or causal
        over = time.perf_counter() - T_START > 60 * a.budget_minutes
        if (pred is None or pred <= a.exact_max_seconds) and on_step and not over:
            exact_path = os.path.join(tmpdir, f"exact_{form}_{d}_{dv}_{n}_{int(causal)}.npy")
            spec = dict(base, method="exact", n=n, save=exact_path)
            ex = run_worker(spec, env, timeout=max(600.0, 4 * (pred or 0)))
            if "median" in ex:
                exact_pts.append((n, ex["median"]))
            else:
                exact_path = None
        else:
            ex = {
                "method": "exact",
                "extrapolated": True,
                "predicted_from_last": pred,
                "why": (
                    "time budget"
                    if over
                    else "off the exact step"
                    if not on_step
                    else f"predicted {pred:.0f} s > {a.exact_max_seconds:.0f} s"
                ),
            }
        row["exact"] = ex
        # ---- fast
        if fast_dead:
            fa = {"method": "fast", "skipped": fast_dead}
        elif time.perf_counter() - T_START > 60 * a.budget_minutes:
            fa = {"method": "fast", "skipped": f"time budget of {a.budget_minutes:.0f} min used"}
        else:
            spec = dict(
                base,
                method="fast",
                n=n,
                exact_path=exact_path,
                max_seconds=a.fast_max_seconds,
                calib=float(np.median(calib)) if calib else 1.0,
            )
            fa = run_worker(spec, env, timeout=3 * a.fast_max_seconds + 300)
            if "median" in fa and fa.get("plan"):
                calib.append(fa["median"] / fa["plan"]["fast_seconds"])
            elif "skipped" in fa and (
                "memory" in fa["skipped"].lower()
                or "working set" in fa["skipped"]
                or "needs at least" in fa["skipped"]
            ):
                fast_dead = f"skipped at n = {n} already: {fa['skipped']}"
        row["fast"] = fa
        if exact_path and os.path.exists(exact_path):
            os.remove(exact_path)
        row["load"] = C.loadavg()
        rows.append(row)
        log(short_line(row))
    # extrapolate exact beyond the measured points with the fitted c n^2
    if exact_pts:
        c = fit_c(exact_pts)
        for row in rows:
            row["exact_fit_c"] = c
            row["exact_max_measured_n"] = max(n_ for n_, _ in exact_pts)
            if row["exact"].get("extrapolated"):
                row["exact"]["median"] = c * row["n"] ** 2
    return rows


def short_line(row) -> str:
    fa, ex = row["fast"], row["exact"]
    ft = f"{fa['median']:.3g}s" if "median" in fa else "skip"
    et = (
        f"{ex['median']:.3g}s"
        if "median" in ex
        else f"~{ex.get('predicted_from_last') or float('nan'):.3g}s(extrap)"
    )
    err = fa.get("err_full", fa.get("err_subset"))
    pl = fa.get("plan") or {}
    return (
        f"  {row['form']:6s} d={row['d']} dv={row['dv']:2d} n=2^{int(math.log2(row['n']))}"
        f"{' causal' if row['causal'] else ''}: fast {ft} exact {et}"
        f" deg={pl.get('degree')} pairs={pl.get('n_pairs')}"
        f" err={err if err is None else f'{err:.2g}'}"
        f" load={row['load'][0] if row['load'] else '?'}"
        + (f"  [{fa['skipped'][:90]}]" if "skipped" in fa else "")
    )


# --------------------------------------------------------------------------------------------------
# breakdown: perf samples by stage, and the bare-FFT floor


STAGES = [
    ("kernel spectra", ("FastKernel::new", "FastKernel::build")),
    ("frequency-domain products", ("stage2",)),
    ("forward FFTs", ("ToeplitzPlan::forward",)),
    ("inverse FFTs", ("ToeplitzPlan::inverse",)),
    ("rest of apply (monomials, certificate, buffers, q^a sums)", ("FastKernel::apply",)),
    ("planning/bounds/binding", ("fastrope::",)),
    # (only samples inside the timed call are counted, see perf_profile)
]


def classify(frames) -> str:
    for name, keys in STAGES:
        for f in frames:
            if any(k in f for k in keys):
                if name == "kernel spectra":
                    if any("kernel_spectrum" in g for g in frames):
                        return "kernel spectra: FFTs"
                    return "kernel spectra: sequences/scatter/alloc"
                return name
    return "outside fastrope (python, numpy, inputs)"


def perf_profile(a, env, spec, tmpdir) -> dict:
    perf = shutil.which("perf")
    if not perf or a.no_perf:
        return {"error": "perf not available" if not perf else "disabled"}
    data = os.path.join(tmpdir, "perf.data")
    prefix = [
        perf,
        "record",
        "-q",
        "-k",
        "CLOCK_MONOTONIC",
        "-F",
        str(a.perf_freq),
        "--call-graph",
        "dwarf,8192",
        "-o",
        data,
        "--",
    ]
    t0 = time.perf_counter()
    res = run_worker(
        dict(spec, max_reps=1), env, timeout=3 * a.fast_max_seconds + 600, prefix=prefix
    )
    wall = time.perf_counter() - t0
    if "median" not in res:
        return {"error": res.get("skipped", "failed"), "worker": res}
    try:
        r = subprocess.run(
            [perf, "script", "-i", data, "-F", "tid,time,ip,sym", "--no-inline"],
            capture_output=True,
            text=True,
            timeout=1800,
        )
    except subprocess.TimeoutExpired:
        return {"error": "perf script timed out"}
    counts: dict = {}
    total = 0
    frames: list = []
    lo, hi = res["window"]  # the timed call, on perf's clock (-k CLOCK_MONOTONIC)
    head = {"t": None, "tid": None}
    tids: dict = {}

    def flush():
        nonlocal total
        if not frames or head["t"] is None or not (lo <= head["t"] <= hi):
            return
        cat = classify(frames)
        counts[cat] = counts.get(cat, 0) + 1
        tids[head["tid"]] = tids.get(head["tid"], 0) + 1
        total += 1

    for line in r.stdout.splitlines():
        if not line.strip():
            flush()
            frames = []
            continue
        if line.startswith((" ", "\t")):
            parts = line.strip().split(None, 1)
            frames.append(parts[1] if len(parts) > 1 else parts[0])
        else:
            flush()
            frames = []
            f = line.split()
            try:
                head["tid"], head["t"] = int(f[0]), float(f[1].rstrip(":"))
            except (IndexError, ValueError):
                head["t"] = None
    flush()
    try:
        os.remove(data)
    except OSError:
        pass
    in_call = sum(v for k, v in counts.items() if not k.startswith("outside"))
    if total == 0:
        return {
            "error": f"no perf samples in the call window (perf script rc {r.returncode}: "
            + " | ".join((r.stderr or "").strip().splitlines()[-3:])
            + f"; {len(r.stdout)} bytes of output)",
            "worker": res,
        }
    return {
        "samples": counts,
        "total_samples": total,
        "samples_in_fastrope": in_call,
        "samples_by_thread": tids,
        "window_seconds": hi - lo,
        "freq": a.perf_freq,
        "worker": res,
        "wall_with_perf": wall,
        "cpu_seconds": {k: v / a.perf_freq for k, v in counts.items()},
    }


def fft_floor(fft_len: int, counts: dict, threads: int) -> dict:
    """Seconds for the same numbers of bare real FFTs of length fft_len (float64)."""
    try:
        import scipy.fft as sfft

        lib = "scipy.fft"

        def rf(x, w):
            return sfft.rfft(x, axis=-1, workers=w)

        def irf(x, w):
            return sfft.irfft(x, n=fft_len, axis=-1, workers=w)
    except ImportError:
        lib = "numpy.fft"

        def rf(x, w):
            return np.fft.rfft(x, axis=-1)

        def irf(x, w):
            return np.fft.irfft(x, n=fft_len, axis=-1)

    batch = max(2, min(32, (256 << 20) // (fft_len * 8)))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, fft_len))
    X = rf(x, 1)
    out = {"library": lib, "fft_len": fft_len, "batch": batch}
    for w in sorted({1, threads}):
        ts_f, ts_i, cpu_f, cpu_i = [], [], [], []
        rf(x, w)
        irf(X, w)
        for _ in range(7):
            c, t = time.process_time(), time.perf_counter()
            rf(x, w)
            ts_f.append((time.perf_counter() - t) / batch)
            cpu_f.append((time.process_time() - c) / batch)
            c, t = time.process_time(), time.perf_counter()
            irf(X, w)
            ts_i.append((time.perf_counter() - t) / batch)
            cpu_i.append((time.process_time() - c) / batch)
        # process CPU time per FFT (what perf's samples measure; insensitive to waiting for a
        # core on a loaded machine)
        out[f"rfft_cpu_s_workers{w}"] = float(np.min(cpu_f))
        out[f"irfft_cpu_s_workers{w}"] = float(np.min(cpu_i))
        # a floor: the best of 7 batches (the machine is shared; the median is kept too)
        out[f"rfft_s_workers{w}"] = float(np.min(ts_f))
        out[f"irfft_s_workers{w}"] = float(np.min(ts_i))
        out[f"rfft_median_s_workers{w}"] = float(np.median(ts_f))
        out[f"irfft_median_s_workers{w}"] = float(np.median(ts_i))
    w = threads
    out["workers"] = w
    out["counts"] = counts
    out["seconds"] = {
        "kernel spectra": counts["kernel"] * out[f"rfft_s_workers{w}"],
        "forward FFTs": counts["forward"] * out[f"rfft_s_workers{w}"],
        "inverse FFTs": counts["inverse"] * out[f"irfft_s_workers{w}"],
    }
    out["seconds_1thread"] = {  # CPU seconds, one worker
        "kernel spectra": counts["kernel"] * out["rfft_cpu_s_workers1"],
        "forward FFTs": counts["forward"] * out["rfft_cpu_s_workers1"],
        "inverse FFTs": counts["inverse"] * out["irfft_cpu_s_workers1"],
    }
    out["floor_seconds"] = sum(out["seconds"].values())
    out["floor_cpu_seconds"] = sum(out["seconds_1thread"].values())
    return out


def breakdown(a, env, tmpdir, pt: dict, results: list) -> dict:
    form, d, dv, n = pt["form"], pt["d"], pt["dv"], pt["n"]
    C.log(f"breakdown {form} d={d} dv={dv} n=2^{int(math.log2(n))}")
    spec = dict(
        form=form,
        d=d,
        dv=dv,
        n=n,
        causal=False,
        eps=a.eps,
        threads=a.threads,
        seed=a.seed,
        subset_rows=0,
        method="fast",
        max_seconds=a.fast_max_seconds,
        calib=1.0,
    )
    out = {"point": pt}
    # the sweep's measurement of the same point, when there is one
    for row in results:
        if (row["form"], row["d"], row["dv"], row["n"], row["causal"]) == (form, d, dv, n, False):
            out["sweep_fast"] = row["fast"]
    prof = perf_profile(a, env, spec, tmpdir)
    out["perf"] = prof
    res = prof.get("worker") if "worker" in prof else None
    if res is None or "plan" not in res:
        res = out.get("sweep_fast")
    if res is None or "plan" not in res:
        res = run_worker(dict(spec, max_reps=1), env, timeout=3 * a.fast_max_seconds + 300)
        out["run"] = res
    pl = res.get("plan")
    if not pl:
        out["error"] = res.get("skipped", "no plan")
        return out
    fl = int(pl["details"]["fft_len"])
    cols = dv + 1
    counts = {
        "kernel": int(pl["n_pairs"]),
        "forward": int(pl["n_beta"]) * cols,
        "inverse": int(pl["n_alpha"]) * cols,
    }
    out["fft"] = fft_floor(fl, counts, a.threads)
    out["products_complex_macs"] = float(pl["n_pairs"]) * cols * (fl // 2 + 1)
    C.log(
        f"  bare FFTs: {sum(counts.values())} of length {fl}: "
        f"{out['fft']['floor_seconds']:.2f} s ({a.threads} workers), "
        f"{out['fft']['floor_cpu_seconds']:.2f} CPU-s"
    )
    if "cpu_seconds" in prof:
        C.log(
            "  perf CPU-s: "
            + ", ".join(f"{k}: {v:.1f}" for k, v in sorted(prof["cpu_seconds"].items()))
        )
    return out


# --------------------------------------------------------------------------------------------------
# analysis and output


def fit_exponent(pts) -> float | None:
    pts = [(n, t) for n, t in pts if (1 << 14) <= n <= (1 << 20) and t and t > 0]
    if len(pts) < 2:
        return None
    x = np.log2([p[0] for p in pts])
    y = np.log2([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


def analyse(results: list) -> dict:
    groups: dict = {}
    for r in results:
        if r["causal"]:
            continue
        groups.setdefault((r["form"], r["d"], r["dv"]), []).append(r)
    out = {}
    for key, rows in groups.items():
        rows = sorted(rows, key=lambda r: r["n"])
        fpts = [(r["n"], r["fast"]["median"]) for r in rows if "median" in r["fast"]]
        epts = [
            (r["n"], r["exact"]["median"])
            for r in rows
            if "median" in r["exact"] and not r["exact"].get("extrapolated")
        ]
        info = {
            "fast_exponent": fit_exponent(fpts),
            "exact_exponent": fit_exponent(epts),
            "fast_range": [fpts[0][0], fpts[-1][0]] if fpts else None,
            "exact_measured_range": [epts[0][0], epts[-1][0]] if epts else None,
        }
        # crossover: first sign change of log(fast/exact) (exact possibly extrapolated)
        ratio = [
            (
                r["n"],
                r["fast"]["median"] / r["exact"]["median"],
                bool(r["exact"].get("extrapolated")),
            )
            for r in rows
            if "median" in r["fast"] and "median" in r["exact"]
        ]
        cross = None
        how = None
        if ratio:
            if ratio[0][1] <= 1:
                cross, how = ratio[0][0], f"fast already faster at the smallest n = {ratio[0][0]}"
            for (n0, r0, x0), (n1, r1, x1) in zip(ratio, ratio[1:]):
                if cross is None and r0 > 1 >= r1:
                    t = math.log(r0) / (math.log(r0) - math.log(r1))
                    cross = 2 ** (math.log2(n0) + t * (math.log2(n1) - math.log2(n0)))
                    how = "interpolated" + (" (exact extrapolated)" if (x0 or x1) else "")
        if cross is None and len(fpts) >= 2 and epts:
            # beyond the grid: fast ~ a n^p (last two points), exact ~ c n^2
            (n0, t0), (n1, t1) = fpts[-2], fpts[-1]
            p = math.log(t1 / t0) / math.log(n1 / n0)
            c = rows[0].get("exact_fit_c") or fit_c(epts)
            if p < 2:
                # t1 (n/n1)^p = c n^2  ->  n = (t1 n1^-p / c)^(1/(2-p))
                cross = (t1 * n1 ** (-p) / c) ** (1.0 / (2.0 - p))
                how = f"beyond the measured fast points: fast ~ n^{p:.2f} vs exact c n^2"
        info["crossover_n"] = cross
        info["crossover_how"] = how
        info["ratios"] = ratio
        out["/".join(map(str, key))] = info
    return out


def fmt_t(x) -> str:
    if x is None:
        return "-"
    if x < 1:
        return f"{x * 1e3:.0f} ms" if x >= 0.01 else f"{x * 1e3:.1f} ms"
    return f"{x:.1f} s" if x < 100 else f"{x:.0f} s"


def fmt_b(x) -> str:
    if x is None:
        return "-"
    return f"{x / 2**20:.0f} MiB" if x < GIB else f"{x / GIB:.2f} GiB"


def fill_cpu_fit(results: list) -> None:
    """Process CPU seconds of the exact method where it was not run: the fitted c n^2 of the
    measured CPU times of the same configuration (as for the wall times)."""
    groups: dict = {}
    for r in results:
        groups.setdefault((r["form"], r["d"], r["dv"], r["causal"]), []).append(r)
    for rows in groups.values():
        pts = [(r["n"], r["exact"]["cpu_median"]) for r in rows if "cpu_median" in r["exact"]]
        if not pts:
            continue
        c = fit_c(pts)
        for r in rows:
            if r["exact"].get("extrapolated"):
                r["exact"]["cpu_fit"] = c * r["n"] ** 2


def table(results: list, eps: float) -> str:
    fill_cpu_fit(results)
    with_cpu = any("cpu_median" in r["fast"] for r in results)
    hdr = [
        "form",
        "d",
        "dv",
        "n",
        "mask",
        "deg",
        "terms",
        "#α",
        "#β",
        "#pairs",
        "fft_len",
        "fast",
        "exact",
        "exact/fast",
        "fast peak",
        "exact peak",
        "max\\|err\\|",
        "eps/err",
        "load1",
    ]
    if with_cpu:
        hdr[14:14] = ["fast CPU-s", "exact CPU-s", "CPU exact/fast"]
    rows = []
    for r in results:
        fa, ex = r["fast"], r["exact"]
        pl = fa.get("plan") or {}
        det = pl.get("details") or {}
        err = fa.get("err_full")
        errs = ""
        if err is None and fa.get("err_subset") is not None:
            err, errs = fa["err_subset"], f" ({fa.get('subset_rows', 64)} rows)"
        et = ex.get("median")
        etxt = fmt_t(et)
        if ex.get("extrapolated"):
            inside = r["n"] < r.get("exact_max_measured_n", 0)
            etxt += " (n² fit)" if inside else " (extrap.)"
        if "median" not in ex and "skipped" in ex:
            etxt = "failed"
        ft = fa.get("median")
        ftxt = fmt_t(ft) if ft is not None else "skipped"
        sp = f"{et / ft:.3g}x" if (et and ft) else "-"
        loads = [x for x in (fa.get("load_before"), ex.get("load_before")) if x]
        load = max(x[0] for x in loads) if loads else (r["load"][0] if r.get("load") else None)
        rows.append(
            [
                r["form"],
                r["d"],
                r["dv"],
                f"2^{int(math.log2(r['n']))}",
                "causal" if r["causal"] else "full",
                pl.get("degree", "-"),
                pl.get("terms", "-"),
                pl.get("n_alpha", "-"),
                pl.get("n_beta", "-"),
                pl.get("n_pairs", "-"),
                det.get("fft_len", "-"),
                ftxt,
                etxt,
                sp,
                fmt_b(fa.get("peak_bytes")),
                fmt_b(ex.get("peak_bytes")),
                f"{err:.2g}{errs}" if err is not None else "-",
                f"{eps / err:.3g}" if err else "-",
                f"{load:.1f}" if load is not None else "-",
            ]
        )
        if with_cpu:
            fc = fa.get("cpu_median")
            ec = ex.get("cpu_median", ex.get("cpu_fit"))
            ectxt = "-" if ec is None else f"{ec:.3g}" + (" (fit)" if "cpu_fit" in ex else "")
            rows[-1][14:14] = [
                "-" if fc is None else f"{fc:.3g}",
                ectxt,
                f"{ec / fc:.3g}x" if (ec and fc) else "-",
            ]
    return C.format_table(hdr, rows, markdown=True)


def skipped_lines(results: list) -> list:
    out = []
    for r in results:
        fa = r["fast"]
        if "skipped" in fa:
            pl = fa.get("plan") or {}
            out.append(
                f"{r['form']} d={r['d']} dv={r['dv']} n=2^{int(math.log2(r['n']))}: "
                f"{fa['skipped']}"
                + (
                    f" [plan without a memory limit: degree {pl.get('degree')}, "
                    f"{pl.get('n_pairs')} pairs, working set "
                    f"{fmt_b(pl.get('working_set_bytes'))}, predicted "
                    f"{fmt_t(pl.get('fast_seconds'))}]"
                    if pl
                    else ""
                )
            )
    return out


def analysis_table(an: dict) -> str:
    hdr = ["form/d/dv", "fast exponent", "exact exponent", "crossover n", "how"]
    rows = []
    for key, info in an.items():
        fe, ee, cn = info["fast_exponent"], info["exact_exponent"], info["crossover_n"]
        rows.append(
            [
                key,
                f"{fe:.2f}" if fe is not None else "-",
                f"{ee:.2f}" if ee is not None else "-",
                (f"{cn:,.0f} (2^{math.log2(cn):.1f})" if cn else "none"),
                info["crossover_how"] or "-",
            ]
        )
    return C.format_table(hdr, rows, markdown=True)


def breakdown_text(bd: dict) -> str:
    pt = bd["point"]
    lines = [f"**{pt['form']} d={pt['d']} d_v={pt['dv']} n=2^{int(math.log2(pt['n']))}**"]
    if "error" in bd and "fft" not in bd:
        return lines[0] + f": {bd['error']}"
    f = bd["fft"]
    cnt = f["counts"]
    sweep = bd.get("sweep_fast") or {}
    lines.append(
        f"FFT length {f['fft_len']}; the plan does {cnt['kernel']} kernel spectra + "
        f"{cnt['forward']} forward + {cnt['inverse']} inverse real FFTs "
        f"= {sum(cnt.values())}, and {bd['products_complex_macs']:.3g} complex multiply-adds."
    )
    lines.append(
        f"Bare {f['library']} FFTs of that length ({f['batch']} per batch, float64, best of 7): "
        f"rfft {f['rfft_cpu_s_workers1'] * 1e3:.2f} / irfft {f['irfft_cpu_s_workers1'] * 1e3:.2f} "
        f"CPU-ms each on one worker; the plan's FFTs would take "
        f"{f['floor_cpu_seconds']:.1f} CPU-s, "
        f"{f['floor_seconds']:.1f} s wall with {f['workers']} workers."
    )
    prof = bd.get("perf") or {}
    if "cpu_seconds" in prof:
        cs = prof["cpu_seconds"]
        w = prof["worker"]
        tot = sum(cs.values())
        lines.append(
            f"perf run (a separate run of the same point): the fast call took "
            f"{w['median']:.1f} s wall (sweep: {fmt_t(sweep.get('median'))}); "
            f"{tot:.1f} CPU-s sampled inside that call ({prof['freq']} Hz per thread, "
            f"dwarf call graphs, so {tot / max(prof['window_seconds'], 1e-9):.2f} cores busy "
            f"on average), by stage:"
        )
        lines.append("")
        floor_by = dict(f["seconds_1thread"])
        kfl = floor_by.get("kernel spectra")
        rows = []
        order = [
            "kernel spectra: FFTs",
            "kernel spectra: sequences/scatter/alloc",
            "forward FFTs",
            "frequency-domain products",
            "inverse FFTs",
            "rest of apply (monomials, certificate, buffers, q^a sums)",
            "planning/bounds/binding",
            "outside fastrope (python, numpy, inputs)",
        ]
        for k in order:
            v = cs.get(k, 0.0)
            fl = {
                "kernel spectra: FFTs": kfl,
                "forward FFTs": floor_by["forward FFTs"],
                "inverse FFTs": floor_by["inverse FFTs"],
            }.get(k)
            rows.append(
                [
                    k,
                    f"{v:.1f}",
                    f"{100 * v / tot:.0f}%" if tot else "-",
                    f"{fl:.1f}" if fl is not None else "-",
                    f"{v / fl:.2f}x" if fl else "-",
                ]
            )
        rows.append(
            [
                "total",
                f"{tot:.1f}",
                "100%",
                f"{f['floor_cpu_seconds']:.1f}",
                f"{tot / f['floor_cpu_seconds']:.2f}x",
            ]
        )
        lines.append(
            C.format_table(
                ["stage", "CPU-s", "share", "bare-FFT CPU-s", "vs bare"], rows, markdown=True
            )
        )
    elif "error" in prof:
        lines.append(f"(no perf profile: {prof['error']})")
    ft = sweep.get("median")
    if ft:
        lines.append("")
        lines.append(
            f"Wall: the sweep's fast time {fmt_t(ft)} is "
            f"{ft / f['floor_seconds']:.2f}x the bare-FFT floor "
            f"({f['floor_seconds']:.1f} s with {f['workers']} workers)."
        )
    return "\n".join(lines)


def plot(results: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = sorted({r["d"] for r in results})
    fig, axes = plt.subplots(1, len(ds), figsize=(5.2 * len(ds), 4.4), squeeze=False)
    colors = {}
    palette = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7"]
    for ax, d in zip(axes[0], ds):
        groups: dict = {}
        for r in results:
            if r["d"] == d and not r["causal"]:
                groups.setdefault((r["form"], r["dv"]), []).append(r)
        for (form, dv), rows in sorted(groups.items()):
            col = colors.setdefault((form, dv), palette[len(colors) % len(palette)])
            rows = sorted(rows, key=lambda r: r["n"])
            lab = f"{form} dv={dv}"
            fx = [(r["n"], r["fast"]["median"]) for r in rows if "median" in r["fast"]]
            if fx:
                ax.plot(*zip(*fx), "o-", color=col, label=f"fast {lab}")
            em = [
                (r["n"], r["exact"]["median"])
                for r in rows
                if "median" in r["exact"] and not r["exact"].get("extrapolated")
            ]
            ee = [
                (r["n"], r["exact"]["median"])
                for r in rows
                if "median" in r["exact"] and r["exact"].get("extrapolated")
            ]
            if em:
                ax.plot(*zip(*em), "s--", color=col, alpha=0.8, label=f"exact {lab}")
            if ee:
                xs = ([em[-1]] if em else []) + ee
                ax.plot(*zip(*xs), ":", color=col, alpha=0.6)
                ax.plot(*zip(*ee), "s", mfc="none", color=col, alpha=0.6)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("n (= n_q = n_k)")
        ax.set_ylabel("seconds (median)")
        ax.set_title(
            f"d = {d}: fast (solid) vs exact (dashed; dotted/hollow = extrapolated)", fontsize=8
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        "fastrope fast vs exact forward, one head, float64, R = 1, eps = 1e-3", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(data: dict, a) -> str:
    results = data["results"]
    an = analyse(results)
    data["analysis"] = an
    parts = ["### Table", "", table(results, data["args"]["eps"]), ""]
    sk = skipped_lines(results)
    if sk:
        parts += ["Skipped fast points:", ""] + [f"* {s}" for s in sk] + [""]
    parts += [
        "### Fitted exponents (2^14..2^20, measured points) and crossovers",
        "",
        analysis_table(an),
        "",
    ]
    for bd in data.get("breakdowns", []):
        parts += ["### Breakdown", "", breakdown_text(bd), ""]
    return "\n".join(parts)


def main(argv=None):
    a = parse_args(argv)
    if a.worker:
        spec = json.loads(a.worker)
        res = worker(spec)
        print(json.dumps(res, default=float), flush=True)
        return
    if a.from_json:
        with open(a.from_json) as f:
            data = json.load(f)
        if a.rerun_breakdown:
            env = dict(os.environ)
            if not a.no_snapshot:
                snap = C.snapshot_package()
                env["PYTHONPATH"] = snap["snapshot"] + os.pathsep + env.get("PYTHONPATH", "")
            tmpdir = tempfile.mkdtemp(prefix="bench_fast_")
            try:
                data["breakdowns"] = [
                    breakdown(a, env, tmpdir, parse_point(s), data["results"])
                    for s in (a.breakdown or [])
                ]
                data["breakdown_argv"] = " ".join(sys.argv)
                data["breakdown_date"] = C.machine_info(a.threads)["date"]
            finally:
                shutil.rmtree(tmpdir, ignore_errors=True)
    else:
        env = dict(os.environ)
        snap = {}
        if not a.no_snapshot:
            snap = C.snapshot_package()
            env["PYTHONPATH"] = snap["snapshot"] + os.pathsep + env.get("PYTHONPATH", "")
        env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")  # numpy input draws only
        info = C.machine_info(a.threads)
        info["package"] = snap
        info["mem_total_gib"] = None
        try:
            with open("/proc/meminfo") as f:
                info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
        except OSError:
            pass
        C.log(f"{info['date']}  {info['cpu']}  load {info['loadavg_start']}")
        t_start = time.perf_counter()
        tmpdir = tempfile.mkdtemp(prefix="bench_fast_")
        results = []
        try:
            for form, d, dv, ns in grid(a):
                C.log(f"{form} d={d} dv={dv}: n = {[int(math.log2(n)) for n in ns]}")
                results += sweep_config(a, env, tmpdir, form, d, dv, ns)
            for s in a.causal_points or []:
                pt = parse_point(s)
                C.log(f"causal {s}")
                results += sweep_config(
                    a, env, tmpdir, pt["form"], pt["d"], pt["dv"], [pt["n"]], causal=True
                )
            breakdowns = [
                breakdown(a, env, tmpdir, parse_point(s), results) for s in (a.breakdown or [])
            ]
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        info["loadavg_end"] = C.loadavg()
        info["wall_seconds"] = time.perf_counter() - t_start
        data = {"machine": info, "args": vars(a), "results": results, "breakdowns": breakdowns}
    md = render(data, a)
    print(md)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(md + "\n")
    if a.json and (not a.from_json or a.rerun_breakdown):
        C.save_json(a.json, data)
    if a.plot:
        plot(data["results"], a.plot)
    if not a.from_json:
        C.log(f"total wall {data['machine']['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
