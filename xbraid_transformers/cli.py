"""``python -m xbraid_transformers.cli``: the ``xbt`` command (kept for torchrun recipes; the
command lives in ``xbraid_transformers.app.cli``)."""
import sys

from .app.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
