"""The command line: ``python -m fastrope demo`` and its exit status."""

import subprocess
import sys

import numpy as np
import pytest

from fastrope.cli import _load, main


def test_demo_runs_and_checks_itself(capsys):
    assert main(["demo", "--n", "256", "--heads", "4", "--repeats", "1", "--long", "4096"]) == 0
    out = capsys.readouterr().out
    assert "exact forward" in out and "fast (measured)" in out and "result: OK" in out


def test_bad_usage_exits_2():
    p = subprocess.run([sys.executable, "-m", "fastrope", "nonsense"], capture_output=True)
    assert p.returncode == 2
    p = subprocess.run([sys.executable, "-m", "fastrope", "demo", "--help"], capture_output=True)
    assert p.returncode == 0 and b"--long" in p.stdout


def test_check_reports_bounds_and_recommends(tmp_path, capsys):
    import numpy as np

    rng = np.random.default_rng(0)
    small = rng.uniform(-0.8, 0.8, (2, 512, 2)).astype(np.float32)
    np.save(tmp_path / "q.npy", small)
    np.savez(tmp_path / "k.npz", k=small[:1])  # one kv head: grouped-query
    png = tmp_path / "hist.png"
    args = ["check", str(tmp_path / "q.npy"), str(tmp_path / "k.npz"), "--eps", "1e-3"]
    try:
        import matplotlib  # noqa: F401

        args += ["--plot", str(png)]
    except ImportError:
        png = None
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "head" in out and "recommendation: the fast method applies" in out
    assert png is None or png.exists()
    # large entries and d: the fast method does not apply, and check says so
    big = rng.standard_normal((1, 256, 32)).astype(np.float32) * 3
    np.save(tmp_path / "big.npy", big)
    assert main(["check", str(tmp_path / "big.npy"), str(tmp_path / "big.npy")]) == 0
    assert "recommendation: use the exact method" in capsys.readouterr().out
    # w=None: q and k taken as already rotated
    assert main(args[:3] + ["--w", "none"]) == 0
    assert "recommendation: the fast method applies" in capsys.readouterr().out


def test_check_missing_file_exits_1(tmp_path):
    assert main(["check", str(tmp_path / "nope.npy"), str(tmp_path / "nope.npy")]) == 1


def test_bench_sweeps_and_saves_json(tmp_path, capsys):
    import json

    out = tmp_path / "bench.json"
    assert main(["bench", "--n-exp", "8", "9", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["n"], r["method"]) for r in rows} == {
        (256, "exact"),
        (256, "fast"),
        (512, "exact"),
        (512, "fast"),
    }
    assert all("seconds" in r or "skipped" in r for r in rows)
    errs = [r["max_error"] for r in rows if "max_error" in r]
    assert errs and max(errs) <= 1e-3


def test_check_w_none_where_fast_is_refused(tmp_path, capsys):
    """Standard-normal q, k with w=None: the fast method is refused, check still reports (the
    exact recommendation, the fast method's R limit) and explains its columns."""
    import numpy as np

    rng = np.random.default_rng(1)
    np.save(tmp_path / "q.npy", rng.standard_normal((2, 64, 8)))
    np.save(tmp_path / "k.npy", rng.standard_normal((2, 64, 8)))
    assert main(["check", str(tmp_path / "q.npy"), str(tmp_path / "k.npy"), "--w", "none"]) == 0
    out = capsys.readouterr().out
    assert "recommendation: use the exact method" in out
    assert "certifiable at this n and eps up to R =" in out
    assert "columns:" in out and "certified" in out


def test_errors_come_before_any_table(tmp_path, capsys):
    import numpy as np

    bad = np.ones((1, 16, 4))
    bad[0, 3, 1] = np.nan
    np.save(tmp_path / "q.npy", bad)
    assert main(["check", str(tmp_path / "q.npy"), str(tmp_path / "q.npy")]) == 1
    captured = capsys.readouterr()
    assert "head" not in captured.out and "error" in captured.err


def test_plot_without_matplotlib_fails_before_the_work(tmp_path, capsys, monkeypatch):
    import numpy as np

    np.save(tmp_path / "q.npy", np.zeros((1, 8, 2)))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    args = ["check", str(tmp_path / "q.npy"), str(tmp_path / "q.npy"), "--plot", "x.png"]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "--plot needs matplotlib" in captured.err


def test_help_names_every_subcommand_in_plain_text():
    p = subprocess.run([sys.executable, "-m", "fastrope", "--help"], capture_output=True)
    text = p.stdout.decode()
    assert p.returncode == 0 and "``" not in text
    for sub in ("demo", "check", "bench"):
        assert f"fastrope {sub}" in text
    p = subprocess.run([sys.executable, "-m", "fastrope", "bench", "--help"], capture_output=True)
    text = p.stdout.decode()
    for words in ("error bound", "position matrix", "which methods"):
        assert words in text
    assert "Times the exact and the fast method" in text


class _Payload:
    """Unpickling this creates ``marker``: a stand-in for a file that runs code when loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _crafted(tmp_path, kind, marker):
    path = tmp_path / f"evil_{marker.name}.{kind}"
    if kind == "pt":
        import torch

        torch.save({"q": _Payload(marker)}, path)
    elif kind == "npy":
        np.save(path, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    else:
        np.savez(path, q=np.array([_Payload(marker)], dtype=object))
    return path


def _permissive_load(path, kind):
    if kind == "pt":
        import torch

        torch.load(path, weights_only=False)
    elif kind == "npy":
        np.load(path, allow_pickle=True)
    else:
        with np.load(path, allow_pickle=True) as z:
            z["q"]


@pytest.mark.parametrize("kind", ["npy", "npz", "pt"])
def test_crafted_pickle_payloads_are_refused_and_never_run(tmp_path, capsys, kind):
    if kind == "pt":
        pytest.importorskip("torch")
    # The payload is live: loading it the permissive way does create its marker.
    probe = tmp_path / "probe"
    _permissive_load(_crafted(tmp_path, kind, probe), kind)
    assert probe.exists()

    marker = tmp_path / "marker"
    path = _crafted(tmp_path, kind, marker)
    good = tmp_path / "k.npy"
    np.save(good, np.zeros((1, 16, 2), dtype=np.float32))
    assert main(["check", str(path), str(good)]) == 1
    err = capsys.readouterr().err
    assert path.name in err and "refus" in err and "unpickl" in err, err
    with pytest.raises(ValueError, match="unpickl"):
        _load(str(path), "q")
    assert not marker.exists(), "the payload ran"


def test_pt_files_of_tensors_still_load(tmp_path):
    torch = pytest.importorskip("torch")
    x = torch.arange(12, dtype=torch.float32).reshape(1, 3, 4)
    torch.save({"q": x, "k": x + 1}, tmp_path / "qk.pt")
    torch.save(x, tmp_path / "t.pt")
    assert np.array_equal(_load(str(tmp_path / "qk.pt"), "k"), (x + 1).numpy())
    assert np.array_equal(_load(str(tmp_path / "t.pt"), "q"), x.numpy())
    torch.save({"q": 3}, tmp_path / "int.pt")
    with pytest.raises(ValueError, match="expected a tensor"):
        _load(str(tmp_path / "int.pt"), "q")
