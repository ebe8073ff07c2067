"""The package's version, in one place: pyproject.toml reads it, checkpoints and exports record it."""

__version__ = "0.1.0"
