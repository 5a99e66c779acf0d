"""``python -m stepcache``: the same command line as ``stepcache``."""

from __future__ import annotations

from stepcache.tools.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
