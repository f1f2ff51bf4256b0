"""Soak: a long mixed workload, to see that memory stays flat and nothing degrades.

    PYTHONPATH=python python benchmarks/soak.py --calls 100000 --json benchmarks/soak_results.json

Worker threads draw calls at random from a fixed menu: every form of ``w`` (``Rotary``,
``BlockW``, ``SparseW``, a dense table, ``None`` with a bias), both methods (exact, and the fast
method on bounded inputs), forward and backward, decode steps, packed sequences, and calls that
must fail (NaN input, a wrong shape, a ``memory_limit`` too small).  Every few thousand calls the
main thread forks a child that makes calls of its own and must exit cleanly.  The script reports
calls per second, p50/p99 latency per kind and the resident memory (RSS) sampled over time, and
exits 1 if RSS over the last tenth of the calls is more than 10% above its value after warm-up,
if a forked child failed, or if any call gave an unexpected result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import numpy as np

import fastrope


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def menu(rng: np.random.Generator) -> list:
    """``(kind, call, expect)``: ``expect`` is None (a result) or the exception type."""
    d, n, L = 16, 96, 96
    q, k, v = (rng.standard_normal((2, 4, n, d)).astype(np.float32) for _ in range(3))
    kv = k[:, :2], v[:, :2]  # GQA
    dout = rng.standard_normal((2, 4, n, d)).astype(np.float32)
    blocks = (rng.standard_normal((2 * L - 1, d // 2, 2, 2)) * 0.2).astype(np.float32)
    support = np.array([[0, 0], [1, 3], [5, 2], [7, 7]])
    sparse = fastrope.SparseW(
        support, (rng.standard_normal((2 * L - 1, 4)) * 0.2).astype(np.float32)
    )
    dense = (rng.standard_normal((2 * L - 1, d, d)) * 0.05).astype(np.float32)
    bias = fastrope.alibi(4, L).astype(np.float32)
    small = [rng.uniform(-0.3, 0.3, (1, 2, 4096, 2)) for _ in range(2)]
    vs = rng.uniform(-1, 1, (1, 2, 4096, 8))
    nan = q.copy()
    nan[0, 0, 3, 1] = np.nan
    cu = np.array([0, 30, 31, 96])
    rot = fastrope.Rotary()
    a = fastrope.attention
    g = fastrope.attention_grad
    return [
        ("rotary fwd", lambda: a(q, *kv, rot, causal=True), None),
        ("rotary bwd", lambda: g(q, *kv, rot, dout, causal=True), None),
        ("blockw fwd", lambda: a(q, k, v, fastrope.BlockW(blocks), window=(20, 0)), None),
        ("blockw bwd", lambda: g(q, k, v, fastrope.BlockW(blocks), dout, causal=True), None),
        ("sparse fwd", lambda: a(q, k, v, sparse, causal=True), None),
        ("dense bwd", lambda: g(q, k, v, dense, dout), None),
        ("none+alibi bwd", lambda: g(q, k, v, None, dout, bias=bias, causal=True), None),
        ("decode", lambda: a(q[:, :, -1:], *kv, rot, q_offset=n - 1, causal=True), None),
        ("packed", lambda: a(q, k, v, rot, causal=True, cu_seqlens_q=cu), None),
        ("fast fwd", lambda: a(*small, vs, rot, 1e-3, causal=True, method="fast"), None),
        ("fast bwd", lambda: g(*small, vs, rot, vs[..., :8], 1e-3, method="fast"), None),
        ("error nan", lambda: a(nan, k, v, rot), ValueError),
        ("error shape", lambda: a(q, k[..., :5], v, rot), ValueError),
        ("error memory", lambda: a(q, k, v, rot, memory_limit=10, method="exact"), MemoryError),
    ]


def worker(calls, items, seed, stop, stats, failures):
    rng = np.random.default_rng(seed)
    for _ in range(calls):
        if stop.is_set():
            return
        kind, fn, expect = items[rng.integers(len(items))]
        t0 = time.perf_counter()
        try:
            fn()
            if expect is not None:
                failures.append(f"{kind}: expected {expect.__name__}, got a result")
        except Exception as e:  # noqa: BLE001 - the soak records whatever happens
            if expect is None or not isinstance(e, expect):
                failures.append(f"{kind}: {type(e).__name__}: {e}")
        stats.setdefault(kind, []).append(time.perf_counter() - t0)


def fork_check(items) -> bool:
    pid = os.fork()
    if pid == 0:  # the child: a few calls of each kind, then a clean exit
        try:
            for _, fn, expect in items:
                try:
                    fn()
                except Exception as e:  # noqa: BLE001
                    if expect is None or not isinstance(e, expect):
                        os._exit(3)
            os._exit(0)
        except BaseException:  # noqa: BLE001
            os._exit(4)
    deadline = time.time() + 120
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status) == 0
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=100_000, help="calls in all (default 100000)")
    ap.add_argument("--threads", type=int, default=3, help="worker threads (default 3)")
    ap.add_argument("--forks", type=int, default=10, help="forked children during the run")
    ap.add_argument("--warmup", type=float, default=0.1, help="fraction counted as warm-up")
    ap.add_argument("--json", help="save the figures as JSON")
    a = ap.parse_args()
    items = menu(np.random.default_rng(0))
    per = a.calls // a.threads
    stats = [dict() for _ in range(a.threads)]
    failures: list = []
    stop = threading.Event()
    threads = [
        threading.Thread(target=worker, args=(per, items, i, stop, stats[i], failures))
        for i in range(a.threads)
    ]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    samples, forks_ok, fork_at = [], [], set(np.linspace(0.1, 0.9, a.forks).round(2))
    while any(t.is_alive() for t in threads):
        time.sleep(0.25)
        done = sum(len(x) for s in stats for x in s.values())
        frac = done / (per * a.threads)
        samples.append((round(time.perf_counter() - t0, 2), done, round(rss_mib(), 1)))
        due = [f for f in fork_at if frac >= f]
        if due and len(forks_ok) < a.forks:
            fork_at -= set(due)
            forks_ok.append(fork_check(items))
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    merged: dict = {}
    for s in stats:
        for kind, xs in s.items():
            merged.setdefault(kind, []).extend(xs)
    total = sum(len(x) for x in merged.values())
    print(
        f"fastrope soak: {total} calls on {a.threads} threads in {wall:.1f} s"
        f" ({total / wall:.0f} calls/s), {len(forks_ok)} forks ({sum(forks_ok)} clean)"
    )
    print(f"{'kind':<16}{'calls':>8}{'p50 ms':>10}{'p99 ms':>10}")
    rows = {}
    for kind in sorted(merged):
        xs = np.array(merged[kind]) * 1e3
        rows[kind] = dict(
            calls=len(xs), p50_ms=float(np.median(xs)), p99_ms=float(np.quantile(xs, 0.99))
        )
        print(f"{kind:<16}{len(xs):>8}{rows[kind]['p50_ms']:>10.3f}{rows[kind]['p99_ms']:>10.3f}")

    # Steady state: the median RSS over the 10% of calls after warm-up against the median over
    # the last 10% (samples taken while the workers run; transient buffers come and go).
    def median_rss(lo: float, hi: float) -> float:
        sel = [r for _, c, r in samples if lo <= c / total <= hi] or [samples[-1][2]]
        return float(np.median(sel))

    warm = median_rss(a.warmup, a.warmup + 0.1)
    late = median_rss(0.9, 1.0)
    growth = (late - warm) / warm
    print(
        f"RSS: {warm:.1f} MiB after warm-up, {late:.1f} MiB over the last 10% of calls"
        f" ({100 * growth:+.1f}%), {max(s[2] for s in samples):.1f} MiB peak"
    )
    ok = not failures and all(forks_ok) and growth <= 0.10
    for f in failures[:10]:
        print("unexpected:", f)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                dict(
                    command=" ".join(sys.argv),
                    calls=total,
                    threads=a.threads,
                    seconds=wall,
                    calls_per_second=total / wall,
                    forks=len(forks_ok),
                    forks_clean=sum(forks_ok),
                    rss_mib=dict(after_warmup=warm, last_tenth=late, samples=samples),
                    kinds=rows,
                    failures=failures[:50],
                    ok=ok,
                ),
                f,
                indent=1,
            )
    print("result:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
