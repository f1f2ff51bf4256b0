"""Torch and fastrope thread pools together: does either deadlock or oversubscribe badly?

Times a fixed batch of fastrope torch-adapter calls (forward and backward) in four set-ups:
alone; while the main thread runs torch matmuls with ``torch.set_num_threads(T)``; in a
``DataLoader`` with 0 and with 2 (forked) workers.  Prints and saves JSON.

    python benchmarks/bench_threads.py --json benchmarks/threads_results.json
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import torch

import fastrope
import fastrope.torch as ft


def sample(i: int, n: int, heads: int, d: int):
    g = torch.Generator().manual_seed(i)
    q, k, v = (torch.randn(heads, n, d, generator=g, requires_grad=True) for _ in range(3))
    out = ft.attention(q, k, v, fastrope.Rotary(), causal=True)
    out.sum().backward()
    return out.detach()


class Samples(torch.utils.data.Dataset):
    def __init__(self, count, n, heads, d):
        self.count, self.shape = count, (n, heads, d)

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        return sample(i, *self.shape)


def timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args()
    data = Samples(a.samples, a.n, a.heads, a.d)
    torch.set_num_threads(a.torch_threads)
    rows = {}
    sample(0, a.n, a.heads, a.d)  # warm-up: pools started
    rows["alone"] = timed(lambda: [data[i] for i in range(len(data))])

    stop = threading.Event()
    matmuls = [0]

    def torch_load():
        x = torch.randn(512, 512)
        while not stop.is_set():
            x @ x
            matmuls[0] += 1

    t = threading.Thread(target=torch_load)
    t.start()
    time.sleep(0.2)
    m0 = matmuls[0]
    rows["with torch matmuls"] = timed(lambda: [data[i] for i in range(len(data))])
    stop.set()
    t.join()
    rows["matmuls during it"] = matmuls[0] - m0
    t_mm = timed(lambda: [torch.randn(512, 512) @ torch.randn(512, 512) for _ in range(50)])
    rows["50 matmuls alone"] = t_mm
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(
            data, batch_size=None, num_workers=workers, timeout=600 if workers else 0
        )
        rows[f"DataLoader, {workers} workers"] = timed(lambda ld=loader: list(ld))
    res = {
        "config": vars(a),
        "cpus": os.cpu_count(),
        "fastrope_threads": fastrope._fastrope.default_num_threads(),
        "seconds": rows,
    }
    for key, val in rows.items():
        print(f"{key:28s} {val:.3f}" if isinstance(val, float) else f"{key:28s} {val}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
