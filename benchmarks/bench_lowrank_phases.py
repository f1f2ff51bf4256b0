"""Where the time of a low-rank fast forward (or, with ``--backward``, backward) goes: each
phase against its floor.

For ``Rotary`` calls (float64, ``d_v = 64``, eps = 1e-3, q and k uniform with the certified score
bound near R = 1), one thread: the call's wall time and its native phases from
``fastrope._fastrope.profile_phases`` (opt-in timers in the Rust code); ``other`` is the rest of
the wall time (Python validation and planning glue, the hand-offs, the result arrays). Then the
same call on two threads (wall time only).

Each phase's floor is its work at rates measured in the same run: float64 GEMM (torch's
``matmul`` of 2048 x 2048 matrices, one thread and two) for flops, and one thread's copy bandwidth
(``np.copyto`` of 256 MiB arrays, bytes read plus bytes written per second) for bytes:

* plan, check: reading q, k and v once; rotate: reading q, k and writing their rotations;
* features: ``2 n r`` products at the GEMM rate (``r`` features per row, queries and keys);
* gemm: ``4 n r (d_v + 1)`` (the key states and the query products);
* diagonal (causal only): ``n b/2 (2 (d_v + 1) + 2 d + 2 g)``, the visible triangle of the
  diagonal tiles of ``b`` rows, ``g`` the degree;
* output: writing ``out`` and ``lse``.

The whole call's floor (two threads) is the larger of all flops at the two-thread GEMM rate and
the bytes every call must move (read q, k, v; write out, lse) at the copy bandwidth.

The backward (``attention_grad`` with a standard-normal ``dout``, the default relative gradient
contract) runs two passes over the same features: pass 1 the forward plus ``a S^T`` and the reverse
sweep for ``dq``, pass 2 the suffix states ``T`` of the queries, ``Φk T`` for ``dv`` and the
sweep for ``dk``. Its floors: plan and check read q, k, v, dout; rotate also writes dq, dk;
features ``4 n r`` (queries and keys, each twice); gemm ``12 n r (d_v + 1)`` (six products with
the states); backprop ``8 n r`` (the two reverse sweeps, at the GEMM rate); diagonal ``n b/2
(8 (d_v + 1) + 4 d + 8 g)`` (four products with ``[V, 1]`` or ``a`` and the two polynomials on
both passes' triangles); output writing dq, dk and dv.

    PYTHONPATH=python python benchmarks/bench_lowrank_phases.py --d 2 4 8 --log2n 16 18 20 \\
        --json benchmarks/lowrank_phases.json
    PYTHONPATH=python python benchmarks/bench_lowrank_phases.py --backward --d 2 4 8 \\
        --log2n 16 18 --masks causal --json benchmarks/lowrank_phases_backward.json
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    format_table,
    loadavg,
    log,
    machine_info,
    save_json,
    snapshot_package,
    try_torch,
)

PHASES = ("plan", "check", "rotate", "features", "gemm", "diagonal", "backprop", "output")


def gemm_rate(threads: int) -> float:
    """float64 GEMM flop/s (torch's matmul, else NumPy's) with ``threads`` threads."""
    import numpy as np

    torch = try_torch()
    n = 2048
    if torch is not None:
        torch.set_num_threads(threads)
        a = torch.rand(n, n, dtype=torch.float64)
        b = torch.rand(n, n, dtype=torch.float64)
        mm = lambda: torch.matmul(a, b)  # noqa: E731
    else:
        a, b = np.random.rand(n, n), np.random.rand(n, n)
        mm = lambda: a @ b  # noqa: E731
    mm()
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        mm()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def copy_bandwidth() -> float:
    """One thread's copy bandwidth, bytes read plus bytes written per second."""
    import numpy as np

    src = np.ones(1 << 25)  # 256 MiB
    dst = np.zeros_like(src)
    np.copyto(dst, src)
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2.0 * src.nbytes / best


