"""The fastrope command line: demo, check and bench.

  fastrope demo                 exact RoPE attention on a Llama-sized head, then the fast method
                                on a long small head, each checked against the exact result
  fastrope check q.npy k.npy    is a model's q/k in the fast method's regime? bounds, degree,
                                terms and predicted costs per head, and where the fast method pays
  fastrope bench                time the exact and the fast method over a sweep of n

Exit status: 0 on success, 1 when the computation failed or a check did not pass, 2 for bad
usage (argparse's convention).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

import numpy as np

from ._bench import best_time, text_row


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
    t_f = best_time(lambda: fastrope.attention(q, k, v, w, causal=True), args.repeats)
    t_b = best_time(
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
    print(text_row(["what", "time (ms)", "GFLOP/s", f"error vs reference (n={m})"], widths))
    print(
        text_row(
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
        text_row(
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
    t_fast = best_time(lambda: fastrope.attention(q, k, v, w, eps, method="fast"), 1)
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
    # The fast backward: dq of a query row depends on that row and every key only, so the exact
    # dq of the same two blocks of rows checks it.
    dout = rng.uniform(-1, 1, out.shape)
    t0 = time.perf_counter()
    g = fastrope.attention_grad(q, k, v, w, dout, eps, method="fast")
    t_grad = time.perf_counter() - t0
    # the relative gradient contract: max|dq_fast - dq| <= eps * S_dq (S_dq >= max|dq|)
    gp = fastrope.plan(q, k, v, w, eps, method="fast", backward=True, dout=dout)
    bound_dq = eps * gp.details["grad_scale"]["dq"]
    m_half, err_dq = m // 2, 0.0
    for i in (0, n - m_half):
        rows = slice(i, i + m_half)
        ex = fastrope.attention_grad(q[:, rows], k, v, w, dout[:, rows], method="exact", q_offset=i)
        err_dq = max(err_dq, float(np.abs(g.dq[:, rows] - ex.dq).max()))
    widths = [22, 14, 34]
    print()
    print(text_row(["what", "time (s)", "error vs exact"], widths))
    print(text_row(["fast (measured)", f"{t_fast:.2f}", f"max over {m} rows = {err:.2e}"], widths))
    print(text_row(["exact", f"{t_exact:.2f}", f"(measured on {m} rows, scaled to n)"], widths))
    print(
        text_row(
            ["fast backward", f"{t_grad:.2f}", f"dq: max over {m} rows = {err_dq:.2e}"], widths
        )
    )
    print(f"(dq certified within eps * S_dq = {bound_dq:.2e}, S_dq >= max|dq| its magnitude bound)")
    return err <= eps and err_dq <= bound_dq


def _load(path: str, name: str) -> np.ndarray:
    """An array from .npy, .npz (key ``name`` or the only array) or .pt (a tensor or a dict of
    tensors).  Files are data: nothing is unpickled (NumPy with ``allow_pickle=False``, torch
    with ``weights_only=True``), so a crafted file cannot run code; one that needs pickle is
    refused with a ValueError."""
    if path.endswith(".npy") or path.endswith(".npz"):
        try:
            data = np.load(path, allow_pickle=False)
            if path.endswith(".npy"):
                return _numeric(data, path)
            with data as z:
                if name in z.files:
                    return _numeric(z[name], path)
                if len(z.files) == 1:
                    return _numeric(z[z.files[0]], path)
                raise ValueError(
                    f"{path}: expected an array named {name!r} or a single array, got {z.files}"
                )
        except ValueError as e:
            if "allow_pickle" in str(e):
                raise ValueError(
                    f"{path}: holds pickled objects (an object array); refusing to unpickle an"
                    " input file: save a numeric array"
                ) from None
            raise
    if path.endswith(".pt"):
        try:
            import torch
        except ImportError as e:
            raise ValueError(f"{path}: reading .pt files needs torch ({e})") from None
        import pickle

        try:
            x = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"{path}: not a plain tensor file (it needs unpickling code, which fastrope"
                f" refuses for input files: torch.load(weights_only=True) said: {first})"
            ) from None
        if isinstance(x, dict):
            if not x:
                raise ValueError(f"{path}: expected a tensor or a dict of tensors, got {{}}")
            x = x[name] if name in x else next(iter(x.values()))
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{path}: expected a tensor, got {type(x).__name__}")
        return x.detach().float().numpy()
    raise ValueError(f"{path}: expected a .npy, .npz or .pt file")


def _numeric(x: np.ndarray, path: str) -> np.ndarray:
    if x.dtype.kind not in "fiub":
        raise ValueError(f"{path}: expected a numeric array, got dtype {x.dtype}")
    return x


def _heads(x: np.ndarray, name: str) -> np.ndarray:
    if x.ndim < 2:
        raise ValueError(f"{name}: expected shape (..., n, d), got {x.shape}")
    return np.asarray(x, dtype=np.float64).reshape((-1,) + x.shape[-2:])


def _sampled_scores(q, k, w, scale, rng, samples=20000) -> np.ndarray:
    """|M_ij| on random (i, j) pairs of one head, from the definition."""
    from fastrope import reference

    n_q, d = q.shape
    i = rng.integers(0, n_q, samples)
    j = rng.integers(0, k.shape[0], samples)
    if w is None:  # W_δ = I
        return np.abs(scale * np.einsum("sa,sa->s", q[i], k[j]))
    deltas, inv = np.unique(i - j, return_inverse=True)
    mats = reference.position_matrices(w, d, deltas, max_position=max(n_q, k.shape[0]))
    mats = mats.reshape((-1,) + mats.shape[-3:])[0]
    return np.abs(scale * np.einsum("sa,sab,sb->s", q[i], mats[inv], k[j]))


def _spectral_bound(q, k, w, scale) -> float:
    """``scale max|q_i| max|k_j| max_δ ||W_δ||_2``: an upper bound on every |M_ij|."""
    import fastrope

    if w is None:
        wn = 1.0  # W_δ = I
    elif isinstance(w, fastrope.Rotary):
        wn = w.frequencies(q.shape[-1])[1] ** 2
    else:
        blocks = np.asarray(w.blocks, dtype=np.float64)
        wn = float(np.linalg.norm(blocks, ord=2, axis=(-2, -1)).max())
    qn, kn = np.linalg.norm(q, axis=-1).max(), np.linalg.norm(k, axis=-1).max()
    return abs(scale) * float(qn * kn) * wn


CHECK_COLUMNS = """columns:
  R          the bound on every score |M_ij| = |scale q_i^T W_δ k_j| that the fast method would
             certify its error with (from the norms of q, k and W)
  max|M|     the largest |M_ij| on 20,000 sampled pairs (R is an upper bound of it)
  degree     the degree of the polynomial approximating exp on [-R, R] at eps
  terms      its number of monomial terms (the low-rank route's features)
  pairs      the Toeplitz route's (α, β) pairs, when that route is planned
  certified  the error the fast method guarantees (<= eps), or - when it is refused
  exact (s), fast (s)   the planner's predicted times at this n (refused: not certifiable)
  method     what method="auto" would run"""


def _fast_limit_r(d: int, n: int, dv: int, w, eps: float, v_max: float) -> Optional[float]:
    """The largest score bound R for which the fast method is still certifiable at ``eps``
    (shape-only plans, bisected on log R), or None if it is refused even at tiny R."""
    import fastrope

    def ok(r: float) -> bool:
        p = fastrope.plan(
            (1, n, d), (1, n, d), (1, n, dv), w, eps, bound_r=r, v_max=v_max, dtype=np.float64
        )
        return p.fast_seconds is not None

    lo, hi = 1e-3, 1e3
    if not ok(lo):
        return None
    if ok(hi):
        return hi
    for _ in range(30):
        mid = float(np.sqrt(lo * hi))
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def check(args: argparse.Namespace) -> int:
    """Is my model in the fast method's regime? Bounds, degree, terms and costs per head."""
    import fastrope

    plt = _pyplot() if args.plot else None  # before any work: fail early without matplotlib
    q = _heads(_load(args.q, "q"), "q")
    k = _heads(_load(args.k, "k"), "k")
    if q.shape[-1] != k.shape[-1] or q.shape[0] % k.shape[0]:
        raise ValueError(f"q {q.shape} and k {k.shape}: expected the same d and heads dividing")
    d = q.shape[-1]
    if args.w == "rotary":
        w = fastrope.Rotary(base=args.base, layout=args.layout)
    elif args.w == "none":
        w = None
    else:
        w = fastrope.BlockW(_load(args.w, "blocks"), layout=args.layout)
    scale = 1.0 / np.sqrt(d) if args.scale is None else args.scale
    rng = np.random.default_rng(0)
    group = q.shape[0] // k.shape[0]
    # Every head first, so that an error is reported before any table is printed.
    verdicts, samples, rows = [], [], []
    for h in range(q.shape[0]):
        qh, kh = q[h], k[h // group]
        vh = np.broadcast_to(np.float64(args.v_max), (kh.shape[0], args.dv))
        p = fastrope.plan(qh, kh, vh, w, args.eps, scale=scale)
        s = _sampled_scores(qh, kh, w, scale, rng)
        r = p.bound_r if p.bound_r is not None else _spectral_bound(qh, kh, w, scale)
        samples.append((s, r))
        fast_s = "refused" if p.fast_seconds is None else f"{p.fast_seconds:.3g}"
        cert = "-" if p.fast_certified_error is None else f"{p.fast_certified_error:.1e}"
        rows.append(
            [
                str(h),
                f"{r:.3g}",
                f"{s.max():.3g}",
                str(p.degree or "-"),
                str(p.terms or "-"),
                str(p.n_pairs or "-"),
                cert,
                f"{p.exact_seconds:.3g}",
                fast_s,
                p.method,
            ]
        )
        verdicts.append((p, r))
    limit = _fast_limit_r(d, q.shape[1], args.dv, w, args.eps, args.v_max)
    print(
        f"fastrope check: {q.shape[0]} heads of q {q.shape[1:]}, k {k.shape[1:]}, d = {d},"
        f" w = {args.w}, eps = {args.eps:g}, |v| <= {args.v_max:g}"
    )
    widths = [5, 8, 8, 9, 7, 8, 10, 12, 12, 10]
    head = ["head", "R", "max|M|", "degree", "terms", "pairs", "certified"]
    print(text_row(head + ["exact (s)", "fast (s)", "method"], widths))
    for row in rows:
        print(text_row(row, widths))
    print(
        "\nthe fast method is certifiable at this n and eps up to R = "
        + ("(none: refused at any R)" if limit is None else f"{limit:.3g}")
    )
    # Longer sequences with the same bounds: where would the fast method start to pay?
    worst = max(r for _, r in verdicts)
    print(f"\nat longer n (R = {worst:.3g}, one head, d_v = {args.dv}):")
    crossover = None
    for e in range(int(np.log2(max(q.shape[1], 2))), 21):
        n = 1 << e
        p = fastrope.plan(
            (1, n, d),
            (1, n, d),
            (1, n, args.dv),
            w,
            args.eps,
            bound_r=worst,
            v_max=args.v_max,
            dtype=np.float64,
        )
        fast = "refused" if p.fast_seconds is None else f"{p.fast_seconds:.3g} s"
        print(f"  n = 2^{e:<3d} exact {p.exact_seconds:10.3g} s   fast {fast:>10}   -> {p.method}")
        if p.method == "fast" and crossover is None:
            crossover = n
    why = verdicts[0][0].why
    if crossover is not None:
        print(
            f"\nrecommendation: the fast method applies (R = {worst:.3g}); it is predicted to pay"
            f" from n = {crossover} on. Use eps={args.eps:g} and method='auto'."
        )
    else:
        print(
            f"\nrecommendation: use the exact method; the fast method does not pay up to n = 2^20"
            f" here ({why})."
        )
    print("\n" + CHECK_COLUMNS)
    if plt is not None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        colors = plt.get_cmap("tab10").colors
        for h, (s, r) in enumerate(samples[:10]):
            c = colors[h % len(colors)]
            ax.hist(s, bins=60, histtype="step", color=c, label=f"head {h} (R = {r:.3g})")
            if r:
                ax.axvline(r, linestyle="--", color=c, linewidth=0.9)
        if limit is not None:
            label = f"fast method's limit R = {limit:.3g}"
            ax.axvline(limit, color="red", linewidth=2, label=label)
        ax.set_xlabel("|M_ij| on sampled pairs (dashed: each head's certified bound R)")
        ax.set_ylabel("count")
        ax.set_title(f"fastrope check: n = {q.shape[1]}, d = {d}, eps = {args.eps:g}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"histogram saved to {args.plot}")
    return 0


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib (pip install matplotlib)") from None
    return plt


def bench(args: argparse.Namespace) -> int:
    """Time exact and fast over a sweep of n; print, save JSON and a log-log plot."""
    import json

    from fastrope import _bench

    plt = _pyplot() if args.plot else None  # before any work: fail early without matplotlib
    ns = [1 << e for e in range(args.n_exp[0], args.n_exp[1] + 1)]
    try:
        from tqdm import tqdm

        progress = tqdm(total=len(ns) * len(args.methods), desc="fastrope bench", unit="run")
    except ImportError:
        progress = None
    # With a progress bar, lines go through tqdm.write so that the bar does not cut them.
    rows = _bench.sweep(
        ns,
        d=args.d,
        dv=args.dv,
        form=args.form,
        eps=args.eps,
        methods=args.methods,
        max_seconds=args.max_seconds,
        rng=np.random.default_rng(0),
        say=print if progress is None else progress.write,
        tick=None if progress is None else lambda: progress.update(1),
    )
    if progress is not None:
        progress.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"command": "fastrope bench", "args": vars(args) | {"func": None}, "rows": rows},
                f,
                indent=1,
                default=str,
            )
        print(f"results saved to {args.json}")
    if plt is not None:
        title = f"{args.form}, d = {args.d}, d_v = {args.dv}, eps = {args.eps:g}"
        _bench.plot_sweep(plt, rows, args.methods, title, args.plot)
        print(f"plot saved to {args.plot}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fastrope",
        description=__doc__.split("\n\nExit status")[0],
        epilog="Exit status: 0 success, 1 failed computation or check, 2 bad usage.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    c = sub.add_parser(
        "check",
        help="does the fast method apply to my model? bounds, degree, terms and costs per head",
        description="Reads q and k (e.g. captured from one layer of your model), computes the"
        " certified score bound R per head, the polynomial degree and term count the fast method"
        " would need, predicted time and memory of both methods at this n and at longer n, and"
        " recommends one.",
        epilog=CHECK_COLUMNS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("q", help="queries (..., n, d): .npy, .npz or .pt")
    c.add_argument("k", help="keys (..., n, d): .npy, .npz or .pt")
    c.add_argument(
        "--w",
        default="rotary",
        help="'rotary', 'none' (W = I: q, k already rotated) or a BlockW blocks file"
        " (2L-1, d/2, 2, 2)",
    )
    c.add_argument("--base", type=float, default=10000.0, help="rotary base (default 10000)")
    c.add_argument("--layout", default="interleaved", choices=["interleaved", "half"])
    c.add_argument("--eps", type=float, default=1e-3, help="error allowed per output entry")
    c.add_argument("--scale", type=float, default=None, help="score scale (default 1/sqrt(d))")
    c.add_argument("--v-max", type=float, default=1.0, help="bound on |v| (default 1)")
    c.add_argument("--dv", type=int, default=64, help="value dim for the longer-n predictions")
    c.add_argument("--plot", metavar="PNG", help="save a histogram of sampled |M_ij| against R")
    c.set_defaults(func=check)
    b = sub.add_parser(
        "bench",
        help="time exact and fast over a sweep of n (JSON, log-log plot)",
        description="Times the exact and the fast method on one head with bounded random inputs"
        " (q and k scaled so that the certified score bound R is about 1) for n = 2^LO ... 2^HI,"
        " next to the planner's predictions and the fast method's measured error against exact."
        " The full benchmarks, with their report, are in the repository's benchmarks/.",
    )
    b.add_argument(
        "--n-exp",
        type=int,
        nargs=2,
        default=[10, 16],
        metavar=("LO", "HI"),
        help="n = 2^LO ... 2^HI (default 10 16)",
    )
    b.add_argument("--d", type=int, default=2, help="head dim (default 2)")
    b.add_argument("--dv", type=int, default=64, help="value dim (default 64)")
    b.add_argument(
        "--form",
        choices=["rotary", "blockw"],
        default="rotary",
        help="the position matrix: RoPE, or a random BlockW table (default rotary)",
    )
    b.add_argument(
        "--eps", type=float, default=1e-3, help="the fast method's error bound (default 1e-3)"
    )
    b.add_argument(
        "--methods",
        nargs="+",
        choices=["exact", "fast"],
        default=["exact", "fast"],
        help="which methods to time (default: both)",
    )
    b.add_argument(
        "--max-seconds",
        type=float,
        default=60.0,
        help="skip a run the planner predicts to take longer (default 60)",
    )
    b.add_argument("--json", metavar="FILE", help="save the results as JSON")
    b.add_argument("--plot", metavar="PNG", help="save a log-log plot of time vs n")
    b.set_defaults(func=bench)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, TypeError, MemoryError, OSError) as e:
        print(f"fastrope {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
