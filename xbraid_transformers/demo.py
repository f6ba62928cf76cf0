"""``python -m xbraid_transformers.demo``: the one-minute demo (``xbraid_transformers.app.demo``)."""
from .app.demo import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
