"""Exceptions the library raises on purpose: each message names the file, key or value, and the fix."""


class ThinkDiffError(Exception):
    """Base class for errors caused by inputs (config, files, checkpoints), not by bugs."""


class ConfigError(ThinkDiffError, ValueError):
    """A config file or override is invalid; raised before any download or heavy work."""


class DataContractError(ThinkDiffError):
    """A stored file (feature shard, manifest, checkpoint) does not match what the reader expects."""


class DiskFullError(ThinkDiffError):
    """A write ran out of space (or quota) on the disk holding `directory`. Writers rename files into
    place only when complete, so what was finished is kept (`kept` says what) and a rerun resumes
    once space is freed."""

    def __init__(self, directory: str, reason: str, kept: str):
        super().__init__(f"{directory}: no space left to write there ({reason}); free space there and rerun: {kept}")
        self.directory, self.reason, self.kept = directory, reason, kept

    def __reduce__(self):  # picklable (a worker process hands it to its parent) despite its arguments
        return type(self), (self.directory, self.reason, self.kept)


BAD_INPUT_ERRORS = (ThinkDiffError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
                    ValueError)
"""What a command line reports as one `error:` line rather than a traceback: bad inputs, not bugs."""


def first_line(error: BaseException, limit: int = 160) -> str:
    """An exception's first line, for a one-line message (its type where it has no text)."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__
