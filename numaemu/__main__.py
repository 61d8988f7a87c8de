"""``python -m numaemu``: same as the ``numaemu`` command."""

from .cli import main

raise SystemExit(main())
