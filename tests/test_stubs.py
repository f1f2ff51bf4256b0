"""The hand-written stub of the native module matches the module (mypy.stubtest, as
pydantic-core does): every function, its parameters and their defaults."""

from __future__ import annotations

import subprocess
import sys


def test_native_stub_matches_the_module() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "fastrope._fastrope"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
