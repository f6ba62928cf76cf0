"""Synchronised dropout: the same masks every time a layer is evaluated for one micro-batch.

MGRIT evaluates a layer many times per batch (relaxation sweeps, coarse steps, the final sweep
and the adjoint), possibly on several processes. A fresh dropout mask at every evaluation would
make the layer a different function each time and break convergence. Instead every evaluation of
layer n for micro-batch b runs under the random state seeded by (seed, n, b), so any evaluator of
that layer draws identical masks without communication. The draw follows the input's shape, so a
change of batch size just works. The caller's random state is restored afterwards.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["layer_seed", "DropoutSync"]

_MASK64 = (1 << 63) - 1


def layer_seed(seed: int, layer: int, micro_batch: int) -> int:
    """A well-mixed 63-bit seed for (seed, layer, micro_batch) (splitmix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + (layer + 1) * 0xBF58476D1CE4E5B9
         + (micro_batch + 1) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & _MASK64


class DropoutSync:
    """Random state per (layer, micro-batch).

    ``next_micro_batch()`` is called once per forward call in training mode and returns the key
    that all evaluations belonging to that call use. ``seed`` must be equal on every process
    that evaluates layers of the same model (the default takes ``torch.initial_seed()``).
    ``synchronised = False`` is the ablation: every evaluation draws fresh masks from the
    global generator (MGRIT then solves a different problem at every sweep; one process only).
    """

    def __init__(self, seed: int | None = None):
        self.seed = torch.initial_seed() if seed is None else int(seed)
        self.micro_batch = 0
        self.synchronised = True
        self._forked = False

    def next_micro_batch(self) -> int:
        key = self.micro_batch
        self.micro_batch += 1
        return key

    @contextlib.contextmanager
    def call_scope(self, active: bool, device: torch.device):
        """Around one forward call: the caller's random state is saved once and restored at the
        end, so the layer evaluations inside only reseed (cheap) instead of saving and
        restoring it each time."""
        if not active or self._forked or not self.synchronised:
            yield
            return
        cuda = device.type == "cuda"
        with torch.random.fork_rng(devices=[device] if cuda else [], device_type="cuda"):
            self._forked = True
            try:
                yield
            finally:
                self._forked = False

    @contextlib.contextmanager
    def scope(self, layer: int, micro_batch: int | None, device: torch.device):
        """Run the body with the random state of (layer, micro_batch); no-op when None."""
        if micro_batch is None or not self.synchronised:
            yield
            return
        with self.call_scope(True, device):
            seed = layer_seed(self.seed, layer, micro_batch)
            torch.random.default_generator.manual_seed(seed)
            if device.type == "cuda":
                torch.cuda.manual_seed(seed)
            yield

    def state_dict(self) -> dict:
        return {"seed": self.seed, "micro_batch": self.micro_batch}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.micro_batch = int(state["seed"]), int(state["micro_batch"])
