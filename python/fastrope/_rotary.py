"""Rotary frequencies ``θ_m`` and the attention factor ``f``, with Hugging Face rope scaling.

The default RoPE frequencies are ``θ_m = base^(-2m/d)`` for ``m = 0 .. d/2 - 1`` and ``f = 1``.
``scaling`` takes the Hugging Face ``rope_scaling`` dict (key ``"rope_type"`` or the older
``"type"``) and reproduces the formulas of ``transformers.modeling_rope_utils``:

``linear`` (position interpolation; ``_compute_linear_scaling_rope_parameters``)::

    θ_m = base^(-2m/d) / factor

``ntk`` (static NTK-aware scaling)::

    base' = base * factor^(d/(d-2)),   θ_m = base'^(-2m/d)

``dynamic`` (dynamic NTK; ``_compute_dynamic_ntk_parameters``), with ``L0`` =
``original_max_position_embeddings`` and ``s = max(max_position + 1, L0)`` (``s = L0`` when
``max_position`` is None)::

    base' = base * (factor * s / L0 - (factor - 1))^(d/(d-2)),   θ_m = base'^(-2m/d)

``yarn`` (``_compute_yarn_parameters``), with ``L0`` = ``original_max_position_embeddings``::

    get_mscale(s, m=1) = 1 if s <= 1 else 0.1 * m * ln(s) + 1
    f = attention_factor                       if given, else
        get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
                                               if mscale and mscale_all_dim are both truthy, else
        get_mscale(factor)
    beta_fast = beta_fast or 32,   beta_slow = beta_slow or 1
    corr(r)   = d * ln(L0 / (2π r)) / (2 ln base)
    low  = corr(beta_fast),  high = corr(beta_slow)
    if truncate (default True): low = floor(low), high = ceil(high)
    low  = max(low, 0),  high = min(high, d - 1);   if low == high: high += 0.001
    ramp_m = clip((m - low) / (high - low), 0, 1)          (m = 0 .. d/2 - 1)
    θ_m = base^(-2m/d) * (ramp_m / factor + (1 - ramp_m))

``llama3`` (``_compute_llama3_parameters``), with ``L0`` = ``original_max_position_embeddings``,
``lo = low_freq_factor``, ``hi = high_freq_factor``, ``θ⁰_m = base^(-2m/d)`` and
``λ_m = 2π / θ⁰_m``::

    θ_m = θ⁰_m / factor                                    if λ_m > L0 / lo
    θ_m = θ⁰_m                                             if λ_m < L0 / hi
    θ_m = (1 - σ_m) θ⁰_m / factor + σ_m θ⁰_m,   σ_m = (L0 / λ_m - lo) / (hi - lo)   otherwise

``explicit``: the frequencies themselves, ``{"rope_type": "explicit", "inv_freq": [θ_0, ...],
"attention_factor": f}`` (``f`` defaults to 1; ``base`` is then unused).  This is how a model's
own rotary embedding is taken over as it stands (``inv_freq`` and ``attention_scaling`` of a Hugging
Face rotary module, whatever its rope type).

``default`` (or ``scaling=None``): no change.  Only YaRN (and ``explicit`` with a factor) has
``f != 1``; Hugging Face multiplies cos and sin by ``f``, so the attention score gets multiplied by
``f^2``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping

import numpy as np

__all__ = ["rotary_frequencies", "SCALING_KEYS"]

# Required and optional keys of each scaling type (besides "rope_type"/"type" and "rope_theta").
SCALING_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "ntk": (("factor",), ()),
    "dynamic": (("factor", "original_max_position_embeddings"), ()),
    "yarn": (
        ("factor", "original_max_position_embeddings"),
        ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
    ),
    "llama3": (
        ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
        (),
    ),
    "explicit": (("inv_freq",), ("attention_factor",)),
}

_COMMON_KEYS = ("rope_type", "type", "rope_theta")


def _expected(kind: str) -> str:
    req, opt = SCALING_KEYS[kind]
    text = f"required keys {list(req)}" if req else "no further keys"
    if opt:
        text += f", optional keys {list(opt)}"
    return text


def _real(scaling: Mapping[str, Any], kind: str, key: str, *, positive: bool = True) -> float:
    value = scaling[key]
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = math.isfinite(value) and (value > 0 or not positive)
    if not ok:
        need = "a finite number > 0" if positive else "a finite number"
        raise ValueError(
            f"scaling: {kind!r} key {key!r} must be {need}, got {scaling[key]!r} "
            f"({_expected(kind)})"
        )
    return float(value)


def _length(scaling: Mapping[str, Any], kind: str, key: str) -> int:
    value = scaling[key]
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        ok = math.isfinite(float(value)) and float(value).is_integer() and value > 0
    if not ok:
        raise ValueError(
            f"scaling: {kind!r} key {key!r} must be a positive integer, got {value!r} "
            f"({_expected(kind)})"
        )
    return int(value)


def _optional_real(scaling: Mapping[str, Any], kind: str, key: str, *, positive: bool) -> Any:
    if scaling.get(key) is None:
        return None
    return _real(scaling, kind, key, positive=positive)


def _scaling_type(scaling: Mapping[str, Any]) -> str:
    kinds = [scaling[key] for key in ("rope_type", "type") if key in scaling]
    if not kinds:
        raise ValueError(
            "scaling: expected a 'rope_type' (or 'type') key naming one of "
            f"{sorted(SCALING_KEYS)}, got keys {sorted(map(str, scaling))}"
        )
    if len(kinds) == 2 and kinds[0] != kinds[1]:
        raise ValueError(f"scaling: 'rope_type' ({kinds[0]!r}) and 'type' ({kinds[1]!r}) disagree")
    kind = kinds[0]
    if not isinstance(kind, str) or kind not in SCALING_KEYS:
        raise ValueError(
            f"scaling: unknown rope type {kind!r}; expected one of {sorted(SCALING_KEYS)}"
        )
    return kind


def _check_keys(scaling: Mapping[str, Any], kind: str, base: float) -> None:
    req, opt = SCALING_KEYS[kind]
    missing = [key for key in req if key not in scaling]
    if missing:
        raise ValueError(f"scaling: {kind!r} is missing {missing}; expected {_expected(kind)}")
    unknown = [key for key in scaling if key not in req + opt + _COMMON_KEYS]
    if unknown:
        raise ValueError(
            f"scaling: {kind!r} does not take {sorted(map(str, unknown))}; expected "
            f"{_expected(kind)}"
        )
    if "rope_theta" in scaling:
        theta = scaling["rope_theta"]
        if not isinstance(theta, numbers.Real) or isinstance(theta, bool) or theta != base:
            raise ValueError(
                f"scaling: 'rope_theta' ({theta!r}) differs from base ({base!r}); pass the "
                "rope base as Rotary(base=...)"
            )


def _default_inv_freq(d: int, base: float) -> np.ndarray:
    """``θ_m = 1 / base^(2m/d)``, as Hugging Face writes it (``arange(0, d, 2) / d``)."""
    return 1.0 / (base ** (np.arange(0, d, 2, dtype=np.float64) / d))


def _yarn(d: int, base: float, scaling: Mapping[str, Any]) -> tuple[np.ndarray, float]:
    kind = "yarn"
    factor = _real(scaling, kind, "factor")
    original = _length(scaling, kind, "original_max_position_embeddings")
    attention_factor = _optional_real(scaling, kind, "attention_factor", positive=True)
    mscale = _optional_real(scaling, kind, "mscale", positive=False)
    mscale_all_dim = _optional_real(scaling, kind, "mscale_all_dim", positive=False)
    beta_fast = _optional_real(scaling, kind, "beta_fast", positive=False) or 32.0
    beta_slow = _optional_real(scaling, kind, "beta_slow", positive=False) or 1.0
    if beta_fast <= 0 or beta_slow <= 0:
        raise ValueError(
            f"scaling: 'yarn' keys 'beta_fast' and 'beta_slow' must be > 0 (or None/0 for the "
            f"defaults 32 and 1), got beta_fast={scaling.get('beta_fast')!r}, "
            f"beta_slow={scaling.get('beta_slow')!r}"
        )
    truncate = scaling.get("truncate", True)
    if truncate is None:
        truncate = True
    if not isinstance(truncate, (bool, np.bool_)):
        raise ValueError(f"scaling: 'yarn' key 'truncate' must be a bool, got {truncate!r}")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        if scale <= 1:
            return 1.0
        return 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(
                get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
            )
        else:
            attention_factor = get_mscale(factor)

    def find_correction_dim(num_rotations: float) -> float:
        return (d * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = find_correction_dim(beta_fast)
    high = find_correction_dim(beta_slow)
    if truncate:
        low = math.floor(low)
        high = math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # as Hugging Face: prevent a division by zero
    ramp = np.clip((np.arange(d // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)

    pos_freqs = base ** (np.arange(0, d, 2, dtype=np.float64) / d)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1.0 - ramp
    inv_freq = (
        inv_freq_interpolation * (1.0 - extrapolation_factor)
        + inv_freq_extrapolation * extrapolation_factor
    )
    return inv_freq, float(attention_factor)


def _llama3(d: int, base: float, scaling: Mapping[str, Any]) -> np.ndarray:
    kind = "llama3"
    factor = _real(scaling, kind, "factor")
    low_freq_factor = _real(scaling, kind, "low_freq_factor")
    high_freq_factor = _real(scaling, kind, "high_freq_factor")
    old_context_len = _length(scaling, kind, "original_max_position_embeddings")
    if not high_freq_factor > low_freq_factor:
        raise ValueError(
            "scaling: 'llama3' needs high_freq_factor > low_freq_factor, got "
            f"high_freq_factor={high_freq_factor!r}, low_freq_factor={low_freq_factor!r}"
        )
    inv_freq = _default_inv_freq(d, base)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor
    )
    smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, inv_freq_llama)


def rotary_frequencies(
    d: int,
    base: float,
    scaling: Mapping[str, Any] | None = None,
    max_position: int | None = None,
) -> tuple[np.ndarray, float]:
    """Rotary frequencies and attention factor: ``(theta, f)``.

    ``theta`` is float64 of shape ``(d/2,)``; the default is ``θ_m = base^(-2m/d)``.  ``f`` is the
    attention factor (1 except for YaRN); the score is multiplied by ``f^2``.  ``scaling`` is a
    Hugging Face ``rope_scaling`` dict; see the module docstring for each type's formula.
    ``max_position`` (the largest position in the call) is used by ``"dynamic"`` only.

    Raises ValueError for an odd or non-positive ``d``, a bad ``base``, or an unknown scaling type
    and missing/invalid keys (the message names ``scaling`` and the expected keys).
    """
    if isinstance(d, bool) or not isinstance(d, numbers.Integral):
        raise TypeError(f"d: expected a positive even int, got {type(d).__name__}")
    d = int(d)
    if d <= 0 or d % 2:
        raise ValueError(f"d: rotary frequencies need a positive even head dim, got d={d}")
    if isinstance(base, bool) or not isinstance(base, numbers.Real):
        raise TypeError(f"base: expected a float > 1, got {type(base).__name__}")
    base = float(base)
    if not math.isfinite(base) or base <= 1.0:
        raise ValueError(f"base: expected a finite float > 1, got {base!r}")
    if scaling is None:
        return _default_inv_freq(d, base), 1.0
    if not isinstance(scaling, Mapping):
        raise TypeError(
            "scaling: expected a dict such as {'rope_type': 'linear', 'factor': 2.0} or None, "
            f"got {type(scaling).__name__}"
        )
    kind = _scaling_type(scaling)
    _check_keys(scaling, kind, base)
    if kind in ("ntk", "dynamic") and d <= 2:
        raise ValueError(f"d: {kind!r} rope scaling needs d > 2 (exponent d/(d-2)), got d={d}")

    if kind == "default":
        return _default_inv_freq(d, base), 1.0
    if kind == "linear":
        return _default_inv_freq(d, base) / _real(scaling, kind, "factor"), 1.0
    if kind == "ntk":
        factor = _real(scaling, kind, "factor")
        return _default_inv_freq(d, base * factor ** (d / (d - 2))), 1.0
    if kind == "dynamic":
        factor = _real(scaling, kind, "factor")
        original = _length(scaling, kind, "original_max_position_embeddings")
        if max_position is None:
            seq_len = original
        else:
            if isinstance(max_position, bool) or not isinstance(max_position, numbers.Integral):
                raise TypeError(
                    f"max_position: expected an int or None, got {type(max_position).__name__}"
                )
            seq_len = max(int(max_position) + 1, original)
        new_base = base * ((factor * seq_len / original) - (factor - 1)) ** (d / (d - 2))
        return _default_inv_freq(d, new_base), 1.0
    if kind == "yarn":
        return _yarn(d, base, scaling)
    if kind == "explicit":
        return _explicit(d, scaling)
    return _llama3(d, base, scaling), 1.0


def _explicit(d: int, scaling: Mapping[str, Any]) -> tuple[np.ndarray, float]:
    raw = scaling["inv_freq"]
    try:
        theta = np.array(raw, dtype=np.float64)
    except (TypeError, ValueError):
        theta = None
    if theta is None or theta.shape != (d // 2,) or not np.isfinite(theta).all():
        raise ValueError(
            f"scaling: 'explicit' key 'inv_freq' must be {d // 2} finite numbers (one per rotary"
            f" pair of d={d}), got {np.shape(raw)}"
        )
    factor = _optional_real(scaling, "explicit", "attention_factor", positive=True)
    return theta, 1.0 if factor is None else factor
