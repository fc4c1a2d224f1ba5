"""A topic's `retry_policy`: how long a job waits after a failed attempt.

Three spellings (spaces ignored, case-insensitive):

- `linear` (the default, also when empty): failed attempt n (0-based) waits (2n+1) units,
  the unit being the server's `retry_unit` setting, as php-delayqueue did (1, 3, 5, 7
  minutes); `linear:30s` uses a unit of its own.
- `exp:BASE,FACTOR,CAP`, e.g. `exp:30s,2,1h`: BASE x FACTOR^n, at most CAP
  (30 s, 1 min, 2 min, 4 min ... 1 h, 1 h).
- `list:1m,5m,30m,2h`: the n-th wait from the list, the last one again once it runs out.

A duration is a number with a unit `ms`, `s`, `m`, `h` or `d` (a bare number is seconds),
from 1 s to 7 days. `parse` raises RetryPolicyError saying what is wrong and what to write.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from typing import Final

log = logging.getLogger("dq.retry_policy")

DEFAULT: Final = "linear"
MAX_LENGTH: Final = 255
MAX_STEPS: Final = 100
MIN_MS: Final = 1000
MAX_MS: Final = 7 * 86400 * 1000
MAX_FACTOR: Final = 100.0
EXAMPLES: Final = "linear, linear:30s, exp:30s,2,1h or list:1m,5m,30m,2h"
_UNITS: Final = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_DURATION: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?")


class RetryPolicyError(ValueError):
    """A retry_policy that cannot be used; its text says why and what to write."""


@dataclass(frozen=True)
class RetryPolicy:
    """A parsed retry_policy: `kind` linear|exp|list and its numbers in ms."""

    kind: str
    steps: tuple[int, ...] = ()  # linear: (unit,) or () for retry_unit; exp: (base, cap); list
    factor: float = 1.0

    def delay_ms(self, attempt: int, retry_unit: float) -> int:
        """The wait after failed attempt `attempt` (0-based), in ms."""
        n = max(0, attempt)
        if self.kind == "list":
            return self.steps[min(n, len(self.steps) - 1)]
        if self.kind == "exp":
            base, cap = self.steps
            # factor^n overflows a float for a large n: stop growing once past the cap
            wait = float(base)
            for _ in range(n):
                wait *= self.factor
                if wait >= cap:
                    return cap
            return min(int(wait), cap)
        unit = self.steps[0] if self.steps else retry_unit * 1000
        return int((2 * n + 1) * unit)

    def describe(self, retry_unit: float, attempts: int = 6) -> str:
        """The first waits, for the console: '1m, 3m, 5m, ...'."""
        return ", ".join(fmt_ms(self.delay_ms(n, retry_unit)) for n in range(attempts)) + ", ..."


def fmt_ms(ms: int) -> str:
    """A duration as the shortest exact spelling parse takes: 90000 -> '90s', 120000 -> '2m'."""
    for unit in ("d", "h", "m", "s"):
        size = _UNITS[unit]
        if ms >= size and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def _duration(text: str, what: str) -> int:
    m = _DURATION.fullmatch(text)
    if not m:
        raise RetryPolicyError(f"{what} {text!r} is not a duration: write a number with a "
                               "unit ms, s, m, h or d, e.g. 30s, 5m, 2h")
    ms = int(float(m.group(1)) * _UNITS[m.group(2) or "s"])
    if not MIN_MS <= ms <= MAX_MS:
        raise RetryPolicyError(f"{what} {text!r} is out of range: from 1s to 7d")
    return ms


def _parse(text: str) -> RetryPolicy:
    spec = re.sub(r"\s+", "", text).lower()
    if len(text) > MAX_LENGTH:
        raise RetryPolicyError(f"retry_policy is {len(text)} characters long; the limit is "
                               f"{MAX_LENGTH}")
    if spec in ("", DEFAULT):
        return RetryPolicy("linear")
    kind, colon, rest = spec.partition(":")
    if not colon or kind not in ("linear", "exp", "list"):
        raise RetryPolicyError(f"retry_policy {text.strip()!r} is not one of the forms "
                               f"{EXAMPLES}")
    parts = rest.split(",")
    if kind == "linear":
        if len(parts) != 1:
            raise RetryPolicyError("linear takes one unit, e.g. linear:30s (waits 30s, 90s, "
                                   "150s, ...), or nothing: linear (the retry_unit setting)")
        return RetryPolicy("linear", (_duration(parts[0], "the unit"),))
    if kind == "exp":
        if len(parts) != 3:
            raise RetryPolicyError("exp takes a base, a factor and a cap, e.g. exp:30s,2,1h "
                                   "(waits 30s, 1m, 2m, 4m, ... at most 1h)")
        base = _duration(parts[0], "the base")
        try:
            factor = float(parts[1])
        except ValueError:
            factor = 0.0
        if not 1.0 <= factor <= MAX_FACTOR:
            raise RetryPolicyError(f"the factor {parts[1]!r} must be a number from 1 to "
                                   f"{MAX_FACTOR:g}, e.g. 2 to double each wait")
        cap = _duration(parts[2], "the cap")
        if cap < base:
            raise RetryPolicyError(f"the cap {parts[2]!r} is below the base {parts[0]!r}; the "
                                   "cap is the longest wait, e.g. exp:30s,2,1h")
        return RetryPolicy("exp", (base, cap), factor)
    if len(parts) > MAX_STEPS or not rest:
        raise RetryPolicyError(f"list takes 1 to {MAX_STEPS} waits, e.g. list:1m,5m,30m,2h")
    return RetryPolicy("list", tuple(_duration(p, f"wait {i + 1}") for i, p in enumerate(parts)))


def parse(text: str) -> RetryPolicy:
    """The policy a retry_policy text spells, or RetryPolicyError."""
    return _cached(text)


@functools.lru_cache(maxsize=1024)
def _cached(text: str) -> RetryPolicy:
    return _parse(text)


def normalise(text: str) -> str:
    """The text as stored: no spaces, lower case; '' becomes 'linear'. Raises
    RetryPolicyError like `parse`."""
    parse(text)
    return re.sub(r"\s+", "", text).lower() or DEFAULT


@functools.lru_cache(maxsize=256)
def policy_of(text: str) -> RetryPolicy:
    """A stored topic's policy; one that does not parse (written by hand into the table)
    is the default, with one warning."""
    try:
        return parse(text)
    except RetryPolicyError as exc:
        log.warning("retry_policy %r cannot be used (%s); the default linear policy is used",
                    text, exc)
        return RetryPolicy("linear")
