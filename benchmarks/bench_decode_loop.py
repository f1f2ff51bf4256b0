#!/usr/bin/env python
"""Benchmark token generation through a stack of decoder layers: the time per generated token
(one step through every layer) with fastrope's torch module against the same stack written the
Hugging Face way with PyTorch's ``scaled_dot_product_attention``.

Each layer of the stack (hidden size ``heads x d``, float32, batch 1) does what a Llama
attention block does in a generation step: a QKV projection of the step's hidden state, RoPE on
the new query and key, the KV cache update,
attention of the one query row against the whole cache, the output projection and the residual
add (with the layer's input RMSNorm). The variants differ in the attention and the cache:

* ``fastrope``: :class:`fastrope.torch.RopeAttention` (``Rotary()``) with a
  :class:`fastrope.torch.KVCache`: the module rotates the new key once, keeps the cache rotated
  (appended in place: the cache's storage doubles when full) and attends with ``w=None`` (a
  call of the plain-call path);
* ``sdpa``: RoPE with torch ops on the new query and key (cos/sin tables precomputed, as
  Hugging Face's rotary embedding module does), the cache extended by ``torch.cat`` (as Hugging
  Face's ``DynamicCache`` does), then ``scaled_dot_product_attention(q, k_cache, v_cache)``
  (``enable_gqa`` for grouped heads);
* ``sdpa_static``: the same with a preallocated cache written in place (as Hugging Face's
  ``StaticCache``), SDPA on the view of its filled rows: the attention alone against fastrope's.

A sample runs ``--steps`` generation steps from a cache of ``n_k - 1`` keys (refilled, untimed,
before each sample), all under ``inference_mode``; the variants alternate sample by sample, so
each sees the other's thread hand-over as a model that mixes the libraries would. Reported: the
median time per step (all layers), its ratio, and the largest difference between the two
stacks' final hidden states.

Example::

    PYTHONPATH=python python benchmarks/bench_decode_loop.py --layers 32 --nk 512 2048
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

HEADER = ["layers", "heads", "n_k", "steps", "sdpa ms/step", "sdpa_static ms/step"]
HEADER += ["fastrope ms/step", "sdpa/fastrope", "static/fastrope", "attention ms/step"]
HEADER += ["max|diff|", "samples", "load1"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=32, help="decoder layers in the stack")
    p.add_argument("--heads", default="8/8/64", help="query heads / kv heads / head dim")
    p.add_argument("--nk", type=int, nargs="+", default=[512, 2048], help="cache length")
    p.add_argument("--steps", type=int, default=8, help="generation steps per timed sample")
    p.add_argument("--samples", type=int, default=15, help="timed samples per variant")
    p.add_argument("--threads", type=int, default=2, help="threads of torch and of fastrope")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    a = p.parse_args(argv)
    if a.quick:
        a.layers, a.nk, a.steps, a.samples = 2, [64], 2, 3
    return a


def build(torch, a, hq, hk, d, nk):
    import fastrope
    import fastrope.torch as ft

    hid = hq * d
    gen = torch.Generator().manual_seed(a.seed)
    layers = []
    for _ in range(a.layers):
        layers.append(
            {
                "w_qkv": torch.randn(hid, (hq + 2 * hk) * d, generator=gen) / hid**0.5,
                "w_o": torch.randn(hq * d, hid, generator=gen) / (hq * d) ** 0.5,
                # the cache before the timed steps: rotated keys (both variants keep it so)
                "k0": torch.randn(1, hk, nk - 1, d, generator=gen),
                "v0": torch.randn(1, hk, nk - 1, d, generator=gen),
            }
        )
    x0 = torch.randn(1, hid, generator=gen)
    rot = fastrope.Rotary()
    # RoPE tables of every position the steps reach (interleaved pairs, as Rotary's default).
    theta, _ = rot.frequencies(d)
    pos = torch.arange(nk + a.steps, dtype=torch.float64)[:, None] * torch.from_numpy(theta)
    cos, sin = pos.cos().float(), pos.sin().float()
    modules = [ft.RopeAttention(rot, num_threads=a.threads) for _ in layers]
    F = torch.nn.functional
    gqa = {"enable_gqa": True} if hq != hk else {}

    def split(x, lay):
        # the layer's input RMSNorm (unit weights), as Llama's, keeps the stack's scale
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        qkv = x @ lay["w_qkv"]
        q = qkv[:, : hq * d].reshape(1, hq, 1, d)
        k = qkv[:, hq * d : (hq + hk) * d].reshape(1, hk, 1, d)
        v = qkv[:, (hq + hk) * d :].reshape(1, hk, 1, d)
        return q, k, v

    def rope(x, p):
        c, s = cos[p], sin[p]
        xp, xr = x[..., 0::2], x[..., 1::2]
        return torch.stack([xp * c - xr * s, xp * s + xr * c], dim=-1).flatten(-2)

    def fresh():
        caches = []
        for lay in layers:
            cache = ft.KVCache()
            cache._claim(True, 0)
            cache.update(lay["k0"], lay["v0"])
            caches.append(cache)
        return caches

    def run_fastrope(caches, steps):
        x = x0
        for _ in range(steps):
            for lay, mod, cache in zip(layers, modules, caches):
                q, k, v = split(x, lay)
                o = mod(q, k, v, cache=cache)
                x = x + o.reshape(1, hq * d) @ lay["w_o"]
        return x

    def fresh_sdpa():
        return [[lay["k0"].clone(), lay["v0"].clone()] for lay in layers]

    def run_sdpa(caches, steps):
        x = x0
        for _ in range(steps):
            for lay, kv in zip(layers, caches):
                q, k, v = split(x, lay)
                p = kv[0].shape[-2]
                q, k = rope(q, p), rope(k, p)
                kv[0] = torch.cat([kv[0], k], dim=-2)
                kv[1] = torch.cat([kv[1], v], dim=-2)
                o = F.scaled_dot_product_attention(q, kv[0], kv[1], **gqa)
                x = x + o.reshape(1, hq * d) @ lay["w_o"]
        return x

    def fresh_static():
        caches = []
        for lay in layers:
            k = lay["k0"].new_empty(lay["k0"].shape[:-2] + (nk + a.steps, d))
            v = torch.empty_like(k)
            k[..., : nk - 1, :], v[..., : nk - 1, :] = lay["k0"], lay["v0"]
            caches.append((k, v))
        return caches

    def run_static(caches, steps):
        x = x0
        for step in range(steps):
            p = nk - 1 + step
            for lay, (kc, vc) in zip(layers, caches):
                q, k, v = split(x, lay)
                q, k = rope(q, p), rope(k, p)
                kc[..., p : p + 1, :], vc[..., p : p + 1, :] = k, v
                o = F.scaled_dot_product_attention(
                    q, kc[..., : p + 1, :], vc[..., : p + 1, :], **gqa
                )
                x = x + o.reshape(1, hq * d) @ lay["w_o"]
        return x

    def run_proj(caches, steps):
        """The stack without attention (projections and residuals only)."""
        x = x0
        for _ in range(steps):
            for lay in layers:
                q, _, _ = split(x, lay)
                x = x + q.reshape(1, hq * d) @ lay["w_o"]
        return x

    return {
        "fastrope": (fresh, run_fastrope),
        "sdpa": (fresh_sdpa, run_sdpa),
        "sdpa_static": (fresh_static, run_static),
        "projections": (fresh_sdpa, run_proj),
    }


def bench_point(torch, a, hq, hk, d, nk):
    variants = build(torch, a, hq, hk, d, nk)
    load0 = C.loadavg()
    times: dict = {n: [] for n in variants}
    final = {}
    with torch.inference_mode():
        for n, (fresh, run) in variants.items():  # warm-up, and the results to compare
            final[n] = run(fresh(), a.steps)
        for _ in range(a.samples):
            for n, (fresh, run) in variants.items():
                caches = fresh()
                t0 = time.perf_counter()
                run(caches, a.steps)
                times[n].append((time.perf_counter() - t0) / a.steps)
    med = {n: C.median(ts) for n, ts in times.items()}
    diff = max(
        float((final[n] - final["sdpa"]).abs().max()) for n in ("fastrope", "sdpa_static")
    )
    att = {n: med[n] - med["projections"] for n in ("sdpa", "sdpa_static", "fastrope")}
    rec = {
        "layers": a.layers,
        "hq": hq,
        "hk": hk,
        "d": d,
        "n_k": nk,
        "steps": a.steps,
        "samples_s_per_step": times,
        "median_s_per_step": med,
        "attention_s_per_step": att,
        "max_abs_diff": diff,
        "loadavg": [load0, C.loadavg()],
    }
    row = [a.layers, f"{hq}/{hk}/{d}", nk, a.steps]
    row += [f"{med[n] * 1e3:.2f}" for n in ("sdpa", "sdpa_static", "fastrope")]
    row += [f"{med[n] / med['fastrope']:.2f}x" for n in ("sdpa", "sdpa_static")]
    row += [" / ".join(f"{att[n] * 1e3:.2f}" for n in ("sdpa", "sdpa_static", "fastrope"))]
    row += [f"{diff:.1e}", str(a.samples), str((load0 or ["-"])[0])]
    C.log(" | ".join(str(x) for x in row))
    return rec, row


def main(argv=None):
    a = parse_args(argv)
    torch = C.try_torch()
    if torch is None:
        C.log("torch is needed for this benchmark (pip install torch)")
        return 1
    C.set_threads(a.threads)
    machine = C.machine_info(a.threads)
    C.log(f"# fastrope decode-loop benchmark  {machine['date']}")
    C.log(
        f"# cpu: {machine['cpu']}, {machine['logical_cores']} logical cores, threads={a.threads},"
        f" torch {torch.__version__}; batch 1, float32; ms per generated token through all"
        " layers (medians); attention = median step minus the projections-only stack"
        " (sdpa / sdpa_static / fastrope)"
    )
    C.log(" | ".join(HEADER))
    hq, hk, d = (int(x) for x in a.heads.split("/"))
    records, rows = [], []
    for nk in a.nk:
        rec, row = bench_point(torch, a, hq, hk, d, nk)
        records.append(rec)
        rows.append(row)
    C.log("")
    C.log(C.format_table(HEADER, rows, markdown=True))
    if a.json:
        config = {k: v for k, v in vars(a).items() if k != "json"}
        C.save_json(a.json, {"machine": machine, "config": config, "records": records})
        C.log(f"# wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
