"""Sequence-parallel ("ring") attention across processes with torch.distributed (gloo).

The sequence is split into ``world`` contiguous shards; process ``r`` owns the queries, keys and
values at positions ``[start_r, start_{r+1})``.  Forward: each process attends its query shard to
the key shard it holds, passes that key/value shard to the next process around the ring, and
after ``world`` steps has seen every shard; the partial results merge exactly by their
log-sum-exp (:func:`fastrope.merge_partials`).  Offsets (``q_offset = start_r``, ``k_offset =
start_s``) make causal masks, windows, biases and position matrices exact across shards.

Backward (the "global statistics" route of ``fastrope/_merge.py``): each process keeps its
merged ``out`` and ``lse``; the key shards go around the ring again, together with accumulators
for their ``dk``/``dv``.  ``attention_grad(q_r, k_s, v_s, w, dout_r, out=out_r, lse=lse_r)``
gives shard ``s``'s exact contribution to ``dk_s``/``dv_s`` and an additive share of ``dq_r``,
``dw`` and ``dbias``; after ``world`` steps the accumulators are back with their owners, and
``dw``/``dbias`` are summed with one all-reduce.

    python examples/ring_attention.py --world 4 --n 4096 --heads 4 --d 64

spawns ``world`` processes, runs forward and backward, and compares every result with
single-process ``fastrope.attention``/``attention_grad``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastrope


def shard_starts(n: int, world: int) -> list:
    """Start positions of ``world`` contiguous shards of ``n`` tokens (the last one is ``n``)."""
    return [int(x) for x in np.linspace(0, n, world + 1).round()]


def _ring_exchange(bufs: list, starts: list, src: int, rank: int, world: int, shapes) -> list:
    """Send ``bufs`` (shard ``src``) to the next rank, receive shard ``src - 1`` from the last."""
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    new_src = (src - 1) % world
    size = starts[new_src + 1] - starts[new_src]
    recv = [torch.empty(shape(size), dtype=b.dtype) for b, shape in zip(bufs, shapes)]
    ops = [dist.P2POp(dist.isend, b.contiguous(), nxt) for b in bufs]
    ops += [dist.P2POp(dist.irecv, r, prv) for r in recv]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return recv


def ring_forward(q, k, v, w, *, starts: list, bias=None, causal=False, window=None,
                 num_threads: Optional[int] = None):  # fmt: skip
    """This rank's ``(out, lse)`` of attention over the whole ring; q, k, v ``(..., n_r, d)``."""
    rank, world = dist.get_rank(), dist.get_world_size()
    kw = dict(bias=bias, causal=causal, window=window, num_threads=num_threads, return_lse=True)
    kc, vc = torch.from_numpy(k), torch.from_numpy(v)
    lead_k, dv = k.shape[:-2], v.shape[-1]
    shapes = [lambda n: lead_k + (n, k.shape[-1]), lambda n: lead_k + (n, dv)]
    src, out, lse = rank, None, None
    for step in range(world):
        o, s = fastrope.attention(
            q, kc.numpy(), vc.numpy(), w, q_offset=starts[rank], k_offset=starts[src], **kw
        )
        out, lse = (o, s) if out is None else fastrope.merge_partials([out, o], [lse, s])
        if step < world - 1:
            kc, vc = _ring_exchange([kc, vc], starts, src, rank, world, shapes)
            src = (src - 1) % world
    return out, lse


def ring_backward(q, k, v, w, dout, out, lse, *, starts: list, bias=None, causal=False,
                  window=None, num_threads: Optional[int] = None):  # fmt: skip
    """``Gradients(dq, dk, dv, dw, dbias)`` for this rank's shard; dw and dbias are all-reduced."""
    rank, world = dist.get_rank(), dist.get_world_size()
    kw = dict(bias=bias, causal=causal, window=window, num_threads=num_threads, out=out, lse=lse)
    kc, vc = torch.from_numpy(k), torch.from_numpy(v)
    dkc, dvc = torch.zeros_like(kc), torch.zeros_like(vc)
    lead_k, d, d_v = k.shape[:-2], k.shape[-1], v.shape[-1]
    shape_k, shape_v = (lambda n: lead_k + (n, d)), (lambda n: lead_k + (n, d_v))
    dq = np.zeros_like(q)
    dw = dbias = None
    src = rank
    for step in range(world):
        g = fastrope.attention_grad(
            q, kc.numpy(), vc.numpy(), w, dout, q_offset=starts[rank], k_offset=starts[src], **kw
        )
        dq += g.dq
        dkc += torch.from_numpy(g.dk)
        dvc += torch.from_numpy(g.dv)
        if g.dw is not None:
            dw = g.dw if dw is None else dw + g.dw
        if g.dbias is not None:
            dbias = g.dbias if dbias is None else dbias + g.dbias
        if step < world - 1:  # k, v and their gradient accumulators move on together
            kc, vc, dkc, dvc = _ring_exchange(
                [kc, vc, dkc, dvc], starts, src, rank, world, [shape_k, shape_v] * 2
            )
        else:  # the last hop only returns the accumulators to their owner
            dkc, dvc = _ring_exchange([dkc, dvc], starts, src, rank, world, [shape_k, shape_v])
        src = (src - 1) % world
    for a in (dw, dbias):
        if a is not None:
            t = torch.from_numpy(a)
            dist.all_reduce(t)  # in place, shares memory with a
    return fastrope.Gradients(dq, dkc.numpy(), dvc.numpy(), dw, dbias)


