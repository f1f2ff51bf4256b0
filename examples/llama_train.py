"""A small Llama-style language model in plain PyTorch whose attention is fastrope, trained on a
generated text corpus, comparing PyTorch SDPA with fastrope exact (Rotary and a learnable BlockW)
and fastrope fast.

    python examples/llama_train.py                       # all runs, ~2-4 minutes on 2 cores
    python examples/llama_train.py --qk-norm 1.0 --out examples/qk_norm_1   # + fast, ~25 min
    python examples/llama_train.py --runs sdpa exact-rotary --steps 100

The model: token embedding, ``layers`` x (RMSNorm → grouped-query attention → RMSNorm → SwiGLU
MLP), RMSNorm, tied output head.  Attention variants:

* ``sdpa``: rotate q and k (RoPE, interleaved pairs) then ``F.scaled_dot_product_attention``;
* ``exact-rotary``: ``fastrope.torch.RopeAttention(Rotary)`` — the same function, RoPE as ``W_δ``;
* ``exact-block``: a learnable per-head ``BlockW`` table (``2·n-1`` relative positions of 2x2
  blocks), initialised to RoPE and trained with the model;
* ``fast-rotary``: ``Rotary`` with ``eps`` (``--eps``, default 1e-2) and ``method="fast"`` (the
  polynomial + FFT method; the head dim is 4, where it applies).  Its cost grows quickly with the
  score bound ``R``: ``--qk-norm R`` (for every run, so they stay comparable) normalises q and k
  and scales the scores by ``R``, which keeps ``|score| <= R``.  Its backward is the fast
  backward (``attention_grad(..., eps, method="fast")``), whose ``eps`` bounds each gradient's
  error relative to its certified magnitude (``--grad-error relative``, the default) or every
  entry absolutely (``--grad-error absolute``).  A run whose ``eps`` cannot be certified (e.g.
  ``fast-rotary`` without ``--qk-norm``) stops with the reason.

The corpus (generated, deterministic): paragraphs that state facts ("the cat of nora is blue.")
among filler sentences and later ask about one ("what color is the cat of nora? blue."), so the
model has to look back across the paragraph.  Writes ``llama_results.json`` and
``llama_loss.png`` next to this script (or to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fastrope
import fastrope.torch as ft

# ------------------------------------------------------------------------------------------
# The corpus
# ------------------------------------------------------------------------------------------

NAMES = "nora omar lena ivan maya theo rosa karl ines yuki".split()
ANIMALS = "cat dog fox owl hen cow".split()
COLORS = "red blue green brown white black pink gray".split()
FILLER_S = ["the sun", "the rain", "a bird", "the wind", "a child", "the river"]
FILLER_V = "sings falls waits runs sleeps moves shines turns".split()
FILLER_A = "slowly today again softly here now".split()


def make_corpus(n_chars: int = 300_000, seed: int = 0) -> str:
    """Paragraphs of facts, filler and questions about the facts (about 60 chars per sentence)."""
    rng = np.random.default_rng(seed)
    out, size = [], 0
    while size < n_chars:
        facts = {}
        lines = []
        for _ in range(int(rng.integers(2, 5))):
            who, animal = rng.choice(NAMES), rng.choice(ANIMALS)
            color = rng.choice(COLORS)
            facts[(who, animal)] = color
            lines.append(f"the {animal} of {who} is {color}.")
            for _ in range(int(rng.integers(0, 3))):
                s, v, a = rng.choice(FILLER_S), rng.choice(FILLER_V), rng.choice(FILLER_A)
                lines.append(f"{s} {v} {a}.")
        keys = list(facts)
        for i in rng.permutation(len(keys))[: int(rng.integers(1, len(keys) + 1))]:
            who, animal = keys[i]
            lines.append(f"what color is the {animal} of {who}? {facts[keys[i]]}.")
        para = " ".join(lines) + "\n"
        out.append(para)
        size += len(para)
    return "".join(out)[:n_chars]


# ------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_interleaved(x, base: float):
    """Rotate pairs (2m, 2m+1) of x ``(B, H, n, d)`` by ``p θ_m`` (Meta's Llama convention)."""
    n, d = x.shape[-2], x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = (torch.arange(n, dtype=torch.float64)[:, None] * theta[None, :]).to(x.dtype)
    cos, sin = ang.cos(), ang.sin()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, dim, heads, kv_heads, kind: str, max_len: int, base: float = 10000.0,
                 qk_norm: float = 0.0, eps: float = 1e-2,
                 grad_error: str = "relative") -> None:  # fmt: skip
        super().__init__()
        # qk_norm R > 0: unit q and k per head, scores scaled by R, so |score| <= R for Rotary
        # (the fast method's cost grows quickly with that bound)
        self.qk_norm = qk_norm
        scale = qk_norm if qk_norm else None
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.wq = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.wkv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(heads * self.head_dim, dim, bias=False)
        self.kind, self.base = kind, base
        if kind == "exact-rotary":
            self.attn = ft.RopeAttention(fastrope.Rotary(base), scale=scale)
        elif kind == "exact-block":
            self.attn = ft.RopeAttention(
                "block", head_dim=self.head_dim, max_len=max_len, heads=heads, base=base,
                scale=scale,
            )  # fmt: skip
        elif kind == "fast-rotary":
            self.attn = ft.RopeAttention(
                fastrope.Rotary(base), eps=eps, method="fast", scale=scale, grad_error=grad_error
            )
        elif kind != "sdpa":
            raise ValueError(f"unknown attention kind {kind!r}")

    def forward(self, x):
        b, n, _ = x.shape
        q = self.wq(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.wkv(x).view(b, n, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.qk_norm:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        if self.kind == "sdpa":
            q, k = rope_interleaved(q, self.base), rope_interleaved(k, self.base)
            scale = self.qk_norm or None
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                               scale=scale)  # fmt: skip
        else:
            o = self.attn(q, k, v)  # causal; the heads of k/v divide q's (GQA)
        return self.wo(o.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self, dim, heads, kv_heads, kind, max_len, **attn) -> None:
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.attn = Attention(dim, heads, kv_heads, kind, max_len, **attn)
        hidden = 4 * dim
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        a, g = self.w13(self.norm2(x)).chunk(2, dim=-1)
        return x + self.w2(F.silu(a) * g)


class Llama(nn.Module):
    def __init__(self, vocab, dim=64, layers=3, heads=16, kv_heads=8, kind="sdpa", max_len=128,
                 **attn) -> None:  # fmt: skip
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            Block(dim, heads, kv_heads, kind, max_len, **attn) for _ in range(layers)
        )
        self.norm = RMSNorm(dim)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, idx):
        x = self.embed(idx)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x) @ self.embed.weight.T  # tied head


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------


