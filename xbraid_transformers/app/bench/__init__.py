"""Measurement cores shared by the scripts in ``benchmarks/`` and by ``xbt reproduce``: each
module measures one thing at any size, the scripts and the experiments choose the sizes and
write the results."""

__all__ = []
