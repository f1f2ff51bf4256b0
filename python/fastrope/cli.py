"""The ``fastrope`` command line: ``demo`` (more subcommands: ``fastrope --help``).

Exit status: 0 on success, 1 when the computation failed or a check did not pass, 2 for bad
usage (argparse's convention).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, List, Optional

import numpy as np


def _time(fn: Callable[[], object], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _row(cols: List[str], widths: List[int]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cols, widths))


def demo(args: argparse.Namespace) -> int:
    """Exact RoPE attention on a Llama-sized head: results, errors against the reference, times."""
    import fastrope
    from fastrope import reference

    rng = np.random.default_rng(0)
    b, hq, hk, n, d = 1, args.heads, max(1, args.heads // 4), args.n, 128
    dtype = np.float32
    print(
        f"fastrope {fastrope.__version__} demo: Llama-sized attention, batch {b}, {hq} query heads"
        f" sharing {hk} kv heads (GQA), n = {n}, d = {d}, {np.dtype(dtype).name}, causal"
    )
    q = rng.standard_normal((b, hq, n, d)).astype(dtype)
    k = rng.standard_normal((b, hk, n, d)).astype(dtype)
    v = rng.standard_normal((b, hk, n, d)).astype(dtype)
    w = fastrope.Rotary(
        base=500000.0,
        scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    plan = fastrope.plan(q, k, v, w, causal=True)
    print("\nplanner:\n  " + str(plan).replace("\n", "\n  "))

    out, lse = fastrope.attention(q, k, v, w, causal=True, return_lse=True)
    dout = rng.standard_normal(out.shape).astype(dtype)
    t_f = _time(lambda: fastrope.attention(q, k, v, w, causal=True), args.repeats)
    t_b = _time(
        lambda: fastrope.attention_grad(q, k, v, w, dout, causal=True, out=out, lse=lse),
        args.repeats,
    )
    flops = 2 * n * n * d * hq * b  # causal: half of 4 n^2 d per head
    # Errors against the NumPy float64 reference on the first kv group (its cost is quadratic).
    m = min(n, 512)
    sl = (slice(0, 1), slice(0, hq // hk), slice(0, m))
    slk = (slice(0, 1), slice(0, 1), slice(0, m))
    o_small = fastrope.attention(q[sl], k[slk], v[slk], w, causal=True)
    g_small = fastrope.attention_grad(q[sl], k[slk], v[slk], w, dout[sl], causal=True)
    o_ref = reference.attention(q[sl], k[slk], v[slk], w, causal=True)
    g_ref = reference.attention_grad(q[sl], k[slk], v[slk], w, dout[sl], causal=True)
    err_o = float(np.abs(o_small - o_ref).max())
    err_g = max(
        float(np.abs(a - r).max() / max(1e-30, np.abs(r).max()))
        for a, r in zip(g_small[:3], g_ref[:3])
    )

    widths = [22, 12, 12, 26]
    print()
    print(_row(["what", "time (ms)", "GFLOP/s", f"error vs reference (n={m})"], widths))
    print(
        _row(
            [
                "exact forward",
                f"{t_f * 1e3:.1f}",
                f"{flops / t_f / 1e9:.1f}",
                f"max|out - ref| = {err_o:.2e}",
            ],
            widths,
        )
    )
    print(
        _row(
            [
                "exact backward",
                f"{t_b * 1e3:.1f}",
                f"{2.5 * flops / t_b / 1e9:.1f}",
                f"rel. max grad err {err_g:.2e}",
            ],
            widths,
        )
    )
    ok = err_o < 1e-4 and err_g < 1e-3 and np.isfinite(out).all()
    if args.long > 0:
        ok &= _demo_fast(args)
    print("\nresult:", "OK" if ok else "MISMATCH")
    return 0 if ok else 1


def _demo_fast(args: argparse.Namespace) -> bool:
    """A small head over a long sequence: the regime of the polynomial + FFT method."""
    import fastrope

    rng = np.random.default_rng(1)
    n, d, dv, eps = args.long, 2, 64, 1e-3
    q = rng.uniform(-1, 1, (1, n, d))
    k = rng.uniform(-1, 1, (1, n, d))
    v = rng.standard_normal((1, n, dv))
    w = fastrope.Rotary()
    r = fastrope.plan(q, k, v, w, eps, method="fast").bound_r
    q, k = q / np.sqrt(r), k / np.sqrt(r)  # bounded entries: R = 1
    print(f"\nsmall head, long sequence: n = {n}, d = {d}, d_v = {dv}, float64, eps = {eps:g}")
    plan = fastrope.plan(q, k, v, w, eps)
    print("planner:\n  " + str(plan).replace("\n", "\n  "))
    t_fast = _time(lambda: fastrope.attention(q, k, v, w, eps, method="fast"), 1)
    out = fastrope.attention(q, k, v, w, eps, method="fast")
    # Exact on two blocks of query rows (their positions via q_offset), timed and scaled to n.
    m = min(n, 512)
    err, t_rows = 0.0, 0.0
    for i in (0, n - m):
        t0 = time.perf_counter()
        ex = fastrope.attention(q[:, i : i + m], k, v, w, method="exact", q_offset=i)
        t_rows += time.perf_counter() - t0
        err = max(err, float(np.abs(out[:, i : i + m] - ex).max()))
    m *= 2
    t_exact = t_rows / m * n
    widths = [22, 14, 30]
    print()
    print(_row(["what", "time (s)", "error vs exact"], widths))
    print(_row(["fast (measured)", f"{t_fast:.2f}", f"max over {m} rows = {err:.2e}"], widths))
    print(_row(["exact", f"{t_exact:.2f}", f"(measured on {m} rows, scaled to n)"], widths))
    return err <= eps


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fastrope", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run exact RoPE attention on a Llama-sized head and check it")
    p.add_argument("--n", type=int, default=2048, help="sequence length (default 2048)")
    p.add_argument("--heads", type=int, default=8, help="query heads (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="timing repeats (best of)")
    p.add_argument(
        "--long",
        type=int,
        default=65536,
        help="sequence length of the small-head fast-method part (0 skips it; default 65536)",
    )
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, TypeError, MemoryError) as e:
        print(f"fastrope {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
