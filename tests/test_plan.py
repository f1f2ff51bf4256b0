"""The planner: a call plans once, ``plan()`` lists every refused method and route with its
reason, and ``route=`` restricts the fast method's route (docs/DESIGN.md §8)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import fastrope
from fastrope import _fastrope as native
from fastrope.reference import attention as attention_reference

N, D, DV = 2048, 4, 8


def _data(seed=0, n=N, d=D, heads=2):
    rng = np.random.default_rng(seed)
    q = rng.uniform(-1, 1, (heads, n, d))
    k = rng.uniform(-1, 1, (heads, n, d))
    v = rng.uniform(-1, 1, (heads, n, DV))
    return q, k, v, rng.uniform(-1, 1, (heads, n, DV))


def _plans_made(f):
    before = native.planner_calls()
    result = f()
    return native.planner_calls() - before, result


@pytest.mark.parametrize("route", ["auto", "toeplitz", "lowrank"])
def test_a_fast_forward_plans_once(route):
    q, k, v, _ = _data()
    w = fastrope.Rotary(D)
    made, out = _plans_made(
        lambda: fastrope.attention(q, k, v, w, 1e-3, causal=True, method="fast", route=route)
    )
    assert made == 1
    ref = attention_reference(q, k, v, w, causal=True)
    assert np.max(np.abs(out - ref)) <= 1e-3


@pytest.mark.filterwarnings("ignore:method='fast'")  # the Toeplitz route is predicted slower
@pytest.mark.parametrize("route", ["auto", "toeplitz"])
def test_a_fast_backward_plans_once(route):
    q, k, v, dout = _data(1)
    w = fastrope.Rotary(D)
    made, g = _plans_made(
        lambda: fastrope.attention_grad(
            q, k, v, w, dout, 1e-3, causal=True, method="fast", route=route,
            grad_error="absolute",
        )  # fmt: skip
    )
    assert made == 1
    exact = fastrope.attention_grad(q, k, v, w, dout, causal=True, method="exact")
    for got, ref in zip(g[:3], exact[:3]):
        assert np.max(np.abs(got - ref)) <= 1e-3


def test_auto_plans_once_whichever_method_it_picks():
    q, k, v, dout = _data(2, n=64)
    w = fastrope.Rotary(D)
    made, _ = _plans_made(lambda: fastrope.attention(q, k, v, w, 1e-3))
    assert made == 1
    made, _ = _plans_made(lambda: fastrope.attention(q, k, v, w, 0.0))
    assert made == 0  # eps = 0 is exact without asking the fast planner
    made, _ = _plans_made(lambda: fastrope.attention_grad(q, k, v, w, dout, 1e-3))
    assert made == 1


def _refused(p):
    return dict(p.refused)


def test_plan_lists_every_refused_route_with_its_reason():
    q, k, v, _ = _data(3)
    # Rotary: both routes certify; the planner takes the cheaper and says what the other costs
    p = fastrope.plan(q, k, v, fastrope.Rotary(D), 1e-3, causal=True, method="fast")
    assert p.method == "fast" and p.route == "lowrank"
    assert "flop" in _refused(p)["toeplitz"]
    assert _refused(p)["exact"] == "method='fast' was requested"
    # a bias table not of the ALiBi form or a general W keep the low-rank route out, each for
    # its reason (an ALiBi bias and a masking window take it)
    n = q.shape[-2]
    t5 = np.random.default_rng(0).uniform(-2, 0, (1, 4 * n - 1))
    cases = [
        (dict(bias=t5), fastrope.Rotary(D), "ALiBi form"),
        ({}, fastrope.BlockW(np.tile(np.eye(2), (2 * n - 1, D // 2, 1, 1))), "Rotary"),
    ]
    for kw in [dict(bias=fastrope.alibi(1, 2 * n)), dict(window=(64, 0))]:
        p = fastrope.plan(q, k, v, fastrope.Rotary(D), 1e-3, causal=True, method="fast", **kw)
        assert p.route == "lowrank", (kw, p.refused)
    for kw, w, word in cases:
        p = fastrope.plan(q, k, v, w, 1e-3, causal=True, method="fast", **kw)
        assert p.route == "toeplitz"
        assert word in _refused(p)["lowrank"], p.refused
    # route='toeplitz' is a reason of its own
    p = fastrope.plan(q, k, v, fastrope.Rotary(D), 1e-3, method="fast", route="toeplitz")
    assert p.route == "toeplitz"
    assert _refused(p)["lowrank"] == "route='toeplitz' was requested"
    p = fastrope.plan(q, k, v, fastrope.Rotary(D), 1e-3, method="fast", route="lowrank")
    assert p.route == "lowrank"
    assert _refused(p)["toeplitz"] == "route='lowrank' was requested"


def test_exact_plans_say_why_fast_was_refused():
    q, k, v, _ = _data(4, n=64)
    w = fastrope.Rotary(D)
    p = fastrope.plan(q, k, v, w, 1e-3, method="exact")
    assert p.method == "exact" and _refused(p)["fast"] == "method='exact' was requested"
    p = fastrope.plan(q, k, v, w, 0.0)
    assert "eps = 0" in _refused(p)["fast"]
    p = fastrope.plan(q, k, v, w, 1e-3)  # n = 64: exact is cheaper
    assert p.method == "exact" and "slower" in _refused(p)["fast"]
    assert p.native is None  # an exact plan keeps no fast plan
    text = str(p)
    assert "refused fast:" in text


def test_a_call_no_route_serves_gives_each_routes_own_reason():
    """Standard-normal d = 8 at eps = 0.1: both routes apply and both give up; the message names
    each route's own limit (features for low-rank, terms for Toeplitz), not one of them."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 512, 8)) for _ in range(3))
    pattern = (
        r"^method='fast': no fast route serves eps = 1\.000e-1: "
        r"the low-rank route: degree \d+ needs C\(8 \+ \d+, \d+\) = [\d.e]+ features, more than"
        r" the limit of 1000000; "
        r"the Toeplitz route: degree \d+ would need C\(\d+, \d+\) = [\d.e]+ terms, more than"
        r" the limit of 1000000$"
    )
    with pytest.raises(fastrope.ApproximationError, match=pattern):
        fastrope.attention(q, k, v, fastrope.Rotary(), 0.1, method="fast")
    p = fastrope.plan(q, k, v, fastrope.Rotary(), 0.1)
    assert p.method == "exact"
    assert "the low-rank route: degree" in p.why and "the Toeplitz route: degree" in p.why


