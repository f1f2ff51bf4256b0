"""Sequence-parallel ring attention (examples/ring_attention.py) over real processes with
torch.distributed (gloo): forward and backward equal single-process attention in float64."""

from __future__ import annotations

import os
import sys

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")
sys.path.insert(0, os.path.abspath(EXAMPLES))  # spawned workers inherit sys.path

import ring_attention  # noqa: E402

TOL = 1e-12  # float64; observed ~1e-15


def _check(errs: dict, names, tol: float) -> None:
    for name in names:
        assert errs[name] <= tol, f"{name}: max abs error {errs[name]:.3g}"


def test_ring_three_processes():
    """One set of 3 processes (spawning costs seconds) runs three problems: uneven shards (37
    tokens over 3 ranks), GQA, causal, a per-head learnable BlockW with ALiBi (gradients to the
    blocks and the bias all-reduced); Rotary with a sliding window; and float32."""
    block, rotary, single = ring_attention.run(
        3,
        dict(w="block", bias=True, causal=True, window=None),
        dict(w="rotary", bias=False, causal=False, window=(9, 4), n=29, seed=1),
        dict(w="rotary", bias=False, dtype="float32", n=48, d=16, seed=2),
    )
    _check(block, ("out", "lse", "dq", "dk", "dv", "dw", "dbias"), TOL)
    _check(rotary, ("out", "lse", "dq", "dk", "dv"), TOL)
    _check(single, ("out", "lse", "dq", "dk", "dv"), 2e-5)
