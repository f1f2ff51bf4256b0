"""The kernel-spectra cache of the fast method across calls (issue #3).

Repeated calls reuse the kernel spectra (``cache_info`` counts the hits), results are bitwise
those of an uncached call and within ``eps`` of the reference, a call with other data but the
same kernel hits and is still certified from its own bound ``R``, every input the spectra depend
on separates entries, the limit and ``memory_limit`` bound what is held, and threads share it.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import fastrope
from fastrope import reference

EPS = 1e-3


@pytest.fixture(autouse=True)
def fresh_cache(toeplitz_path):
    limit = fastrope.cache_info()["limit"]
    fastrope.set_cache_limit(1 << 30)
    fastrope.clear_cache()
    yield
    fastrope.clear_cache()
    fastrope.set_cache_limit(limit)


def unit_inputs(seed: int, n: int = 384, d: int = 4, dv: int = 6, heads: int = 2, r: float = 1.0):
    """q, k with unit rows times ``sqrt(r)`` each (so ``R = scale * r`` for Rotary)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((heads, n, d))
    k = rng.standard_normal((heads, n, d))
    q *= np.sqrt(r) / np.linalg.norm(q, axis=-1, keepdims=True)
    k *= np.sqrt(r) / np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.uniform(-1, 1, (heads, n, dv))
    return q, k, v


def fast(q, k, v, w=None, **kw):
    w = fastrope.Rotary() if w is None else w
    return fastrope.attention(q, k, v, w, EPS, method="fast", **kw)


def counts():
    i = fastrope.cache_info()
    return i["hits"], i["misses"]


def test_api_and_info_fields():
    for name in ("clear_cache", "cache_info", "set_cache_limit"):
        assert name in fastrope.__all__
        assert getattr(fastrope, name).__doc__
    info = fastrope.cache_info()
    assert set(info) >= {"hits", "misses", "entries", "bytes", "limit"}
    assert info["limit"] == 1 << 30
    assert (info["hits"], info["misses"], info["entries"], info["bytes"]) == (0, 0, 0, 0)
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError):
            fastrope.set_cache_limit(bad)


def test_repeated_calls_hit_and_match_uncached_results():
    q, k, v = unit_inputs(0)
    first = fast(q, k, v, causal=True)
    assert counts() == (0, 1)
    info = fastrope.cache_info()
    assert info["entries"] == 1 and 0 < info["bytes"] <= info["limit"]
    for i in range(3):
        again = fast(q, k, v, causal=True)
        assert counts() == (i + 1, 1)
        assert np.array_equal(again, first)
    ref = reference.attention(q, k, v, fastrope.Rotary(), causal=True)
    assert np.abs(first - ref).max() <= EPS
    # Uncached (limit 0): bitwise the same result, nothing held, nothing hit.
    fastrope.set_cache_limit(0)
    assert fastrope.cache_info()["entries"] == 0
    uncached = fast(q, k, v, causal=True)
    assert np.array_equal(uncached, first)
    info = fastrope.cache_info()
    assert (info["hits"], info["misses"], info["entries"], info["bytes"]) == (3, 2, 0, 0)


def test_other_data_same_kernel_hits_and_is_certified_with_its_own_bound():
    # R = 0.61 and R = 0.612 share the Chebyshev interval (R rounded up to 7 bits: 0.6171875),
    # hence the polynomial and the spectra; the second call's R is larger than the first's, so
    # it could not pass the first call's plan: it is certified with its own.
    scale = 0.5
    q1, k1, v1 = unit_inputs(1, r=0.61 / scale)
    q2, k2, v2 = unit_inputs(2, r=0.612 / scale)
    p1 = fastrope.plan(q1, k1, v1, fastrope.Rotary(), EPS, method="fast", scale=scale)
    p2 = fastrope.plan(q2, k2, v2, fastrope.Rotary(), EPS, method="fast", scale=scale)
    assert p1.bound_r < p2.bound_r < 0.6171875
    assert p1.degree == p2.degree and p1.poly_kind == p2.poly_kind
    out1 = fast(q1, k1, v1, scale=scale)
    out2 = fast(q2, k2, v2, scale=scale)
    assert counts() == (1, 1)
    ref2 = reference.attention(q2, k2, v2, fastrope.Rotary(), scale=scale)
    assert np.abs(out2 - ref2).max() <= EPS
    ref1 = reference.attention(q1, k1, v1, fastrope.Rotary(), scale=scale)
    assert np.abs(out1 - ref1).max() <= EPS
    # And bitwise what a cold cache gives.
    fastrope.clear_cache()
    assert np.array_equal(fast(q2, k2, v2, scale=scale), out2)
    assert counts() == (0, 1)


