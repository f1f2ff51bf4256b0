"""The README's Python examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README.md has no python example"
    for code in blocks:
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})


def test_readme_commands_match_ci():
    """The second command at the top of the README is what .ci/run runs."""
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    cmd = "'.[test]' && python -c \"import torch, jax, transformers\" && python -m pytest"
    assert f"pip install -e {cmd}" in text
    assert f"pip install -q -e {cmd}" in ci
