"""Training: run-directory rules, trainer construction from the config, callbacks."""

from qfine.training.run import train

__all__ = ["train"]
