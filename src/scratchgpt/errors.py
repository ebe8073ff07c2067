"""The one exception type users see: its message is printed as a single line by the CLI."""


class ScratchGPTError(Exception):
    """A problem the user can fix (bad input, missing file, invalid config); never a bug."""


class ConfigError(ScratchGPTError, ValueError):
    """A config value is invalid, or a preset or override does not exist."""


class DataError(ScratchGPTError):
    """The training text cannot be found, read, or split."""


class TokenizerError(ScratchGPTError, ValueError):
    """Text cannot be encoded: for example, a character outside the vocabulary."""


class CheckpointError(ScratchGPTError):
    """A checkpoint directory is missing, foreign, incomplete or corrupted."""


class InteropError(ScratchGPTError):
    """A model or directory that cannot be converted to or from the Hugging Face format."""
