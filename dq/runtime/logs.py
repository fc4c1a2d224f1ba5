"""Logging for every dq process: stderr in the foreground, daily files in the log dir.

With `settings.log_dir` the files are named as php-delayqueue's DqLog named them, so
scripts written for it find them: `request_YYYYMMDD.txt` (logger "dq.request"),
`notify_YYYYMMDD.txt` ("dq.notify"), `err_YYYYMMDD.txt` (WARNING and above from every
logger) and `notice_YYYYMMDD.txt` (everything else). All processes append to the same
files with O_APPEND, which keeps line-sized records whole.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from dq.config import Settings
from dq.errors import ConfigError

# Loggers whose records go to their own daily file instead of notice_YYYYMMDD.txt.
OWN_FILES = {"dq.request": "request", "dq.notify": "notify"}
OTHER_FILE = "notice"  # the rest
ERROR_FILE = "err"  # WARNING and above, from every logger (also in their own file)
SUFFIX = ".txt"

_process_name = "dq"

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "dqproc", "taskName"}


def process_name() -> str:
    return _process_name


class _ProcessFilter(logging.Filter):
    """Stamps each record with the dq process title (dq-master, dq-server-0, ...)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.dqproc = _process_name
        return True


class _Route(logging.Filter):
    """Lets through the records of `names` (include=True) or all others (include=False)."""

    def __init__(self, names: set[str], *, include: bool) -> None:
        super().__init__()
        self.names = names
        self.include = include

    def filter(self, record: logging.LogRecord) -> bool:
        root = record.name.split(".", 2)
        hit = ".".join(root[:2]) in self.names
        return hit == self.include


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(dqproc)s[%(process)d] %(name)s: "
                         "%(message)s")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, process, pid, msg, plus `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created).astimezone().isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": getattr(record, "dqproc", _process_name),
            "pid": record.process,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class DailyFileHandler(logging.FileHandler):
    """Appends to `<dir>/<stem>_YYYYMMDD.txt`, moving to a new file when the date changes."""

    def __init__(self, directory: str | Path, stem: str) -> None:
        self.directory = Path(directory)
        self.stem = stem
        self.day = time.strftime("%Y%m%d")
        super().__init__(self._path(), mode="a", encoding="utf-8", delay=True)

    def _path(self) -> str:
        return str(self.directory / f"{self.stem}_{self.day}{SUFFIX}")

    def emit(self, record: logging.LogRecord) -> None:
        day = time.strftime("%Y%m%d", time.localtime(record.created))
        if day != self.day:
            self.acquire()
            try:
                self.close()
                self.day = day
                self.baseFilename = os.path.abspath(self._path())
            finally:
                self.release()
        super().emit(record)


def make_handlers(settings: Settings) -> list[logging.Handler]:
    """The handlers `settings` asks for: stderr unless daemon, daily files with a log dir."""
    formatter: logging.Formatter = (
        JsonFormatter() if settings.log_format == "json" else TextFormatter())
    out: list[logging.Handler] = []
    if not settings.daemon:
        stderr = logging.StreamHandler(sys.stderr)
        if settings.log_dir:
            stderr.addFilter(_Route(set(OWN_FILES), include=False))
        out.append(stderr)
    if settings.log_dir:
        Path(settings.log_dir).mkdir(parents=True, exist_ok=True)
        for name, stem in OWN_FILES.items():
            own = DailyFileHandler(settings.log_dir, stem)
            own.addFilter(_Route({name}, include=True))
            out.append(own)
        rest = DailyFileHandler(settings.log_dir, OTHER_FILE)
        rest.addFilter(_Route(set(OWN_FILES), include=False))
        errors = DailyFileHandler(settings.log_dir, ERROR_FILE)
        errors.setLevel(logging.WARNING)
        out += [rest, errors]
    for handler in out:
        handler.setFormatter(formatter)
        handler.addFilter(_ProcessFilter())
    return out


def setup_logging(settings: Settings, role: str) -> None:
    """(Re)configure the root logger for the process titled `role`; safe to call again."""
    global _process_name
    level = logging.getLevelNamesMapping().get(settings.log_level.upper())
    if level is None:
        raise ConfigError(f"log_level {settings.log_level!r} is not one of DEBUG, INFO, "
                          "WARNING, ERROR")
    _process_name = role
    try:  # the new handlers first: a log dir that cannot be used leaves the old ones
        handlers = make_handlers(settings)
    except OSError as exc:
        raise ConfigError(f"log_dir {settings.log_dir!r} cannot be used ({exc.strerror or exc}); "
                          "create it, or set log_dir to a directory dq may write") from None
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    # httpx logs every request at INFO; consumers make thousands.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # One line per request and per notify belongs in the log dir's own files; without a
    # log dir they would flood stderr (and cost the hot path its formatting), so they are
    # only kept there at DEBUG.
    quiet = not settings.log_dir and level > logging.DEBUG
    for name in OWN_FILES:
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.NOTSET)
