"""The NumPy float64 oracle (fastrope.reference) against independent hand-written computations."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pytest

from fastrope import BlockW, Rotary, SparseW, reference

# --------------------------------------------------------------------------------------------
# Independent helpers (written here, not shared with the library)
# --------------------------------------------------------------------------------------------


def rope_theta(d: int, base: float = 10000.0) -> np.ndarray:
    return np.array([base ** (-2 * m / d) for m in range(d // 2)])


def rotate_interleaved(x: np.ndarray, pos: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Rotate pair (2m, 2m+1) of x[..., t, :] by pos[t] * theta[m] (RoFormer / Meta Llama)."""
    out = np.empty_like(x)
    for m, th in enumerate(theta):
        a = pos * th
        x0, x1 = x[..., 2 * m], x[..., 2 * m + 1]
        out[..., 2 * m] = x0 * np.cos(a) - x1 * np.sin(a)
        out[..., 2 * m + 1] = x0 * np.sin(a) + x1 * np.cos(a)
    return out


def rotate_hf(x: np.ndarray, pos: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Hugging Face: x * cos + rotate_half(x) * sin, cos/sin = cat(freqs, freqs)."""
    freqs = np.outer(pos, theta)
    emb = np.concatenate([freqs, freqs], axis=-1)
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * np.cos(emb) + rotated * np.sin(emb)


def softmax_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    mask: np.ndarray | None = None,
    scale: float | None = None,
    add: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Plain attention with scores scale * q k^T (+ add), boolean mask (True = keep)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = scale * (q @ np.swapaxes(k, -1, -2))
    if add is not None:
        s = s + add
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    mx = np.max(s, axis=-1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    e = np.exp(s - mx)
    tot = e.sum(-1, keepdims=True)
    out = (e @ v) / np.where(tot == 0, 1.0, tot)
    with np.errstate(divide="ignore"):
        lse = (mx + np.log(tot))[..., 0]
    return out, lse


def naive_general(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    w_of: Callable[[tuple, int], np.ndarray],
    keep: Callable[[int, int], bool] = lambda i, j: True,
    bias_of: Callable[[tuple, int], float] | None = None,
    q_offset: int = 0,
    k_offset: int = 0,
    scale: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Loops over (head, i, j): M_ij = scale q_i^T W_δ k_j + b(δ); w_of(head_index, δ)."""
    lead = q.shape[:-2]
    n_q, d = q.shape[-2:]
    n_k = k.shape[-2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = np.zeros((*lead, n_q, v.shape[-1]))
    lse = np.full((*lead, n_q), -np.inf)
    for h in np.ndindex(*lead):
        for i in range(n_q):
            logits, cols = [], []
            for j in range(n_k):
                if not keep(i, j):
                    continue
                delta = (q_offset + i) - (k_offset + j)
                s = scale * q[h][i] @ w_of(h, delta) @ k[h][j]
                if bias_of is not None:
                    s += bias_of(h, delta)
                logits.append(s)
                cols.append(j)
            if cols:
                lg = np.array(logits)
                mx = lg.max()
                e = np.exp(lg - mx)
                out[h][i] = e @ v[h][cols] / e.sum()
                lse[h][i] = mx + math.log(e.sum())
    return out, lse


def rotary_blocks(theta: np.ndarray, L: int) -> np.ndarray:
    """blocks[δ+L-1, m] = [[cos, sin], [-sin, cos]](δ θ_m)."""
    blocks = np.zeros((2 * L - 1, len(theta), 2, 2))
    for row in range(2 * L - 1):
        delta = row - (L - 1)
        for m, th in enumerate(theta):
            c, s = math.cos(delta * th), math.sin(delta * th)
            blocks[row, m] = [[c, s], [-s, c]]
    return blocks


def pair_list(d: int, layout: str) -> list[tuple[int, int]]:
    if layout == "interleaved":
        return [(2 * m, 2 * m + 1) for m in range(d // 2)]
    return [(m, m + d // 2) for m in range(d // 2)]


def blocks_to_dense(blocks: np.ndarray, layout: str) -> np.ndarray:
    d = 2 * blocks.shape[-3]
    dense = np.zeros((*blocks.shape[:-3], d, d))
    for m, (p, r) in enumerate(pair_list(d, layout)):
        idx = (p, r)
        for a in range(2):
            for b in range(2):
                dense[..., idx[a], idx[b]] = blocks[..., m, a, b]
    return dense


def blocks_to_sparse(blocks: np.ndarray, layout: str) -> tuple[np.ndarray, np.ndarray]:
    d = 2 * blocks.shape[-3]
    support, cols = [], []
    for m, (p, r) in enumerate(pair_list(d, layout)):
        idx = (p, r)
        for a in range(2):
            for b in range(2):
                support.append((idx[a], idx[b]))
                cols.append(blocks[..., m, a, b])
    return np.array(support, dtype=np.int64), np.stack(cols, axis=-1)


def rng_arrays(seed: int, *shapes: tuple[int, ...]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) for s in shapes]


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["interleaved", "half"])
@pytest.mark.parametrize("causal", [False, True])
def test_rotary_equals_rotate_then_attend(layout: str, causal: bool) -> None:
    B, H, n_q, n_k, d, d_v = 2, 3, 6, 9, 8, 5
    q_offset, k_offset = 7, 2
    q, k, v = rng_arrays(1, (B, H, n_q, d), (B, H, n_k, d), (B, H, n_k, d_v))
    theta = rope_theta(d, 10000.0)
    rotate = rotate_interleaved if layout == "interleaved" else rotate_hf
    qr = rotate(q, q_offset + np.arange(n_q), theta)
    kr = rotate(k, k_offset + np.arange(n_k), theta)
    mask = None
    if causal:
        mask = (q_offset + np.arange(n_q))[:, None] >= (k_offset + np.arange(n_k))[None, :]
    want, want_lse = softmax_attention(qr, kr, v, mask)
    got, lse = reference.attention(
        q,
        k,
        v,
        Rotary(layout=layout),
        causal=causal,
        q_offset=q_offset,
        k_offset=k_offset,
        return_lse=True,
    )
    assert got.dtype == np.float64 and got.shape == (B, H, n_q, d_v)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12, atol=1e-12)


def test_rotary_wrong_sign_differs() -> None:
    """The opposite rotation sign must be visibly different (guards the W convention)."""
    n, d = 8, 4
    q, k, v = rng_arrays(2, (n, d), (n, d), (n, 3))
    theta = rope_theta(d)
    qr = rotate_interleaved(q, np.arange(n), -theta)
    kr = rotate_interleaved(k, np.arange(n), -theta)
    wrong, _ = softmax_attention(qr, kr, v)
    got = reference.attention(q, k, v, Rotary())
    assert np.max(np.abs(got - wrong)) > 1e-3


def test_rotary_yarn_attention_factor_squared() -> None:
    d, n = 8, 6
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    w = Rotary(scaling=scaling)
    theta, f = w.frequencies(d, n - 1)
    assert f > 1.0
    q, k, v = rng_arrays(3, (2, n, d), (2, n, d), (2, n, d))
    pos = np.arange(n)
    # HF multiplies cos and sin by f: both q and k rotations get a factor f.
    want, _ = softmax_attention(
        f * rotate_interleaved(q, pos, theta), f * rotate_interleaved(k, pos, theta), v
    )
    np.testing.assert_allclose(reference.attention(q, k, v, w), want, rtol=1e-12, atol=1e-12)


def test_rotary_dynamic_uses_largest_position() -> None:
    d, n = 8, 5
    scaling = {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 8}
    w = Rotary(scaling=scaling)
    q, k, v = rng_arrays(4, (n, d), (n, d), (n, d))
    q_offset, k_offset = 10, 3  # largest position 14 -> seq_len 15
    theta, _ = w.frequencies(d, 14)
    base = 10000.0 * (2.0 * 15 / 8 - 1.0) ** (d / (d - 2))
    np.testing.assert_allclose(theta, rope_theta(d, base), rtol=1e-13)
    qr = rotate_interleaved(q, q_offset + np.arange(n), theta)
    kr = rotate_interleaved(k, k_offset + np.arange(n), theta)
    want, _ = softmax_attention(qr, kr, v)
    got = reference.attention(q, k, v, w, q_offset=q_offset, k_offset=k_offset)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["interleaved", "half"])
def test_block_sparse_dense_equal_rotary(layout: str) -> None:
    B, H, n_q, n_k, d, d_v = 2, 2, 7, 5, 6, 3
    q, k, v = rng_arrays(5, (B, H, n_q, d), (B, H, n_k, d), (B, H, n_k, d_v))
    q_offset, k_offset = 1, 4
    L = 9  # needs δ in [1-4-4, 1+6-4] = [-7, 3]
    blocks = rotary_blocks(rope_theta(d), L)
    kw = dict(q_offset=q_offset, k_offset=k_offset, return_lse=True)
    want, want_lse = reference.attention(q, k, v, Rotary(layout=layout), **kw)
    support, values = blocks_to_sparse(blocks, layout)
    dense = blocks_to_dense(blocks, layout)
    for w in (BlockW(blocks, layout=layout), SparseW(support, values), dense):
        got, lse = reference.attention(q, k, v, w, **kw)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(lse, want_lse, rtol=1e-12, atol=1e-12)


def test_position_matrices_rotary_is_relative_rotation() -> None:
    d = 6
    theta = rope_theta(d)
    deltas = [-5, 0, 3]
    for layout in ("interleaved", "half"):
        wmats = reference.position_matrices(Rotary(layout=layout), d, deltas)
        assert wmats.shape == (3, d, d)
        rotate = rotate_interleaved if layout == "interleaved" else rotate_hf
        eye = np.eye(d)
        for idx, delta in enumerate(deltas):
            p, p2 = 11, 11 - delta
            # rows of R(p) e_a: rotate each basis vector; q^T W k = (R(p) q) . (R(p') k)
            rq = rotate(eye, np.full(d, p), theta).T  # columns: R(p) e_a
            rk = rotate(eye, np.full(d, p2), theta).T
            np.testing.assert_allclose(wmats[idx], rq.T @ rk, atol=1e-12)


def test_position_matrices_tables() -> None:
    blocks = rng_arrays(6, (3, 5, 2, 2, 2))[0]  # lead 3, L=3, d=4
    got = reference.position_matrices(BlockW(blocks), 4, [-2, 1])
    assert got.shape == (3, 2, 4, 4)
    np.testing.assert_array_equal(got[:, 0], blocks_to_dense(blocks[:, 0], "interleaved"))
    np.testing.assert_array_equal(got[:, 1], blocks_to_dense(blocks[:, 3], "interleaved"))
    with pytest.raises(ValueError, match="needs δ in"):
        reference.position_matrices(BlockW(blocks), 4, [3])


def general_case(seed: int, lead=(2, 3), n_q=5, n_k=7, d=4, d_v=3, L=12, w_lead=(3,)):
    q, k, v, dense = rng_arrays(
        seed, (*lead, n_q, d), (*lead, n_k, d), (*lead, n_k, d_v), (*w_lead, 2 * L - 1, d, d)
    )
    return q, k, v, 0.5 * dense


def test_causal_bottom_right_matches_hand_mask() -> None:
    q, k, v, dense = general_case(7)
    n_q, n_k, L = 5, 7, 12
    got, lse = reference.attention(q, k, v, dense, causal=True, q_offset=n_k - n_q, return_lse=True)
    want, want_lse = naive_general(
        q,
        k,
        v,
        lambda h, dl: dense[h[-1], dl + L - 1],
        keep=lambda i, j: j <= i + (n_k - n_q),
        q_offset=n_k - n_q,
    )
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12, atol=1e-12)
    # top-left alignment with zero offsets
    got0 = reference.attention(q, k, v, dense, causal=True)
    want0, _ = naive_general(
        q, k, v, lambda h, dl: dense[h[-1], dl + L - 1], keep=lambda i, j: j <= i
    )
    np.testing.assert_allclose(got0, want0, rtol=1e-12, atol=1e-12)


def test_window_and_offsets() -> None:
    q, k, v, dense = general_case(8)
    L = 12
    left, right = 2, 1
    got = reference.attention(q, k, v, dense, window=(left, right), q_offset=3, k_offset=1)
    want, _ = naive_general(
        q,
        k,
        v,
        lambda h, dl: dense[h[-1], dl + L - 1],
        keep=lambda i, j: -right <= (3 + i) - (1 + j) <= left,
        q_offset=3,
        k_offset=1,
    )
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # window sides may be None (unbounded)
    got2 = reference.attention(q, k, v, dense, window=(None, 0))
    want2 = reference.attention(q, k, v, dense, causal=True)
    np.testing.assert_allclose(got2, want2, rtol=0, atol=0)


def test_bias_alibi_like() -> None:
    B, H, n, d = 2, 3, 6, 4
    q, k, v = rng_arrays(9, (B, H, n, d), (B, H, n, d), (B, H, n, d))
    L = n
    slopes = np.array([0.5, 0.25, 0.125])
    deltas = np.arange(-(L - 1), L)
    bias = -slopes[:, None] * np.abs(deltas)[None, :]
    theta = rope_theta(d)
    pos = np.arange(n)
    qr, kr = rotate_interleaved(q, pos, theta), rotate_interleaved(k, pos, theta)
    add = -slopes[:, None, None] * np.abs(pos[:, None] - pos[None, :])
    want, want_lse = softmax_attention(qr, kr, v, add=add)
    got, lse = reference.attention(q, k, v, Rotary(), bias=bias, return_lse=True)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12, atol=1e-12)


