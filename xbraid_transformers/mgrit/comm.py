"""Communication between the blocks of time points owned by different processes.

The solver talks to its neighbours in *solve order* (the adjoint solve reverses it) through
four operations. A single process needs none of them; it uses ``SERIAL``.
"""
from __future__ import annotations

from typing import Optional

import torch


class Communicator:
    """Neighbour exchange along the time blocks, in solve order."""

    rank = 0
    size = 1

    def exchange(self, last: torch.Tensor) -> Optional[torch.Tensor]:
        """Send this block's last point to the next block; return the previous block's last
        point (None on the first block)."""
        return None

    def recv_prev(self, like: torch.Tensor) -> torch.Tensor:
        """Receive the previous block's last point (shape and dtype of ``like``)."""
        return like

    def send_next(self, value: torch.Tensor) -> None:
        """Send ``value`` to the next block (nothing on the last block)."""

    def allreduce_sum(self, value: float) -> float:
        return value


SERIAL = Communicator()