# ------------------------------------------------------------------------------------------
# A self-checking run: every rank builds the same full problem from a seed and takes its shard
# ------------------------------------------------------------------------------------------


def make_problem(cfg: dict):
    rng = np.random.default_rng(cfg["seed"])
    b, h, hk, n, d = cfg["batch"], cfg["heads"], cfg["kv_heads"], cfg["n"], cfg["d"]
    dt = np.dtype(cfg["dtype"])
    q = rng.standard_normal((b, h, n, d)).astype(dt)
    k = rng.standard_normal((b, hk, n, d)).astype(dt)
    v = rng.standard_normal((b, hk, n, d)).astype(dt)
    dout = rng.standard_normal((b, h, n, d)).astype(dt)
    if cfg["w"] == "rotary":
        w = fastrope.Rotary(base=cfg.get("base", 10000.0))
    else:
        blocks = 0.5 * rng.standard_normal((h, 2 * n - 1, d // 2, 2, 2))
        w = fastrope.BlockW(blocks.astype(dt))
    bias = fastrope.alibi(h, n).astype(dt) if cfg["bias"] else None
    return q, k, v, dout, w, bias


def _worker(rank: int, world: int, cfgs: list, tmp: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        for i, cfg in enumerate(cfgs):
            q, k, v, dout, w, bias = make_problem(cfg)
            starts = shard_starts(cfg["n"], world)
            sl = slice(starts[rank], starts[rank + 1])
            kw = dict(starts=starts, bias=bias, causal=cfg["causal"], window=cfg["window"],
                      num_threads=cfg.get("num_threads", 1))  # fmt: skip
            t0 = time.perf_counter()
            out, lse = ring_forward(q[..., sl, :], k[..., sl, :], v[..., sl, :], w, **kw)
            t1 = time.perf_counter()
            g = ring_backward(
                q[..., sl, :], k[..., sl, :], v[..., sl, :], w, dout[..., sl, :], out, lse, **kw
            )
            t2 = time.perf_counter()
            res = dict(out=out, lse=lse, dq=g.dq, dk=g.dk, dv=g.dv, t_fwd=t1 - t0, t_bwd=t2 - t1)
            for name in ("dw", "dbias"):
                if getattr(g, name) is not None:
                    res[name] = getattr(g, name)
            np.savez(os.path.join(tmp, f"cfg{i}_rank{rank}.npz"), **res)
    finally:
        dist.destroy_process_group()


DEFAULT = dict(seed=0, batch=1, heads=4, kv_heads=2, n=37, d=8, dtype="float64", w="block",
               bias=True, causal=True, window=None)  # fmt: skip


def run(world: int = 2, *configs: dict, **overrides: Any):
    """Spawn ``world`` processes, run ring forward + backward, and compare with one process.

    With keyword overrides of :data:`DEFAULT`, runs that one problem and returns a dict: the max
    abs error of every output (``out``, ``lse``, ``dq``, ``dk``, ``dv``, ``dw``, ``dbias``) and the
    slowest rank's forward/backward seconds.  With several config dicts, runs them all in one set
    of processes and returns a list of such dicts.
    """
    cfgs = [dict(DEFAULT, **c) for c in configs] or [dict(DEFAULT, **overrides)]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, cfgs, tmp), nprocs=world, join=True)
        parts = [
            [dict(np.load(os.path.join(tmp, f"cfg{i}_rank{r}.npz"))) for r in range(world)]
            for i in range(len(cfgs))
        ]
    results = [_compare(cfg, p) for cfg, p in zip(cfgs, parts)]
    return results if configs else results[0]


def _compare(cfg: dict, parts: list) -> dict:
    q, k, v, dout, w, bias = make_problem(cfg)
    kw = dict(bias=bias, causal=cfg["causal"], window=cfg["window"])
    out, lse = fastrope.attention(q, k, v, w, return_lse=True, **kw)
    g = fastrope.attention_grad(q, k, v, w, dout, out=out, lse=lse, **kw)
    ref = dict(out=out, lse=lse, dq=g.dq, dk=g.dk, dv=g.dv, dw=g.dw, dbias=g.dbias)
    errs = {}
    for name, r in ref.items():
        if r is None:
            continue
        if name in ("dw", "dbias"):  # all-reduced: every rank holds the total
            errs[name] = max(float(np.max(np.abs(p[name] - r))) for p in parts)
            continue
        got = np.concatenate([p[name] for p in parts], axis=-1 if name == "lse" else -2)
        fin = np.isfinite(r)
        assert np.array_equal(np.isfinite(got), fin), f"{name}: -inf pattern differs"
        errs[name] = float(np.max(np.abs(got[fin] - r[fin]))) if fin.any() else 0.0
    errs["t_fwd"] = max(float(p["t_fwd"]) for p in parts)
    errs["t_bwd"] = max(float(p["t_bwd"]) for p in parts)
    return errs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, default=4, help="number of processes (2-4 on one box)")
    p.add_argument("--n", type=int, default=1024, help="sequence length")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--w", choices=["rotary", "block"], default="rotary")
    p.add_argument("--no-causal", action="store_true")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    a = p.parse_args(argv)
    errs = run(a.world, n=a.n, heads=a.heads, kv_heads=a.kv_heads, d=a.d, w=a.w,
               causal=not a.no_causal, dtype=a.dtype, bias=False)  # fmt: skip
    print(f"ring attention, {a.world} processes, n={a.n}, {a.heads} heads, d={a.d}, w={a.w}")
    for name, e in errs.items():
        print(f"  {name:6s} {e:.3g}" + (" s" if name.startswith("t_") else " (max abs error)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
