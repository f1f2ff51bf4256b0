#!/usr/bin/env python
"""Benchmark fastrope's exact method (issue #2) against PyTorch's scaled_dot_product_attention.

Times, in the same run, for each grid point (n, d, causal) -- fastrope Rotary and SDPA in
interleaved rounds (so background load hits both alike), BlockW (much slower) separately:

* fastrope exact forward, ``fastrope.attention(q, k, v, Rotary(), causal=..., method="exact")``
  (called with ``return_lse=True`` to keep ``out``/``lse`` for the backward; the kernel computes
  lse either way), and backward, ``fastrope.attention_grad(..., out=out, lse=lse)``, so the
  backward time excludes the forward;
* the same for ``BlockW`` with blocks ``(2n-1, d/2, 2, 2)`` built from the rotary cos/sin (same
  maths, general block kernel; its backward also returns dW);
* when torch is importable: ``torch.nn.functional.scaled_dot_product_attention`` on q and k
  rotated by RoPE beforehand (rotation not timed); forward under ``torch.inference_mode()``;
  backward as ``out.backward(dout, retain_graph=True)`` on one graph built once (untimed), grads
  reset to None before each call so nothing accumulates.

Reports median times, GFLOP/s (forward ``4 n^2 d`` per head, backward 2.5x that, both halved
when causal) and speedup = t_sdpa / t_fastrope (below 1: fastrope is slower).  Correctness is
checked once per configuration: max |fastrope - SDPA| on the output and, for the backward, on
dq, dk (mapped into the rotated frame) and dv.

Examples::

    PYTHONPATH=python python benchmarks/bench_exact.py --quick
    PYTHONPATH=python python benchmarks/bench_exact.py --json benchmarks/exact_results.json \
        --plot benchmarks/exact_time_vs_n.png
    PYTHONPATH=python python benchmarks/bench_exact.py --from-json benchmarks/exact_results.json \
        --plot benchmarks/exact_time_vs_n.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402

IMPLS = ("rotary", "blockw", "sdpa")
LABEL = {"rotary": "fastrope Rotary", "blockw": "fastrope BlockW", "sdpa": "torch SDPA"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Time fastrope's exact attention (Rotary, BlockW) against torch SDPA + RoPE.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 16384], help="sequence lengths")
    p.add_argument("--d", type=int, nargs="+", default=[64, 128], help="head dims")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--mask", choices=["both", "causal", "noncausal"], default="both")
    p.add_argument(
        "--causal",
        dest="mask",
        action="store_const",
        const="causal",
        help="causal only (same as --mask causal)",
    )
    p.add_argument(
        "--no-causal",
        dest="mask",
        action="store_const",
        const="noncausal",
        help="non-causal only (same as --mask noncausal)",
    )
    p.add_argument(
        "--forms",
        nargs="+",
        choices=["rotary", "blockw"],
        default=["rotary", "blockw"],
        help="fastrope position forms to time",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="fastrope num_threads and torch.set_num_threads",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed samples wanted per measurement")
    p.add_argument(
        "--min-repeats", type=int, default=2, help="samples kept even when a round exceeds --budget"
    )
    p.add_argument(
        "--fill",
        type=float,
        default=3.0,
        help="after --repeats samples, more rounds until the timed calls of a (grid point, pass, "
        "group) took this many seconds (fast points get many samples: single calls on a shared "
        "VM slow down 2x now and then, for every library alike)",
    )
    p.add_argument("--max-repeats", type=int, default=31, help="most samples taken to reach --fill")
    p.add_argument(
        "--prime-below",
        type=float,
        default=0.25,
        help="calls shorter than this (s) are preceded by an untimed call of the same function, "
        "so that they are timed with the cores awake (0: never)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=25.0,
        help="seconds per (grid point, pass) before stopping early at --min-repeats",
    )
    p.add_argument(
        "--warmup-below",
        type=float,
        default=1.0,
        help="discard the first round as warm-up when it took less than this (s)",
    )
    p.add_argument("--blockw-max-n", type=int, default=4096, help="largest n timed for BlockW")
    p.add_argument("--bwd-max-n", type=int, default=4096, help="largest n timed for the backward")
    p.add_argument("--bwd-all", action="store_true", help="backward at every n (incl. 16384)")
    p.add_argument(
        "--blockw-bwd-max-n",
        type=int,
        default=None,
        help="largest n for the BlockW backward (default: --bwd-max-n; it is the "
        "slowest kernel, about 1 min per call at n=4096, d=128)",
    )
    p.add_argument("--no-backward", action="store_true")
    p.add_argument(
        "--max-load",
        type=float,
        default=0.0,
        help="before each grid point wait until the 1-min load average is below this "
        "(0: never wait)",
    )
    p.add_argument("--max-wait", type=float, default=60.0, help="longest wait for --max-load (s)")
    p.add_argument(
        "--no-snapshot",
        action="store_true",
        help="import fastrope in place instead of from a private copy (a rebuild of "
        "the extension during the run then crashes it with SIGBUS)",
    )
    p.add_argument("--no-sdpa", action="store_true", help="skip torch even if importable")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write all samples and metadata here")
    p.add_argument("--markdown", default=None, help="write the results table as markdown here")
    p.add_argument("--plot", default=None, help="write a log-log time-vs-n PNG here")
    p.add_argument(
        "--from-json",
        "--plot-from",
        dest="from_json",
        default=None,
        help="no timing: re-render the table (and --plot, --markdown) from a --json file",
    )
    p.add_argument(
        "--numpy-n",
        type=int,
        default=2048,
        help="n of the BlockW forward against a naive NumPy general-W forward, d=64, one head "
        "(0: skip)",
    )
    p.add_argument(
        "--rss-n",
        type=int,
        default=65536,
        help="n of the extra-resident-memory measurement (d=64, one head, in a subprocess; "
        "0: skip)",
    )
    p.add_argument(
        "--extras-only",
        action="store_true",
        help="only the NumPy comparison and the memory measurement, no grid",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=0.02,
        help="seconds of sleep before every timed call (torch's OpenMP threads spin for a few ms "
        "after each op and would take a core from the next call)",
    )
    p.add_argument(
        "--no-peak",
        action="store_true",
        help="skip the float32 matmul peak (torch.mm 4096^2, at the start and the end)",
    )
    p.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    a = p.parse_args(argv)
    if a.quick:
        a.n, a.d, a.heads, a.repeats, a.min_repeats, a.budget = [256, 512], [64], 2, 3, 1, 5.0
        a.numpy_n, a.rss_n, a.no_peak, a.fill = 256, 4096, True, 0.0
    if a.bwd_all:
        a.bwd_max_n = max(a.n)
    if a.blockw_bwd_max_n is None:
        a.blockw_bwd_max_n = a.bwd_max_n
    return a


def masks(a):
    return {"both": [False, True], "causal": [True], "noncausal": [False]}[a.mask]


# --------------------------------------------------------------------------------------------------


def max_diff(x, y) -> float:
    return float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))


def bench_point(a, n, d, causal, torch, records, rows):
    import fastrope

    T = a.threads
    B, H, dt = a.batch, a.heads, a.dtype
    q, k, v = C.make_qkv(B, H, n, d, dt, seed=a.seed)
    rot = fastrope.Rotary()
    forms = {"rotary": rot}
    if "blockw" in a.forms and n <= a.blockw_max_n:
        forms["blockw"] = fastrope.BlockW(C.rotary_blocks(n, d, dt))
    if "rotary" not in a.forms:
        forms.pop("rotary")
    angles = C.rope_angles(n, d)
    use_sdpa = torch is not None and not a.no_sdpa
    if use_sdpa:
        import torch.nn.functional as F

        qr = torch.from_numpy(C.rotate_interleaved(q, angles))
        kr = torch.from_numpy(C.rotate_interleaved(k, angles))
        vt = torch.from_numpy(v)

    # ---- forward
    fns = {}
    for name, w in forms.items():
        fns[name] = lambda w=w: fastrope.attention(
            q, k, v, w, causal=causal, method="exact", return_lse=True, num_threads=T
        )
    if use_sdpa:

        def sdpa_fwd():
            with torch.inference_mode():
                return F.scaled_dot_product_attention(qr, kr, vt, is_causal=causal)

        fns["sdpa"] = sdpa_fwd
    load0 = C.loadavg()
    samples, first = time_groups(a, fns)
    checks = {}
    if use_sdpa:
        ref = first["sdpa"].numpy()
        for name in forms:
            checks[name] = {"out": max_diff(first[name][0], ref)}
    if "rotary" in forms and "blockw" in forms:
        checks["blockw_vs_rotary"] = {"out": max_diff(first["blockw"][0], first["rotary"][0])}
    emit(a, n, d, causal, "fwd", samples, checks, load0, records, rows)
    fwd_results = {name: first[name] for name in forms}
    del first

    # ---- backward
    if a.no_backward or n > a.bwd_max_n:
        return
    rng = np.random.default_rng(a.seed + 1)
    dout = rng.standard_normal((B, H, n, d)).astype(dt)
    fns = {}
    for name, w in forms.items():
        if name == "blockw" and n > a.blockw_bwd_max_n:
            continue
        o, lse = fwd_results[name]
        fns[name] = lambda w=w, o=o, lse=lse: fastrope.attention_grad(
            q, k, v, w, dout, causal=causal, method="exact", out=o, lse=lse, num_threads=T
        )
    if use_sdpa:
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (qr, kr, vt))
        out_t = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)
        dout_t = torch.from_numpy(dout)

        def sdpa_bwd():
            qg.grad = kg.grad = vg.grad = None
            out_t.backward(dout_t, retain_graph=True)
            return qg.grad, kg.grad, vg.grad

        fns["sdpa"] = sdpa_bwd
    if not fns:
        return
    load0 = C.loadavg()
    samples, first = time_groups(a, fns)
    checks = {}
    if use_sdpa:
        tq, tk, tv = (g.numpy() for g in first["sdpa"])
        for name in fns:
            if name == "sdpa":
                continue
            g = first[name]
            # q_rot = R q  =>  dL/dq_rot = R dL/dq  (R orthogonal)
            checks[name] = {
                "dq": max_diff(C.rotate_interleaved(g.dq, angles), tq),
                "dk": max_diff(C.rotate_interleaved(g.dk, angles), tk),
                "dv": max_diff(g.dv, tv),
            }
    emit(a, n, d, causal, "bwd", samples, checks, load0, records, rows)
    if use_sdpa:
        del out_t, qg, kg, vg


def time_groups(a, fns):
    """Rotary and SDPA are timed together in interleaved rounds; BlockW, up to 10-30x slower,
    separately with its own budget, so its long calls do not eat the samples of the main pair."""
    samples, first = {}, {}
    groups = [
        {k: f for k, f in fns.items() if k != "blockw"},
        {k: f for k, f in fns.items() if k == "blockw"},
    ]
    for g in groups:
        if g:
            s, f = C.run_rounds(
                g,
                a.repeats,
                a.min_repeats,
                a.budget,
                a.warmup_below,
                a.settle,
                fill=a.fill,
                max_repeats=a.max_repeats,
                prime_below=a.prime_below,
            )
            samples.update(s)
            first.update(f)
    return samples, first


def emit(a, n, d, causal, pas, samples, checks, load0, records, rows):
    flops = C.attention_flops(a.batch, a.heads, n, n, d, causal, backward=(pas == "bwd"))
    med = {k: C.median(v) for k, v in samples.items()}
    point = []
    for name, ts in samples.items():
        point.append(
            {
                "n": n,
                "d": d,
                "batch": a.batch,
                "heads": a.heads,
                "dtype": a.dtype,
                "causal": causal,
                "pass": pas,
                "impl": name,
                "threads": a.threads,
                "samples_s": [round(t, 6) for t in ts],
                "median_s": med[name],
                "gflops": flops / med[name] / 1e9,
                "flops": flops,
                "speedup_vs_sdpa": (med["sdpa"] / med[name])
                if ("sdpa" in med and name != "sdpa")
                else None,
                # Median over interleaved rounds of t_sdpa / t_fastrope in the same round.
                # (BlockW is timed in rounds of its own.)
                "paired_speedup_vs_sdpa": paired(samples.get("sdpa"), ts)
                if name == "rotary"
                else None,
                "max_abs_diff_vs_sdpa": checks.get(name),
                "loadavg": load0,
            }
        )
    if "blockw_vs_rotary" in checks:
        point.append(
            {
                "n": n,
                "d": d,
                "causal": causal,
                "pass": pas,
                "impl": "check",
                "blockw_vs_rotary": checks["blockw_vs_rotary"],
            }
        )
    records.extend(point)
    row = table_row(point)
    rows.append(row)
    C.log(progress_line(row))


def paired(ref, ts):
    """Median of ``ref[r] / ts[r]`` over rounds (None unless both were timed in the same rounds)."""
    if not ref or len(ref) != len(ts):
        return None
    return C.median([x / y for x, y in zip(ref, ts)])


WIDTHS = [6, 4, 6, 4, 8, 8, 8, 8, 8, 9, 8, 8, 5, 9, 5]


def progress_line(cells):
    return "  ".join(str(c).rjust(w) for c, w in zip(cells, WIDTHS))


HEADER = [
    "n",
    "d",
    "mask",
    "pass",
    "rot ms",
    "blk ms",
    "sdpa ms",
    "rot GF/s",
    "blk GF/s",
    "sdpa GF/s",
    "rot/sdpa",
    "blk/sdpa",
    "reps",
    "max|diff|",
    "load1",
]


def table_row(point):
    """One table row from the records of one (n, d, causal, pass).  ``reps``: samples of the
    Rotary/SDPA pair, then of BlockW; ``max|diff|``: largest difference from SDPA over out (fwd) or
    dq, dk, dv (bwd), Rotary and BlockW."""
    recs = {r["impl"]: r for r in point if r["impl"] in IMPLS}
    r0 = next(iter(recs.values()))
    med = {k: r["median_s"] for k, r in recs.items()}
    flops = r0["flops"]

    def ms(k):
        return C.fmt(med[k] * 1e3, ".1f" if med[k] < 10 else ".0f") if k in med else "-"

    def gf(k):
        return C.fmt(flops / med[k] / 1e9, ".1f") if k in med else "-"

    def sp(k):
        return f"{med['sdpa'] / med[k]:.2f}x" if k in med and "sdpa" in med else "-"

    diffs = [
        max(r["max_abs_diff_vs_sdpa"].values())
        for r in recs.values()
        if r.get("max_abs_diff_vs_sdpa")
    ]
    main = [len(recs[k]["samples_s"]) for k in ("rotary", "sdpa") if k in recs]
    reps = str(min(main)) if main else ""
    if "blockw" in recs:
        reps += f"/{len(recs['blockw']['samples_s'])}"
    load0 = r0.get("loadavg")
    return [
        r0["n"],
        r0["d"],
        "causal" if r0["causal"] else "full",
        r0["pass"],
        ms("rotary"),
        ms("blockw"),
        ms("sdpa"),
        gf("rotary"),
        gf("blockw"),
        gf("sdpa"),
        sp("rotary"),
        sp("blockw"),
        reps,
        f"{max(diffs):.1e}" if diffs else "-",
        C.fmt(load0[0], ".1f") if load0 else "-",
    ]


def rows_from_records(records):
    groups: dict = {}
    for r in records:
        if r.get("impl") in IMPLS:
            groups.setdefault((r["n"], r["d"], r["causal"], r["pass"]), []).append(r)
    return [table_row(g) for g in groups.values()]


# --------------------------------------------------------------------------------------------------


def plot(records, path, title=""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in records if r.get("impl") in IMPLS]
    passes = [p for p in ("fwd", "bwd") if any(r["pass"] == p for r in recs)]
    masks_ = [m for m in (False, True) if any(r["causal"] == m for r in recs)]
    fig, axes = plt.subplots(
        len(passes), len(masks_), figsize=(6 * len(masks_), 4.2 * len(passes)), squeeze=False
    )
    colors = {"rotary": "C0", "blockw": "C2", "sdpa": "C3"}
    ds = sorted({r["d"] for r in recs})
    styles = ["-", "--", ":", "-."]
    for i, pas in enumerate(passes):
        for j, m in enumerate(masks_):
            ax = axes[i][j]
            for impl in IMPLS:
                for di, d in enumerate(ds):
                    pts = sorted(
                        (r["n"], r["median_s"])
                        for r in recs
                        if r["impl"] == impl
                        and r["d"] == d
                        and r["pass"] == pas
                        and r["causal"] == m
                    )
                    if not pts:
                        continue
                    xs, ys = zip(*pts)
                    ax.plot(
                        xs,
                        ys,
                        styles[di % 4],
                        marker="o",
                        color=colors[impl],
                        label=f"{LABEL[impl]}, d={d}",
                    )
            # an n^2 guide through the smallest SDPA point
            ref = sorted(
                (r["n"], r["median_s"])
                for r in recs
                if r["impl"] == "sdpa" and r["pass"] == pas and r["causal"] == m and r["d"] == ds[0]
            )
            if ref:
                n0, t0 = ref[0]
                xs = np.array(sorted({r["n"] for r in recs if r["pass"] == pas}), float)
                ax.plot(xs, t0 * (xs / n0) ** 2, color="0.6", lw=0.8, ls=":", label="∝ n²")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("n (= n_q = n_k)")
            ax.set_ylabel("time (s)")
            ax.set_title(
                f"{'forward' if pas == 'fwd' else 'backward'}, {'causal' if m else 'non-causal'}"
            )
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(rows):
    return C.format_table(HEADER, rows, markdown=True)


# --------------------------------------------------------------------------------------------------


def numpy_general_w(q, k, v, w, scale):
    """Naive general-W forward in NumPy, one head: per relative position δ the diagonal
    ``S[i, i - δ] = scale q_i^T W_δ k_{i-δ}`` (``w`` dense, ``(2L-1, d, d)``), then a
    materialised softmax and ``P V``. What a user without fastrope would write."""
    n, L = q.shape[0], (w.shape[0] + 1) // 2
    s = np.empty((n, n), dtype=q.dtype)
    for delta in range(-(n - 1), n):
        i0, j0 = max(delta, 0), max(-delta, 0)
        m = n - abs(delta)
        qw = q[i0 : i0 + m] @ w[delta + L - 1]
        s[np.arange(i0, i0 + m), np.arange(j0, j0 + m)] = scale * np.einsum(
            "id,id->i", qw, k[j0 : j0 + m]
        )
    s -= s.max(axis=1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=1, keepdims=True)
    return s @ v


def peak_point(a, torch):
    """The machine's float32 matmul peak in this run: ``torch.mm`` (else NumPy's ``@``) of two
    4096 x 4096 matrices with the benchmark's thread count, best of 7 (2 n^3 flops)."""
    n = 4096
    rng = np.random.default_rng(a.seed)
    x, y = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
    if torch is not None:
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)
        fn, lib = (lambda: torch.mm(tx, ty)), f"torch.mm ({torch.get_num_threads()} threads)"
    else:
        fn, lib = (lambda: x @ y), "numpy matmul"
    fn()
    best = min(C.timed(fn)[0] for _ in range(7))
    res = {"n": n, "lib": lib, "best_s": best, "gflops": 2 * n**3 / best / 1e9}
    C.log(f"# float32 matmul peak: {lib}, n={n}: {res['gflops']:.0f} GFLOP/s (best of 7)")
    return res


