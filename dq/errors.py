"""DqError and its `err` words, and the exit codes children report to the master."""

from __future__ import annotations

from typing import Final

# The `err` words a program can test. Replies carry them next to a human `msg`.
NOT_FOUND: Final = "not_found"
UNKNOWN_TOPIC: Final = "unknown_topic"
TOPIC_OFFLINE: Final = "topic_offline"
BAD_REQUEST: Final = "bad_request"
TOO_LARGE: Final = "too_large"
UNAVAILABLE: Final = "unavailable"
TOO_MANY_CONNECTIONS: Final = "too_many_connections"

ERR_WORDS: Final = frozenset(
    {NOT_FOUND, UNKNOWN_TOPIC, TOPIC_OFFLINE, BAD_REQUEST, TOO_LARGE, UNAVAILABLE,
     TOO_MANY_CONNECTIONS}
)

# Exit codes are an API between children and the master (gunicorn style).
EXIT_OK: Final = 0
EXIT_CONFIG: Final = 2  # bad flag or config: the CLI and the master exit with it
EXIT_BOOT: Final = 3  # a child that cannot boot: the master stops respawning it in a loop
EXIT_ORPHAN: Final = 4  # a child whose master went away


class DqError(Exception):
    """A failure a client can act on: `err` is a stable word, `msg` says what to do."""

    def __init__(self, err: str, msg: str) -> None:
        super().__init__(msg)
        self.err = err
        self.msg = msg

    def __repr__(self) -> str:
        return f"DqError({self.err!r}, {self.msg!r})"


class ConfigError(Exception):
    """A setting is wrong; the message names the setting and the fix."""
