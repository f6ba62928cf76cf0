"""Transformer layers as ODE right-hand sides, and synchronised dropout."""
