"""The native module: thin wrappers over the Rust core on canonical arrays (see _api.py)."""

from typing import Dict, Optional, Tuple

import numpy as np

__version__: str

_Shape = Tuple[int, int, int, int, int, int, int]  # (B, Hq, Hk, n_q, n_k, d, d_v)
_Rotary = Tuple[np.ndarray, float, np.ndarray]  # (theta (d/2,), attention factor, pairs (d/2, 2))

def exact_forward(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    shape: _Shape,
    scale: float,
    causal: bool,
    window: Optional[Tuple[int, int]],
    q_offset: int,
    k_offset: int,
    rotary: Optional[_Rotary],
    support: Optional[np.ndarray],
    values: Optional[np.ndarray],
    w_index: Optional[np.ndarray],
    bias: Optional[np.ndarray],
    bias_index: Optional[np.ndarray],
    num_threads: Optional[int],
) -> Tuple[np.ndarray, np.ndarray]: ...
def exact_backward(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    lse: np.ndarray,
    dout: np.ndarray,
    shape: _Shape,
    scale: float,
    causal: bool,
    window: Optional[Tuple[int, int]],
    q_offset: int,
    k_offset: int,
    rotary: Optional[_Rotary],
    support: Optional[np.ndarray],
    values: Optional[np.ndarray],
    w_index: Optional[np.ndarray],
    bias: Optional[np.ndarray],
    bias_index: Optional[np.ndarray],
    want_dw: bool,
    want_dbias: bool,
    num_threads: Optional[int],
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]: ...
def default_num_threads() -> int: ...
def clear_cache() -> None: ...
def cache_info() -> Dict[str, int]: ...
def set_cache_limit(limit: int) -> None: ...