def diagonal_rows(r: int, d: int, g: int, dv: int, backward: bool = False) -> int:
    """The causal forward's rows per block (``forward_block`` in the Rust code), or the
    backward's (``block_rows``)."""
    cols = dv + 1
    if backward:
        balance = r * (6.0 * cols + 12.0) / (4.0 * d + 2.0 * g + 4.0 * cols + 10.0)
    else:
        balance = 4.0 * r * cols / (d + g + cols)
    return min(max(math.ceil(balance / 16.0) * 16, 32), 256)


def inputs(n: int, d: int, dv: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    q = rng.uniform(-1, 1, (1, n, d)) / d**0.25
    k = rng.uniform(-1, 1, (1, n, d)) / d**0.25
    v = rng.uniform(-1, 1, (1, n, dv))
    return q, k, v


def measure(
    fastrope, n: int, d: int, dv: int, causal: bool, repeat: int, backward: bool = False
) -> dict:
    import numpy as np

    nat = fastrope._fastrope
    q, k, v = inputs(n, d, dv)
    w = fastrope.Rotary(d)
    kw = dict(w=w, causal=causal, method="fast", eps=1e-3)
    if backward:
        dout = np.random.default_rng(1).standard_normal(q.shape[:-1] + (dv,))
        p = fastrope.plan(q, k, v, backward=True, dout=dout, **kw)

        def call(threads):
            return fastrope.attention_grad(q, k, v, dout=dout, num_threads=threads, **kw)

    else:
        p = fastrope.plan(q, k, v, **kw)

        def call(threads):
            return fastrope.attention(q, k, v, num_threads=threads, **kw)

    call(1)  # warm-up
    one = None
    for _ in range(repeat):
        nat.profile_phases(True)
        t = time.perf_counter()
        call(1)
        t = time.perf_counter() - t
        ph = nat.profile_phases(False)
        if one is None or t < one[0]:
            one = (t, ph)
    two = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        call(2)
        two = min(two, time.perf_counter() - t)
    wall1, ph = one
    return {
        "n": n,
        "d": d,
        "dv": dv,
        "causal": causal,
        "backward": backward,
        "degree": p.degree,
        "features": p.terms,
        "wall_1": wall1,
        "wall_2": two,
        "phases_1": {name: ph.get(name, 0.0) for name in PHASES},
    }


def floors(pt: dict, rate1: float, rate2: float, bw: float) -> dict:
    n, d, dv, r, g = pt["n"], pt["d"], pt["dv"], pt["features"], pt["degree"]
    cols = dv + 1
    bwd = pt.get("backward", False)
    qkv = 8.0 * n * (2 * d + dv + (dv if bwd else 0))
    flops = {
        "features": (4.0 if bwd else 2.0) * n * r,
        "gemm": (12.0 if bwd else 4.0) * n * r * cols,
        "diagonal": 0.0,
        "backprop": 8.0 * n * r if bwd else 0.0,
    }
    if pt["causal"]:
        b = diagonal_rows(r, d, g, dv, bwd)
        per_row = (8.0 * cols + 4.0 * d + 8.0 * g) if bwd else (2.0 * cols + 2.0 * d + 2.0 * g)
        flops["diagonal"] = n * b / 2.0 * per_row
    out_bytes = 8.0 * n * ((2 * d + dv) if bwd else (dv + 1))
    f1 = {
        "plan": qkv / bw,
        # a plan made from these arrays in the same call skips the scan (then only the views
        # are made: a few microseconds, and no floor)
        "check": qkv / bw if pt["phases_1"]["check"] > 0.01 * qkv / bw else 0.0,
        "rotate": 8.0 * 4 * n * d / bw,
        "features": flops["features"] / rate1,
        "gemm": flops["gemm"] / rate1,
        "diagonal": flops["diagonal"] / rate1,
        "backprop": flops["backprop"] / rate1,
        "output": out_bytes / bw,
    }
    if bwd:
        f1["rotate"] *= 2.0
    total2 = max(sum(flops.values()) / rate2, (qkv + out_bytes) / bw)
    return {"phases_1": f1, "total_1": sum(f1.values()), "total_2": total2}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, nargs="+", default=[2, 4, 8], help="head dimensions")
    ap.add_argument("--log2n", type=int, nargs="+", default=[16, 18, 20], help="log2 of n")
    ap.add_argument(
        "--masks", nargs="+", default=["none", "causal"], choices=["none", "causal"]
    )
    ap.add_argument("--dv", type=int, default=64, help="value dimension")
    ap.add_argument("--repeat", type=int, default=3, help="calls per point (best is kept)")
    ap.add_argument("--backward", action="store_true", help="time the fast backward instead")
    ap.add_argument("--json", help="write the measurements here")
    ap.add_argument("--from-json", help="render an earlier run's JSON, measure nothing")
    args = ap.parse_args(argv)
    if args.from_json:
        import json

        with open(args.from_json) as f:
            saved = json.load(f)
        m = saved["machine"]
        rate1, rate2, bw = m["gemm_flops_1"], m["gemm_flops_2"], m["copy_bytes_per_s"]
        for pt in saved["points"]:
            pt["floors"] = floors(pt, rate1, rate2, bw)
        print(render(saved["points"]))
        return

    src = snapshot_package()
    import fastrope

    info = machine_info(2)
    info["package"] = src
    rate1, rate2, bw = gemm_rate(1), gemm_rate(2), copy_bandwidth()
    info.update(gemm_flops_1=rate1, gemm_flops_2=rate2, copy_bytes_per_s=bw)
    log(
        f"GEMM {rate1 / 1e9:.1f} GFLOP/s (1 thread), {rate2 / 1e9:.1f} (2 threads); "
        f"copy {bw / 1e9:.1f} GB/s (1 thread); load {loadavg()}"
    )
    points = []
    for d in args.d:
        for e in args.log2n:
            for mask in args.masks:
                pt = measure(
                    fastrope, 1 << e, d, args.dv, mask == "causal", args.repeat, args.backward
                )
                pt["floors"] = floors(pt, rate1, rate2, bw)
                pt["load"] = loadavg()
                points.append(pt)
                log(
                    f"d={d} n=2^{e} {mask}: {pt['wall_1'] * 1e3:.1f} ms (1 thread), "
                    f"{pt['wall_2'] * 1e3:.1f} ms (2); load {pt['load']}"
                )
    info["loadavg_end"] = loadavg()
    print()
    print(render(points), flush=True)
    if args.json:
        save_json(args.json, {"machine": info, "points": points})


