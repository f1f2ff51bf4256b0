"""Run transformers' own model tests with fastrope as the attention behind ``"sdpa"``.

    python tools/hf_conformance.py /path/to/transformers [pytest args...]

``/path/to/transformers`` is a source checkout of the transformers version that is installed
(its ``tests/`` directory: the PyPI sdist does not ship ``tests/models`` nor the generation and
export mixins that ``tests/test_modeling_common.py`` imports).  By default it runs
``tests/models/llama/test_modeling_llama.py``; other pytest arguments replace that.

fastrope's attention function (``fastrope.integrations.transformers``) is registered
under the name ``"sdpa"``, transformers' default, so that every test that builds a
model with the default attention runs it through fastrope, while the tests that compare an
implementation against ``"eager"`` compare fastrope against eager.  At the end the plugin prints
how many attention calls went through fastrope and fails the run if none did (the routing check).
"""

from __future__ import annotations

import os
import sys

import pytest

CALLS = {"n": 0}


class _Plugin:
    def pytest_configure(self, config):
        from transformers import AttentionInterface

        import fastrope.integrations.transformers as fr_hf

        def routed(*args, **kwargs):
            CALLS["n"] += 1
            return fr_hf.fastrope_attention_forward(*args, **kwargs)

        AttentionInterface.register("sdpa", routed)

    def pytest_sessionfinish(self, session, exitstatus):
        print(f"\nfastrope conformance: {CALLS['n']} attention calls went through fastrope")
        if CALLS["n"] == 0 and session.testscollected:
            session.exitstatus = 1


def main(argv: list) -> int:
    if not argv or not os.path.isdir(os.path.join(argv[0], "tests")):
        print(__doc__)
        return 2
    root, rest = argv[0], argv[1:]
    os.chdir(root)
    sys.path.insert(0, root)
    args = rest or ["tests/models/llama/test_modeling_llama.py"]
    return pytest.main(["-q", "-p", "no:cacheprovider", *args], plugins=[_Plugin()])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
