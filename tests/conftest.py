"""Shared helpers for the fastrope test-suite: seeded data, builders for every form of ``w``,
and one tolerance rule used by every comparison against the float64 oracle.

Tolerance rule (faer-style: machine epsilon times a size factor)
----------------------------------------------------------------
Every output entry is a convex combination of rows of ``v`` with weights ``exp(M_ij)/l_i``.
Rounding perturbs each score ``M_ij`` by about ``eps_mach * sqrt(n_terms) * |M|`` (a dot product
of ``n_terms`` products: ``2d`` for Rotary/BlockW, ``|S|`` for SparseW, ``d^2`` for a dense
``W``), and the normalisation/accumulation over ``n_k`` keys adds about ``eps_mach *
log2(n_k)`` relative error.  A relative error ``r`` on every weight moves an output entry by at
most ``2 r max|v|``.  So::

    tol = eps_mach(dtype) * C(dtype) * (sqrt(n_terms) * max(1, |M|) + log2(n_k + 2))
              * max(1, max|v|)
          + 8 * eps_mach(float64) * max|position| * max(1, max|v|)      (Rotary only)

with ``C = 64`` for float64 (so ~1e-13..1e-12 for the sizes used here) and ``C = 16`` for
float32 (~1e-5..4e-5, i.e. about 2e-5 relative to max|v|).  The last term is the rounding of
the rotation angles ``p * θ`` (computed in float64 by rotate-then-dot), which grows with the
absolute position ``p``; it only matters for offsets ~1e6.  ``lse`` uses the same rule without
the ``max|v|`` factor.  Gradients are compared relative to the largest entry of the reference
gradient: ``max|got - ref| <= 8 * tol * max(1, max|ref|)`` (each gradient is a sum of the same
products times ``dS``).  The observed errors are ~100x below these bounds.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import fastrope

# Hypothesis profiles, chosen by HYPOTHESIS_PROFILE: ``ci`` (the default; each property test
# keeps its own small ``max_examples``) and ``fuzz`` (``make fuzz-python``: every property test
# runs FASTROPE_FUZZ_EXAMPLES examples, 2000 unless set, with no deadline).
HYPOTHESIS_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
FUZZ_EXAMPLES = int(os.environ.get("FASTROPE_FUZZ_EXAMPLES", "2000"))
settings.register_profile(
    "ci",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "fuzz",
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
settings.load_profile(HYPOTHESIS_PROFILE)


def examples(n: int) -> int:
    """A property test's ``max_examples``: its own ``n`` under the ``ci`` profile, the fuzz
    budget under ``fuzz`` (an explicit ``@settings(max_examples=...)`` overrides a profile)."""
    return FUZZ_EXAMPLES if HYPOTHESIS_PROFILE == "fuzz" else n

SEED = 20240611

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}

# Every form of ``w`` (docs/DESIGN.md §2), as names understood by :func:`make_w`.
ROTARY_KINDS = ("rotary", "rotary_half", "rotary_llama3", "rotary_yarn")
TABLE_KINDS = ("block", "block_half", "sparse", "dense")
W_KINDS = ROTARY_KINDS + TABLE_KINDS
EVEN_D_KINDS = ROTARY_KINDS + ("block", "block_half")

DTYPES = (np.float64, np.float32)
EPS_MACH = {
    np.dtype(np.float64): float(np.finfo(np.float64).eps),
    np.dtype(np.float32): float(np.finfo(np.float32).eps),
}
C_TOL = {np.dtype(np.float64): 64.0, np.dtype(np.float32): 16.0}


# ------------------------------------------------------------------------------------------
# Random data
# ------------------------------------------------------------------------------------------


def make_rng(seed: int = SEED) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture
def rng() -> np.random.Generator:
    """A fixed-seed generator (fresh for every test, so tests do not depend on their order)."""
    return make_rng()


def lead_k_of(lead_q: Sequence[int], group: int) -> tuple:
    """k/v leading dims for q's leading dims and a GQA ratio (heads axis = axis -3 of q)."""
    lead_q = tuple(lead_q)
    if group == 1 or not lead_q:
        return lead_q
    assert lead_q[-1] % group == 0
    return lead_q[:-1] + (lead_q[-1] // group,)


def make_qkv(
    rng: np.random.Generator,
    lead: Sequence[int],
    n_q: int,
    n_k: int,
    d: int,
    d_v: int,
    dtype=np.float64,
    group: int = 1,
    scale_q: float = 1.0,
):
    """Standard-normal q ``(*lead, n_q, d)``, k ``(*lead_k, n_k, d)``, v ``(*lead_k, n_k, d_v)``."""
    lead = tuple(lead)
    lead_k = lead_k_of(lead, group)
    q = (scale_q * rng.standard_normal(lead + (n_q, d))).astype(dtype)
    k = rng.standard_normal(lead_k + (n_k, d)).astype(dtype)
    v = rng.standard_normal(lead_k + (n_k, d_v)).astype(dtype)
    return q, k, v


def needed_L(n_q: int, n_k: int, q_offset: int = 0, k_offset: int = 0, extra: int = 0) -> int:
    """Smallest L whose table covers every δ of the n_q x n_k rectangle (masks ignored)."""
    c = q_offset - k_offset
    return max(abs(c - (n_k - 1)), abs(c + n_q - 1), 0) + 1 + extra


def random_support(rng: np.random.Generator, d: int, size: Optional[int] = None) -> np.ndarray:
    """Distinct random (l1, l2) entries of a d x d matrix, int64 ``(|S|, 2)``."""
    size = min(d * d, d + 1) if size is None else size
    flat = rng.choice(d * d, size=size, replace=False)
    return np.stack(np.divmod(flat, d), axis=1).astype(np.int64)


def make_w(
    kind: str,
    rng: np.random.Generator,
    L: int,
    d: int,
    lead: Sequence[int] = (),
    dtype=np.float64,
):
    """One ``w`` of the given kind.  Tables have ``2L-1`` rows and leading dims ``lead``
    (ignored by the Rotary kinds); their values keep the scores O(1) for unit-normal q, k."""
    lead = tuple(lead)
    rows = 2 * L - 1
    if kind == "rotary":
        return fastrope.Rotary()
    if kind == "rotary_half":
        return fastrope.Rotary(base=500000.0, layout="half")
    if kind == "rotary_llama3":
        return fastrope.Rotary(base=10000.0, layout="interleaved", scaling=dict(LLAMA3))
    if kind == "rotary_yarn":
        return fastrope.Rotary(base=10000.0, layout="half", scaling=dict(YARN))
    if kind in ("block", "block_half"):
        blocks = 0.5 * rng.standard_normal(lead + (rows, d // 2, 2, 2))
        layout = "interleaved" if kind == "block" else "half"
        return fastrope.BlockW(blocks.astype(dtype), layout=layout)
    if kind == "sparse":
        support = random_support(rng, d)
        values = rng.standard_normal(lead + (rows, len(support)))
        return fastrope.SparseW(support, values.astype(dtype))
    if kind == "dense":
        table = rng.standard_normal(lead + (rows, d, d)) / math.sqrt(d)
        if d > 1:  # some entries zero for every δ (exercises the non-zero support compression)
            table[..., :, rng.random((d, d)) < 0.25] = 0.0
        return table.astype(dtype)
    raise ValueError(kind)


def w_terms(kind: str, w: Any, d: int) -> int:
    """Number of products in one score ``q_i^T W_δ k_j``."""
    if kind in ROTARY_KINDS or kind.startswith("block"):
        return 2 * d
    if kind == "sparse":
        return max(1, len(w.support))
    return d * d


def make_bias(rng: np.random.Generator, L: int, lead: Sequence[int] = ()) -> np.ndarray:
    """A random Toeplitz bias ``(*lead, 2L-1)``: ALiBi-like decay plus noise."""
    lead = tuple(lead)
    delta = np.arange(-(L - 1), L)
    slopes = rng.uniform(0.01, 0.3, size=lead + (1,))
    return -slopes * np.abs(delta) + 0.3 * rng.standard_normal(lead + (2 * L - 1,))


# ------------------------------------------------------------------------------------------
# Tolerances and comparisons
# ------------------------------------------------------------------------------------------


def tol(
    dtype,
    *,
    n_terms: int,
    n_k: int,
    vmax: float = 1.0,
    score: float = 1.0,
    max_pos: int = 0,
) -> float:
    """The tolerance rule of the module docstring."""
    dt = np.dtype(dtype)
    base = (
        EPS_MACH[dt]
        * C_TOL[dt]
        * (math.sqrt(max(n_terms, 1)) * max(1.0, score) + math.log2(n_k + 2))
    )
    pos = 8.0 * EPS_MACH[np.dtype(np.float64)] * abs(max_pos)
    return (base + pos) * max(1.0, vmax)


def score_bound(q: np.ndarray, k: np.ndarray, scale: Optional[float] = None) -> float:
    """A rough typical score magnitude ``scale * |q| |k|`` (for the tolerance's |M| factor)."""
    if q.size == 0 or k.size == 0:
        return 1.0
    d = q.shape[-1]
    s = 1.0 / math.sqrt(d) if scale is None else abs(scale)
    rq = float(np.sqrt(np.mean(np.sum(np.asarray(q, np.float64) ** 2, axis=-1))))
    rk = float(np.sqrt(np.mean(np.sum(np.asarray(k, np.float64) ** 2, axis=-1))))
    return s * rq * rk


def max_abs(x: np.ndarray) -> float:
    return float(np.max(np.abs(x))) if np.size(x) else 0.0


def assert_close(got: np.ndarray, ref: np.ndarray, atol: float, name: str = "") -> None:
    """Shapes equal, no NaN, ``-inf`` exactly where the reference has it, then ``atol``."""
    got = np.asarray(got)
    ref = np.asarray(ref)
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != reference {ref.shape}"
    assert not np.isnan(got).any(), f"{name}: NaN in result"
    np.testing.assert_array_equal(
        np.isneginf(got), np.isneginf(ref), err_msg=f"{name}: -inf pattern"
    )
    fin = np.isfinite(ref)
    if fin.any():
        err = np.max(np.abs(got[fin].astype(np.float64) - ref[fin]))
        assert err <= atol, f"{name}: max|got - ref| = {err:.3e} > tol {atol:.3e}"


def assert_grad_close(got: Any, ref: Any, t: float, name: str) -> None:
    if ref is None:
        assert got is None, f"{name}: expected None, got {type(got).__name__}"
        return
    assert got is not None, f"{name}: got None"
    scale = max(1.0, max_abs(ref))
    assert_close(got, ref, 8.0 * t * scale, name)


def check_forward(q, k, v, w, *, kind: str, max_pos: int = 0, **kw):
    """fastrope.attention vs the oracle (out and lse, dtypes), returns (out, lse)."""
    out, lse = fastrope.attention(q, k, v, w, return_lse=True, **kw)
    ref_out, ref_lse = fastrope.reference.attention(q, k, v, w, return_lse=True, **kw)
    dt = np.dtype(q.dtype)
    assert out.dtype == dt and lse.dtype == dt, (out.dtype, lse.dtype)
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    d = q.shape[-1]
    t_kw = dict(
        n_terms=w_terms(kind, w, d),
        n_k=k.shape[-2],
        score=score_bound(q, k, kw.get("scale")),
        max_pos=max_pos,
    )
    assert_close(out, ref_out, tol(dt, vmax=max_abs(v), **t_kw), "out")
    assert_close(lse, ref_lse, tol(dt, **t_kw), "lse")
    return out, lse


def check_grad(q, k, v, w, dout, *, kind: str, **kw):
    """fastrope.attention_grad vs the oracle: all five outputs, shapes and dtypes."""
    g = fastrope.attention_grad(q, k, v, w, dout, **kw)
    rg = fastrope.reference.attention_grad(q, k, v, w, dout, **kw)
    dt = np.dtype(q.dtype)
    t = tol(
        dt,
        n_terms=w_terms(kind, w, q.shape[-1]),
        n_k=max(k.shape[-2], q.shape[-2]),
        score=score_bound(q, k, kw.get("scale")),
        vmax=max(max_abs(v), max_abs(dout)),
    )
    for name, a, b in zip(("dq", "dk", "dv", "dw", "dbias"), g, rg):
        if a is not None:
            assert a.dtype == dt, f"{name}: dtype {a.dtype}, expected {dt}"
        assert_grad_close(a, b, t, name)
    assert g.dq.shape == q.shape and g.dk.shape == k.shape and g.dv.shape == v.shape
    return g, rg


# ------------------------------------------------------------------------------------------
# The fast method's inputs (tests/test_fast*.py)
# ------------------------------------------------------------------------------------------

FAST_FORMS = ("rotary", "rotary-half", "blockw", "sparse", "dense")


def bounded(rng: np.random.Generator, shape, scale: float = 0.5, dtype=np.float64) -> np.ndarray:
    """Uniform entries in ``[-scale, scale]``."""
    return (rng.uniform(-1, 1, shape) * scale).astype(dtype)


def unit_rows(rng: np.random.Generator, shape: tuple, d: int, r: float = 1.0) -> np.ndarray:
    """Rows ``shape + (d,)`` with largest 2-norm ``sqrt(r)`` (scores up to ``r`` at scale 1)."""
    x = rng.standard_normal(shape + (d,))
    return x * (r**0.5 / np.linalg.norm(x, axis=-1, keepdims=True).max())


def make_fast_w(
    form: str, rng: np.random.Generator, L: int, d: int, lead=(), dtype=np.float64, dense=0.3
):
    """A ``w`` of one of :data:`FAST_FORMS` with ``2L-1`` rows; tables of moderate size
    (``dense`` bounds the dense table's entries)."""
    rows = 2 * L - 1
    if form == "rotary":
        return fastrope.Rotary()
    if form == "rotary-half":
        return fastrope.Rotary(layout="half", base=500.0)
    if form == "blockw":
        return fastrope.BlockW(rng.uniform(-0.6, 0.6, lead + (rows, d // 2, 2, 2)).astype(dtype))
    if form == "sparse":
        support = np.array([[0, 0], [0, 1], [1, 1], [d - 1, 0]])
        return fastrope.SparseW(support, rng.uniform(-0.8, 0.8, lead + (rows, 4)).astype(dtype))
    if form == "dense":
        return rng.uniform(-dense, dense, lead + (rows, d, d)).astype(dtype)
    raise AssertionError(form)


# The low-rank path's cases (Rotary / w=None without window or bias), forward and backward.
LOWRANK_CASES = [
    # w, lead_q, group, n_q, n_k, d, d_v, kw
    (fastrope.Rotary(), (2,), 1, 97, 97, 4, 5, dict(causal=True)),
    (fastrope.Rotary(), (2,), 1, 64, 101, 2, 3, dict()),
    (fastrope.Rotary(layout="half"), (2, 4), 2, 53, 71, 4, 2, dict(causal=True, q_offset=18)),
    (fastrope.Rotary(base=500.0), (3,), 1, 300, 280, 2, 4, dict(causal=True, k_offset=9)),
    (fastrope.Rotary(scaling={"rope_type": "yarn", "factor": 4.0,
                            "original_max_position_embeddings": 32}), (1,), 1, 70, 70, 6, 3,
     dict(causal=True)),
    (None, (2,), 1, 41, 43, 3, 2, dict(causal=True, q_offset=2)),
    (fastrope.Rotary(), (1,), 1, 600, 600, 2, 8, dict(causal=True, q_offset=5, k_offset=3)),
]  # fmt: skip


@pytest.fixture
def toeplitz_path(monkeypatch):
    """Rotary without window or bias takes the low-rank path (no kernel spectra); tests of the
    Toeplitz path (its planner, its cache) request this."""
    monkeypatch.setenv("FASTROPE_FAST_PATH", "toeplitz")


# ------------------------------------------------------------------------------------------
# Hugging Face transformers models (tests/test_transformers*.py; torch imported lazily)
# ------------------------------------------------------------------------------------------


def hf_model(config, impl: str, rope_in_fastrope: bool = False):
    """A ``LlamaForCausalLM`` of ``config`` with attention ``impl`` and the same weights for
    every implementation; RoPE applied by fastrope through ``w`` with ``rope_in_fastrope``."""
    import copy

    import torch
    import transformers

    import fastrope.integrations.transformers as fr_hf

    c = copy.deepcopy(config)
    c._attn_implementation = impl
    torch.manual_seed(0)  # same weights for every implementation
    m = transformers.LlamaForCausalLM(c).eval()
    return fr_hf.apply_rope_in_fastrope(m) if rope_in_fastrope else m


def hf_logits(m, ids, **kw):
    import torch

    with torch.no_grad():
        return m(ids, **kw).logits
