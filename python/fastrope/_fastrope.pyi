"""The native module: thin wrappers over the Rust core on canonical arrays (see _api.py)."""

from typing import Any, Dict, Optional, Tuple, TypedDict, Unpack, final

import numpy as np

__all__ = [
    "exact_forward",
    "exact_backward",
    "fast_forward",
    "fast_backward",
    "exact_cost",
    "format_bytes",
    "choose_method",
    "default_num_threads",
    "clear_cache",
    "cache_info",
    "set_cache_limit",
    "_inject_alloc_failure",
    "planner_calls",
    "profile_phases",
    "rotate_rows",
    "PlannedCall",
    "__version__",
]

__version__: str

_Shape = Tuple[int, int, int, int, int, int, int]  # (B, Hq, Hk, n_q, n_k, d, d_v)
_Rotary = Tuple[np.ndarray, float, np.ndarray]  # (theta (d/2,), attention factor, pairs (d/2, 2))

class _Call(TypedDict):
    """The call description every entry point takes as keywords (``Call.native_args()``)."""

    shape: _Shape
    scale: float
    causal: bool
    window: Optional[Tuple[int, int]]
    q_offset: int
    k_offset: int
    rotary: Optional[_Rotary]
    support: Optional[np.ndarray]
    values: Optional[np.ndarray]
    w_index: Optional[np.ndarray]
    bias: Optional[np.ndarray]
    bias_index: Optional[np.ndarray]

def exact_forward(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    num_threads: Optional[int],
    check_kv: bool = False,
    check_q: bool = False,
    memory_limit: Optional[int] = None,
    **call: Unpack[_Call],
) -> Tuple[np.ndarray, np.ndarray]: ...
def exact_backward(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    lse: np.ndarray,
    dout: np.ndarray,
    *,
    want_dw: bool,
    want_dbias: bool,
    num_threads: Optional[int],
    **call: Unpack[_Call],
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]: ...
def fast_forward(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    eps: float,
    memory_limit: int,
    run: bool,
    num_threads: Optional[int],
    max_terms: int = ...,
    max_degree: int = ...,
    bounds: Optional[Tuple[float, float]] = None,
    route: str = "auto",
    plan: Optional[PlannedCall] = None,
    check_kv: bool = False,
    **call: Unpack[_Call],
) -> Tuple[Optional[np.ndarray], Optional[np.ndarray], Dict[str, Any]]:
    """``(out, lse, plan)``; ``(None, None, plan)`` with ``run=False``, where ``plan["handle"]``
    is the plan itself: passed back as ``plan=`` to a run with the same arguments, it is run
    without planning (or reading its bounds) again.  ``check_kv``: scan k and v for NaN/Inf
    before planning (the caller checked q).  ``plan["seconds"]`` is the predicted time
    (src/plan/cost.rs); ``max_terms``/``max_degree`` default to the cost model's limits."""

def fast_backward(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    dout: Optional[np.ndarray],
    *,
    eps: float,
    want_dw: bool,
    want_dbias: bool,
    memory_limit: int,
    run: bool,
    num_threads: Optional[int],
    max_terms: int = ...,
    max_degree: int = ...,
    poly: Optional[Tuple[str, int, float]] = None,
    bounds: Optional[Tuple[float, float]] = None,
    dlse: Optional[np.ndarray] = None,
    route: str = "auto",
    plan: Optional[PlannedCall] = None,
    grad_error: str = "relative",
    **call: Unpack[_Call],
) -> Tuple[Any, ...]:
    """``(dq, dk, dv, dw, dbias, out, lse, plan)``; ``None`` for the arrays with ``run=False``.

    ``dlse`` (``(batch, hq, nq)``): a cotangent for ``lse``, taken by the low-rank path only.
    ``grad_error``: ``"relative"`` (each gradient's error at most ``eps`` times its certified
    magnitude ``plan["grad_scale"]``) or ``"absolute"`` (at most ``eps``).
    """

@final
class PlannedCall:
    """A fast plan made with ``run=False`` (opaque)."""

def exact_cost(*, dtype: str, backward: bool, **call: Unpack[_Call]) -> Tuple[float, float, int]:
    """The exact method's predicted ``(flops, seconds, working_bytes)`` (src/plan/cost.rs)."""

def format_bytes(bytes: int) -> str:
    """``bytes`` as messages write them: ``"512 bytes"``, ``"3.0 MiB"``, ``"2.10 GiB"``."""

def choose_method(
    plan: PlannedCall,
    *,
    method: str,
    eps: float,
    certified: float,
    exact_seconds: float,
    memory_limit: int,
) -> Tuple[str, str, Tuple[str, str]]:
    """Exact or fast for a call the fast ``plan`` certifies: ``(method, why, (method not taken,
    reason))``; ``method`` is ``"auto"`` or ``"fast"`` (a fast plan over ``memory_limit`` then
    raises ``ApproximationError``)."""

def planner_calls() -> int:
    """How many fast plans (forward or backward) this process has made."""

def profile_phases(on: Optional[bool] = None) -> Dict[str, float]:
    """Seconds of thread time per phase of the fast calls since the last call (plan, check,
    rotate, features, gemm, diagonal, output), resetting them; ``on`` turns the timers on or
    off (off by default: then nothing is timed)."""

def rotate_rows(x: np.ndarray, c: np.ndarray, s: np.ndarray, half: bool) -> np.ndarray:
    """``x`` ``(m, n, d)`` with row ``i``'s pairs rotated by ``c``, ``s`` ``(n, d/2)``."""
    ...

def default_num_threads() -> int: ...
def clear_cache() -> None: ...
def cache_info() -> Dict[str, int]: ...
def set_cache_limit(limit: int) -> None: ...
def _inject_alloc_failure(nth: int) -> None:
    """Test hook: the ``nth`` next fallible allocation of the fast method fails (0 disarms)."""