def test_every_kernel_input_separates_entries():
    q, k, v = unit_inputs(3, n=256)
    rng = np.random.default_rng(3)
    L = 512
    block = fastrope.BlockW(rng.uniform(-0.5, 0.5, (2 * L - 1, 2, 2, 2)))
    block2 = fastrope.BlockW(rng.uniform(-0.5, 0.5, (2 * L - 1, 2, 2, 2)))
    calls = [
        dict(),
        dict(causal=True),
        dict(window=(40, 0)),
        dict(bias=np.full(2 * 256 - 1, -0.05)),
        dict(scale=0.4),
        dict(q_offset=3),
        dict(w=fastrope.Rotary(base=500.0)),
        dict(w=block),
        dict(w=block2),
        dict(eps_scale=1e-3),
        dict(n=200),
    ]
    outs = []
    for i, kw in enumerate(calls):
        kw = dict(kw)
        eps = EPS * kw.pop("eps_scale", 1.0)
        n = kw.pop("n", 256)
        w = kw.pop("w", fastrope.Rotary())
        out = fastrope.attention(q[:, :n], k[:, :n], v[:, :n], w, eps, method="fast", **kw)
        outs.append(out)
        assert counts() == (0, i + 1), kw
    # Every one again: all hits, identical results.
    for i, kw in enumerate(calls):
        kw = dict(kw)
        eps = EPS * kw.pop("eps_scale", 1.0)
        n = kw.pop("n", 256)
        w = kw.pop("w", fastrope.Rotary())
        out = fastrope.attention(q[:, :n], k[:, :n], v[:, :n], w, eps, method="fast", **kw)
        assert np.array_equal(out, outs[i])
        assert counts() == (i + 1, len(calls))
    assert fastrope.cache_info()["entries"] == len(calls)


def test_backward_kernels_are_cached_too():
    q, k, v = unit_inputs(4, n=256)
    rng = np.random.default_rng(4)
    dout = rng.uniform(-1, 1, (2, 256, 6))
    L = 256
    w = fastrope.BlockW(rng.uniform(-0.5, 0.5, (2 * L - 1, 2, 2, 2)))
    bias = np.full(2 * L - 1, -0.05)

    def grad():
        return fastrope.attention_grad(q, k, v, w, dout, 1e-2, method="fast", bias=bias)

    g1 = grad()
    h, m = counts()
    assert (h, m) == (0, 1)
    g2 = grad()
    assert counts() == (1, 1)
    fastrope.set_cache_limit(0)
    g3 = grad()
    for a, b, c in zip(g1, g2, g3):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    ref = reference.attention_grad(q, k, v, w, dout, bias=bias)
    for name in ("dq", "dk", "dv", "dw", "dbias"):
        err = np.abs(getattr(g2, name) - getattr(ref, name)).max()
        assert err <= 1e-2, (name, err)