def numpy_point(a):
    """BlockW (and Rotary) forward against :func:`numpy_general_w`, n = a.numpy_n, d = 64, one
    head, float32, non-causal."""
    import fastrope

    n, d = a.numpy_n, 64
    q, k, v = C.make_qkv(1, 1, n, d, "float32", seed=a.seed)
    blocks = C.rotary_blocks(n, d, "float32")  # (2L-1, d/2, 2, 2)
    dense = np.zeros((blocks.shape[0], d, d), dtype=np.float32)
    for m in range(d // 2):
        dense[:, 2 * m : 2 * m + 2, 2 * m : 2 * m + 2] = blocks[:, m]
    bw = fastrope.BlockW(blocks)
    scale = 1.0 / np.sqrt(d)
    fns = {
        "numpy": lambda: numpy_general_w(q[0, 0], k[0, 0], v[0, 0], dense, scale),
        "blockw": lambda: fastrope.attention(q, k, v, bw, method="exact", num_threads=a.threads),
        "rotary": lambda: fastrope.attention(
            q, k, v, fastrope.Rotary(), method="exact", num_threads=a.threads
        ),
    }
    load0 = C.loadavg()
    samples = {}
    outs = {}
    for name, fn in fns.items():
        reps = 3 if name == "numpy" else 9
        ts = []
        # OpenBLAS's threads spin after NumPy's matmuls (and would take a core from the next
        # call): a pause first, and the settle gap before every call. Short calls are primed
        # by an untimed call, as in the grid (see `C.run_rounds`).
        time.sleep(0.5)
        t0, _ = C.timed(fn)  # warm-up
        for _ in range(reps):
            time.sleep(a.settle)
            if t0 < a.prime_below:
                fn()
            t, outs[name] = C.timed(fn)
            ts.append(t)
        samples[name] = ts
    med = {k_: C.median(t) for k_, t in samples.items()}
    res = {
        "n": n,
        "d": d,
        "heads": 1,
        "samples_s": samples,
        "median_s": med,
        "numpy_over_blockw": med["numpy"] / med["blockw"],
        "numpy_over_rotary": med["numpy"] / med["rotary"],
        "max_diff_blockw_numpy": max_diff(outs["blockw"][0, 0], outs["numpy"]),
        "loadavg": [load0, C.loadavg()],
    }
    C.log(
        f"# NumPy general-W vs fastrope, n={n} d={d} one head: numpy {med['numpy'] * 1e3:.0f} ms, "
        f"BlockW {med['blockw'] * 1e3:.1f} ms ({res['numpy_over_blockw']:.0f}x faster), "
        f"Rotary {med['rotary'] * 1e3:.1f} ms ({res['numpy_over_rotary']:.0f}x), "
        f"max|diff| {res['max_diff_blockw_numpy']:.1e}, load {load0} -> {C.loadavg()}"
    )
    return res


_RSS_CHILD = r"""
import json, sys, numpy as np
import fastrope
n, d, threads = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[5])
form, pas = sys.argv[3], sys.argv[4]
def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
rng = np.random.default_rng(0)
q, k, v, dout = (rng.standard_normal((1, 1, n, d), dtype=np.float32) for _ in range(4))
if form == "rotary":
    w = fastrope.Rotary()
else:
    th = 10000.0 ** (-2.0 * np.arange(d // 2) / d)
    ang = np.arange(-(n - 1), n)[:, None] * th
    c, s = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    w = fastrope.BlockW(np.stack([np.stack([c, s], -1), np.stack([-s, c], -1)], -2))
# Warm up on a small problem (thread pool, lazily loaded code), then count from here.
fastrope.attention(q[:, :, :256], k[:, :, :256], v[:, :, :256], fastrope.Rotary(), method="exact")
out = lse = None
if pas == "bwd":
    out, lse = fastrope.attention(q, k, v, w, method="exact", return_lse=True, num_threads=threads)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
base = status("VmRSS")
if pas == "fwd":
    res = fastrope.attention(q, k, v, w, method="exact", return_lse=True, num_threads=threads)
    outputs = sum(x.nbytes for x in res)
else:
    g = fastrope.attention_grad(
        q, k, v, w, dout, method="exact", out=out, lse=lse, num_threads=threads
    )
    outputs = sum(x.nbytes for x in (g.dq, g.dk, g.dv)) + (g.dw.nbytes if g.dw is not None else 0)
peak = status("VmHWM")
print(json.dumps({"base": base, "peak": peak, "outputs": outputs, "extra": peak - base - outputs}))
"""


def rss_point(a):
    """Extra resident memory of one call (peak RSS minus RSS before minus the outputs), in a
    fresh subprocess per (form, pass): n = a.rss_n, d = 64, one head, float32."""
    import subprocess

    res = []
    for form in ("rotary", "blockw"):
        for pas in ("fwd", "bwd"):
            r = subprocess.run(
                [sys.executable, "-c", _RSS_CHILD, str(a.rss_n), "64", form, pas, str(a.threads)],
                capture_output=True,
                text=True,
                check=False,
                # The child imports the same fastrope (the snapshot copy, when there is one).
                env=dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p)),
            )
            if r.returncode != 0:
                C.log(f"# RSS {form} {pas}: failed: {r.stderr.strip()[-300:]}")
                continue
            x = json.loads(r.stdout.strip().splitlines()[-1])
            x.update(form=form, pass_=pas, n=a.rss_n, d=64)
            res.append(x)
            C.log(
                f"# extra RSS n={a.rss_n} d=64 one head {form} {pas}: "
                f"{x['extra'] / 2**20:.1f} MiB (outputs {x['outputs'] / 2**20:.1f} MiB)"
            )
    return res


