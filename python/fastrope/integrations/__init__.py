"""Integrations with model libraries, and helpers shared by the framework adapters.

* :mod:`fastrope.integrations.transformers` — ``attn_implementation="fastrope"`` for Hugging Face
  transformers models (needs ``torch`` and ``transformers``).

The adapters (:mod:`fastrope.torch`, :mod:`fastrope.jax`) check shapes when a program is traced,
before any data exists; :func:`validate_shapes` runs the core's own argument checks for that, so
the messages are the same as in eager NumPy calls.  This package needs only NumPy.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from .._api import prepare
from .._validate import join_w, split_w

__all__ = ["validate_shapes"]


def validate_shapes(
    q: tuple, k: tuple, v: tuple, w: Any, bias: Optional[tuple], dtype: Any, **kw: Any
) -> None:
    """The core's argument checks on shapes alone: zero-stride stand-ins, nothing allocated.

    ``q``, ``k``, ``v``, ``bias`` are shapes; ``w`` is a :class:`~fastrope.Rotary`, a
    :class:`~fastrope.BlockW`/:class:`~fastrope.SparseW` whose ``blocks``/``values`` are shapes, or
    a dense table's shape; ``kw`` are :func:`fastrope.attention`'s masking/offset keywords.
    Raises the TypeError/ValueError that :func:`fastrope.attention` would raise.
    """

    def z(shape):
        return None if shape is None else np.broadcast_to(np.zeros((), dtype), tuple(shape))

    parts = split_w(w, is_dense=lambda _: True)  # anything else is a dense table's shape
    w = join_w(parts._replace(values=z(parts.values)))
    prepare(z(q), z(k), z(v), w, bias=z(bias), **dict(kw, check_finite=False))
