"""Coarse views of a ``LayerParallel`` stack: every ``stride``-th layer with step ``stride * h``,
a coarser discretisation of the same ODE (the extension point of multilevel training)."""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Tuple

from torch import nn

from ..mgrit.config import MGRITConfig

__all__ = ["CoarseViews"]


class CoarseViews:
    """The coarse views of ``LayerParallel`` (a mixin: it reads the stack's layers, step size,
    options and layer ranges, and changes them only through the stack's setters)."""

    def coarse_layers(self, stride: int, offset: int = 0) -> List[int]:
        """The fine layers ``offset, offset + stride, ...`` of a coarse view (validated)."""
        num_layers = len(self.layers)
        if not isinstance(stride, int) or stride < 1 or not 0 <= offset < stride:
            raise ValueError(
                f"need stride >= 1 and 0 <= offset < stride, got stride={stride}, offset={offset}")
        if num_layers % stride:
            raise ValueError(f"{num_layers} layers cannot be coarsened by {stride}")
        return list(range(offset, num_layers, stride))

    def coarse_ranges(self, stride: int, offset: int = 0) -> Optional[List[Tuple[int, int]]]:
        """The ranks' ranges of a coarse view's layers (rank r keeps the selected layers it
        owns); None on a single process. Raises when a rank would be left without layers."""
        self.coarse_layers(stride, offset)
        if self.layer_ranges is None:
            return None
        ranges = [(-(-(lo - offset) // stride), -(-(hi - offset) // stride))
                  for lo, hi in self.layer_ranges]
        if any(lo == hi for lo, hi in ranges):
            raise ValueError(f"a coarse view with stride {stride} leaves a rank without layers "
                             f"(fine layer ranges {self.layer_ranges}); use fewer ranks or a smaller stride")
        return ranges

    @contextlib.contextmanager
    def coarse_view(self, stride: int, offset: int = 0) -> Iterator["CoarseViews"]:
        """Inside the ``with`` block this stack runs the layers ``offset::stride`` with step
        ``stride * h``: a coarser forward-Euler discretisation of the same ODE. The layer
        modules are shared, not copied. It stays layer-parallel when the MGRIT hierarchy fits
        the coarse layers and the ranks' coarse layer ranges, and otherwise runs serially
        (relayed along the ranks); each rank keeps the selected layers of its own range."""
        keep = self.coarse_layers(stride, offset)
        ranges = self.coarse_ranges(stride, offset)
        saved = (self.layers, self.step_size, self.mgrit, self.parallel, self.layer_ranges,
                 self._num_layers)
        fits = len(keep) % self.mgrit.coarsest_spacing == 0
        self.layers = nn.ModuleList(self.layers[i] for i in keep)
        self.layer_ranges, self._num_layers = ranges, len(keep)
        # through the setters: the options are checked against the coarse layers now in place
        self.mgrit = self.mgrit if fits else MGRITConfig(levels=1)
        self.step_size *= stride
        self.set_parallel(self.parallel and fits)
        self.reset_warm_start()
        try:
            yield self
        finally:
            layers, self.step_size, mgrit, parallel, self.layer_ranges, self._num_layers = saved
            self.layers = layers
            self.mgrit = mgrit
            self.set_parallel(parallel)
            self.reset_warm_start()
