"""The planner's choices over a grid of shapes: the method, the fast route, the predicted flops,
seconds and working sets, and the reasons, against the figures in tests/data/plan_choices.json.

The fixture pins the cost model (src/plan/cost.rs): a change to a rate or a formula shows here
as a changed choice or figure.  ``python tests/test_plan_choices.py`` rewrites the fixture from
the planner as it is.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

import fastrope

FIXTURE = Path(__file__).parent / "data" / "plan_choices.json"
NS = [2**8, 2**10, 2**12, 2**14]
# (d, eps): every pair forward; backward, eps = 1e-6 at d = 2 only (at d = 4 and 8 the backward's
# degree search runs to its limit before refusing, seconds per plan).
FORWARD_D_EPS = [(d, eps) for d in (2, 4, 8) for eps in (1e-3, 1e-6)]
BACKWARD_D_EPS = [(2, 1e-3), (2, 1e-6), (4, 1e-3), (8, 1e-3)]
SCHEMES = ["rotary", "rotary-causal", "rotary-f64", "bias", "window", "blockw", "sparse2"]
HEADS = 2
BOUND_R = 2.0


def _case(scheme: str, n: int, d: int):
    """``(w, keyword arguments)`` of ``scheme`` at sequence length ``n`` and head dim ``d``."""
    kw: dict = {}
    if scheme in ("rotary", "rotary-causal", "rotary-f64"):
        w = fastrope.Rotary(d)
        kw["causal"] = scheme != "rotary"
        if scheme == "rotary-f64":
            kw["dtype"] = np.float64
    elif scheme == "bias":
        w = fastrope.Rotary(d)
        kw.update(causal=True, bias=fastrope.alibi(HEADS, 2 * n))
    elif scheme == "window":
        w = fastrope.Rotary(d)
        kw.update(causal=True, window=(n // 4, 0))
    elif scheme == "blockw":
        w = fastrope.BlockW(np.tile(np.eye(2), (2 * n - 1, d // 2, 1, 1)))
    else:  # two W tables (one per head) on a diagonal support
        support = np.array([[i, i] for i in range(d)])
        values = np.random.default_rng(n + d).uniform(0.5, 1.0, (HEADS, 2 * n - 1, d))
        w = fastrope.SparseW(support, values)
    return w, kw


def _grid():
    for backward in (False, True):
        for scheme in SCHEMES:
            for d, eps in BACKWARD_D_EPS if backward else FORWARD_D_EPS:
                for n in NS:
                    yield backward, scheme, d, n, eps


def _key(backward, scheme, d, n, eps) -> str:
    return f"{'backward' if backward else 'forward'} {scheme} d={d} n={n} eps={eps:g}"


def _figures(backward, scheme, d, n, eps) -> dict:
    w, kw = _case(scheme, n, d)
    p = fastrope.plan(
        (HEADS, n, d),
        (HEADS, n, d),
        (HEADS, n, d),
        w,
        eps,
        bound_r=BOUND_R,
        v_max=1.0,
        backward=backward,
        memory_limit=1 << 34,
        num_threads=2,
        **kw,
    )
    return dict(
        method=p.method,
        route=p.route,
        exact_flops=p.exact_flops,
        exact_seconds=p.exact_seconds,
        working_set_bytes=p.working_set_bytes,
        fast_flops=p.fast_flops,
        fast_seconds=p.fast_seconds,
        fast_working_set_bytes=p.fast_working_set_bytes,
        why=p.why,
        refused=[list(r) for r in p.refused],
    )


def _expected() -> dict:
    with open(FIXTURE) as f:
        return json.load(f)


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_choices_and_costs_match_the_fixture(backward, scheme):
    expected = _expected()
    for case in _grid():
        if case[:2] != (backward, scheme):
            continue
        key = _key(*case)
        got, want = _figures(*case), expected[key]
        assert got["method"] == want["method"], key
        assert got["route"] == want["route"], key
        for name in ("exact_flops", "exact_seconds", "fast_flops", "fast_seconds"):
            if want[name] is None:
                assert got[name] is None, (key, name)
            else:
                assert math.isclose(got[name], want[name], rel_tol=1e-12), (key, name)
        for name in ("working_set_bytes", "fast_working_set_bytes", "why", "refused"):
            assert got[name] == want[name], (key, name)


def test_the_grid_takes_both_methods_and_both_routes():
    chosen = {(v["method"], v["route"]) for v in _expected().values()}
    assert {"exact", "fast"} <= {m for m, _ in chosen}
    assert {("fast", "toeplitz"), ("fast", "lowrank")} <= chosen


if __name__ == "__main__":
    FIXTURE.parent.mkdir(exist_ok=True)
    table = {_key(*case): _figures(*case) for case in _grid()}
    FIXTURE.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"{len(table)} plans written to {FIXTURE}", file=sys.stderr)
