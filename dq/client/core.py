"""What DqClient and AsyncDqClient share, without their I/O: the server list and the order
an exchange tries it in, each request's frame and the reading of its reply, and the
pipelined exchange's reply matching and window (a sans-I/O core in the style of h11).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from dq.client.frames import PING_FRAME, add_frame, cmd_frame
from dq.errors import NOT_FOUND, UNAVAILABLE, DqError
from dq.wire.frames import OK_EMPTY, decode_reply

DEAD_FOR = 5.0  # seconds a server that failed is skipped
WINDOW = 4000  # add_many: requests in flight on the connection at most

Server = tuple[str, int]
T = TypeVar("T")


def _parse_server(server: str) -> Server:
    host, _, port = server.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"server {server!r} must be 'host:port', e.g. '127.0.0.1:6789'")
    return host.strip("[]"), int(port)


class _Servers:
    """The server list with the ones that failed recently set aside."""

    def __init__(self, servers: Sequence[str] | str) -> None:
        if isinstance(servers, str):
            servers = [servers]
        self.servers = [_parse_server(s) for s in servers]
        if not self.servers:
            raise ValueError("DqClient needs at least one 'host:port' server")
        self.dead_until: dict[Server, float] = {}

    def candidates(self) -> list[Server]:
        now = time.monotonic()
        alive = [s for s in self.servers if self.dead_until.get(s, 0) <= now]
        random.shuffle(alive)
        dead = [s for s in self.servers if s not in alive]
        return alive + dead  # dead ones last: better a retry than no try

    def failed(self, server: Server) -> None:
        self.dead_until[server] = time.monotonic() + DEAD_FOR


class _Attempts:
    """The servers one exchange tries, in order: the server of the connection kept from
    before first, if any (a server that drained for a reload closed it: that server is
    then tried again on a fresh connection, and is not set aside for that), then the
    others, those that failed recently last."""

    def __init__(self, servers: _Servers, kept: Server | None) -> None:
        self.servers = servers
        self.errors: list[str] = []
        self.candidates = servers.candidates()
        self.reused = kept is not None and kept in self.candidates
        if self.reused:
            self.candidates.insert(0, kept)  # type: ignore[arg-type]
        self.next = 0  # candidates[next] is the next to try

    def __iter__(self) -> Iterator[Server]:
        while self.next < len(self.candidates):
            self.next += 1
            yield self.candidates[self.next - 1]

    def failed(self, server: Server, why: str) -> None:
        """The server that was just tried failed: `why` goes into the final error."""
        self.errors.append(f"{server[0]}:{server[1]}: {why}")
        if not (self.reused and self.next == 1):
            self.servers.failed(server)

    def restart(self) -> None:
        """Progress was made: the rest is a new exchange, with every server (the one that
        just failed last) to try again."""
        self.candidates, self.reused, self.next = self.servers.candidates(), False, 0
        self.errors.clear()

    def error(self) -> DqError:
        return DqError(UNAVAILABLE, "no dq server could be reached: " + "; ".join(self.errors))


# -- requests: a frame and the reading of its reply ---------------------------------------

@dataclass(frozen=True, slots=True)
class Request(Generic[T]):
    """One request: its frame, and what makes the caller's result of its reply (the
    reply's data, or the DqError it carried), raising the errors that are not a result."""

    frame: bytes
    result: Callable[[Any], T]


def _data(reply: Any) -> Any:
    if isinstance(reply, DqError):
        raise reply
    return reply


def _added(reply: Any) -> None:
    _data(reply)


def _got(reply: Any) -> dict[str, Any] | None:
    if isinstance(reply, DqError) and reply.err == NOT_FOUND:
        return None
    data = _data(reply)
    return data if isinstance(data, dict) else {}


def _deleted(reply: Any) -> bool:
    if isinstance(reply, DqError) and reply.err == NOT_FOUND:
        return False
    _data(reply)
    return True


def _pinged(reply: Any) -> bool:
    _data(reply)
    return True


def add_request(topic: str, job_id: str | int, body: Mapping[str, Any] | None, *,
                delay: float | None = None, fix_time: str | int | None = None,
                due_ms: int | None = None) -> Request[None]:
    """Add or replace a job."""
    return Request(add_frame(topic, job_id, body, delay=delay, fix_time=fix_time,
                             due_ms=due_ms), _added)


def get_request(topic: str, job_id: str | int) -> Request[dict[str, Any] | None]:
    """The job's body and times; None when there is no such job."""
    return Request(cmd_frame("get", topic, job_id), _got)


def delete_request(topic: str, job_id: str | int) -> Request[bool]:
    """Delete a job: False when there was no such job."""
    return Request(cmd_frame("del", topic, job_id), _deleted)


def ping_request() -> Request[bool]:
    return Request(PING_FRAME, _pinged)


def _decode(raw: bytes) -> Any:
    obj = json.loads(raw)
    if not isinstance(obj, dict):
        raise DqError(UNAVAILABLE, "the server sent a reply that is not a JSON object")
    return decode_reply(obj)


def read_header(head: bytes) -> int:
    """The length a reply frame's 4-byte header declares; ConnectionError if it is not one."""
    if not head.isdigit():
        raise ConnectionError(f"bad reply frame header {head!r}")
    return int(head)


# -- the pipelined exchange: reply matching and window --------------------------------------