def test_method_fast_warns_when_it_is_predicted_far_slower_than_exact():
    """A huge eps on a small call: the planner certifies with a degree whose features cost far
    more than the exact method; method='fast' runs it as asked, with a warning that points at
    the caller's line and gives both predicted times; method='auto' runs exact, silently."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 64, 8)) for _ in range(3))
    with pytest.warns(UserWarning, match=r"method='fast': predicted .* s against the exact") as w:
        p = fastrope.plan(q, k, v, fastrope.Rotary(), 1e6, method="fast")
    assert w[0].filename == __file__
    assert p.method == "fast" and p.fast_seconds > 100 * p.exact_seconds
    assert f"degree {p.degree} ({p.terms} features)" in str(w[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fastrope.plan(q, k, v, fastrope.Rotary(), 1e6).method == "exact"
        # a fast call that is worth it does not warn
        q2, k2, v2, _ = _data(1, n=2**14)
        assert fastrope.plan(q2, k2, v2, fastrope.Rotary(D), 1e-3, method="fast").method == "fast"


def test_route_lowrank_where_it_cannot_serve():
    q, k, v, _ = _data(5, n=256)
    bias = np.random.default_rng(1).uniform(-2, 0, (1, 1023))  # T5-like: not ALiBi
    with pytest.raises(fastrope.ApproximationError, match="route='lowrank'.*ALiBi form"):
        fastrope.attention(
            q, k, v, fastrope.Rotary(D), 1e-3, bias=bias, method="fast", route="lowrank"
        )
    # auto falls back to exact and says why
    p = fastrope.plan(q, k, v, fastrope.Rotary(D), 1e-3, bias=bias, route="lowrank")
    assert p.method == "exact" and "route='lowrank'" in _refused(p)["fast"]


@pytest.mark.parametrize("bad", ["fft", 3, "Toeplitz"])
def test_route_is_validated(bad):
    q, k, v, _ = _data(6, n=16)
    with pytest.raises(ValueError, match="route: expected one of"):
        fastrope.attention(q, k, v, fastrope.Rotary(D), 1e-3, route=bad)


def test_the_environment_default(monkeypatch):
    q, k, v, _ = _data(7)
    monkeypatch.setenv("FASTROPE_FAST_PATH", "toeplitz")
    p = fastrope.plan(q, k, v, fastrope.Rotary(D), 1e-3, method="fast")
    assert p.route == "toeplitz"
    p = fastrope.plan(q, k, v, fastrope.Rotary(D), 1e-3, method="fast", route="auto")
    assert p.route == "lowrank"  # an explicit route wins
    monkeypatch.setenv("FASTROPE_FAST_PATH", "fft")
    with pytest.raises(ValueError, match="FASTROPE_FAST_PATH"):
        fastrope.plan(q, k, v, fastrope.Rotary(D), 1e-3)


def test_a_plan_handle_runs_only_with_the_arguments_it_was_made_for():
    from fastrope._api import prepare

    q, k, v, _ = _data(8, n=512)
    call = prepare(q, k, v, fastrope.Rotary(D))
    args = dict(
        **call.native_args(),
        eps=1e-3,
        max_terms=10**6,
        max_degree=40,
        memory_limit=1 << 32,
        num_threads=None,
    )
    info = native.fast_forward(call.q4, call.k4, call.v4, **args, run=False)[2]
    handle = info["handle"]
    assert "forward" in repr(handle)
    out, lse, _ = native.fast_forward(call.q4, call.k4, call.v4, **args, run=True, plan=handle)
    again, _, _ = native.fast_forward(call.q4, call.k4, call.v4, **args, run=True)
    np.testing.assert_array_equal(out, again)
    other = call.q4.copy()
    with pytest.raises(ValueError, match="plan: made for other arguments"):
        native.fast_forward(other, call.k4, call.v4, **args, run=True, plan=handle)
    with pytest.raises(ValueError, match="plan: made for other arguments"):
        native.fast_forward(
            call.q4, call.k4, call.v4, **dict(args, eps=1e-2), run=True, plan=handle
        )