def windows(data: np.ndarray, starts: np.ndarray, n: int):
    x = np.stack([data[s : s + n + 1] for s in starts])
    return torch.from_numpy(x[:, :-1]), torch.from_numpy(x[:, 1:])


def answer_words(text: str) -> np.ndarray:
    """Per character: the index of the answer word it belongs to ("...? <word>."), else -1."""
    ids = np.full(len(text), -1, dtype=np.int64)
    for j, m in enumerate(re.finditer(r"\? ([a-z]+)\.", text)):
        ids[m.start(1) : m.end(1)] = j
    return ids


def evaluate(model, vx, vy, answer_ids) -> tuple:
    """Validation loss, and the fraction of answer words predicted entirely right (each char by
    argmax given the true prefix): the model must find the fact earlier in the paragraph."""
    with torch.no_grad():
        logits = model(vx)
    loss = float(F.cross_entropy(logits.flatten(0, 1), vy.flatten()))
    correct = (logits.argmax(-1) == vy).numpy()
    words, right = 0, 0
    for row in range(len(answer_ids)):
        ids = answer_ids[row]
        for wid in np.unique(ids[ids >= 0]):
            sel = ids == wid
            if sel[0] or sel[-1]:  # may be cut by the window
                continue
            words += 1
            right += bool(correct[row][sel].all())
    return loss, right / max(words, 1)


def train(kind: str, args, data, val, val_ids) -> dict:
    torch.manual_seed(args.seed)
    vocab = int(max(data.max(), val.max())) + 1
    model = Llama(vocab, args.dim, args.layers, args.heads, args.kv_heads, kind, args.n,
                  base=args.base, qk_norm=args.qk_norm, eps=args.eps,
                  grad_error=args.grad_error)  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / args.steps))
    )
    rng = np.random.default_rng(args.seed)
    vstarts = np.random.default_rng(123).integers(0, len(val) - args.n - 1, size=64)
    vx, vy = windows(val, vstarts, args.n)
    answer_ids = np.stack([val_ids[s + 1 : s + args.n + 1] for s in vstarts])
    curve, val_curve = [], []
    seconds = 0.0
    failed = None
    for step in range(args.steps):
        x, y = windows(data, rng.integers(0, len(data) - args.n - 1, size=args.batch), args.n)
        t0 = time.perf_counter()
        try:
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
        except (fastrope.ApproximationError, MemoryError) as e:  # fast method: eps not certified
            failed = f"step {step + 1}: {type(e).__name__}: {e}"
            print(f"  {kind:13s} stopped at {failed}")
            break
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        seconds += time.perf_counter() - t0
        curve.append(loss.item())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            vl, acc = evaluate(model, vx, vy, answer_ids)
            val_curve.append((step + 1, vl, acc))
            print(f"  {kind:13s} step {step + 1:4d}  train {curve[-1]:.3f}  val {vl:.3f}"
                  f"  answers {acc:.1%}", flush=True)  # fmt: skip
    last = val_curve[-1] if val_curve else (0, math.nan, math.nan)
    return dict(kind=kind, train=curve, val=val_curve, seconds=seconds, failed=failed,
                seconds_per_step=seconds / max(len(curve), 1), final_val=last[1],
                final_answer_accuracy=last[2])  # fmt: skip


