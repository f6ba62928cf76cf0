"""The package version, written once (``setup.py`` and ``xbt info`` read it here)."""
__version__ = "0.1.0"