def test_empty_rows_give_zero_and_minus_inf() -> None:
    q, k, v, dense = general_case(10)
    # k_offset = 3, causal: query i sees key j only if i >= 3 + j -> rows 0..2 empty
    out, lse = reference.attention(q, k, v, dense, causal=True, k_offset=3, return_lse=True)
    assert not np.any(np.isnan(out)) and not np.any(np.isnan(lse))
    np.testing.assert_array_equal(out[..., :3, :], 0.0)
    assert np.all(np.isneginf(lse[..., :3]))
    assert np.all(np.isfinite(lse[..., 3:]))
    dout = rng_arrays(11, out.shape)[0]
    g = reference.attention_grad(q, k, v, dense, dout, causal=True, k_offset=3)
    np.testing.assert_array_equal(g.dq[..., :3, :], 0.0)
    assert all(np.all(np.isfinite(x)) for x in (g.dq, g.dk, g.dv, g.dw))
    # -inf bias on every visible δ also empties rows
    bias = np.zeros(2 * 12 - 1)
    bias[: 12 - 1 + 1] = -np.inf  # δ <= 0 masked
    out2, lse2 = reference.attention(q, k, v, dense, causal=True, bias=bias, return_lse=True)
    np.testing.assert_array_equal(out2[..., 0, :], 0.0)
    assert np.all(np.isneginf(lse2[..., 0]))
    # everything masked: a window that keeps nothing
    out3, lse3 = reference.attention(q, k, v, dense, window=(-1, 0), return_lse=True)
    np.testing.assert_array_equal(out3, 0.0)
    assert np.all(np.isneginf(lse3))


