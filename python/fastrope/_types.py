"""Result types and exceptions shared by the native path and the NumPy reference."""

from __future__ import annotations

from typing import Any, NamedTuple


class Gradients(NamedTuple):
    """Gradients of ``sum(out * dout)``.

    ``dq``, ``dk``, ``dv`` have the shapes of ``q``, ``k``, ``v``.  ``dw`` has the shape of the
    stored values of ``w`` (``BlockW.blocks``, ``SparseW.values`` or the dense array; summed over
    dims that were broadcast) and is ``None`` for ``Rotary``.  ``dbias`` has the shape of ``bias``
    or is ``None`` when no bias was given.
    """

    dq: Any
    dk: Any
    dv: Any
    dw: Any
    dbias: Any


class ApproximationError(ValueError):
    """The fast method cannot certify the requested ``eps`` (or fit ``memory_limit``)."""
