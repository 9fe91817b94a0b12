"""Errors that end a run with one line for the user instead of a traceback."""


class ConfigError(ValueError):
    """A config value the project cannot run with: names the key, the value and what is allowed."""

    def __init__(self, key: str, value, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r}: {allowed}")


class DatasetUnavailable(RuntimeError):
    """A dataset that is not on disk and could not be downloaded."""


class RunFault(RuntimeError):
    """A run that cannot go on, explained in one line (a full disk, a checkpoint of another model)."""


def one_line(e: BaseException, limit: int = 500) -> str:
    """`Type: message` with the message's whitespace (newlines included) folded, cut at `limit`; an
    exception without a message (a bare `assert` in a library) says where it was raised."""
    message = " ".join(str(e).split())
    if not message and e.__traceback__ is not None:
        import traceback
        from pathlib import Path

        frame = traceback.extract_tb(e.__traceback__)[-1]
        message = f"(no message) at {Path(frame.filename).name}:{frame.lineno} in {frame.name}"
    return f"{type(e).__name__}: {message}"[:limit]
