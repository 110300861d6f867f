"""Exceptions the library raises on purpose: each message names the file, key or value, and the fix."""


class ThinkDiffError(Exception):
    """Base class for errors caused by inputs (config, files, checkpoints), not by bugs."""


class ConfigError(ThinkDiffError, ValueError):
    """A config file or override is invalid; raised before any download or heavy work."""


class DataContractError(ThinkDiffError):
    """A stored file (feature shard, manifest, checkpoint) does not match what the reader expects."""


BAD_INPUT_ERRORS = (ThinkDiffError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
                    ValueError)
"""What a command line reports as one `error:` line rather than a traceback: bad inputs, not bugs."""


def first_line(error: BaseException, limit: int = 160) -> str:
    """An exception's first line, for a one-line message (its type where it has no text)."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__
