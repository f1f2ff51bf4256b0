"""Forked children (``os.fork``, ``multiprocessing``, PyTorch ``DataLoader`` workers) compute what
their parent computes, whatever the parent did before the fork (README "Processes, threads,
interrupts and files").

A forked child keeps only the thread that forked: thread pools that were running in the parent
have no threads there, and a lock another thread held stays held.  Each scenario runs in a fresh
interpreter (a script in ``tmp_path``) under a timeout, so a regression fails the test instead of
hanging the suite; every forked child also arms ``alarm`` so it dies rather than waits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX-only")

TIMEOUT = 240  # seconds for a whole scenario (each takes a few seconds when it works)

# The workload every scenario repeats in parent and child: both methods, forward and backward,
# rayon's default pool and a `num_threads=` pool, a decode step (the serial path), a call long
# enough to start the Ctrl-C polling thread, and the fast method's kernel cache in use.
PRELUDE = """
import os, signal, sys, threading, time
os.environ["FASTROPE_FAST_PATH"] = "toeplitz"  # Rotary on the path that fills the kernel cache
import numpy as np
import fastrope
from fastrope import reference

EPS = 1e-3


def inputs(seed, n=128, d=4, dv=4, heads=2):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((heads, n, d))
    k = rng.standard_normal((heads, n, d))
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.uniform(-1, 1, (heads, n, dv))
    dout = rng.uniform(-1, 1, (heads, n, dv))
    return q, k, v, dout


def work(seed=0):
    q, k, v, dout = inputs(seed)
    w = fastrope.Rotary()
    res = {}
    for method, eps in (("exact", 0.0), ("fast", EPS)):
        for nt in (None, 2):
            kw = dict(causal=True, method=method, num_threads=nt)
            res[f"{method}/{nt}/out"] = fastrope.attention(q, k, v, w, eps, **kw)
            g = fastrope.attention_grad(q, k, v, w, dout, eps, **kw)
            res[f"{method}/{nt}/dq"], res[f"{method}/{nt}/dk"] = g.dq, g.dk
            res[f"{method}/{nt}/dv"] = g.dv
    n = q.shape[1]
    res["decode"] = fastrope.attention(q[:, -1:], k, v, w, q_offset=n - 1)
    return res


def long_call():
    # Above the binding's polling threshold: runs with the Ctrl-C polling thread.
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 1024, 64)).astype(np.float32)
    return fastrope.attention(x, x, x, fastrope.Rotary())


def check_reference(res, seed=0):
    q, k, v, dout = inputs(seed)
    ref = reference.attention(q, k, v, fastrope.Rotary(), causal=True)
    for key in ("exact/None/out", "exact/2/out"):
        err = np.abs(res[key] - ref).max()
        assert err < 1e-12, (key, err)
    for key in ("fast/None/out", "fast/2/out"):
        err = np.abs(res[key] - ref).max()
        assert err < EPS, (key, err)


def same(a, b):
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    for key in a:
        assert np.array_equal(a[key], b[key]), key


