"""The error contract of docs/DESIGN.md §4: clear exceptions naming the argument; degenerate
sizes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import make_qkv, make_rng, make_w

import fastrope

ROT = fastrope.Rotary()


def qkv(dtype=np.float64, lead=(2,), n_q=5, n_k=6, d=4, d_v=3):
    return make_qkv(make_rng(0), lead, n_q, n_k, d, d_v, dtype)


def dense_w(L=6, d=4, lead=()):
    return make_w("dense", make_rng(1), L, d, lead)


# ------------------------------------------------------------------------------------------
# dtypes -> TypeError naming the argument
# ------------------------------------------------------------------------------------------

BAD_DTYPES = [np.int64, np.int32, np.complex128, np.bool_, object, np.float16, np.uint8]


@pytest.mark.parametrize("bad", BAD_DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("name", ("q", "k", "v"))
def test_wrong_dtype_qkv(name: str, bad) -> None:
    args = dict(zip("qkv", qkv()))
    args[name] = args[name].astype(bad)
    with pytest.raises(TypeError, match=rf"^{name}\b"):
        fastrope.attention(args["q"], args["k"], args["v"], ROT)
    with pytest.raises(TypeError, match=rf"^{name}\b"):
        fastrope.attention_grad(args["q"], args["k"], args["v"], ROT, np.zeros((2, 5, 3)))


@pytest.mark.parametrize(
    "bad", [np.int64, np.complex128, np.bool_, object], ids=lambda t: np.dtype(t).name
)
def test_wrong_dtype_tables_bias_dout(bad) -> None:
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"^w\b"):
        fastrope.attention(q, k, v, dense_w().astype(bad))
    with pytest.raises(TypeError, match=r"w\.blocks"):
        fastrope.attention(q, k, v, fastrope.BlockW(np.zeros((11, 2, 2, 2), dtype=bad)))
    with pytest.raises(TypeError, match=r"w\.values"):
        fastrope.attention(
            q, k, v, fastrope.SparseW(np.array([[0, 1]]), np.zeros((11, 1), dtype=bad))
        )
    with pytest.raises(TypeError, match=r"^bias\b"):
        fastrope.attention(q, k, v, ROT, bias=np.zeros(11, dtype=bad))
    with pytest.raises(TypeError, match=r"^dout\b"):
        fastrope.attention_grad(q, k, v, ROT, np.zeros((2, 5, 3), dtype=bad))


def test_sparse_support_float_dtype_is_type_error() -> None:
    """docs/DESIGN.md §4: TypeError for wrong dtypes (the oracle raises TypeError here too)."""
    q, k, v = qkv()
    w = fastrope.SparseW(np.array([[0.0, 1.0]]), np.zeros((11, 1)))
    with pytest.raises(TypeError, match=r"w\.support"):
        fastrope.reference.attention(q, k, v, w)
    with pytest.raises(TypeError, match=r"w\.support"):
        fastrope.attention(q, k, v, w)


@pytest.mark.parametrize(
    ("dq", "dk", "dv"),
    [
        (np.float32, np.float64, np.float64),
        (np.float64, np.float32, np.float64),
        (np.float64, np.float64, np.float32),
    ],
)
def test_mismatched_dtypes(dq, dk, dv) -> None:
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"q, k, v"):
        fastrope.attention(q.astype(dq), k.astype(dk), v.astype(dv), ROT)


@pytest.mark.parametrize("bad", ["q", None, 3.0, {"a": 1}])
def test_non_array_inputs(bad) -> None:
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"^q\b"):
        fastrope.attention(bad, k, v, ROT)
    if bad is None:  # w=None is plain dot-product attention (W_δ = I), not an error
        assert fastrope.attention(q, k, v, None).shape == (2, 5, 3)
        return
    with pytest.raises(TypeError, match=r"^w\b"):
        fastrope.attention(q, k, v, bad)


def test_bad_keyword_types() -> None:
    q, k, v = qkv()
    with pytest.raises(TypeError, match="q_offset"):
        fastrope.attention(q, k, v, ROT, q_offset=1.5)
    with pytest.raises(TypeError, match="k_offset"):
        fastrope.attention(q, k, v, ROT, k_offset="3")
    with pytest.raises(TypeError, match="causal"):
        fastrope.attention(q, k, v, ROT, causal=1)
    with pytest.raises(TypeError, match="scale"):
        fastrope.attention(q, k, v, ROT, scale="0.5")
    with pytest.raises(TypeError, match="eps"):
        fastrope.attention(q, k, v, ROT, eps="0")
    with pytest.raises(TypeError, match="num_threads"):
        fastrope.attention(q, k, v, ROT, num_threads=2.0)
    with pytest.raises(TypeError, match="window"):
        fastrope.attention(q, k, v, ROT, window=5)
    with pytest.raises(TypeError, match="window"):
        fastrope.attention(q, k, v, ROT, window=(1.5, 2))


# ------------------------------------------------------------------------------------------
# Shapes -> ValueError naming the argument
# ------------------------------------------------------------------------------------------


def test_wrong_ranks_and_shapes() -> None:
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"^q\b"):
        fastrope.attention(q[0, 0], k, v, ROT)
    with pytest.raises(ValueError, match=r"^k\b"):
        fastrope.attention(q, k[0], v, ROT)
    with pytest.raises(ValueError, match=r"^v\b"):
        fastrope.attention(q, k, v[None], ROT)
    with pytest.raises(ValueError, match=r"^k\b"):  # d of k differs from q's
        fastrope.attention(q, k[..., :2], v, ROT)
    with pytest.raises(ValueError, match=r"^v\b"):  # n_k of v differs from k's
        fastrope.attention(q, k, v[:, :5], ROT)
    with pytest.raises(ValueError, match=r"k, v|^k\b"):  # batch dims differ
        a, b, c = make_qkv(make_rng(2), (2, 2), 5, 6, 4, 3)
        fastrope.attention(a, b[:1], c[:1], ROT)


@pytest.mark.parametrize(("hq", "hk"), [(3, 2), (4, 3), (2, 4), (1, 2)])
def test_gqa_heads_not_dividing(hq: int, hk: int) -> None:
    rng = make_rng(3)
    q = rng.standard_normal((2, hq, 5, 4))
    k = rng.standard_normal((2, hk, 6, 4))
    v = rng.standard_normal((2, hk, 6, 3))
    with pytest.raises(ValueError, match=r"heads|^k\b"):
        fastrope.attention(q, k, v, ROT)


def test_odd_d_rotary_and_blockw() -> None:
    q, k, v = qkv(d=5)
    with pytest.raises(ValueError, match=r"(?=.*\bw\b)(?=.*even)"):
        fastrope.attention(q, k, v, ROT)
    with pytest.raises(ValueError, match=r"(?=.*\bw\b)(?=.*even)"):
        fastrope.attention(q, k, v, fastrope.BlockW(np.zeros((11, 2, 2, 2))))
    # sparse and dense W allow odd d
    fastrope.attention(q, k, v, dense_w(d=5))


def test_table_too_short_names_delta_range() -> None:
    q, k, v = qkv()  # n_q = 5, n_k = 6: δ in [-5, 4] with zero offsets
    with pytest.raises(ValueError, match=r"(?s)^w\b.*δ in \[-5, 4\]"):
        fastrope.attention(q, k, v, dense_w(L=3))
    with pytest.raises(ValueError, match=r"(?s)^w\b.*δ in \[-2, 7\]"):
        fastrope.attention(q, k, v, dense_w(L=6), q_offset=3)
    with pytest.raises(ValueError, match=r"(?s)w.*δ in \[0, 4\]"):
        fastrope.attention(q, k, v, fastrope.BlockW(np.zeros((7, 2, 2, 2))), causal=True)
    with pytest.raises(ValueError, match=r"(?s)w.*δ in \[-5, 4\]"):
        fastrope.attention(q, k, v, fastrope.SparseW(np.array([[0, 1]]), np.zeros((5, 1))))
    with pytest.raises(ValueError, match=r"(?s)^bias\b.*δ in \[-5, 4\]"):
        fastrope.attention(q, k, v, ROT, bias=np.zeros(5))
    with pytest.raises(ValueError, match=r"(?s)w.*δ in \[-105, -96\]"):
        fastrope.attention(q, k, v, dense_w(L=6), k_offset=100)
    # masks shrink what is needed: causal with a window needs only δ in [0, 2]
    fastrope.attention(q, k, v, dense_w(L=3), causal=True, window=(2, 0))
    fastrope.attention(q, k, v, ROT, bias=np.zeros(5), causal=True, window=(2, 0))


def test_even_number_of_table_rows() -> None:
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"^w\b.*odd"):
        fastrope.attention(q, k, v, np.zeros((12, 4, 4)))
    with pytest.raises(ValueError, match=r"w\.blocks.*odd"):
        fastrope.attention(q, k, v, fastrope.BlockW(np.zeros((12, 2, 2, 2))))
    with pytest.raises(ValueError, match=r"w\.values.*odd"):
        fastrope.attention(q, k, v, fastrope.SparseW(np.array([[0, 1]]), np.zeros((12, 1))))
    with pytest.raises(ValueError, match=r"^bias\b.*odd"):
        fastrope.attention(q, k, v, ROT, bias=np.zeros(12))


def test_table_shapes_and_broadcasting() -> None:
    q, k, v = qkv()  # lead (2,)
    with pytest.raises(ValueError, match=r"^w\b"):
        fastrope.attention(q, k, v, np.zeros((11, 4, 3)))
    with pytest.raises(ValueError, match=r"^w\b"):
        fastrope.attention(q, k, v, np.zeros((3, 11, 4, 4)))
    with pytest.raises(ValueError, match=r"^w\b"):
        fastrope.attention(q, k, v, np.zeros((1, 2, 11, 4, 4)))
    with pytest.raises(ValueError, match=r"w\.blocks"):
        fastrope.attention(q, k, v, fastrope.BlockW(np.zeros((11, 3, 2, 2))))
    with pytest.raises(ValueError, match=r"w\.values"):
        fastrope.attention(q, k, v, fastrope.SparseW(np.array([[0, 1]]), np.zeros((11, 2))))
    with pytest.raises(ValueError, match=r"^bias\b"):
        fastrope.attention(q, k, v, ROT, bias=np.zeros((3, 11)))
    with pytest.raises(ValueError, match=r"^bias\b"):
        fastrope.attention(q, k, v, ROT, bias=np.zeros(()))


def test_sparse_support_errors() -> None:
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"w\.support"):
        fastrope.attention(q, k, v, fastrope.SparseW(np.array([[0, 4]]), np.zeros((11, 1))))
    with pytest.raises(ValueError, match=r"w\.support"):
        fastrope.attention(q, k, v, fastrope.SparseW(np.array([[-1, 0]]), np.zeros((11, 1))))
    with pytest.raises(ValueError, match=r"w\.support"):
        fastrope.attention(q, k, v, fastrope.SparseW(np.array([[0, 1], [0, 1]]), np.zeros((11, 2))))
    with pytest.raises(ValueError, match=r"w\.support"):
        fastrope.attention(q, k, v, fastrope.SparseW(np.array([0, 1]), np.zeros((11, 2))))


def test_grad_dout_out_lse_shapes() -> None:
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"^dout\b"):
        fastrope.attention_grad(q, k, v, ROT, np.zeros((2, 5, 2)))
    with pytest.raises(ValueError, match=r"^out\b"):
        fastrope.attention_grad(
            q, k, v, ROT, np.zeros((2, 5, 3)), out=np.zeros((2, 5, 2)), lse=np.zeros((2, 5))
        )
    with pytest.raises(ValueError, match=r"^lse\b"):
        fastrope.attention_grad(
            q, k, v, ROT, np.zeros((2, 5, 3)), out=np.zeros((2, 5, 3)), lse=np.zeros((2, 4))
        )


# ------------------------------------------------------------------------------------------
# Non-finite values
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", ("q", "k", "v", "w", "w.blocks", "w.values", "bias", "dout"))
@pytest.mark.parametrize("dtype", (np.float64, np.float32))
def test_non_finite(name: str, bad: float, dtype) -> None:
    q, k, v = qkv(dtype)
    args = {"q": q, "k": k, "v": v}
    w = ROT
    bias = None
    dout = np.zeros((2, 5, 3), dtype)
    if name in args:
        args[name][1, 2, 1] = bad
    elif name == "w":
        w = dense_w().astype(dtype)
        w[4, 1, 2] = bad
    elif name == "w.blocks":
        blocks = np.zeros((11, 2, 2, 2), dtype)
        blocks[10, 1, 0, 1] = bad  # a δ row the call does not even use
        w = fastrope.BlockW(blocks)
    elif name == "w.values":
        values = np.zeros((11, 1), dtype)
        values[3, 0] = bad
        w = fastrope.SparseW(np.array([[0, 1]]), values)
    elif name == "bias":
        if bad == -np.inf:
            return  # -inf in a bias is a legal mask (tested in test_attention.py)
        bias = np.zeros(11, dtype)
        bias[5] = bad
    elif name == "dout":
        dout[0, 0, 0] = bad
    pattern = r"^(w|w\.blocks|w\.values)\b" if name.startswith("w") else rf"^{name}\b"
    if name != "dout":
        with pytest.raises(ValueError, match=pattern):
            fastrope.attention(args["q"], args["k"], args["v"], w, bias=bias)
        fastrope.attention(args["q"], args["k"], args["v"], w, bias=bias, check_finite=False)
    with pytest.raises(ValueError, match=pattern):
        fastrope.attention_grad(args["q"], args["k"], args["v"], w, dout, bias=bias)
    fastrope.attention_grad(args["q"], args["k"], args["v"], w, dout, bias=bias, check_finite=False)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", ("q", "k", "v"))
@pytest.mark.parametrize("method", ("fast", "auto"))
def test_non_finite_on_the_fast_path(name: str, bad: float, method: str) -> None:
    # With eps > 0 the fast method's planning probe scans k and v (natively): a bad entry in
    # any row, the last included, is refused with the same words as the exact path.
    rng = np.random.default_rng(3)
    n, d = 700, 2
    args = {
        "q": rng.uniform(-0.5, 0.5, (2, n, d)),
        "k": rng.uniform(-0.5, 0.5, (2, n, d)),
        "v": rng.uniform(-1, 1, (2, n, 3)),
    }
    args[name][1, n - 1, 1] = bad
    what = "NaN" if np.isnan(bad) else "Inf"
    for causal in (False, True):
        with pytest.raises(ValueError, match=rf"^{name}: expected finite values, got {what}"):
            fastrope.attention(
                args["q"], args["k"], args["v"], fastrope.Rotary(d), 1e-3,
                method=method, causal=causal,
            )


def test_non_finite_check_mentions_check_finite() -> None:
    q, k, v = qkv()
    q[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="check_finite"):
        fastrope.attention(q, k, v, ROT)


# ------------------------------------------------------------------------------------------
# Scalars and options
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [-1.0, -1e-300, float("nan"), float("inf")])
def test_bad_eps(eps: float) -> None:
    q, k, v = qkv()
    with pytest.raises(ValueError, match="eps"):
        fastrope.attention(q, k, v, ROT, eps)
    with pytest.raises(ValueError, match="eps"):
        fastrope.attention_grad(q, k, v, ROT, np.zeros((2, 5, 3)), eps)


@pytest.mark.parametrize("method", ["fastest", "EXACT", "", "approx"])
def test_unknown_method(method: str) -> None:
    q, k, v = qkv()
    with pytest.raises(ValueError, match="method"):
        fastrope.attention(q, k, v, ROT, method=method)


def test_unknown_layout() -> None:
    with pytest.raises(ValueError, match="layout"):
        fastrope.Rotary(layout="neox")
    with pytest.raises(ValueError, match="layout"):
        fastrope.BlockW(np.zeros((11, 2, 2, 2)), layout="rotate_half")


def test_bad_scale_and_window() -> None:
    q, k, v = qkv()
    for scale in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale"):
            fastrope.attention(q, k, v, ROT, scale=scale)
    for window in ((-1, 2), (2, -1), (-3, None)):
        with pytest.raises(ValueError, match="window"):
            fastrope.attention(q, k, v, ROT, window=window)


def test_method_fast_raises_approximation_error_when_it_cannot_certify() -> None:
    assert issubclass(fastrope.ApproximationError, ValueError)
    q, k, v = qkv()
    # eps = 0 asks for the exact result
    with pytest.raises(fastrope.ApproximationError, match="eps = 0"):
        fastrope.attention(q, k, v, ROT, 0.0, method="fast")
    # entries far outside the bounded regime: no polynomial of a sane degree certifies eps
    with pytest.raises(fastrope.ApproximationError, match="method='fast'"):
        fastrope.attention(q * 40, k * 40, v, ROT, 1e-3, method="fast")
    # the same for the fast backward, catchable as a ValueError
    with pytest.raises(ValueError, match="method='fast'"):
        fastrope.attention_grad(q * 40, k * 40, v, ROT, np.ones((2, 5, 3)), 1e-3, method="fast")
    # method="auto" falls back to exact and says why
    p = fastrope.plan(q * 40, k * 40, v, ROT, 1e-3)
    assert p.method == "exact" and "cannot" in p.why


def test_tiny_memory_limit_raises_memory_error() -> None:
    q, k, v = qkv()
    with pytest.raises(MemoryError):
        fastrope.attention(q, k, v, ROT, memory_limit=16)
    with pytest.raises(MemoryError):
        fastrope.attention_grad(q, k, v, dense_w(), np.zeros((2, 5, 3)), memory_limit=16)
    with pytest.raises(MemoryError):
        fastrope.plan(q, k, v, ROT, memory_limit=16)
    # a generous limit is fine
    fastrope.attention(q, k, v, ROT, memory_limit=1 << 30)
    for bad in (0, -5):
        with pytest.raises(ValueError, match="memory_limit"):
            fastrope.attention(q, k, v, ROT, memory_limit=bad)


@pytest.mark.parametrize("n", [0, -1])
def test_bad_num_threads(n: int) -> None:
    q, k, v = qkv()
    with pytest.raises(ValueError, match="num_threads"):
        fastrope.attention(q, k, v, ROT, num_threads=n)
    with pytest.raises(ValueError, match="num_threads"):
        fastrope.attention_grad(q, k, v, ROT, np.zeros((2, 5, 3)), num_threads=n)


def test_huge_num_threads_is_an_error_not_a_crash() -> None:
    """An absurd thread count must raise, not kill the interpreter (run in a subprocess)."""
    code = textwrap.dedent(
        """
        import numpy as np, fastrope
        q = np.zeros((2, 5, 4))
        try:
            fastrope.attention(q, q, q, fastrope.Rotary(), num_threads=10**6)
        except (ValueError, MemoryError, RuntimeError) as e:
            assert "num_threads" in str(e), str(e)
            print("raised", type(e).__name__)
        else:
            print("ran")
        """
    )
    src = str(Path(fastrope.__file__).resolve().parent.parent)
    env = {"PYTHONPATH": src, "PATH": "/usr/bin:/bin"}
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert res.returncode == 0, f"rc={res.returncode} stderr={res.stderr[-2000:]}"
    assert res.stdout.strip() in (
        "raised ValueError",
        "raised MemoryError",
        "raised RuntimeError",
        "ran",
    )


# ------------------------------------------------------------------------------------------
# Degenerate sizes work
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", (np.float64, np.float32))
@pytest.mark.parametrize("kind", ("rotary", "block", "sparse", "dense"))
def test_zero_sizes(kind: str, dtype) -> None:
    rng = make_rng(4)
    w = make_w(kind, rng, 6, 4, (), dtype)
    q, k, v = qkv(dtype)
    # n_q = 0
    out, lse = fastrope.attention(q[:, :0], k, v, w, return_lse=True)
    assert out.shape == (2, 0, 3) and lse.shape == (2, 0) and out.dtype == np.dtype(dtype)
    # n_k = 0: every row is empty
    out, lse = fastrope.attention(q, k[:, :0], v[:, :0], w, return_lse=True, causal=True)
    assert out.shape == (2, 5, 3) and (out == 0).all() and np.isneginf(lse).all()
    assert lse.dtype == np.dtype(dtype)
    # d_v = 0
    out, lse = fastrope.attention(q, k, v[..., :0], w, return_lse=True)
    assert out.shape == (2, 5, 0)
    ref_lse = fastrope.reference.attention(q, k, v[..., :0], w, return_lse=True)[1]
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5 if dtype == np.float32 else 1e-13)
    # zero batch
    a, b, c = make_qkv(rng, (0, 2), 5, 6, 4, 3, dtype)
    out, lse = fastrope.attention(a, b, c, w, return_lse=True)
    assert out.shape == (0, 2, 5, 3) and lse.shape == (0, 2, 5)
    # gradients of the same degenerate problems
    g = fastrope.attention_grad(q[:, :0], k, v, w, np.zeros((2, 0, 3), dtype))
    assert g.dq.shape == (2, 0, 4) and (g.dk == 0).all() and (g.dv == 0).all()
    g = fastrope.attention_grad(q, k[:, :0], v[:, :0], w, np.ones((2, 5, 3), dtype))
    assert g.dk.shape == (2, 0, 4) and (g.dq == 0).all()
    g = fastrope.attention_grad(q, k, v[..., :0], w, np.zeros((2, 5, 0), dtype))
    assert g.dv.shape == (2, 6, 0) and (g.dq == 0).all() and (g.dk == 0).all()


def test_d_zero_is_rejected() -> None:
    q, k, v = qkv(d=4)
    with pytest.raises(ValueError, match=r"^q\b"):
        fastrope.attention(q[..., :0], k[..., :0], v, np.zeros((11, 0, 0)))


def test_plan_reports_exact() -> None:
    q, k, v = qkv()
    p = fastrope.plan(q, k, v, ROT)
    assert p.method == "exact" and p.certified_error == 0.0 and p.working_set_bytes > 0
    assert isinstance(str(p), str) and p.why


# ------------------------------------------------------------------------------------------
# Extreme integers: a window wider than any δ is unbounded; offsets beyond int64
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "window", [(2**63 - 1, 2**63 - 1), (10**30, None), (None, 10**30), (2**64, 2**64)]
)
def test_huge_window_equals_unbounded(window) -> None:
    """window=(left, right) keeps -right <= δ <= left: any int wider than every δ is 'no window'."""
    q, k, v = qkv()
    expected = fastrope.attention(q, k, v, ROT)
    np.testing.assert_array_equal(fastrope.attention(q, k, v, ROT, window=window), expected)


@pytest.mark.parametrize(("q_offset", "k_offset"), [(2**63, 0), (2**62, -(2**62)), (0, -(2**70))])
def test_offsets_beyond_int64(q_offset: int, k_offset: int) -> None:
    """Either computed (finite, right shape) or a ValueError naming the offset (docs/DESIGN.md §4:
    ValueError for ranges, message naming the argument) -- never a bare OverflowError."""
    q, k, v = qkv()
    try:
        out = fastrope.attention(q, k, v, ROT, q_offset=q_offset, k_offset=k_offset)
    except ValueError as e:
        assert "offset" in str(e), str(e)
    else:
        assert out.shape == (2, 5, 3) and np.isfinite(out).all()
