"""Training: run-directory rules, trainer construction from the config, callbacks."""

from .run import train

__all__ = ["train"]
