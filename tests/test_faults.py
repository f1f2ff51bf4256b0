"""Faults in the middle of a call: a memory limit below the plan, an allocation that fails, Ctrl-C
during a fast backward that uses the kernel cache, and the cache's controls racing with calls.
After each, the process keeps working and gives the results it gave before."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import fastrope
from fastrope import _fastrope, reference

EPS = 1e-3
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "FASTROPE_FAST_PATH": "toeplitz"}


@pytest.fixture(autouse=True)
def toeplitz_path_and_fresh_cache(monkeypatch):
    """Rotary on the Toeplitz path (the one with kernel spectra, cached), a cache of 1 GiB."""
    monkeypatch.setenv("FASTROPE_FAST_PATH", "toeplitz")
    limit = fastrope.cache_info()["limit"]
    fastrope.set_cache_limit(1 << 30)
    fastrope.clear_cache()
    yield
    _fastrope._inject_alloc_failure(0)
    fastrope.clear_cache()
    fastrope.set_cache_limit(limit)


def unit_inputs(seed: int, n: int = 96, d: int = 4, dv: int = 4, heads: int = 2):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((heads, n, d))
    k = rng.standard_normal((heads, n, d))
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.uniform(-1, 1, (heads, n, dv))
    dout = rng.uniform(-1, 1, (heads, n, dv))
    return q, k, v, dout


def fast_call(backward: bool, seed: int = 0, **kw):
    q, k, v, dout = unit_inputs(seed)
    w = fastrope.Rotary()
    if backward:
        g = fastrope.attention_grad(q, k, v, w, dout, EPS, method="fast", causal=True, **kw)
        return np.concatenate([g.dq.ravel(), g.dk.ravel(), g.dv.ravel()])
    return fastrope.attention(q, k, v, w, EPS, method="fast", causal=True, **kw)


def test_memory_limit_below_the_plan_is_refused_before_allocating():
    """A 1 MiB limit: the exact method (16 MiB outputs, 288 MiB backward working set) refuses
    with the peak RSS unmoved (an output allocated and dropped would raise it by 16 MiB); the
    fast method (a 2.7 GB working set) refuses after its O(n d) bound scans only."""
    code = """
        import resource, numpy as np, fastrope
        rng = np.random.default_rng(0)
        q = rng.standard_normal((8, 8192, 64)).astype(np.float32)
        dout = rng.standard_normal((8, 8192, 64)).astype(np.float32)
        w = fastrope.Rotary()
        u = rng.standard_normal((8, 1 << 18, 4)).astype(np.float32)  # fast-method inputs
        u /= np.linalg.norm(u, axis=-1, keepdims=True)
        small = q[:, :64].copy()
        fastrope.attention(small, small, small, w)  # the libraries loaded, the pool started
        fastrope.attention_grad(small, small, small, w, small)
        calls = {
            "exact": lambda: fastrope.attention(q, q, q, w, method="exact", memory_limit=1 << 20),
            "auto": lambda: fastrope.attention(q, q, q, w, 1e-3, memory_limit=1 << 20),
            "exact backward": lambda: fastrope.attention_grad(
                q, q, q, w, dout, method="exact", memory_limit=1 << 20
            ),
            "fast": lambda: fastrope.attention(
                u, u, u, w, 1e-3, method="fast", memory_limit=1 << 20
            ),
        }
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
        for name, call in calls.items():
            before = peak()
            try:
                call()
                print(name, "ran", 0, "", sep="|")
            except (MemoryError, fastrope.ApproximationError) as e:
                print(name, type(e).__name__, peak() - before, e, sep="|")
    """
    p = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    rows = {}
    for line in p.stdout.splitlines():
        name, kind, grew_kib, message = line.split("|", 3)
        rows[name] = (kind, int(grew_kib), message)
    assert set(rows) == {"exact", "auto", "exact backward", "fast"}, p.stdout
    for name in ("exact", "auto", "exact backward"):
        assert rows[name][0] == "MemoryError", rows[name]
    # method="fast" reports what it cannot fit as an ApproximationError (it names the memory).
    assert rows["fast"][0] == "ApproximationError" and "memory" in rows["fast"][2], rows["fast"]
    for name in ("exact", "auto", "exact backward"):
        grew_kib = rows[name][1]
        assert grew_kib < 4096, f"{name}: peak RSS grew by {grew_kib} KiB before refusing"
    # The fast planner reads its bounds from the data first (float64 scans of q and k, the
    # diagonal sequences of the call's δ range: O(n d), here ~2 inputs' worth), then refuses a
    # working set of gigabytes without touching it.
    input_kib = 8 * (1 << 18) * 4 * 4 // 1024
    assert "GB" in rows["fast"][2], rows["fast"]
    assert rows["fast"][1] < 3 * input_kib, f"fast: peak RSS grew by {rows['fast'][1]} KiB"


@pytest.mark.parametrize("backward", [False, True])
def test_an_allocation_failure_mid_call_raises_and_the_process_stays_usable(backward):
    """The n-th allocation of the call fails, for every n it reaches (the kernel spectra, the
    per-head buffers, the products), with the cache empty and with it filled."""
    q, k, v, dout = unit_inputs(0)
    expected = fast_call(backward)
    if not backward:
        ref = reference.attention(q, k, v, fastrope.Rotary(), causal=True)
        assert np.abs(expected - ref).max() <= EPS
    raised = 0
    for cached in (False, True):
        for nth in range(1, 200):
            if not cached:
                fastrope.clear_cache()
            _fastrope._inject_alloc_failure(nth)
            try:
                got = fast_call(backward)
            except MemoryError as e:
                raised += 1
                assert "cannot allocate" in str(e), e
            else:
                # The call made fewer than nth allocations: it never met the failure.
                _fastrope._inject_alloc_failure(0)
                assert np.array_equal(got, expected)
                break
            info = fastrope.cache_info()
            assert info["bytes"] <= info["limit"], info
            assert np.array_equal(fast_call(backward), expected), nth
        else:
            pytest.fail("the injected failure was never passed")
    assert raised >= 4, raised


def test_cache_controls_racing_with_calls_on_other_threads():
    """set_cache_limit / clear_cache / cache_info hammered while three threads call forward and
    backward: every result is bitwise the one computed alone, and the counters stay coherent."""
    expected = {(b, s): fast_call(b, seed=s) for b in (False, True) for s in (0, 1)}
    stop = threading.Event()
    errors: list = []
    calls = [0]

    def caller(i: int) -> None:
        try:
            while not stop.is_set():
                for (b, s), e in expected.items():
                    if not np.array_equal(fast_call(b, seed=s, num_threads=1 + i % 2), e):
                        errors.append(f"thread {i}: wrong result for backward={b}, seed={s}")
                    calls[0] += 1
        except BaseException as e:  # reported by the main thread
            errors.append(f"thread {i}: {e!r}")

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    rng = np.random.default_rng(0)
    t_end = time.monotonic() + 3.0
    try:
        while time.monotonic() < t_end:
            op = rng.integers(4)
            if op == 0:
                fastrope.clear_cache()
            elif op == 1:
                fastrope.set_cache_limit(int(rng.choice([0, 1 << 12, 1 << 18, 1 << 30])))
            else:
                info = fastrope.cache_info()
                assert info["bytes"] <= max(info["limit"], 0) or info["limit"] == 0, info
                assert info["entries"] >= 0 and info["bytes"] >= 0
            time.sleep(0.001)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:5]
    assert calls[0] >= 12, calls[0]
    fastrope.set_cache_limit(1 << 30)
    for (b, s), e in expected.items():
        assert np.array_equal(fast_call(b, seed=s), e)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT delivery is POSIX-specific")
def test_ctrl_c_in_a_long_fast_backward_leaves_the_cache_consistent():
    """SIGINT lands in a long fast backward (kernel cache on) while another thread keeps calling
    with the cache: the backward raises KeyboardInterrupt, the other thread's results never
    change, and the next backward is bitwise the one computed with an empty cache."""
    code = """
        import os, signal, threading, time, numpy as np, fastrope
        signal.signal(signal.SIGINT, signal.default_int_handler)

        def inputs(seed, n, d, heads):
            rng = np.random.default_rng(seed)
            q = rng.standard_normal((heads, n, d))
            k = rng.standard_normal((heads, n, d))
            q /= np.linalg.norm(q, axis=-1, keepdims=True)
            k /= np.linalg.norm(k, axis=-1, keepdims=True)
            v = rng.uniform(-1, 1, (heads, n, d))
            return q, k, v, rng.uniform(-1, 1, (heads, n, d))

        def grad(x):
            q, k, v, dout = x
            g = fastrope.attention_grad(q, k, v, fastrope.Rotary(), dout, 1e-3, method="fast")
            return np.concatenate([g.dq.ravel(), g.dk.ravel(), g.dv.ravel()])

        small, big = inputs(1, 96, 4, 2), inputs(2, 1024, 8, 10)
        expected_small = grad(small)
        t0 = time.perf_counter()
        expected_big = grad(big)
        print("big backward", time.perf_counter() - t0, flush=True)

        stop, wrong, calls = threading.Event(), [], [0]
        def other():
            while not stop.is_set():
                if not np.array_equal(grad(small), expected_small):
                    wrong.append(calls[0])
                calls[0] += 1
        t = threading.Thread(target=other)
        t.start()
        for delay in (0.2, 0.5):
            fastrope.clear_cache()  # the interrupted call builds and inserts kernels
            threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT)).start()
            t0 = time.perf_counter()
            try:
                grad(big)
                print("finished", time.perf_counter() - t0)
            except KeyboardInterrupt:
                print("interrupted", time.perf_counter() - t0, flush=True)
            info = fastrope.cache_info()
            assert 0 <= info["bytes"] <= info["limit"], info
            assert np.array_equal(grad(big), expected_big), "after the interrupt"
            assert np.array_equal(grad(big), expected_big), "from the cache"
        stop.set()
        t.join()
        assert not wrong, wrong
        assert calls[0] > 0
        print("ok", calls[0])
    """
    p = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert float(lines[0].split()[-1]) > 1.0, f"the backward is too short to interrupt: {lines}"
    assert sum(line.startswith("interrupted") for line in lines) == 2, lines
    assert lines[-1].startswith("ok"), lines
