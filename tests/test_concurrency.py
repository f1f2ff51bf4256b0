"""Threads, the GIL, Ctrl-C and determinism (docs/DESIGN.md §4, §6)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import fastrope

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

# A child started from a background job (`cmd &`, nohup, many CI agents) inherits SIGINT
# ignored, and Python then installs no KeyboardInterrupt handler: the Ctrl-C tests' children
# install it themselves, so they check the same thing however the suite was started.
SIGINT_HANDLER = """
        import signal
        signal.signal(signal.SIGINT, signal.default_int_handler)
"""


def _inputs(n: int, d: int = 64, heads: int = 2, seed: int = 0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((heads, n, d)).astype(dtype)
    k = rng.standard_normal((heads, n, d)).astype(dtype)
    v = rng.standard_normal((heads, n, d)).astype(dtype)
    return q, k, v


def test_gil_is_released_during_the_computation():
    """Another Python thread keeps running while a long call is in the Rust core."""
    q, k, v = _inputs(4096, heads=4)
    done = threading.Event()
    counter = [0]

    def spin():
        while not done.is_set():
            counter[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    try:
        t0 = time.perf_counter()
        fastrope.attention(q, k, v, fastrope.Rotary(), num_threads=1)
        elapsed = time.perf_counter() - t0
    finally:
        done.set()
        t.join()
    assert elapsed > 0.05, "the call was too short to tell"
    # Holding the GIL would leave the spinner at (almost) 0 iterations for the whole call.
    assert counter[0] > 10_000, f"only {counter[0]} iterations in {elapsed:.2f} s"


def test_many_python_threads_give_correct_results():
    inputs = [_inputs(150 + 17 * i, d=16, seed=i, dtype=np.float64) for i in range(8)]
    w = fastrope.Rotary(layout="half")
    expected = [fastrope.attention(q, k, v, w, causal=True) for q, k, v in inputs]
    results: list = [None] * len(inputs)
    errors: list = []

    def work(i: int) -> None:
        try:
            for _ in range(3):
                q, k, v = inputs[i]
                results[i] = fastrope.attention(q, k, v, w, causal=True)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for got, want in zip(results, expected):
        np.testing.assert_array_equal(got, want)
    ref = fastrope.reference.attention(*inputs[0], w, causal=True)
    np.testing.assert_allclose(results[0], ref, atol=1e-12)


def test_repeated_calls_and_thread_counts_are_bitwise_reproducible():
    q, k, v = _inputs(700, d=32, dtype=np.float64)
    w = fastrope.Rotary()
    dout = np.random.default_rng(5).standard_normal(v.shape)
    for threads in (1, 2, 3):
        a = fastrope.attention(q, k, v, w, causal=True, num_threads=threads)
        b = fastrope.attention(q, k, v, w, causal=True, num_threads=threads)
        np.testing.assert_array_equal(a, b)
        g1 = fastrope.attention_grad(q, k, v, w, dout, causal=True, num_threads=threads)
        g2 = fastrope.attention_grad(q, k, v, w, dout, causal=True, num_threads=threads)
        for x, y in zip(g1[:3], g2[:3]):
            np.testing.assert_array_equal(x, y)


def _run(code: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env or ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_rayon_num_threads_is_honoured():
    out = _run(
        "import fastrope._fastrope as f; print(f.default_num_threads())",
        env={**ENV, "RAYON_NUM_THREADS": "3"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "3"


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT delivery is POSIX-specific")
def test_ctrl_c_interrupts_a_long_call_within_about_a_second():
    code = (
        SIGINT_HANDLER
        + """
        import sys, time, numpy as np, fastrope
        rng = np.random.default_rng(0)
        q = rng.standard_normal((8, 16384, 128)).astype(np.float32)
        print("ready", flush=True)
        t0 = time.perf_counter()
        try:
            fastrope.attention(q, q, q, fastrope.Rotary(), num_threads=1)
            print("finished", time.perf_counter() - t0, flush=True)
        except KeyboardInterrupt:
            print("interrupted", time.perf_counter() - t0, flush=True)
    """
    )
    p = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready"
    time.sleep(1.0)
    t_sig = time.perf_counter()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    latency = time.perf_counter() - t_sig
    assert "interrupted" in out, (out, err)
    # The kernels poll between tiles and the binding checks signals every 50 ms.
    assert latency < 3.0, f"took {latency:.2f} s to return after SIGINT"


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT delivery is POSIX-specific")
@pytest.mark.parametrize("backward", [False, True])
def test_ctrl_c_interrupts_a_long_fast_call(backward):
    """The fast method's low-rank path (one long head: no parallelism to hide behind) polls too,
    forward and backward."""
    code = (
        SIGINT_HANDLER
        + f"""
        import sys, time, numpy as np, fastrope
        rng = np.random.default_rng(0)
        n, d = 1 << 19, 8
        q = rng.uniform(-1, 1, (n, d)).astype(np.float32)
        q /= np.linalg.norm(q, axis=-1).max()
        v = rng.uniform(-1, 1, (n, 64)).astype(np.float32)
        backward = {backward}
        p = fastrope.plan(q, q, v, fastrope.Rotary(), 1e-3, method="fast", backward=backward)
        assert p.details["path"] == "lowrank", p
        print("ready", flush=True)
        t0 = time.perf_counter()
        try:
            if backward:
                fastrope.attention_grad(q, q, v, fastrope.Rotary(), v, 1e-3, method="fast")
            else:
                fastrope.attention(q, q, v, fastrope.Rotary(), 1e-3, method="fast")
            print("finished", time.perf_counter() - t0, flush=True)
        except KeyboardInterrupt:
            print("interrupted", time.perf_counter() - t0, flush=True)
    """
    )
    p = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready", p.stderr.read() if p.stderr else ""
    time.sleep(1.0)
    t_sig = time.perf_counter()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    latency = time.perf_counter() - t_sig
    assert "interrupted" in out, (out, err)
    assert latency < 3.0, f"took {latency:.2f} s to return after SIGINT"
