"""The package version, written once (``setup.py`` and ``xbt info`` read it here)."""

__all__ = ["__version__"]
__version__ = "0.1.0"
