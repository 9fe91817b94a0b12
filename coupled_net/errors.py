"""Errors that end a run with one line for the user instead of a traceback."""


class ConfigError(ValueError):
    """A config value the project cannot run with: names the key, the value and what is allowed."""

    def __init__(self, key: str, value, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r}: {allowed}")


class DatasetUnavailable(RuntimeError):
    """A dataset that is not on disk and could not be downloaded."""


def one_line(e: BaseException, limit: int = 500) -> str:
    """`Type: message` with the message's whitespace (newlines included) folded, cut at `limit`."""
    return " ".join(f"{type(e).__name__}: {e}".split())[:limit]
