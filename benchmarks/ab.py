"""A/B two builds of fastrope on a fixed set of calls, the builds alternated.

Each round runs every case once per build, each build in its own process (its package directory
first on ``sys.path``), in the order A, B, B, A, ... so that drifts of a shared machine hit both
alike. A case's time is the best of ``--repeat`` calls inside the process after one warm-up.
Prints per case the best time of each build over the rounds and the ratio B / A.

    python benchmarks/ab.py --a /path/to/old/python --b python --rounds 3
    python benchmarks/ab.py --a /path/to/old/python --b python --cases lowrank --rounds 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CASES = {
    # name: (kwargs of the call, n, d, dv, w)
    "exact rotary n=4096 d=64 causal": dict(n=4096, d=64, dv=64, w="rotary", eps=0.0),
    "exact blockw n=2048 d=64": dict(n=2048, d=64, dv=64, w="blockw", eps=0.0),
    "fast lowrank n=2^16 d=2 causal": dict(n=1 << 16, d=2, dv=64, w="rotary", eps=1e-3),
    "fast lowrank n=2^16 d=4": dict(n=1 << 16, d=4, dv=64, w="rotary", eps=1e-3, causal=False),
    "fast toeplitz blockw n=2^14 d=2": dict(n=1 << 14, d=2, dv=64, w="blockw", eps=1e-3),
    "fast backward lowrank n=2^14 d=2": dict(
        n=1 << 14, d=2, dv=64, w="rotary", eps=1e-3, backward=True
    ),
}

# The low-rank forward's sweep (RESULTS §13): Rotary, d_v = 64, eps = 1e-3, every point of the
# issue's grid; the slowest points (d = 8 at 2^20) are left to bench_lowrank_phases.py.
LOWRANK = {
    f"fast lowrank d={d} n=2^{e} {'causal' if causal else 'none'}": dict(
        n=1 << e, d=d, dv=64, w="rotary", eps=1e-3, causal=causal
    )
    for d in (2, 4, 8)
    for e in (16, 18, 20)
    for causal in (False, True)
    if not (d == 8 and e == 20)
}

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
import fastrope
case = json.loads(sys.argv[2]); repeat = int(sys.argv[3])
n, d, dv = case["n"], case["d"], case["dv"]
rng = np.random.default_rng(0)
q = rng.uniform(-1, 1, (1, n, d)) / d**0.25
k = rng.uniform(-1, 1, (1, n, d)) / d**0.25
v = rng.uniform(-1, 1, (1, n, dv))
if case["w"] == "rotary":
    w = fastrope.Rotary(d)
else:
    th = rng.uniform(0, 0.1, d // 2)
    dl = np.arange(-(n - 1), n)[:, None] * th
    c, s = np.cos(dl), np.sin(dl)
    w = fastrope.BlockW(np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2))
kw = dict(causal=case.get("causal", True), method="exact" if case["eps"] == 0 else "fast")
if case.get("backward"):
    dout = rng.uniform(-1, 1, (1, n, dv))
    f = lambda: fastrope.attention_grad(q, k, v, w, dout, case["eps"], **kw)
else:
    f = lambda: fastrope.attention(q, k, v, w, case["eps"], **kw)
f()
best = float("inf")
for _ in range(repeat):
    t = time.perf_counter(); f(); best = min(best, time.perf_counter() - t)
print(best)
"""


def run(path: str, case: dict, repeat: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, path, json.dumps(case), str(repeat)],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, help="package directory of build A (holds fastrope/)")
    ap.add_argument("--b", required=True, help="package directory of build B")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument(
        "--cases",
        choices=["default", "lowrank"],
        default="default",
        help="the six fixed calls, or the low-rank forward's sweep (d = 2/4/8, n = 2^16..2^20)",
    )
    args = ap.parse_args()
    cases = CASES if args.cases == "default" else LOWRANK
    best = {name: {"a": float("inf"), "b": float("inf")} for name in cases}
    for r in range(args.rounds):
        order = ("a", "b") if r % 2 == 0 else ("b", "a")
        for name, case in cases.items():
            for which in order:
                t = run(getattr(args, which), case, args.repeat)
                best[name][which] = min(best[name][which], t)
    print(f"{'case':40s} {'A (ms)':>10s} {'B (ms)':>10s} {'B/A':>6s}")
    for name, t in best.items():
        print(f"{name:40s} {t['a'] * 1e3:10.2f} {t['b'] * 1e3:10.2f} {t['b'] / t['a']:6.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(best, f, indent=1)


if __name__ == "__main__":
    main()
