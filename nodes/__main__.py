"""``python -m nodes``: start one node process by hand (same as ``numaemu node``)."""

from .main import main

if __name__ == "__main__":
    raise SystemExit(main())