def main(argv=None):
    a = parse_args(argv)
    if a.from_json:
        with open(a.from_json) as f:
            data = json.load(f)
        table = markdown_table(rows_from_records(data["records"]))
        C.log(table)
        if a.markdown:
            with open(a.markdown, "w") as f:
                f.write(table + "\n")
        if a.plot:
            plot(data["records"], a.plot, _title(data["machine"], data["config"]))
        return 0

    snap = None if a.no_snapshot else C.snapshot_package("fastrope")
    import fastrope  # noqa: F401

    torch = None if a.no_sdpa else C.try_torch()
    C.set_threads(a.threads)
    machine = C.machine_info(a.threads)
    machine["package"] = snap or {"source": os.path.dirname(fastrope.__file__)}
    config = {
        k: v for k, v in vars(a).items() if k not in ("json", "markdown", "plot", "from_json")
    }
    C.log(f"# fastrope exact-method benchmark  {machine['date']}")
    C.log(
        f"# cpu: {machine['cpu']}, {machine['logical_cores']} logical cores, threads={a.threads}, "
        f"loadavg={machine['loadavg_start']}"
    )
    C.log(
        f"# fastrope {machine['fastrope']}, numpy {machine['numpy']}, "
        f"torch {machine['torch'] if torch is not None else 'not available (SDPA skipped)'}"
    )
    if snap:
        C.log(
            f"# extension {snap.get('extension')} built {snap.get('extension_mtime')} "
            f"sha256 {snap.get('extension_sha256')} (run from a snapshot copy)"
        )
    if torch is not None:
        C.log(f"# torch threads: {torch.get_num_threads()}")
    C.log(
        f"# batch={a.batch} heads={a.heads} dtype={a.dtype} repeats={a.repeats} "
        f"(min {a.min_repeats}, budget {a.budget}s/point, more up to {a.max_repeats} within "
        f"{a.fill}s of calls; calls under {a.prime_below}s primed by an untimed call) ; "
        f"times are medians; "
        f"speedup = t_sdpa / t_fastrope"
    )
    C.log(progress_line(HEADER))
    records, rows = [], []
    extras = {}
    if not a.no_peak:
        extras["peak"] = peak_point(a, torch)
    if a.numpy_n:
        extras["numpy"] = numpy_point(a)
    if a.rss_n:
        extras["rss"] = rss_point(a)
    t_start = time.perf_counter()
    for n in [] if a.extras_only else a.n:
        for d in a.d:
            for causal in masks(a):
                waited = C.wait_for_load(a.max_load, a.max_wait)
                if waited >= 1:
                    C.log(f"# waited {waited:.0f} s for load < {a.max_load}")
                bench_point(a, n, d, causal, torch, records, rows)
    elapsed = time.perf_counter() - t_start
    machine["loadavg_end"] = C.loadavg()
    machine["steal_s_end"] = C.cpu_steal_seconds()
    if not a.no_peak:
        extras["peak_end"] = peak_point(a, torch)
    machine["elapsed_s"] = round(elapsed, 1)
    loads = [r["loadavg"][0] for r in records if r.get("loadavg")]
    if loads:
        machine["loadavg1_min_max"] = [min(loads), max(loads)]
    C.log(f"# done in {elapsed:.0f} s; loadavg at end {machine['loadavg_end']}")
    C.log("")
    C.log(markdown_table(rows))
    if a.json:
        C.save_json(
            a.json,
            {
                "machine": machine,
                "config": config,
                "records": records,
                "extras": extras,
                "table": {"header": HEADER, "rows": rows},
            },
        )
        C.log(f"# wrote {a.json}")
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(markdown_table(rows) + "\n")
        C.log(f"# wrote {a.markdown}")
    if a.plot:
        plot(records, a.plot, _title(machine, config))
        C.log(f"# wrote {a.plot}")
    return 0


def _title(m, cfg):
    return (
        f"fastrope exact vs torch SDPA — {m['cpu']}, {cfg['threads']} threads, "
        f"batch {cfg['batch']}, heads {cfg['heads']}, {cfg['dtype']}, median times"
    )


if __name__ == "__main__":
    sys.exit(main())
