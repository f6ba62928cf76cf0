"""The application built on the library: the trainer, the ``xbt`` command, its tasks, reports,
checkpoints and the demo. Nothing in the library imports from here."""

__all__ = []
