"""The command line: ``python -m fastrope demo`` and its exit status."""

import subprocess
import sys

from fastrope.cli import main


def test_demo_runs_and_checks_itself(capsys):
    assert main(["demo", "--n", "256", "--heads", "4", "--repeats", "1", "--long", "4096"]) == 0
    out = capsys.readouterr().out
    assert "exact forward" in out and "fast (measured)" in out and "result: OK" in out


def test_bad_usage_exits_2():
    p = subprocess.run([sys.executable, "-m", "fastrope", "nonsense"], capture_output=True)
    assert p.returncode == 2
    p = subprocess.run([sys.executable, "-m", "fastrope", "demo", "--help"], capture_output=True)
    assert p.returncode == 0 and b"--long" in p.stdout