def in_child(body):
    # Runs body() in a forked child; 0 when it returned, its exit code or -signal otherwise.
    pid = os.fork()
    if pid == 0:
        signal.alarm(60)  # a hang kills the child
        code = 1
        try:
            body()
            code = 0
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)
"""


def run_script(tmp_path, body: str, timeout: float = TIMEOUT) -> str:
    """Runs PRELUDE + body in a fresh interpreter in its own session (so a hung grandchild is
    killed with it); returns stdout, failing with both streams on a non-zero exit or a hang."""
    script = tmp_path / "scenario.py"
    script.write_text(PRELUDE + textwrap.dedent(body))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.Popen(
        [sys.executable, str(script)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"hung for {timeout} s\nstdout:\n{out}\nstderr:\n{err}")
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{out}\nstderr:\n{err}"
    return out


def test_os_fork_after_calls_gives_the_parents_results(tmp_path):
    """Both methods, forward and backward, both pools, the decode path, the polling thread and a
    filled kernel cache in the parent; the child (and a grandchild) compute the same, bitwise,
    and reuse the inherited cache."""
    out = run_script(
        tmp_path,
        """
        parent = work()
        check_reference(parent)
        long_call()
        hits = fastrope.cache_info()["hits"]
        assert fastrope.cache_info()["entries"] > 0

        def child():
            same(work(), parent)
            # The parent's kernels came along: the repeat hit them.
            assert fastrope.cache_info()["hits"] > hits, fastrope.cache_info()
            long_call()
            assert in_child(lambda: same(work(), parent)) == 0, "grandchild failed"
            print("child ok", flush=True)

        assert in_child(child) == 0, "child failed"
        same(work(), parent)  # and the parent is unaffected
        print("parent ok")
        """,
    )
    assert "child ok" in out and "parent ok" in out


def test_os_fork_with_calls_in_flight_on_other_threads(tmp_path):
    """Forks taken while two other threads run calls (long exact ones with the polling thread,
    fast ones using and evicting the kernel cache, `set_cache_limit`/`clear_cache`): every child
    works, so no lock was inherited held and no pool is waited on."""
    out = run_script(
        tmp_path,
        """
        parent = work()
        stop = threading.Event()
        errors = []

        def busy(i):
            try:
                while not stop.is_set():
                    if i == 0:
                        long_call()
                        fastrope.attention(*inputs(5)[:3], fastrope.Rotary(), num_threads=2)
                    else:
                        work(seed=3)
                        fastrope.set_cache_limit(1 << 20)
                        fastrope.clear_cache()
                        fastrope.set_cache_limit(1 << 30)
            except BaseException as e:  # reported by the main thread
                errors.append(repr(e))

        threads = [threading.Thread(target=busy, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        failed = []
        try:
            for i in range(8):
                time.sleep(0.05 + 0.07 * i)
                code = in_child(lambda: same(work(), parent))
                if code != 0:
                    failed.append((i, code))
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not errors, errors
        assert not failed, f"children failed (fork #, exit code): {failed}"
        same(work(), parent)
        print("ok")
        """,
    )
    assert "ok" in out


@pytest.mark.parametrize("start_method", ["fork", "forkserver", "spawn"])
def test_multiprocessing_pool(tmp_path, start_method):
    out = run_script(
        tmp_path,
        f"""
        import multiprocessing as mp

        if __name__ == "__main__":
            seeds = [0, 1, 2, 3]
            expected = [work(s) for s in seeds]  # the parent's pools and cache are started
            long_call()
            ctx = mp.get_context({start_method!r})
            with ctx.Pool(2) as pool:
                got = pool.map(work, seeds)
            for e, g in zip(expected, got):
                same(e, g)
            print("ok")
        """,
    )
    assert "ok" in out


def test_torch_dataloader_workers_forward_and_backward(tmp_path):
    """Two DataLoader workers (forked on Linux) each run the torch adapter forward and backward;
    every sample equals the parent's own computation."""
    pytest.importorskip("torch")
    out = run_script(
        tmp_path,
        """
        import torch
        import fastrope.torch as ft

        class Samples(torch.utils.data.Dataset):
            def __len__(self):
                return 6

            def __getitem__(self, i):
                q, k, v, dout = (torch.from_numpy(a) for a in inputs(i))
                q.requires_grad_(True)
                k.requires_grad_(True)
                v.requires_grad_(True)
                out = ft.attention(q, k, v, fastrope.Rotary(), causal=True)
                (out * dout).sum().backward()
                return out.detach(), q.grad, k.grad, v.grad

        if __name__ == "__main__":
            data = Samples()
            expected = [data[i] for i in range(len(data))]
            long_call()
            loader = torch.utils.data.DataLoader(
                data, batch_size=None, num_workers=2, multiprocessing_context="fork", timeout=120
            )
            got = list(loader)
            assert len(got) == len(expected)
            for e, g in zip(expected, got):
                for a, b in zip(e, g):
                    assert torch.equal(a, b)
            print("ok")
        """,
    )
    assert "ok" in out
