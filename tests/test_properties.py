"""Property-based tests (hypothesis): random shapes, masks, offsets and memory layouts against
the float64 oracle.  Tolerances follow the rule stated in conftest.py."""

from __future__ import annotations

import numpy as np
from conftest import (
    EVEN_D_KINDS,
    W_KINDS,
    check_forward,
    check_grad,
    examples,
    make_bias,
    make_rng,
    make_w,
    needed_L,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastrope

SETTINGS = settings(
    max_examples=examples(40),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

LAYOUTS = ("c", "fortran", "reversed", "transposed", "sliced", "readonly")


def in_layout(x: np.ndarray, layout: str, rng: np.random.Generator) -> np.ndarray:
    """``x``'s values in a given memory layout (a view wherever possible)."""
    if layout == "fortran":
        y = np.asfortranarray(x)
    elif layout == "reversed":
        y = np.ascontiguousarray(x[..., ::-1, ::-1])[..., ::-1, ::-1]
    elif layout == "transposed":
        y = np.ascontiguousarray(np.swapaxes(x, -1, -2)).swapaxes(-1, -2)
    elif layout == "sliced":
        big = rng.standard_normal(tuple(2 * s + 1 for s in x.shape)).astype(x.dtype)
        sl = tuple(slice(1, 1 + 2 * s, 2) for s in x.shape)
        big[sl] = x
        y = big[sl]
    elif layout == "readonly":
        y = x.copy()
        y.setflags(write=False)
    else:
        y = x
    assert np.array_equal(y, x)
    return y


@st.composite
def problems(draw):
    kind = draw(st.sampled_from(W_KINDS))
    if kind in EVEN_D_KINDS:
        d = 2 * draw(st.integers(1, 8))
    else:
        d = draw(st.integers(1, 9))
    d_v = draw(st.integers(0, 7))
    n_q = draw(st.integers(0, 80))
    n_k = draw(st.integers(0, 80))
    batch_rank = draw(st.integers(0, 2))
    batch = tuple(draw(st.lists(st.integers(1, 2), min_size=batch_rank, max_size=batch_rank)))
    heads_axis = draw(st.booleans())
    hk = draw(st.integers(1, 2))
    group = draw(st.sampled_from((1, 2, 3)))
    lead_q = batch + ((hk * group,) if heads_axis else ())
    lead_k = batch + ((hk,) if heads_axis else ())
    if not heads_axis and batch:
        lead_q = lead_k = batch
    q_offset = draw(st.integers(-60, 60))
    k_offset = draw(st.integers(-60, 60))
    causal = draw(st.booleans())
    window = draw(
        st.one_of(
            st.none(),
            st.tuples(
                st.one_of(st.none(), st.integers(0, 40)), st.one_of(st.none(), st.integers(0, 40))
            ),
        )
    )
    w_per_head = draw(st.booleans()) and len(lead_q) > 0
    use_bias = draw(st.booleans())
    dtype = draw(st.sampled_from((np.float64, np.float32)))
    layouts = tuple(draw(st.sampled_from(LAYOUTS)) for _ in range(3))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(
        kind=kind,
        d=d,
        d_v=d_v,
        n_q=n_q,
        n_k=n_k,
        lead_q=lead_q,
        lead_k=lead_k,
        q_offset=q_offset,
        k_offset=k_offset,
        causal=causal,
        window=window,
        w_per_head=w_per_head,
        use_bias=use_bias,
        dtype=dtype,
        layouts=layouts,
        seed=seed,
    )


def materialise(p):
    rng = make_rng(p["seed"])
    dt = p["dtype"]
    q = rng.standard_normal(p["lead_q"] + (p["n_q"], p["d"])).astype(dt)
    k = rng.standard_normal(p["lead_k"] + (p["n_k"], p["d"])).astype(dt)
    v = rng.standard_normal(p["lead_k"] + (p["n_k"], p["d_v"])).astype(dt)
    q, k, v = (in_layout(x, lay, rng) for x, lay in zip((q, k, v), p["layouts"]))
    L = needed_L(p["n_q"], p["n_k"], p["q_offset"], p["k_offset"])
    w_lead = p["lead_q"][-1:] if p["w_per_head"] else ()
    w = make_w(p["kind"], rng, L, p["d"], w_lead, dt)
    bias = make_bias(rng, L, p["lead_q"][-1:]) if p["use_bias"] else None
    kw = dict(
        causal=p["causal"],
        window=p["window"],
        bias=bias,
        q_offset=p["q_offset"],
        k_offset=p["k_offset"],
    )
    return q, k, v, w, kw, rng


@SETTINGS
@given(problems())
def test_forward_matches_reference(p) -> None:
    q, k, v, w, kw, _ = materialise(p)
    max_pos = max(abs(p["q_offset"]) + p["n_q"], abs(p["k_offset"]) + p["n_k"])
    out, lse = check_forward(q, k, v, w, kind=p["kind"], max_pos=max_pos, **kw)
    assert out.shape == p["lead_q"] + (p["n_q"], p["d_v"])
    # masked-out rows: out exactly 0 and lse -inf, never NaN
    empty = np.isneginf(lse)
    assert (out[empty] == 0).all()
    # the result does not depend on the memory layout of the inputs
    qc, kc, vc = (np.ascontiguousarray(x) for x in (q, k, v))
    np.testing.assert_array_equal(fastrope.attention(qc, kc, vc, w, **kw), out)


@settings(
    max_examples=examples(20),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(problems())
def test_backward_matches_reference(p) -> None:
    p = dict(p, n_q=min(p["n_q"], 40), n_k=min(p["n_k"], 40))
    q, k, v, w, kw, rng = materialise(p)
    dout = rng.standard_normal(q.shape[:-1] + (v.shape[-1],)).astype(p["dtype"])
    check_grad(q, k, v, w, dout, kind=p["kind"], **kw)
