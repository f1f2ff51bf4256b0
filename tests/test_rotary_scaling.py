"""Rope scaling: each type against a literal transcription of the Hugging Face formula."""

from __future__ import annotations

import math

import numpy as np
import pytest

import fastrope
import fastrope.reference
from fastrope import Rotary
from fastrope._rotary import rotary_frequencies


def default_theta(d: int, base: float) -> list[float]:
    return [1.0 / base ** (2 * m / d) for m in range(d // 2)]


def test_default_and_none() -> None:
    theta, f = rotary_frequencies(8, 10000.0, None, None)
    assert theta.dtype == np.float64 and theta.shape == (4,)
    np.testing.assert_allclose(theta, [1.0, 0.1, 0.01, 0.001], rtol=1e-14)
    assert f == 1.0
    for key in ("rope_type", "type"):
        theta2, f2 = rotary_frequencies(8, 10000.0, {key: "default"}, 123)
        np.testing.assert_array_equal(theta2, theta)
        assert f2 == 1.0


def test_rotary_frequencies_method() -> None:
    theta, f = Rotary(base=500000.0).frequencies(16)
    np.testing.assert_allclose(theta, default_theta(16, 500000.0), rtol=1e-14)
    assert f == 1.0


def test_linear() -> None:
    d, base, factor = 64, 10000.0, 4.0
    theta, f = rotary_frequencies(d, base, {"rope_type": "linear", "factor": factor}, None)
    expected = [t / factor for t in default_theta(d, base)]
    np.testing.assert_allclose(theta, expected, rtol=1e-13)
    assert f == 1.0


def test_ntk_static() -> None:
    d, base, factor = 64, 10000.0, 8.0
    theta, f = rotary_frequencies(d, base, {"type": "ntk", "factor": factor}, 10**6)
    new_base = base * factor ** (d / (d - 2))
    np.testing.assert_allclose(theta, default_theta(d, new_base), rtol=1e-13)
    assert f == 1.0


@pytest.mark.parametrize(
    ("max_position", "seq_len"),
    [(None, 2048), (0, 2048), (100, 2048), (2047, 2048), (2048, 2049), (4095, 4096)],
)
def test_dynamic_ntk(max_position: int | None, seq_len: int) -> None:
    d, base, factor, original = 32, 10000.0, 2.0, 2048
    scaling = {"type": "dynamic", "factor": factor, "original_max_position_embeddings": original}
    theta, f = rotary_frequencies(d, base, scaling, max_position)
    # HF: base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    new_base = base * ((factor * seq_len / original) - (factor - 1)) ** (d / (d - 2))
    np.testing.assert_allclose(theta, default_theta(d, new_base), rtol=1e-13)
    assert f == 1.0
    if seq_len == original:
        np.testing.assert_allclose(theta, default_theta(d, base), rtol=1e-13)
    if seq_len == 4096:  # 2 * 4096 / 2048 - 1 = 3
        np.testing.assert_allclose(theta, default_theta(d, base * 3 ** (32 / 30)), rtol=1e-13)


def llama3_expected(d, base, factor, low, high, original):
    out = []
    for m in range(d // 2):
        inv = 1.0 / base ** (2 * m / d)
        wavelen = 2 * math.pi / inv
        if wavelen < original / high:
            out.append(inv)
        elif wavelen > original / low:
            out.append(inv / factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append((1 - smooth) * inv / factor + smooth * inv)
    return out


def test_llama3_31_config() -> None:
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    d, base = 128, 500000.0
    theta, f = rotary_frequencies(d, base, scaling, None)
    expected = llama3_expected(d, base, 8.0, 1.0, 4.0, 8192)
    np.testing.assert_allclose(theta, expected, rtol=1e-13)
    assert f == 1.0
    # All three regimes occur with this config: kept, smoothed, divided by 8.
    plain = np.array(default_theta(d, base))
    ratio = theta / plain
    assert np.sum(np.isclose(ratio, 1.0)) > 0
    assert np.sum(np.isclose(ratio, 1 / 8)) > 0
    assert np.sum((ratio < 1 - 1e-9) & (ratio > 1 / 8 + 1e-9)) > 0
    assert theta[0] == 1.0


def yarn_expected(d, base, factor, original, beta_fast=32, beta_slow=1, truncate=True):
    def corr(rot):
        return d * math.log(original / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = corr(beta_fast), corr(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    out = []
    for m in range(d // 2):
        ramp = min(max((m - low) / (high - low), 0.0), 1.0)
        extrap = 1.0 / base ** (2 * m / d)
        interp = extrap / factor
        extra_factor = 1 - ramp
        out.append(interp * (1 - extra_factor) + extrap * extra_factor)
    return out


def test_yarn_default_attention_factor() -> None:
    d, base = 128, 10000.0
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    theta, f = rotary_frequencies(d, base, scaling, None)
    assert f == pytest.approx(0.1 * math.log(4) + 1, rel=1e-15)
    np.testing.assert_allclose(theta, yarn_expected(d, base, 4.0, 4096), rtol=1e-13)
    # Highest frequencies extrapolate (unchanged), lowest interpolate (divided by factor).
    assert theta[0] == 1.0
    assert theta[-1] == pytest.approx(1.0 / base ** ((d - 2) / d) / 4.0, rel=1e-13)


def test_yarn_options() -> None:
    d, base = 64, 10000.0
    common = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096}
    # DeepSeek-V3 style: mscale == mscale_all_dim -> f = 1.
    _, f = rotary_frequencies(d, base, {**common, "mscale": 1.0, "mscale_all_dim": 1.0}, None)
    assert f == pytest.approx(1.0, abs=1e-15)
    _, f = rotary_frequencies(d, base, {**common, "mscale": 0.707, "mscale_all_dim": 1.0}, None)
    expected = (0.1 * 0.707 * math.log(40) + 1) / (0.1 * 1.0 * math.log(40) + 1)
    assert f == pytest.approx(expected, rel=1e-14)
    # only one of mscale / mscale_all_dim -> get_mscale(factor)
    _, f = rotary_frequencies(d, base, {**common, "mscale": 0.707}, None)
    assert f == pytest.approx(0.1 * math.log(40) + 1, rel=1e-14)
    # explicit attention_factor wins
    _, f = rotary_frequencies(
        d, base, {**common, "attention_factor": 1.25, "mscale": 2.0, "mscale_all_dim": 1.0}, None
    )
    assert f == 1.25
    # factor <= 1 -> get_mscale = 1
    _, f = rotary_frequencies(
        d, base, {"type": "yarn", "factor": 1.0, "original_max_position_embeddings": 4096}, None
    )
    assert f == 1.0
    # beta_fast / beta_slow and truncate=False (gpt-oss style)
    scaling = {**common, "beta_fast": 16, "beta_slow": 2.0, "truncate": False}
    theta, _ = rotary_frequencies(d, base, scaling, None)
    np.testing.assert_allclose(
        theta, yarn_expected(d, base, 40.0, 4096, 16, 2.0, truncate=False), rtol=1e-13
    )
    assert not np.allclose(theta, yarn_expected(d, base, 40.0, 4096, 16, 2.0, truncate=True))
    # beta None or 0 -> HF's `or` defaults 32 / 1
    theta0, _ = rotary_frequencies(d, base, {**common, "beta_fast": None, "beta_slow": 0}, None)
    np.testing.assert_allclose(theta0, yarn_expected(d, base, 40.0, 4096), rtol=1e-13)


def test_rotary_scaling_reaches_frequencies() -> None:
    scaling = {"rope_type": "linear", "factor": 2.0}
    theta, f = Rotary(base=10000.0, scaling=scaling).frequencies(8, 50)
    np.testing.assert_allclose(theta, [0.5, 0.05, 0.005, 0.0005], rtol=1e-14)
    assert f == 1.0


@pytest.mark.parametrize("d", [0, -2, 3, 7])
def test_bad_d(d: int) -> None:
    with pytest.raises(ValueError, match=r"^d: "):
        rotary_frequencies(d, 10000.0, None, None)


def test_bad_d_type() -> None:
    with pytest.raises(TypeError, match=r"^d: "):
        rotary_frequencies(8.0, 10000.0, None, None)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["ntk", "dynamic"])
def test_ntk_needs_d_above_2(kind: str) -> None:
    scaling = {"type": kind, "factor": 2.0, "original_max_position_embeddings": 16}
    if kind == "ntk":
        del scaling["original_max_position_embeddings"]
    with pytest.raises(ValueError, match=r"^d: "):
        rotary_frequencies(2, 10000.0, scaling, None)


@pytest.mark.parametrize(
    ("scaling", "pattern"),
    [
        ({"factor": 2.0}, r"scaling: .*'rope_type'"),
        ({"rope_type": "longrope", "factor": 2.0}, r"scaling: unknown rope type 'longrope'"),
        ({"rope_type": 3}, r"scaling: unknown rope type"),
        ({"rope_type": "linear"}, r"scaling: 'linear' is missing \['factor'\]"),
        ({"rope_type": "linear", "factor": -1.0}, r"scaling: 'linear' key 'factor'"),
        ({"rope_type": "linear", "factor": "2"}, r"scaling: 'linear' key 'factor'"),
        ({"rope_type": "linear", "factor": True}, r"scaling: 'linear' key 'factor'"),
        ({"rope_type": "linear", "factor": float("nan")}, r"scaling: 'linear' key 'factor'"),
        ({"rope_type": "linear", "factor": 2.0, "foo": 1}, r"scaling: 'linear' does not take"),
        ({"rope_type": "linear", "type": "ntk", "factor": 2.0}, r"scaling: .*disagree"),
        (
            {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0},
            r"scaling: 'rope_theta'",
        ),
        (
            {"type": "dynamic", "factor": 2.0},
            r"scaling: 'dynamic' is missing \['original_max_position_embeddings'\]",
        ),
        (
            {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 0},
            r"scaling: 'yarn' key 'original_max_position_embeddings'",
        ),
        (
            {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4096.5},
            r"scaling: 'yarn' key 'original_max_position_embeddings'",
        ),
        (
            {
                "type": "yarn",
                "factor": 2.0,
                "original_max_position_embeddings": 4096,
                "truncate": "yes",
            },
            r"scaling: 'yarn' key 'truncate'",
        ),
        (
            {
                "type": "yarn",
                "factor": 2.0,
                "original_max_position_embeddings": 4096,
                "beta_fast": -1,
            },
            r"scaling: 'yarn' keys 'beta_fast' and 'beta_slow'",
        ),
        (
            {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192},
            r"scaling: 'llama3' is missing \['low_freq_factor', 'high_freq_factor'\]",
        ),
        (
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 4.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            r"scaling: 'llama3' needs high_freq_factor > low_freq_factor",
        ),
    ],
)
def test_bad_scaling(scaling: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        rotary_frequencies(16, 10000.0, scaling, None)


def test_missing_keys_message_lists_expected() -> None:
    with pytest.raises(ValueError) as info:
        rotary_frequencies(16, 10000.0, {"rope_type": "yarn"}, None)
    message = str(info.value)
    assert "original_max_position_embeddings" in message and "beta_fast" in message


def test_scaling_not_a_mapping() -> None:
    with pytest.raises(TypeError, match=r"^scaling: "):
        rotary_frequencies(16, 10000.0, [("rope_type", "linear")], None)  # type: ignore[arg-type]


def test_rope_theta_equal_to_base_is_accepted() -> None:
    scaling = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    theta, _ = rotary_frequencies(8, 10000.0, scaling, None)
    np.testing.assert_allclose(theta, [0.5, 0.05, 0.005, 0.0005], rtol=1e-14)


def test_explicit_frequencies():
    """``rope_type="explicit"``: the given θ and attention factor, used by every method."""
    theta = np.array([1.0, 0.3, 0.05, 0.001])
    w = fastrope.Rotary(
        base=500.0,
        scaling={"rope_type": "explicit", "inv_freq": list(theta), "attention_factor": 1.5},
    )
    got, f = w.frequencies(8)
    assert np.array_equal(got, theta) and f == 1.5
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 7, 8)) for _ in range(3))
    ref = fastrope.reference.attention(q, k, v, w, causal=True)
    pairs = fastrope.rotary_pairs(8)
    ang = np.arange(7)[:, None] * theta[None, :]
    rot = np.zeros((7, 8, 8))  # rotate by position, scale by f: W-free reference
    for m, (p, r) in enumerate(pairs):
        rot[:, p, p] = rot[:, r, r] = 1.5 * np.cos(ang[:, m])
        rot[:, r, p], rot[:, p, r] = 1.5 * np.sin(ang[:, m]), -1.5 * np.sin(ang[:, m])
    qr, kr = np.einsum("nab,hnb->hna", rot, q), np.einsum("nab,hnb->hna", rot, k)
    plain = fastrope.reference.attention(qr, kr, v, None, causal=True)
    assert np.abs(ref - plain).max() <= 1e-12
    assert np.abs(fastrope.attention(q, k, v, w, causal=True) - ref).max() <= 1e-12
    with pytest.raises(ValueError, match="'inv_freq' must be 4 finite numbers"):
        fastrope.Rotary(scaling={"rope_type": "explicit", "inv_freq": [1.0, 2.0]}).frequencies(8)