def test_gqa_equals_repeated_heads() -> None:
    B, Hq, Hk, n_q, n_k, d = 2, 6, 2, 5, 6, 4
    q, k, v = rng_arrays(12, (B, Hq, n_q, d), (B, Hk, n_k, d), (B, Hk, n_k, 3))
    krep, vrep = np.repeat(k, Hq // Hk, axis=1), np.repeat(v, Hq // Hk, axis=1)
    # q head h uses kv head h // 3
    np.testing.assert_array_equal(krep[:, 4], k[:, 1])
    kw = dict(causal=True, q_offset=1)
    got = reference.attention(q, k, v, Rotary(), **kw)
    want = reference.attention(q, krep, vrep, Rotary(), **kw)
    np.testing.assert_allclose(got, want, rtol=0, atol=0)
    dout = rng_arrays(13, got.shape)[0]
    g = reference.attention_grad(q, k, v, Rotary(), dout, **kw)
    grep = reference.attention_grad(q, krep, vrep, Rotary(), dout, **kw)
    assert g.dk.shape == k.shape and g.dv.shape == v.shape
    np.testing.assert_allclose(g.dq, grep.dq, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(g.dk, grep.dk.reshape(B, Hk, 3, n_k, d).sum(2), atol=1e-13)
    np.testing.assert_allclose(g.dv, grep.dv.reshape(B, Hk, 3, n_k, 3).sum(2), atol=1e-13)


def test_two_dim_inputs_and_float32() -> None:
    n_q, n_k, d = 4, 6, 4
    q, k, v = rng_arrays(14, (n_q, d), (n_k, d), (n_k, 2))
    theta = rope_theta(d)
    want, _ = softmax_attention(
        rotate_interleaved(q, np.arange(n_q), theta),
        rotate_interleaved(k, np.arange(n_k), theta),
        v,
        scale=0.3,
    )
    got = reference.attention(
        q.astype(np.float32), k.astype(np.float32), v.tolist(), Rotary(), scale=0.3
    )
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # extra keywords are swallowed
    reference.attention(
        q, k, v, Rotary(), 1e-3, method="fast", memory_limit=10, check_finite=False, num_threads=2
    )


def test_per_head_w_broadcasting() -> None:
    B, H, n, d = 2, 3, 5, 4
    q, k, v = rng_arrays(15, (B, H, n, d), (B, H, n, d), (B, H, n, d))
    L = n
    blocks = rng_arrays(16, (H, 2 * L - 1, d // 2, 2, 2))[0]
    got = reference.attention(q, k, v, BlockW(blocks))
    for h in range(H):
        one = reference.attention(q[:, h], k[:, h], v[:, h], BlockW(blocks[h]))
        np.testing.assert_allclose(got[:, h], one, rtol=1e-13, atol=1e-13)
    got1 = reference.attention(q, k, v, BlockW(blocks[:1][None]))  # (1, 1, 2L-1, ...)
    want1 = reference.attention(q, k, v, BlockW(blocks[0]))
    np.testing.assert_allclose(got1, want1, rtol=1e-13, atol=1e-13)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_out_of_range_delta() -> None:
    q, k, v, _ = general_case(17)
    n_q, n_k, d = 5, 7, 4
    blocks = rng_arrays(18, (3, 2 * 4 - 1, d // 2, 2, 2))[0]  # L = 4: δ in [-3, 3]
    with pytest.raises(ValueError, match=r"w: the call needs δ in \[-6, 4\].*\[-3, 3\]"):
        reference.attention(q, k, v, BlockW(blocks))
    # causal + bottom-right with a window: needed δ in [0, 3] -> fine
    reference.attention(q, k, v, BlockW(blocks), causal=True, window=(3, 0), q_offset=n_k - n_q)
    with pytest.raises(ValueError, match=r"needs δ in \[0, 6\]"):
        reference.attention(q, k, v, BlockW(blocks), causal=True, q_offset=n_k - n_q)
    dense = rng_arrays(19, (2 * 4 - 1, d, d))[0]
    with pytest.raises(ValueError, match=r"^w: the call needs δ"):
        reference.attention_grad(q, k, v, dense, np.ones((2, 3, n_q, 3)))
    bias = np.zeros(5)  # L_b = 3
    with pytest.raises(ValueError, match=r"^bias: the call needs δ in \[-6, 4\]"):
        reference.attention(q, k, v, Rotary(), bias=bias)


def test_shape_errors() -> None:
    q, k, v, dense = general_case(20)
    with pytest.raises(ValueError, match=r"^k: "):
        reference.attention(q, k[..., :3], v, dense)
    with pytest.raises(ValueError, match=r"^v: "):
        reference.attention(q, k, v[..., :4, :], dense)
    with pytest.raises(ValueError, match=r"^k: "):
        reference.attention(q, k[:, :2], v[:, :2], dense)  # 2 does not divide 3
    with pytest.raises(ValueError, match=r"^w: leading dims"):
        reference.attention(q, k, v, dense[:2])
    with pytest.raises(ValueError, match=r"^w: expected shape"):
        reference.attention(q, k, v, dense[..., :3])
    with pytest.raises(ValueError, match=r"^w: the δ axis"):
        reference.attention(q, k, v, dense[:, :4])
    with pytest.raises(TypeError, match=r"^q: "):
        reference.attention(q.astype(complex), k, v, dense)
    with pytest.raises(ValueError, match=r"^dout: "):
        reference.attention_grad(q, k, v, dense, np.ones(3))
    with pytest.raises(ValueError, match=r"^bias: leading dims"):
        reference.attention(q, k, v, dense, bias=np.zeros((4, 23)))


# --------------------------------------------------------------------------------------------
# Gradients against central finite differences
# --------------------------------------------------------------------------------------------


def finite_difference(fun: Callable[[np.ndarray], float], x: np.ndarray, h: float = 1e-5):
    grad = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        old = x[idx]
        x[idx] = old + h
        fp = fun(x)
        x[idx] = old - h
        fm = fun(x)
        x[idx] = old
        grad[idx] = (fp - fm) / (2 * h)
    return grad


def assert_close_grad(got: np.ndarray, want: np.ndarray, name: str) -> None:
    assert got.shape == want.shape, name
    err = np.max(np.abs(got - want)) if got.size else 0.0
    tol = 1e-6 * max(1.0, float(np.max(np.abs(want))) if want.size else 0.0)
    assert err <= tol, f"{name}: max error {err:.3e} > {tol:.3e}"


def make_w(kind: str, values: np.ndarray, support: np.ndarray | None = None):
    if kind == "block":
        return BlockW(values)
    if kind == "block-half":
        return BlockW(values, layout="half")
    if kind == "sparse":
        return SparseW(support, values)
    return values


GRAD_CASES = [
    # (kind, keywords, w_lead, bias_shape-or-None)
    ("dense", dict(), (3,), None),
    ("dense", dict(causal=True, q_offset=2), (1, 3), (3, 23)),
    ("block", dict(window=(3, 2), q_offset=4, k_offset=1), (3,), (23,)),
    ("block-half", dict(causal=True, q_offset=5, k_offset=0, scale=0.7), (), (2, 3, 23)),
    ("sparse", dict(q_offset=-2, k_offset=3), (2, 1), (1, 23)),
    ("sparse", dict(causal=True, k_offset=2), (), None),  # rows 0, 1 empty
]


@pytest.mark.parametrize(("kind", "kw", "w_lead", "bias_shape"), GRAD_CASES)
def test_gradients_finite_differences(kind, kw, w_lead, bias_shape) -> None:
    lead, n_q, n_k, d, d_v, L = (2, 3), 5, 7, 4, 3, 12
    rng = np.random.default_rng(100 + GRAD_CASES.index((kind, kw, w_lead, bias_shape)))
    q = rng.standard_normal((*lead, n_q, d))
    k = rng.standard_normal((*lead, n_k, d))
    v = rng.standard_normal((*lead, n_k, d_v))
    dout = rng.standard_normal((*lead, n_q, d_v))
    support = None
    if kind == "dense":
        values = 0.5 * rng.standard_normal((*w_lead, 2 * L - 1, d, d))
    elif kind.startswith("block"):
        values = rng.standard_normal((*w_lead, 2 * L - 1, d // 2, 2, 2))
    else:
        support = np.array([[0, 0], [0, 3], [2, 1], [3, 3], [1, 2], [2, 0]])
        values = rng.standard_normal((*w_lead, 2 * L - 1, len(support)))
    bias = None if bias_shape is None else 0.3 * rng.standard_normal(bias_shape)

    def loss(qq, kk, vv, ww, bb) -> float:
        out = reference.attention(qq, kk, vv, make_w(kind, ww, support), bias=bb, **kw)
        return float(np.sum(out * dout))

    g = reference.attention_grad(q, k, v, make_w(kind, values, support), dout, bias=bias, **kw)
    assert g.dw.shape == values.shape
    assert_close_grad(
        g.dq, finite_difference(lambda x: loss(x, k, v, values, bias), q.copy()), "dq"
    )
    assert_close_grad(
        g.dk, finite_difference(lambda x: loss(q, x, v, values, bias), k.copy()), "dk"
    )
    assert_close_grad(
        g.dv, finite_difference(lambda x: loss(q, k, x, values, bias), v.copy()), "dv"
    )
    assert_close_grad(
        g.dw, finite_difference(lambda x: loss(q, k, v, x, bias), values.copy()), "dw"
    )
    if bias is None:
        assert g.dbias is None
    else:
        assert_close_grad(
            g.dbias, finite_difference(lambda x: loss(q, k, v, values, x), bias.copy()), "dbias"
        )
    assert np.max(np.abs(g.dw)) > 0


@pytest.mark.parametrize("layout", ["interleaved", "half"])
def test_gradients_rotary_gqa_prime_sizes(layout: str) -> None:
    B, Hq, Hk, n_q, n_k, d, d_v = 1, 4, 2, 7, 11, 6, 5
    rng = np.random.default_rng(21)
    q = rng.standard_normal((B, Hq, n_q, d))
    k = rng.standard_normal((B, Hk, n_k, d))
    v = rng.standard_normal((B, Hk, n_k, d_v))
    dout = rng.standard_normal((B, Hq, n_q, d_v))
    bias = 0.2 * rng.standard_normal((Hq, 2 * 13 - 1))
    kw = dict(causal=True, q_offset=n_k - n_q, window=(5, 0), bias=bias)
    w = Rotary(layout=layout)

    def loss(qq, kk, vv, bb) -> float:
        return float(np.sum(reference.attention(qq, kk, vv, w, **{**kw, "bias": bb}) * dout))

    g = reference.attention_grad(q, k, v, w, dout, **kw)
    assert g.dw is None
    assert_close_grad(g.dq, finite_difference(lambda x: loss(x, k, v, bias), q.copy()), "dq")
    assert_close_grad(g.dk, finite_difference(lambda x: loss(q, x, v, bias), k.copy()), "dk")
    assert_close_grad(g.dv, finite_difference(lambda x: loss(q, k, x, bias), v.copy()), "dv")
    assert_close_grad(g.dbias, finite_difference(lambda x: loss(q, k, v, x), bias.copy()), "db")


def test_grad_ignores_out_and_lse_and_matches_forward_shapes() -> None:
    q, k, v, dense = general_case(22)
    dout = rng_arrays(23, (2, 3, 5, 3))[0]
    out, lse = reference.attention(q, k, v, dense, return_lse=True)
    g1 = reference.attention_grad(q, k, v, dense, dout, out=out, lse=lse, method="exact")
    g2 = reference.attention_grad(q, k, v, dense, dout)
    for a, b in zip(g1, g2):
        np.testing.assert_array_equal(a, b)
    assert g1.dq.shape == q.shape and g1.dk.shape == k.shape and g1.dv.shape == v.shape
