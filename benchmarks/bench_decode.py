#!/usr/bin/env python
"""Benchmark a generation step (one query row per head against a KV cache of ``n_k`` keys):
fastrope's decode path against PyTorch's ``scaled_dot_product_attention``.

For each cache length and head configuration, two measurements:

**Isolated** (``ms`` columns): each variant in phases of its own (a phase times bursts of
``--burst`` back-to-back calls, as a generation step calls attention once per layer; the phases
run twice, in turn, and a variant's median is over both). Interleaving the libraries call by call
does not work here: on this 2-core VM, after another library's threads (fastrope's rayon pool,
OpenBLAS) have run, SDPA's next calls take 2-8 ms instead of 0.07 ms until its OpenMP threads are
back on the cores, so interleaved rounds measure that hand-over rather than SDPA. The variants:

* ``rotary``: ``fastrope.attention(q, k, v, Rotary(), causal=True, q_offset=n_k - 1)`` on an
  unrotated cache (fastrope rotates every cached key in each call);
* ``blockw``: ``fastrope.attention(q, k, v, BlockW(blocks), ...)`` with RoPE's blocks as a table
  (the general 2x2-block kernel, as for learned position matrices), unrotated cache;
* ``none``: ``fastrope.attention(q_rot, k_rot, v, None, ...)``: the cache holds rotated keys
  (as Hugging Face's does) and fastrope runs plain attention;
* ``torch``: the attention of a :class:`fastrope.torch.RopeAttention` step (under
  ``inference_mode``, the adapter's plain-call path) on a rotated cache: the step rotates its
  query with ``fastrope.torch.rotate`` and attends with ``w=None`` (the cache update not timed);
* ``sdpa``: ``scaled_dot_product_attention(q_rot, k_rot, v)`` under ``inference_mode`` (no mask:
  one query sees the whole cache), with ``enable_gqa=True`` for grouped heads: the call Hugging
  Face's Llama makes on CPU (``use_gqa_in_sdpa``);
* ``sdpa_rep`` (grouped heads only): the same on k and v repeated to every query head beforehand
  (untimed): SDPA's best case. ``best`` is the faster of ``sdpa`` and ``sdpa_rep``.

**Layer** (``layer`` columns): the attention inside a decoder-layer loop, as in a model: a torch
QKV projection (``hidden = heads x d``), the attention (``sdpa``, or the ``torch`` step above), the
output projection; bursts of ``--burst`` layers, the two variants interleaved round by round (the
hand-over between the libraries' threads is then part of what a user gets).

All in float32, batch 1, ``--threads`` threads for both libraries; medians; ratios are
``t_sdpa / t_fastrope`` (above 1: fastrope is faster). Every output is checked against SDPA's.

Example::

    PYTHONPATH=python python benchmarks/bench_decode.py --json benchmarks/decode_results.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

HEADER = ["n_k", "heads", "d", "rotary ms", "blockw ms", "none ms", "torch ms", "sdpa ms"]
HEADER += ["sdpa best ms"]
HEADER += ["best/rotary", "best/none", "best/torch", "layer sdpa ms", "layer fastrope ms"]
HEADER += ["layer ratio", "max|diff|", "reps", "load1"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--nk", type=int, nargs="+", default=[512, 2048, 8192, 32768])
    p.add_argument(
        "--heads",
        nargs="+",
        default=["8/8/64", "32/8/128"],
        help="query heads / kv heads / head dim (default: 8 heads of 64, and Llama-3-8B's "
        "32 query heads sharing 8 kv heads of 128)",
    )
    p.add_argument(
        "--prefill",
        type=int,
        nargs="*",
        default=[],
        help="also time causal prefills of these lengths (n query rows against n keys), the same"
        " way: fastrope with Rotary() on unrotated q/k against SDPA(is_causal) on rotated ones",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=31)
    p.add_argument("--budget", type=float, default=8.0, help="seconds per point")
    p.add_argument("--settle", type=float, default=0.02)
    p.add_argument("--burst", type=int, default=16, help="back-to-back calls per timed sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--no-snapshot", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    a = p.parse_args(argv)
    if a.quick:
        a.nk, a.heads, a.repeats, a.budget, a.burst = [256, 1024], ["4/2/64"], 5, 2.0, 4
    return a


def bench_point(a, nk, hq, hk, d, torch):
    import fastrope
    import fastrope.torch as ft

    rng = np.random.default_rng(a.seed)
    q = rng.standard_normal((1, hq, 1, d)).astype(np.float32)
    k = rng.standard_normal((1, hk, nk, d)).astype(np.float32)
    v = rng.standard_normal((1, hk, nk, d)).astype(np.float32)
    angles = C.rope_angles(nk, d)
    qr = C.rotate_interleaved(q, angles[nk - 1 :])
    kr = C.rotate_interleaved(k, angles)
    w = fastrope.Rotary()
    bw = fastrope.BlockW(C.rotary_blocks(nk, d, "float32"))
    T = a.threads
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    tqr, tkr = torch.from_numpy(qr), torch.from_numpy(kr)
    F = torch.nn.functional
    gqa = {"enable_gqa": True} if hq != hk else {}

    def sdpa():
        with torch.inference_mode():
            return F.scaled_dot_product_attention(tqr, tkr, tv, **gqa)

    def adapter():
        with torch.inference_mode():
            qr_t = ft.rotate(tq, w, nk - 1)
            return ft.attention(qr_t, tkr, tv, None, causal=True, q_offset=nk - 1, num_threads=T)

    def sdpa_rep():
        with torch.inference_mode():
            return F.scaled_dot_product_attention(tqr, tkr_rep, tv_rep)

    g = hq // hk
    tkr_rep = tkr.repeat_interleave(g, dim=1).contiguous()
    tv_rep = tv.repeat_interleave(g, dim=1).contiguous()
    fns = {
        "rotary": lambda: fastrope.attention(
            q, k, v, w, causal=True, q_offset=nk - 1, num_threads=T
        ),
        "blockw": lambda: fastrope.attention(
            q, k, v, bw, causal=True, q_offset=nk - 1, num_threads=T
        ),
        "none": lambda: fastrope.attention(
            qr, kr, v, None, causal=True, q_offset=nk - 1, num_threads=T
        ),
        "torch": adapter,
        "sdpa": sdpa,
    }
    if g > 1:
        fns["sdpa_rep"] = sdpa_rep

    load0 = C.loadavg()
    samples, first = phases(a, fns)

    # The decoder-layer loop.
    hid = hq * d
    gen = torch.Generator().manual_seed(a.seed)
    w_qkv = torch.randn(hid, (hq + 2 * hk) * d, generator=gen) / hid**0.5
    w_o = torch.randn(hq * d, hid, generator=gen) / (hq * d) ** 0.5
    x = torch.randn(1, hid, generator=gen)

    def layer(attn):
        def run():
            with torch.inference_mode():
                q_new = (x @ w_qkv)[:, : hq * d].reshape(1, hq, 1, d)
                return attn(q_new).reshape(1, hq * d) @ w_o

        return run

    def layer_sdpa(q_new):
        return F.scaled_dot_product_attention(q_new, tkr, tv, **gqa)

    def layer_fastrope(q_new):
        q_rot = ft.rotate(q_new, w, nk - 1)
        return ft.attention(q_rot, tkr, tv, None, causal=True, q_offset=nk - 1, num_threads=T)

    lay, _ = C.run_rounds(
        {
            "sdpa": burst(layer(layer_sdpa), a.burst),
            "fastrope": burst(layer(layer_fastrope), a.burst),
        },
        repeats=a.repeats,
        min_repeats=5,
        budget=a.budget,
        warmup_below=1.0,
        settle=a.settle,
    )
    lay = {n: [t / a.burst for t in s_] for n, s_ in lay.items()}
    ref = first["sdpa"].numpy()
    diff = max(
        float(np.max(np.abs(np.asarray(first[n], np.float64) - ref))) for n in fns if n != "sdpa"
    )
    med = {n: C.median(s) for n, s in samples.items()}
    best = min(med["sdpa"], med.get("sdpa_rep", med["sdpa"]))
    rec = {
        "n_k": nk,
        "hq": hq,
        "hk": hk,
        "d": d,
        "threads": T,
        "samples_s": samples,
        "median_s": med,
        "sdpa_over": {n: med["sdpa"] / med[n] for n in ("rotary", "blockw", "none", "torch")},
        "sdpa_best_over": {n: best / med[n] for n in ("rotary", "blockw", "none", "torch")},
        "layer_samples_s": lay,
        "layer_median_s": {n: C.median(s_) for n, s_ in lay.items()},
        "max_abs_diff_vs_sdpa": diff,
        "loadavg": [load0, C.loadavg()],
    }
    row = [nk, f"{hq}/{hk}", d]
    row += [f"{med[n] * 1e3:.3f}" for n in ("rotary", "blockw", "none", "torch", "sdpa")]
    row += [f"{best * 1e3:.3f}"]
    row += [f"{rec['sdpa_best_over'][n]:.2f}x" for n in ("rotary", "none", "torch")]
    lm = rec["layer_median_s"]
    row += [f"{lm['sdpa'] * 1e3:.3f}", f"{lm['fastrope'] * 1e3:.3f}"]
    row += [f"{lm['sdpa'] / lm['fastrope']:.2f}x"]
    row += [f"{diff:.1e}", str(min(len(s) for s in samples.values())), str((load0 or ["-"])[0])]
    C.log(" | ".join(str(x) for x in row))
    return rec, row


def burst(fn, calls: int):
    """``fn`` called ``calls`` times back to back (a timed sample); returns the last result."""

    def run():
        for _ in range(calls - 1):
            fn()
        return fn()

    return run


PREFILL_HEADER = ["n", "heads", "d", "fastrope ms", "sdpa ms", "sdpa/fastrope", "max|diff|"]
PREFILL_HEADER += ["reps", "load1"]


def phases(a, fns):
    """Each variant in phases of its own (bursts of ``--burst`` calls), twice in turn: the median
    seconds per call and the first result of each."""
    samples: dict = {n: [] for n in fns}
    first: dict = {}
    for _ in range(2):
        for n, f in fns.items():
            s_, f_ = C.run_rounds(
                {n: burst(f, a.burst)},
                repeats=max(a.repeats // 2, 3),
                min_repeats=3,
                budget=a.budget / (2 * len(fns)),
                warmup_below=1.0,
                settle=a.settle,
            )
            samples[n] += [t / a.burst for t in s_[n]]
            first.setdefault(n, f_[n])
    return samples, first


def bench_prefill(a, n, hq, hk, d, torch):
    """A causal prefill of ``n`` rows: ``fastrope.attention(q, k, v, Rotary(), causal=True)``
    against SDPA on the rotated q and k, in isolated phases."""
    import fastrope

    rng = np.random.default_rng(a.seed)
    q = rng.standard_normal((1, hq, n, d)).astype(np.float32)
    k = rng.standard_normal((1, hk, n, d)).astype(np.float32)
    v = rng.standard_normal((1, hk, n, d)).astype(np.float32)
    angles = C.rope_angles(n, d)
    tqr = torch.from_numpy(C.rotate_interleaved(q, angles))
    tkr = torch.from_numpy(C.rotate_interleaved(k, angles))
    tv = torch.from_numpy(v)
    w = fastrope.Rotary()
    F = torch.nn.functional
    gqa = {"enable_gqa": True} if hq != hk else {}

    def sdpa():
        with torch.inference_mode():
            return F.scaled_dot_product_attention(tqr, tkr, tv, is_causal=True, **gqa)

    fns = {
        "fastrope": lambda: fastrope.attention(q, k, v, w, causal=True, num_threads=a.threads),
        "sdpa": sdpa,
    }
    load0 = C.loadavg()
    samples, first = phases(a, fns)
    med = {name: C.median(s_) for name, s_ in samples.items()}
    diff = float(np.max(np.abs(np.asarray(first["fastrope"]) - first["sdpa"].numpy())))
    rec = {
        "n": n,
        "hq": hq,
        "hk": hk,
        "d": d,
        "samples_s": samples,
        "median_s": med,
        "sdpa_over_fastrope": med["sdpa"] / med["fastrope"],
        "max_abs_diff_vs_sdpa": diff,
        "loadavg": [load0, C.loadavg()],
    }
    row = [n, f"{hq}/{hk}", d, f"{med['fastrope'] * 1e3:.3f}", f"{med['sdpa'] * 1e3:.3f}"]
    row += [f"{rec['sdpa_over_fastrope']:.2f}x", f"{diff:.1e}"]
    row += [str(min(len(s_) for s_ in samples.values())), str((load0 or ["-"])[0])]
    C.log(" | ".join(str(x) for x in row))
    return rec, row


def main(argv=None):
    a = parse_args(argv)
    snap = None if a.no_snapshot else C.snapshot_package("fastrope")
    import fastrope

    torch = C.try_torch()
    if torch is None:
        C.log("torch is needed for this benchmark (pip install torch)")
        return 1
    C.set_threads(a.threads)
    machine = C.machine_info(a.threads)
    machine["package"] = snap or {"source": os.path.dirname(fastrope.__file__)}
    C.log(f"# fastrope decode benchmark  {machine['date']}")
    C.log(
        f"# cpu: {machine['cpu']}, {machine['logical_cores']} logical cores, threads={a.threads}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"loadavg={machine['loadavg_start']}; batch 1, float32, one query row per head; "
        "times are medians, ratios = t_sdpa / t"
    )
    C.log(" | ".join(HEADER))
    records, rows = [], []
    t0 = time.perf_counter()
    for spec in a.heads:
        hq, hk, d = (int(x) for x in spec.split("/"))
        for nk in a.nk:
            rec, row = bench_point(a, nk, hq, hk, d, torch)
            records.append(rec)
            rows.append(row)
    prefill_rows = []
    if a.prefill:
        C.log(" | ".join(PREFILL_HEADER))
        for spec in a.heads:
            hq, hk, d = (int(x) for x in spec.split("/"))
            for n in a.prefill:
                rec, row = bench_prefill(a, n, hq, hk, d, torch)
                records.append({"prefill": rec})
                prefill_rows.append(row)
    machine["elapsed_s"] = round(time.perf_counter() - t0, 1)
    machine["loadavg_end"] = C.loadavg()
    C.log(f"# done in {machine['elapsed_s']:.0f} s; loadavg at end {machine['loadavg_end']}")
    table = C.format_table(HEADER, rows, markdown=True)
    if prefill_rows:
        table += "\n\n" + C.format_table(PREFILL_HEADER, prefill_rows, markdown=True)
    C.log("")
    C.log(table)
    config = {k: v for k, v in vars(a).items() if k not in ("json", "markdown")}
    if a.json:
        C.save_json(a.json, {"machine": machine, "config": config, "records": records})
        C.log(f"# wrote {a.json}")
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