def render(points) -> str:
    def ms(x):
        return f"{x * 1e3:.1f}"

    header = ["d", "n", "mask", "g, r"]
    header += [f"{p} (floor)" for p in PHASES]
    header += ["other", "1 thread (floor)", "2 threads (floor)", "x floor"]
    rows = []
    for pt in points:
        fl = pt["floors"]
        ph = pt["phases_1"]
        other = pt["wall_1"] - sum(ph.values())
        row = [
            str(pt["d"]),
            f"2^{int(math.log2(pt['n']))}",
            "causal" if pt["causal"] else "none",
            f"{pt['degree']}, {pt['features']}",
        ]
        for name in PHASES:
            if (name == "diagonal" and not pt["causal"]) or (
                name == "backprop" and not pt.get("backward")
            ):
                row.append("-")
            else:
                row.append(f"{ms(ph.get(name, 0.0))} ({ms(fl['phases_1'][name])})")
        row.append(ms(other))
        row.append(f"{ms(pt['wall_1'])} ({ms(fl['total_1'])})")
        row.append(f"{ms(pt['wall_2'])} ({ms(fl['total_2'])})")
        row.append(f"{pt['wall_2'] / fl['total_2']:.1f}")
        rows.append(row)
    return format_table(header, rows, markdown=True)


if __name__ == "__main__":
    main()
