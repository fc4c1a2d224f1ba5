"""Password guessing, limited: wrong passwords per client address and over all addresses.

Every wrong password (login form, HTTP Basic, Bearer) waits `Limits.wait` before its
answer and takes a token from two buckets: its address's (5 a second, bursts of 10) and
everyone's (20 a second, bursts of 20). A request that finds a bucket empty is answered
429 with Retry-After at once, before its password is looked at, so a limited answer says
nothing about the password. What keeps a stranger from locking the owner out:

- the per-address bucket refuses only that address: the owner elsewhere is not slowed;
- the overall bucket refuses only addresses never let in: an address that gave the right
  password in the last `known_for` seconds is still judged (by its own bucket only);
- a logged-in browser holds a session cookie, which is not a password check at all.

So during a flood from many addresses, the owner gets in from a machine that got in before
(or with the session cookie it has), and a first login from a new address waits for the
flood to end. IPv6 clients are counted per /64, the block one subscriber gets. The state
lives in the dq-web process (the console runs one): a restart forgets it.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class Limits:
    """How wrong passwords are slowed; tests/conftest.py swaps in one without wait or limit."""

    wait: float = 0.3  # seconds a wrong password waits before its answer
    per_address: float = 5.0  # wrong passwords judged a second from one address ...
    address_burst: float = 10.0  # ... after a first burst of this many
    overall: float = 20.0  # wrong passwords judged a second from all addresses not let in
    overall_burst: float = 20.0
    known_for: float = 7 * 24 * 3600  # seconds an address that got in skips `overall`
    limited: bool = True  # False: only the wait (tests)


LIMITS = Limits()
MAX_ADDRESSES: Final = 65536  # addresses whose failures are remembered (oldest go first)
MAX_KNOWN: Final = 4096  # addresses remembered as let in


class _Bucket:
    """Tokens refilled at `rate` a second up to `burst`; a wrong password takes one."""

    __slots__ = ("stamp", "tokens")

    def __init__(self, burst: float, now: float) -> None:
        self.tokens, self.stamp = burst, now

    def refill(self, rate: float, burst: float, now: float) -> float:
        self.tokens = min(burst, self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        return self.tokens

    def retry_after(self, rate: float) -> int:
        """Whole seconds until a token is back (Retry-After wants an integer)."""
        return max(1, math.ceil((1 - self.tokens) / rate)) if rate > 0 else 3600


def client_key(host: str | None) -> str:
    """Whom a request's failures count against: its IPv4 address, or its IPv6 /64."""
    if not host:
        return "?"
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class LoginGuard:
    """One console process's memory of wrong passwords. Call `refusal` before judging a
    password and `record` right after, with no await between (so concurrent guesses cannot
    all pass `refusal` before any is counted)."""

    def __init__(self) -> None:
        now = time.monotonic()
        self._all = _Bucket(LIMITS.overall_burst, now)
        self._by_address: OrderedDict[str, _Bucket] = OrderedDict()
        self._known: OrderedDict[str, float] = OrderedDict()
        self.judged_wrong = 0
        self.refused = 0

    def refusal(self, key: str, now: float | None = None) -> int:
        """0 when a password from `key` may be judged now, else the seconds to wait."""
        lim, now = LIMITS, time.monotonic() if now is None else now
        if not lim.limited:
            return 0
        bucket = self._by_address.get(key)
        if bucket is not None and bucket.refill(lim.per_address, lim.address_burst, now) < 1:
            self.refused += 1
            return bucket.retry_after(lim.per_address)
        if self._all.refill(lim.overall, lim.overall_burst, now) < 1 and not self._knows(key, now):
            self.refused += 1
            return self._all.retry_after(lim.overall)
        return 0

    def record(self, key: str, ok: bool, now: float | None = None) -> None:
        """Count a judged password: a wrong one takes tokens, a right one makes `key` known."""
        lim, now = LIMITS, time.monotonic() if now is None else now
        if ok:
            self._known[key] = now
            self._known.move_to_end(key)
            while len(self._known) > MAX_KNOWN:
                self._known.popitem(last=False)
            return
        self.judged_wrong += 1
        if not lim.limited:
            return
        self._all.refill(lim.overall, lim.overall_burst, now)
        self._all.tokens = max(0.0, self._all.tokens - 1)
        bucket = self._by_address.pop(key, None) or _Bucket(lim.address_burst, now)
        bucket.refill(lim.per_address, lim.address_burst, now)
        bucket.tokens = max(0.0, bucket.tokens - 1)
        self._by_address[key] = bucket  # to the end: the front holds the stalest
        self._forget(now)

    def _knows(self, key: str, now: float) -> bool:
        since = self._known.get(key)
        return since is not None and now - since < LIMITS.known_for

    def _forget(self, now: float) -> None:
        """Drop addresses whose bucket has refilled (they are as good as new), oldest
        first, and any beyond MAX_ADDRESSES."""
        lim = LIMITS
        while self._by_address:
            key, oldest = next(iter(self._by_address.items()))
            full = oldest.refill(lim.per_address, lim.address_burst, now) >= lim.address_burst
            if not full and len(self._by_address) <= MAX_ADDRESSES:
                break
            del self._by_address[key]