def test_limit_and_memory_limit_bound_what_is_held():
    q, k, v = unit_inputs(5, n=256)
    fast(q, k, v)
    one = fastrope.cache_info()["bytes"]
    assert one > 0
    # A limit below one entry: computed, not kept.
    fastrope.set_cache_limit(one - 1)
    assert fastrope.cache_info()["entries"] == 0
    fast(q, k, v, causal=True)
    assert fastrope.cache_info()["entries"] == 0
    # Room for about two: the least recently used goes first.
    fastrope.set_cache_limit(2 * one + one // 2)
    fastrope.clear_cache()
    a = fast(q, k, v)
    fast(q, k, v, causal=True)
    fast(q, k, v)  # refreshes the first
    fast(q, k, v, window=(30, 0))  # evicts the causal one
    info = fastrope.cache_info()
    assert (info["entries"], info["evictions"], info["hits"], info["misses"]) == (2, 1, 1, 3)
    assert info["bytes"] <= info["limit"]
    assert np.array_equal(fast(q, k, v), a)
    assert counts() == (2, 3)
    fast(q, k, v, causal=True)
    assert counts() == (2, 4)
    # A call's memory_limit bounds what the cache holds during and after it.
    fastrope.set_cache_limit(1 << 30)
    for i in range(4):
        fast(q, k, v, window=(10 + i, 0))
    assert fastrope.cache_info()["entries"] >= 4
    plan = fastrope.plan(q, k, v, fastrope.Rotary(), EPS, method="fast", causal=True)
    limit = plan.working_set_bytes + one // 2
    fast(q, k, v, causal=True, memory_limit=limit)
    assert fastrope.cache_info()["bytes"] <= limit


def test_threads_share_the_cache_correctly():
    inputs = [unit_inputs(10 + i, n=256) for i in range(2)]
    kws = [dict(), dict(causal=True), dict(window=(20, 5))]
    fastrope.set_cache_limit(0)
    expected = {(i, j): fast(*inputs[i], **kws[j]) for i in range(2) for j in range(3)}
    fastrope.set_cache_limit(1 << 30)
    fastrope.clear_cache()
    errors = []
    rounds = 4

    def worker(t: int):
        try:
            for r in range(rounds):
                for i in range(2):
                    j = (t + r + i) % 3
                    out = fast(*inputs[i], **kws[j])
                    if not np.array_equal(out, expected[(i, j)]):
                        errors.append((t, r, i, j))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    h, m = counts()
    assert h + m == 4 * rounds * 2
    # Three kernels; concurrent first lookups may each build, but most calls hit.
    assert 3 <= m <= 3 * 4 and h >= 4 * rounds * 2 - 12
    assert fastrope.cache_info()["entries"] == 3


def test_streamed_spectra_are_cached_small_and_hit():
    # Under a memory_limit the held spectra do not fit, a call streams them: the cache keeps
    # what a streamed kernel is rebuilt from (expansion, norms, masses, the sequences), not
    # the spectra, and the next call with the same kernel hits it.
    rng = np.random.default_rng(41)
    q, k, v = unit_inputs(41, n=300)
    w = fastrope.BlockW(rng.uniform(-0.6, 0.6, (599, 2, 2, 2)))
    held = fast(q, k, v, w)
    held_bytes = fastrope.cache_info()["bytes"]
    assert fastrope.cache_info()["entries"] == 1
    p = fastrope.plan(q, k, v, w, EPS, method="fast", memory_limit=1 << 34)
    limit = p.fast_working_set_bytes
    while True:
        p = fastrope.plan(q, k, v, w, EPS, method="fast", memory_limit=limit)
        if p.details["kernel_spectra"]["mode"] == "streamed":
            break
        limit = limit * 7 // 8
    fastrope.clear_cache()
    out = fast(q, k, v, w, memory_limit=limit)
    info = fastrope.cache_info()
    assert (info["entries"], info["misses"], info["hits"]) == (1, 1, 0)
    # The sequences (8 rows of 2n - 1 diagonals) and the factor, plus small tables: far less
    # than the spectra of every pair.
    assert 8 * 9 * 599 < info["bytes"] < held_bytes / 4
    again = fast(q, k, v, w, memory_limit=limit)
    assert fastrope.cache_info()["hits"] == 1
    assert np.array_equal(out, again) and np.array_equal(out, held)
    assert np.abs(out - reference.attention(q, k, v, w)).max() <= EPS