def plot(results: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in results:
        t = np.asarray(r["train"])
        k = max(1, len(t) // 30)
        smooth = np.convolve(t, np.ones(k) / k, mode="valid")
        # sdpa and exact-rotary compute the same function: their curves coincide
        style = dict(ls="--", color="k", zorder=3) if r["kind"] == "sdpa" else dict(ls="-")
        (line,) = ax.plot(np.arange(k, len(t) + 1), smooth, lw=1.4, label=r["kind"], **style)
        vs, vl, _ = zip(*r["val"])
        ax.plot(vs, vl, "o", ms=3, color=line.get_color())
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/char); dots: validation")
    ax.set_title("Llama-style char model, fastrope vs SDPA")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


RUNS = ("sdpa", "exact-rotary", "exact-block", "fast-rotary")


def bench(args, data, reps: int) -> dict:
    """Median seconds per training step of each run, steps interleaved across the runs so that
    they share the machine's load alike (the step times of a training run are not comparable on
    a shared machine)."""
    vocab = int(data.max()) + 1
    models = {}
    for kind in args.runs:
        torch.manual_seed(args.seed)
        m = Llama(vocab, args.dim, args.layers, args.heads, args.kv_heads, kind, args.n,
                  base=args.base, qk_norm=args.qk_norm, eps=args.eps,
                  grad_error=args.grad_error)  # fmt: skip
        models[kind] = (m, torch.optim.AdamW(m.parameters(), lr=args.lr))
    rng = np.random.default_rng(args.seed)
    times = {kind: [] for kind in models}
    for _ in range(reps):
        x, y = windows(data, rng.integers(0, len(data) - args.n - 1, size=args.batch), args.n)
        for kind, (m, opt) in list(models.items()):
            t0 = time.perf_counter()
            try:
                loss = F.cross_entropy(m(x).flatten(0, 1), y.flatten())
                opt.zero_grad(set_to_none=True)
                loss.backward()
            except (fastrope.ApproximationError, MemoryError) as e:
                print(f"  {kind}: {type(e).__name__}: {e}")
                del models[kind], times[kind]
                continue
            opt.step()
            times[kind].append(time.perf_counter() - t0)
    return {kind: float(np.median(t)) for kind, t in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--n", type=int, default=128, help="sequence length")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=16, help="query heads (head dim = dim / heads)")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--base", type=float, default=10000.0, help="RoPE base")
    p.add_argument("--qk-norm", type=float, default=0.0, metavar="R",
                   help="unit-norm q and k, scores scaled by R (|score| <= R: the fast method's"
                        " regime); 0 = off")  # fmt: skip
    p.add_argument("--eps", type=float, default=1e-2, help="eps of the fast run")
    p.add_argument("--grad-error", choices=("relative", "absolute"), default="relative",
                   help="what eps bounds in the fast run's backward")  # fmt: skip
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--replot", action="store_true", help="only redraw the PNG from the JSON")
    p.add_argument("--bench", type=int, default=0, metavar="N",
                   help="only time N training steps of each run (interleaved)")  # fmt: skip
    args = p.parse_args(argv)
    if args.replot:
        with open(os.path.join(args.out, "llama_results.json")) as f:
            results = [r for r in json.load(f)["results"] if r["val"]]
        plot(results, os.path.join(args.out, "llama_loss.png"))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)

    text = make_corpus()
    chars = sorted(set(text))
    data = np.array([chars.index(c) for c in text], dtype=np.int64)
    split = int(0.9 * len(data))
    val_ids = answer_words(text)[split:]
    if args.bench:
        for kind, sec in bench(args, data, args.bench).items():
            print(f"| {kind} | {sec * 1e3:.0f} ms/step |")
        return 0
    print(f"corpus: {len(text)} chars, vocab {len(chars)}; model dim {args.dim}, {args.layers}"
          f" layers, {args.heads} heads of d={args.dim // args.heads}, {args.kv_heads} kv heads,"
          f" n={args.n}, batch {args.batch}, {args.steps} steps")  # fmt: skip
    results, skipped = [], {}
    for kind in args.runs:
        results.append(train(kind, args, data[:split], data[split:], val_ids))
        if results[-1]["failed"]:
            skipped[kind] = results[-1]["failed"]
    summary = dict(
        config={k: v for k, v in vars(args).items() if k not in ("out", "runs")},
        torch=torch.__version__,
        fastrope=fastrope.__version__,
        results=results,
        unavailable=skipped,
    )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "llama_results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if any(r["val"] for r in results):
        plot([r for r in results if r["val"]], os.path.join(args.out, "llama_loss.png"))
    print("\n| run | val loss | answers right | s/step (train) |\n|---|---|---|---|")
    for r in results:
        if not r["val"]:
            print(f"| {r['kind']} | unavailable: stopped at {r['failed']} | | |")
            continue
        note = f" (stopped at {r['failed']})" if r["failed"] else ""
        print(f"| {r['kind']}{note} | {r['final_val']:.3f} | {r['final_answer_accuracy']:.1%} |"
              f" {r['seconds_per_step']:.3f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