_OK: bytes = OK_EMPTY
_RUN = 64
_OK_RUN: bytes = OK_EMPTY * _RUN


class _Batch:
    """Frames of one AsyncDqClient exchange and the replies that came back so far. With
    `more`, the frames are made as the window reaches them, so the server is at work on
    the first ones while the rest are being encoded."""

    __slots__ = ("data", "done", "frames", "more", "out", "weight", "window")

    def __init__(self, frames: Sequence[bytes], window: int, data: bool,
                 more: Iterator[Sequence[bytes]] | None = None, weight: int = 1) -> None:
        self.frames, self.window, self.data, self.more = list(frames), window, data, more
        self.weight = weight  # requests a frame may carry: the time a reply may take
        self.out: list[Any] = [None] * len(self.frames)
        self.done = 0  # frames[:done] are answered

    def fill(self, upto: int) -> int:
        """Make frames until there are `upto` (or no more); the number there are."""
        while self.more is not None and len(self.frames) < upto:
            try:
                made = next(self.more, None)
            except Exception as exc:  # a bug, not a broken connection: no other server
                self.more = None
                raise RuntimeError(f"the frames could not be made: {exc!r}") from exc
            if made is None:
                self.more = None
            else:
                self.frames.extend(made)
                self.out.extend([None] * len(made))
        return len(self.frames)


class _Window:
    """Which of a batch's frames to write when, over one connection: up to `window`
    unanswered, more written in slices of a quarter window (fewer, larger writes) as
    replies come back; and by when the next reply is due: `timeout` from now, but never
    after the whole batch's deadline, `timeout` plus 1 ms per request the frames carry."""

    __slots__ = ("batch", "cap", "n", "sent", "step", "timeout")

    def __init__(self, batch: _Batch, timeout: float, clock: Callable[[], float]) -> None:
        self.batch, self.timeout = batch, timeout
        done, window = batch.done, batch.window
        self.step = max(1, window // 4)
        self.n = batch.fill(done + window)  # frames made: the replies owed
        self.sent = min(self.n, done + window)
        self.cap = clock() + timeout + 0.001 * batch.weight * (self.n - done)

    def first(self) -> bytes:
        """The frames to write first."""
        return b"".join(self.batch.frames[self.batch.done:self.sent])

    def due(self, now: float) -> float:
        return min(now + self.timeout, self.cap)

    def more(self) -> bytes:
        """The frames to write now that replies came back (b"" for none): the window is
        filled again once a slice of it was answered."""
        batch = self.batch
        done, window = batch.done, batch.window
        if self.sent - done > window - self.step:
            return b""
        if self.n < done + window:
            grown = batch.fill(done + window)
            self.cap += 0.001 * batch.weight * (grown - self.n)
            self.n = grown
        if self.sent >= self.n:
            return b""
        upto = min(self.n, done + window)
        data = b"".join(batch.frames[self.sent:upto])
        self.sent = upto
        return data


class _Replies:
    """Splits the replies out of what a connection reads, matches them in order to the
    batch's frames and advances batch.done. A reply equal to the constant success frame
    is not decoded when the batch does not keep data (64 of them are skipped at once)."""

    __slots__ = ("batch", "buf", "pos")

    def __init__(self, batch: _Batch) -> None:
        self.batch = batch
        self.buf, self.pos = b"", 0  # buf[pos:] is a reply not all read yet

    def feed(self, chunk: bytes, n: int) -> None:
        """Take the replies in chunk; `n` frames have been made (and replies are owed for
        those sent). Raises ConnectionError for a garbled stream or more replies than
        requests, ValueError for a reply that is not JSON (batch.done counts the replies
        before either)."""
        buf = self.buf[self.pos:] + chunk if self.pos < len(self.buf) else chunk
        pos, end, done = 0, len(buf), self.batch.done
        ok, ok_len, run, run_len = _OK, len(_OK), _OK_RUN, len(_OK_RUN)
        fast = not self.batch.data  # a success's data ([] in the constant frame) is not wanted
        while True:
            if fast and buf.startswith(run, pos):  # successes, many at once
                pos += run_len
                done += _RUN
            elif fast and buf.startswith(ok, pos):
                pos += ok_len
                done += 1
            elif end - pos < 4:
                break
            else:
                stop = self._reply(buf, pos, end, done, n)
                if stop < 0:
                    break
                pos = stop
                done += 1
        self.buf, self.pos = buf, pos
        if done > n:  # these replies cannot be matched to requests
            raise ConnectionError(f"the server sent {done - n} replies more than it was "
                                  "sent requests")
        self.batch.done = done

    def _reply(self, buf: bytes, pos: int, end: int, done: int, n: int) -> int:
        """The reply framed at buf[pos:] (the done-th): where it ends, or -1 when it has
        not all arrived. Its data (or DqError) goes to batch.out[done]."""
        try:
            stop = pos + 4 + read_header(buf[pos:pos + 4])
        except ConnectionError:
            if done <= n:  # the replies before it count
                self.batch.done = done
            raise
        if stop > end:
            return -1
        if done < n:
            try:
                value = _decode(buf[pos + 4:stop])
                if self.batch.data:
                    self.batch.out[done] = value
            except DqError as exc:
                self.batch.out[done] = exc
            except ValueError:  # not JSON: as a broken connection
                self.batch.done = done  # (done < n here)
                raise
        return stop
