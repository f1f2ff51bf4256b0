"""Smoke test of an installed wheel (run from outside the source tree): the native module
loads, is the stable-ABI build, and computes attention equal to the NumPy reference."""

import pathlib
import sys

import numpy as np

import fastrope
import fastrope.reference

native = pathlib.Path(fastrope._fastrope.__file__).name
assert ".abi3." in native, native
assert "site-packages" in fastrope.__file__, fastrope.__file__
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((2, 4, 33, 16)) for _ in range(3))
w = fastrope.Rotary()
err = np.abs(
    fastrope.attention(q, k, v, w, causal=True)
    - fastrope.reference.attention(q, k, v, w, causal=True)
).max()
assert err <= 1e-12, err
print(f"wheel smoke test: {native} on Python {sys.version.split()[0]}, max error {err:.1e}")
