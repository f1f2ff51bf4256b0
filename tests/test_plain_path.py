"""The plain-call path of ``attention`` (``fastrope._attention._plain_forward``): a decode step or
a short prefill with ``w=None`` or an unscaled ``Rotary`` skips the general argument
normalisation. It must accept the same calls, give the same results (bit for bit: the same
native forward runs) and raise the same errors as the general path, in NumPy and in torch."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close, make_qkv, score_bound, tol

import fastrope
from fastrope import _attention, reference


@pytest.fixture
def general_only(monkeypatch):
    """Run calls with the plain path switched off (the general path for every call)."""

    def run(fn, *args, **kwargs):
        with monkeypatch.context() as m:
            m.setattr(_attention, "_plain_forward", lambda *a: None)
            return fn(*args, **kwargs)

    return run


@pytest.fixture
def plain_only(monkeypatch):
    """Fail any call that leaves the plain path for the general one."""

    def run(fn, *args, **kwargs):
        def boom(*a, **k):
            raise AssertionError("the call took the general path")

        with monkeypatch.context() as m:
            m.setattr(_attention, "prepare", boom)
            return fn(*args, **kwargs)

    return run


CASES = [
    # lead dims, group, n_q, n_k, d, dv, w, kwargs
    ((1, 8), 1, 1, 512, 64, 64, None, dict(causal=True, q_offset=511)),
    ((1, 8), 4, 1, 96, 16, 8, None, dict(causal=True, q_offset=95)),
    ((2, 4), 2, 3, 40, 8, 5, fastrope.Rotary(), dict(causal=True, q_offset=37)),
    ((4,), 1, 64, 64, 32, 32, fastrope.Rotary(), dict(causal=True)),
    ((2, 2), 1, 17, 23, 6, 3, fastrope.Rotary(500.0, "half"), dict(q_offset=5, k_offset=-3)),
    ((3,), 3, 5, 9, 4, 2, None, dict(scale=0.7)),
    ((1, 2), 1, 2, 7, 2, 1, fastrope.Rotary(), dict(causal=True, k_offset=4)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_plain_path_equals_the_general_path_and_the_reference(
    rng, plain_only, general_only, case, dtype
):
    lead, group, nq, nk, d, dv, w, kw = CASES[case]
    q, k, v = make_qkv(rng, lead, nq, nk, d, dv, dtype=dtype, group=group)
    out, lse = plain_only(fastrope.attention, q, k, v, w, return_lse=True, **kw)
    out_g, lse_g = general_only(fastrope.attention, q, k, v, w, return_lse=True, **kw)
    assert out.dtype == dtype and out.shape == out_g.shape and lse.shape == lse_g.shape
    np.testing.assert_array_equal(out, out_g)
    np.testing.assert_array_equal(lse, lse_g)
    ref_out, ref_lse = reference.attention(q, k, v, w, return_lse=True, **kw)
    max_pos = nk + abs(kw.get("q_offset", 0)) + abs(kw.get("k_offset", 0))
    t = tol(dtype, n_terms=d, n_k=nk, score=score_bound(q, k, kw.get("scale")), max_pos=max_pos)
    assert_close(out, ref_out, t * float(np.abs(v).max()), "out")
    assert_close(lse, ref_lse, t, "lse")


@pytest.mark.parametrize(
    "kw",
    [
        dict(w=fastrope.Rotary(scaling={"rope_type": "linear", "factor": 2.0})),
        dict(bias=np.zeros(2 * 12 - 1)),
        dict(window=(3, 0)),
        dict(eps=1e-3, method="auto"),
        dict(scale=1),
        dict(causal=np.bool_(True)),
        dict(q_offset=np.int64(2)),
    ],
)
def test_calls_outside_the_plain_path_still_agree(rng, general_only, kw):
    q, k, v = make_qkv(rng, (2,), 4, 12, 8, 3)
    kw = dict(kw)
    w = kw.pop("w", None)
    out = fastrope.attention(q, k, v, w, **kw)
    np.testing.assert_array_equal(out, general_only(fastrope.attention, q, k, v, w, **kw))


def _error(fn, *args, **kwargs):
    with pytest.raises(Exception) as e:
        fn(*args, **kwargs)
    return type(e.value), str(e.value)


@pytest.mark.parametrize(
    "bad",
    ["nan_q", "inf_k", "nan_v", "d_mismatch", "n_mismatch", "heads", "memory", "threads", "odd_d"],
)
def test_plain_path_raises_the_general_paths_errors(rng, general_only, bad):
    q, k, v = make_qkv(rng, (1, 4), 1, 32, 8, 8, group=2)
    kw = dict(causal=True, q_offset=31)
    if bad == "nan_q":
        q[0, 1, 0, 3] = np.nan
    elif bad == "inf_k":
        k[0, 1, 5, 2] = np.inf
    elif bad == "nan_v":
        v[0, 0, 7, 0] = np.nan
    elif bad == "d_mismatch":
        k = k[..., :6]
    elif bad == "n_mismatch":
        v = v[..., :31, :]
    elif bad == "heads":
        q = np.concatenate([q, q[:, :1]], axis=1)
    elif bad == "memory":
        kw["memory_limit"] = 10
    elif bad == "threads":
        kw["num_threads"] = 0
    elif bad == "odd_d":
        q, k = q[..., :7], k[..., :7]
        kw["w"] = fastrope.Rotary()
    w = kw.pop("w", None)
    got = _error(fastrope.attention, q, k, v, w, **kw)
    want = _error(general_only, fastrope.attention, q, k, v, w, **kw)
    assert got == want


def test_unchecked_nan_still_runs_on_the_plain_path(rng, plain_only):
    q, k, v = make_qkv(rng, (1, 2), 1, 16, 4, 4)
    q[0, 0, 0, 0] = np.nan
    out = plain_only(fastrope.attention, q, k, v, None, check_finite=False)
    assert out.shape == (1, 2, 1, 4)


def test_torch_inference_calls_take_the_plain_path(rng, plain_only, general_only):
    torch = pytest.importorskip("torch")
    import fastrope.torch as ft

    q, k, v = (torch.from_numpy(x) for x in make_qkv(rng, (1, 4), 1, 64, 16, 8, group=2))
    w = fastrope.Rotary()
    with torch.inference_mode():
        qr = ft.rotate(q, w, 63)
        out, lse = plain_only(
            ft.attention, qr, k, v, None, causal=True, q_offset=63, return_lse=True
        )
        out_g, lse_g = general_only(
            ft.attention, qr, k, v, None, causal=True, q_offset=63, return_lse=True
        )
    assert isinstance(out, torch.Tensor) and out.dtype == q.dtype
    torch.testing.assert_close(out, out_g, rtol=0, atol=0)
    torch.testing.assert_close(lse, lse_g, rtol=0, atol=0)
    np.testing.assert_allclose(qr.numpy(), w.rotate(q.numpy(), 63), rtol=0, atol=0)
    # With a gradient to take, the call goes through the custom op and still agrees.
    qg = qr.clone().requires_grad_(True)
    out2 = ft.attention(qg, k, v, None, causal=True, q_offset=63)
    assert out2.requires_grad
    torch.testing.assert_close(out2.detach(), out, rtol=0, atol=0)
    # Errors are the general path's: the argument is named.
    with torch.inference_mode(), pytest.raises(ValueError, match="grad_error"):
        ft.attention(qr, k, v, None, grad_error="sideways")
    with torch.inference_mode(), pytest.raises(ValueError, match="eps"):
        ft.attention(qr, k, v, None, eps=-1.0, method="exact")


def test_torch_rotate_reuses_its_tables_only_for_the_same_position(rng):
    torch = pytest.importorskip("torch")
    import threading

    import fastrope.torch as ft

    w = fastrope.Rotary()
    x = rng.standard_normal((1, 4, 1, 16)).astype(np.float32)
    xt = torch.from_numpy(x)
    want = {p: w.rotate(x, p) for p in (5, 6, 1000)}
    with torch.inference_mode():
        for p in (5, 5, 6, 1000, 5, 1000, 6):
            np.testing.assert_array_equal(ft.rotate(xt, w, p).numpy(), want[p])
        x64 = torch.from_numpy(x.astype(np.float64))  # same position, another dtype
        np.testing.assert_array_equal(ft.rotate(x64, w, 6).numpy(), w.rotate(x64.numpy(), 6))
    errors = []

    def worker(p):
        with torch.inference_mode():
            for _ in range(300):
                if not np.array_equal(ft.rotate(xt, w, p).numpy(), want[p]):
                    errors.append(p)

    threads = [threading.Thread(target=worker, args=(p,)) for p in (5, 6, 1000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors


def test_kv_cache_appends_in_place_and_keeps_earlier_views(rng):
    torch = pytest.importorskip("torch")
    import fastrope.torch as ft

    ks = [torch.from_numpy(rng.standard_normal((1, 2, m, 4))) for m in (50, 1, 30, 1)]
    vs = [torch.from_numpy(rng.standard_normal((1, 2, m, 3))) for m in (50, 1, 30, 1)]
    cache = ft.KVCache()
    views = []
    with torch.inference_mode():
        for k, v in zip(ks, vs):
            views.append(cache.update(k, v))
        # the storage grew past its first capacity (64) and earlier views kept their rows
        for i, (kv, vv) in enumerate(views):
            torch.testing.assert_close(kv, torch.cat(ks[: i + 1], dim=-2), rtol=0, atol=0)
            torch.testing.assert_close(vv, torch.cat(vs[: i + 1], dim=-2), rtol=0, atol=0)
        assert len(cache) == 82 and cache.k.shape == (1, 2, 82, 4)
        with pytest.raises(ValueError, match="k: expected shape"):
            cache.update(ks[0][..., :3], vs[0])
    # Under autograd the cache is extended functionally: gradients reach the appended keys.
    k_new = torch.from_numpy(rng.standard_normal((1, 2, 1, 4))).requires_grad_()
    k_all, _ = cache.update(k_new, vs[-1])
    k_all.sum().backward()
    assert k_new.grad is not None and torch.all(k_new.grad == 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["interleaved", "half"])
@pytest.mark.parametrize("shape", [(1, 8, 1, 64), (3, 5, 6), (2, 2, 7, 4), (1, 2), (4, 0, 8)])
def test_native_row_rotation_gives_numpys_bits(rng, dtype, layout, shape):
    from fastrope._position import _rotate_rows, _rotate_rows_numpy

    x = rng.standard_normal(shape).astype(dtype)
    n, d = shape[-2:]
    c, s = (rng.standard_normal((n, d // 2)).astype(dtype) for _ in range(2))
    got = _rotate_rows(x, c, s, layout)
    assert got.dtype == dtype and got.shape == x.shape
    np.testing.assert_array_equal(got, _rotate_rows_numpy(x, c, s, layout))
    # strided x (every other row) takes the NumPy operations, with the same result
    xs = np.repeat(x, 2, axis=-2)[..., ::2, :]
    np.testing.assert_array_equal(_rotate_rows(xs, c, s, layout), got)


def test_kv_cache_moves_between_inference_mode_no_grad_and_autograd(rng):
    torch = pytest.importorskip("torch")
    import fastrope.torch as ft

    ks = [torch.from_numpy(rng.standard_normal((1, 2, m, 4))) for m in (3, 1, 1, 1)]
    vs = [torch.from_numpy(rng.standard_normal((1, 2, m, 4))) for m in (3, 1, 1, 1)]
    cache = ft.KVCache()
    with torch.inference_mode():  # storage made in inference mode...
        cache.update(ks[0], vs[0])
    with torch.no_grad():  # ...is replaced, not written, outside it
        cache.update(ks[1], vs[1])
    k_grad = ks[2].clone().requires_grad_()
    k_all, _ = cache.update(k_grad, vs[2])  # autograd: extended functionally
    with torch.no_grad():  # the cache holds keys in the graph: still not written in place
        k_next, _ = cache.update(ks[3], vs[3])
    torch.testing.assert_close(k_next, torch.cat(ks, dim=-2), rtol=0, atol=0)
    k_all.sum().backward()
    assert torch.all(k_grad.grad == 1)
