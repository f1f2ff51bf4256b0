"""``python -m fastrope <command>``: see :mod:`fastrope.cli`."""

from .cli import main

raise SystemExit(main())
