"""MGRIT (multigrid reduction in time) in PyTorch: the generic solver and its adjoint."""
from .comm import SERIAL, CommunicationError, Communicator
from .solver import MGRITDivergenceError, MGRITResult, solve

__all__ = ["solve", "MGRITResult", "MGRITDivergenceError", "Communicator", "CommunicationError",
           "SERIAL"]
