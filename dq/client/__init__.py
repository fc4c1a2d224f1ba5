"""Python clients for the dq wire protocol: DqClient (blocking) and AsyncDqClient.

Both take a list of "host:port" servers, like the original PHP client: a server that
cannot be reached is skipped for a while and the request goes to another one. Failures
the server reports raise DqError with its `err` word; `get` of a missing job returns None
and `delete` of a missing job returns False.
"""

from __future__ import annotations

import asyncio
import json
import json.encoder
import random
import socket
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from dq.errors import BAD_REQUEST, NOT_FOUND, TOO_LARGE, UNAVAILABLE, DqError
from dq.wire.protocol import MAX_FRAME, MAX_MANY, OK_EMPTY, decode_reply, encode_frame

DEAD_FOR = 5.0  # seconds a server that failed is skipped
WINDOW = 4000  # add_many: requests in flight on the connection at most


def _parse_server(server: str) -> tuple[str, int]:
    host, _, port = server.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"server {server!r} must be 'host:port', e.g. '127.0.0.1:6789'")
    return host.strip("[]"), int(port)


def add_frame(topic: str, job_id: str | int, body: Mapping[str, Any] | None, *,
              delay: float | None = None, fix_time: str | int | None = None,
              due_ms: int | None = None) -> bytes:
    return _add_frames(({"topic": topic, "id": job_id, "body": body, "delay": delay,
                         "fix_time": fix_time, "due_ms": due_ms},))[0]


def _add_frame_plain(topic: str, job_id: str | int, body: Mapping[str, Any] | None, *,
                     delay: float | None = None, fix_time: str | int | None = None,
                     due_ms: int | None = None) -> bytes:
    """The reference encoding of an add: `_add_frames` must produce exactly these bytes."""
    if body and isinstance(body, str | bytes | bytearray):  # dict() would say less
        raise DqError(BAD_REQUEST, f"body must be a dict (a JSON object), e.g. "
                      f"{{'order_id': 42}}, not a {type(body).__name__}")
    req: dict[str, Any] = {"cmd": "add", "topic": topic, "id": job_id, "body": dict(body or {})}
    if delay is not None:
        req["delay"] = delay
    if fix_time is not None:
        req["fix_time"] = fix_time
    if due_ms is not None:
        req["due_ms"] = due_ms
    return encode_frame(req)


_esc = json.encoder.encode_basestring_ascii
_json_encode = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode


def _value_encoder() -> Callable[[Any, int], list[str]]:
    """`encode(value, 0)` gives the chunks of value's JSON text as dq.wire.protocol.encode_frame
    writes it (compact, ASCII; before its "/" escaping): JSONEncoder's own C encoder, made
    once instead of once per value as JSONEncoder.encode does. It keeps no markers, so it
    holds no state; a circular value overflows the recursion limit instead of raising
    "Circular reference detected", and `_add_frames` then takes the plain path, which
    raises that."""
    def plain(value: Any, _level: int) -> list[str]:
        return [_json_encode(value)]

    make: Any = getattr(json.encoder, "c_make_encoder", None)
    try:
        encode: Callable[[Any, int], list[str]] = make(
            None, json.JSONEncoder().default, _esc, None, ":", ",", False, False, True)
        sample = {"a/\u00e9": [1, 2.5, None, True, {"": "x\n"}]}
        if "".join(encode(sample, 0)) == _json_encode(sample):
            return encode
    except TypeError:  # no _json accelerator, or one that is made differently
        pass
    return plain


_encode_value = _value_encoder()


def _add_frames(jobs: Iterable[Mapping[str, Any]], *, parts: bool = False,
                errors: dict[int, Exception] | None = None) -> list[bytes]:
    """The add frame of each job (a dict of add()'s arguments), byte for byte what
    `_add_frame_plain` builds, at half its cost: the request's JSON is written around the
    body's instead of through a new dict, the topic's part is reused, and strings and
    integers skip the encoder. A job this fast path cannot encode (a value JSON cannot
    hold, a frame too large) goes the plain way, which raises what it always has.

    With `parts`, each job's part of an add_many frame instead: the same JSON without the
    length and "cmd" (`_add_frame_of` makes the add frame of a part). With `errors`, a job
    that cannot be encoded is not raised: its exception goes there under the job's index,
    and b"" in its place."""
    enc, join, esc, int_repr = _encode_value, "".join, _esc, int.__repr__
    lead, room = ("{", MAX_FRAME - _CMD_LEN) if parts else ('{"cmd":"add",', MAX_FRAME)
    prefixes: dict[str, str] = {}
    out: list[bytes] = []
    append = out.append
    for i, job in enumerate(jobs):
        try:
            topic, job_id = job["topic"], job["id"]
        except (KeyError, TypeError) as exc:
            if errors is None:
                raise
            errors[i] = exc
            append(b"")
            continue
        body = job.get("body")
        delay, fix_time, due_ms = job.get("delay"), job.get("fix_time"), job.get("due_ms")
        try:
            head = prefixes.get(topic) if type(topic) is str else None
            if head is None:
                head = lead + '"topic":' + join(enc(topic, 0)) + ',"id":'
                if type(topic) is str:
                    prefixes[topic] = head
            kind = type(job_id)
            id_text = (esc(job_id) if kind is str else int_repr(job_id) if kind is int
                       else join(enc(job_id, 0)))
            body_text = join(enc(body if type(body) is dict else dict(body), 0)) if body else "{}"
            if delay is None and fix_time is None and due_ms is None:
                text = f'{head}{id_text},"body":{body_text}}}'
            else:
                tail = ""
                if delay is not None:
                    tail = ',"delay":' + (int_repr(delay) if type(delay) is int
                                          else join(enc(delay, 0)))
                if fix_time is not None:
                    tail += ',"fix_time":' + (esc(fix_time) if type(fix_time) is str
                                              else join(enc(fix_time, 0)))
                if due_ms is not None:
                    tail += ',"due_ms":' + (int_repr(due_ms) if type(due_ms) is int
                                            else join(enc(due_ms, 0)))
                text = f'{head}{id_text},"body":{body_text}{tail}}}'
            if "/" in text:
                text = text.replace("/", "\\/")
            if len(text) > room:  # the text is ASCII: characters are bytes
                raise ValueError("too large")
            append(text.encode("ascii") if parts else f"{len(text):04d}{text}".encode("ascii"))
        except Exception:
            try:
                frame = _add_frame_plain(topic, job_id, body, delay=delay, fix_time=fix_time,
                                         due_ms=due_ms)
            except Exception as exc:
                if errors is None:
                    raise
                errors[i] = exc
                append(b"")
                continue
            append(b"{" + frame[4 + _CMD_LEN + 1:] if parts else frame)
    return out


_CMD_LEN = len('"cmd":"add",')  # what an add_many part leaves out of its add frame's JSON


def _add_frame_of(part: bytes) -> bytes:
    """The add frame of a job's add_many part."""
    return b'%04d{"cmd":"add",%b' % (len(part) + _CMD_LEN, part[1:])


_MANY_SLICE = 5 * MAX_MANY  # add_many: jobs encoded at a time, as the window moves on
_MANY_HEAD = b'{"cmd":"add_many","jobs":['
MANY_RETRY = 60.0  # seconds a client that was refused add_many frames sends add frames


class _ManyFrame:
    """A frame of add_many's: jobs[start:stop] in one add_many frame, or (`many` false)
    one job too large for one in its own add frame."""

    __slots__ = ("data", "many", "start", "stop")

    def __init__(self, data: bytes, start: int, stop: int, many: bool) -> None:
        self.data, self.start, self.stop, self.many = data, start, stop, many


def _encode_error(exc: Exception) -> DqError:
    if isinstance(exc, DqError):  # too_large
        return exc
    return DqError(BAD_REQUEST, f"the job cannot be sent ({type(exc).__name__}: {exc}); a job "
                   "is a dict with topic and id, and a body of JSON values (dict, list, str, "
                   "int, float, bool, None)")


class _Many:
    """How a client sends add_many's jobs: add_many frames of up to `limit` bytes, or add
    frames while add_many frames are off (made so, or refused by an older server)."""

    def __init__(self, on: bool) -> None:
        self.on = on
        self.off_until = 0.0  # refused: add frames until then, then add_many frames again
        self.limit = MAX_FRAME  # halved when the server's max_frame refuses a full frame

    def use(self) -> bool:
        return self.on and time.monotonic() >= self.off_until

    def frames(self, jobs: Sequence[Mapping[str, Any]], first: int,
               failed: dict[int, DqError]) -> list[_ManyFrame]:
        """The jobs in add_many frames, in order, each as full as MAX_MANY jobs and `limit`
        bytes allow. A job's part is its add frame's JSON without "cmd", the same bytes.
        `first` is the index of jobs[0] in the caller's list (the frames' start and stop,
        and the keys of `failed`, which gets the jobs that cannot be encoded)."""
        out: list[_ManyFrame] = []
        parts: list[bytes] = []
        limit = self.limit
        start, empty = first, len(_MANY_HEAD) + 2
        size = empty

        def close(stop: int) -> None:
            text = _MANY_HEAD + b",".join(parts) + b"]}"
            out.append(_ManyFrame(b"%04d" % len(text) + text, start, stop, True))

        errors: dict[int, Exception] = {}
        for i, part in enumerate(_add_frames(jobs, parts=True, errors=errors), first):
            if not part or (parts and (len(parts) == MAX_MANY or size + len(part) > limit)):
                if parts:
                    close(i)
                parts, start, size = [], i, empty
            if not part:  # it cannot be encoded: it fails here, alone
                failed[i] = _encode_error(errors[i - first])
                start = i + 1
            elif size + len(part) > limit:  # too large to share a frame: an add frame
                out.append(_ManyFrame(_add_frame_of(part), i, i + 1, False))
                start = i + 1
            else:
                parts.append(part)
                size += len(part) + 1
        if parts:
            close(first + len(jobs))
        return out

    def spread(self, jobs: Sequence[Mapping[str, Any]], frames: Sequence[_ManyFrame],
               replies: Sequence[Any], out: list[Any]) -> list[int]:
        """Put each job's result (None or its DqError) from its frame's reply into out.
        Returns the jobs to send again in add frames, in order: those of frames that failed
        as a whole, and the later adds of the same topic:id (already stored, so that the
        last add of a job is still the one that stays)."""
        again: list[int] = []
        whole: list[Any] = []  # the replies of frames that failed as a whole
        for frame, reply in zip(frames, replies, strict=True):
            if not frame.many:
                out[frame.start] = reply if isinstance(reply, DqError) else None
            elif isinstance(reply, list) and len(reply) == frame.stop - frame.start:
                said: dict[str, str] = {}  # a repeated message comes as "" (many_reply)
                for i, res in enumerate(reply, frame.start):
                    out[i] = None if res == 1 else _job_error(res, said)
            else:
                again.extend(range(frame.start, frame.stop))
                whole.append(reply)
        self._failed(whole)
        if not again:
            return again
        redo = set(again)
        keys = {_key(jobs[i]) for i in again}
        return sorted(redo.union(j for j in range(again[0] + 1, len(jobs))
                                 if j not in redo and _key(jobs[j]) in keys))

    def _failed(self, replies: list[Any]) -> None:
        """Frames failed as a whole: a server from before add_many said it does not know
        the command, or its max_frame is smaller than the frames (they are made half as
        large from the next call on). Otherwise a job in a frame was not JSON (a NaN, say):
        its jobs go again one by one and each fails alone."""
        errors = [r for r in replies if isinstance(r, DqError)]
        if any("cmd must be one of" in r.msg and "add_many" not in r.msg.split("(got")[0]
               for r in errors):
            self.off_until = time.monotonic() + MANY_RETRY
        if any(r.err == TOO_LARGE for r in errors):
            self.limit = max(512, self.limit // 2)


def _key(job: Mapping[str, Any]) -> str:
    return f"{job.get('topic')}:{job.get('id')}"  # as the server reads it (id 42 is "42")


def _job_error(res: Any, said: dict[str, str]) -> DqError:
    if isinstance(res, dict) and isinstance(res.get("err"), str):
        err, msg = res["err"], res.get("msg")
        if isinstance(msg, str) and msg:
            said[err] = msg
        else:
            msg = said.get(err) or f"the job was not stored ({err}); add it again, alone, to " \
                "see why"
        return DqError(err, msg)
    return DqError(UNAVAILABLE, f"the server answered {res!r} for this job; add it again")


def _singles(jobs: Sequence[Mapping[str, Any]], todo: Sequence[int],
             failed: dict[int, DqError]) -> tuple[list[int], list[bytes]]:
    """The add frames of jobs[i] for i in todo, but those known not to encode; a job that
    does not encode goes into failed. Returns the indexes framed and their frames."""
    todo = [i for i in todo if i not in failed]
    errors: dict[int, Exception] = {}
    frames = _add_frames((jobs[i] for i in todo), errors=errors)
    for k, exc in errors.items():
        failed[todo[k]] = _encode_error(exc)
    return ([i for k, i in enumerate(todo) if k not in errors],
            [f for k, f in enumerate(frames) if k not in errors])


def _cmd_frame(cmd: str, topic: str, job_id: str | int) -> bytes:
    return encode_frame({"cmd": cmd, "topic": topic, "id": job_id})


def _decode(raw: bytes) -> Any:
    obj = json.loads(raw)
    if not isinstance(obj, dict):
        raise DqError(UNAVAILABLE, "the server sent a reply that is not a JSON object")
    return decode_reply(obj)


class _Servers:
    """The server list with the ones that failed recently set aside."""

    def __init__(self, servers: Sequence[str] | str) -> None:
        if isinstance(servers, str):
            servers = [servers]
        self.servers = [_parse_server(s) for s in servers]
        if not self.servers:
            raise ValueError("DqClient needs at least one 'host:port' server")
        self.dead_until: dict[tuple[str, int], float] = {}

    def candidates(self) -> list[tuple[str, int]]:
        now = time.monotonic()
        alive = [s for s in self.servers if self.dead_until.get(s, 0) <= now]
        random.shuffle(alive)
        dead = [s for s in self.servers if s not in alive]
        return alive + dead  # dead ones last: better a retry than no try

    def failed(self, server: tuple[str, int]) -> None:
        self.dead_until[server] = time.monotonic() + DEAD_FOR


def _unreachable(errors: list[str]) -> DqError:
    return DqError(UNAVAILABLE, "no dq server could be reached: " + "; ".join(errors))


class DqClient:
    """Blocking client. One connection at a time, reconnected on failure."""

    def __init__(self, servers: Sequence[str] | str, *, timeout: float = 3.0,
                 connect_timeout: float = 1.0, many_frames: bool = True) -> None:
        self._servers = _Servers(servers)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._sock: socket.socket | None = None
        self._server: tuple[str, int] | None = None
        self._buf = b""
        self._many = _Many(many_frames)

    def __enter__(self) -> DqClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock, self._buf = None, b""

    def _read_exact(self, n: int) -> bytes:
        assert self._sock is not None
        while len(self._buf) < n:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _read_reply(self) -> Any:
        head = self._read_exact(4)
        if not head.isdigit():
            raise ConnectionError(f"bad reply frame header {head!r}")
        return _decode(self._read_exact(int(head)))

    def _exchange(self, frames: Sequence[bytes], tolerate: bool = False) -> list[Any]:
        """Send frames, read one reply each; on a broken connection try the next server."""
        errors = []
        candidates = self._servers.candidates()
        reused = self._sock is not None and self._server in candidates
        if reused:
            # A kept connection may have been closed by a server that drained (a reload):
            # try it, then that server again on a fresh connection, then the others.
            candidates.insert(0, self._server)  # type: ignore[arg-type]
        for i, server in enumerate(candidates):
            try:
                if self._sock is None or self._server != server:
                    self.close()
                    self._sock = socket.create_connection(server, self.connect_timeout)
                    self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    self._sock.settimeout(self.timeout)
                    self._server = server
                self._sock.sendall(b"".join(frames))
                out: list[Any] = []
                for _ in frames:
                    try:
                        out.append(self._read_reply())
                    except DqError as exc:
                        if not tolerate:
                            # keep the stream in step: read the rest before raising
                            for _ in range(len(frames) - len(out) - 1):
                                self._read_reply_safe()
                            raise
                        out.append(exc)
                return out
            except (OSError, ConnectionError, ValueError) as exc:
                errors.append(f"{server[0]}:{server[1]}: {exc}")
                if not (reused and i == 0):
                    self._servers.failed(server)
                self.close()
        raise _unreachable(errors)

    def _read_reply_safe(self) -> None:
        try:
            self._read_reply()
        except DqError:
            pass

    def add(self, topic: str, job_id: str | int, body: Mapping[str, Any] | None = None, *,
            delay: float | None = None, fix_time: str | int | None = None,
            due_ms: int | None = None) -> None:
        """Add or replace a job; due at fix_time, after delay seconds, at due_ms, or after
        the topic's delay."""
        self._exchange([add_frame(topic, job_id, body, delay=delay, fix_time=fix_time,
                                  due_ms=due_ms)])

    def add_many(self, jobs: Iterable[Mapping[str, Any]], *, chunk: int = 500) -> list[Any]:
        """Adds sent together: many jobs to an add_many frame, frames pipelined, `chunk`
        jobs at a time. Each job is a dict of add()'s arguments (topic, id, body, ...).
        Returns, per job, None on success or the DqError it got (a job that cannot be
        encoded gets a bad_request one). dq before 0.3 refuses add_many frames and is then
        sent one add frame per job; php-delayqueue's server does not answer them: make
        clients for it with `many_frames=False`."""
        jobs = list(jobs)
        out: list[Any] = [None] * len(jobs)
        for lo in range(0, len(jobs), chunk):
            part = jobs[lo:lo + chunk]
            res: list[Any] = [None] * len(part)
            again = list(range(len(part)))
            failed: dict[int, DqError] = {}
            if self._many.use():
                frames = self._many.frames(part, 0, failed)
                again = self._many.spread(part, frames, self._exchange(
                    [f.data for f in frames], tolerate=True), res)
            sent, singles = _singles(part, again, failed)
            for i, r in zip(sent, self._exchange(singles, tolerate=True) if singles else [],
                            strict=True):
                res[i] = r if isinstance(r, DqError) else None
            for i, error in failed.items():
                res[i] = error
            out[lo:lo + len(part)] = res
        return out

    def get(self, topic: str, job_id: str | int) -> dict[str, Any] | None:
        try:
            data = self._exchange([_cmd_frame("get", topic, job_id)])[0]
        except DqError as exc:
            if exc.err == NOT_FOUND:
                return None
            raise
        return data if isinstance(data, dict) else {}

    def delete(self, topic: str, job_id: str | int) -> bool:
        try:
            self._exchange([_cmd_frame("del", topic, job_id)])
        except DqError as exc:
            if exc.err == NOT_FOUND:
                return False
            raise
        return True

    def ping(self) -> bool:
        self._exchange([encode_frame({"cmd": "ping"})])
        return True


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


class AsyncDqClient:
    """asyncio client. Requests are pipelined on one connection and answered in order;
    add_many keeps a window of them in flight, writing more as replies come back."""

    def __init__(self, servers: Sequence[str] | str, *, timeout: float = 3.0,
                 connect_timeout: float = 1.0, many_frames: bool = True) -> None:
        self._servers = _Servers(servers)
        self._server_list = [servers] if isinstance(servers, str) else list(servers)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._server: tuple[str, int] | None = None
        self._lock: asyncio.Lock | None = None
        self._lanes: list[AsyncDqClient] = []  # add_many's extra connections
        self._many = _Many(many_frames)

    async def __aenter__(self) -> AsyncDqClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection, and add_many's extra ones."""
        lanes, self._lanes = self._lanes, []
        for lane in lanes:
            await lane.close()
        await self._drop()

    async def _drop(self) -> None:
        """Close this client's own connection (it is made again when next needed)."""
        if self._conn is not None:
            self._conn[1].close()
            try:
                await self._conn[1].wait_closed()
            except OSError:
                pass
        self._conn = None

    async def _exchange(self, frames: Sequence[bytes], *, window: int = WINDOW,
                        data: bool = True, more: Iterator[Sequence[bytes]] | None = None,
                        weight: int = 1) -> list[Any]:
        """Send frames (then those `more` makes), up to `window` of them unanswered at a
        time, and return per frame its reply's data (None for each success when `data` is
        false) or its DqError. `weight` is the requests a frame may carry (add_many's):
        the server is given 1 ms per request to answer them all, beyond `timeout`.

        If the connection fails (closed, reset, a garbled reply, `timeout` seconds without
        a reply while some are owed), the frames not yet answered are sent again to the
        next server; those whose replies arrived are not. Raises DqError('unavailable')
        when no server could finish them."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        batch = _Batch(frames, max(1, window), data, more, weight)
        errors = []
        async with self._lock:
            candidates = self._servers.candidates()
            reused = self._conn is not None and self._server in candidates
            if reused:  # see DqClient._exchange
                candidates.insert(0, self._server)  # type: ignore[arg-type]
            i = 0
            while i < len(candidates):
                server = candidates[i]
                before = batch.done
                try:
                    if self._conn is None or self._server != server:
                        await self._drop()
                        self._conn = await asyncio.wait_for(
                            asyncio.open_connection(*server), self.connect_timeout)
                        self._server = server
                    await self._stream(batch)
                    return batch.out
                except (OSError, ConnectionError, asyncio.IncompleteReadError,
                        TimeoutError, ValueError) as exc:
                    errors.append(f"{server[0]}:{server[1]}: {str(exc) or type(exc).__name__}")
                    if not (reused and i == 0):
                        self._servers.failed(server)
                    await self._drop()
                if batch.done > before:
                    # Progress was made: the rest is a new exchange, with every server
                    # (the one that just failed last) to try again.
                    candidates, reused, i = self._servers.candidates(), False, 0
                    errors.clear()
                else:
                    i += 1
        raise _unreachable(errors)

    async def _stream(self, batch: _Batch) -> None:
        """Run batch.frames[batch.done:] over the current connection: write ahead while
        replies stream back, split replies out of large reads, and advance batch.done as
        they arrive. A reply equal to the constant success frame is not decoded."""
        assert self._conn is not None
        reader, writer = self._conn
        frames, out, window, keep = batch.frames, batch.out, batch.window, batch.data
        done = batch.done
        step = max(1, window // 4)  # write in slices: fewer, larger writes
        n = batch.fill(done + window)
        sent = min(n, done + window)
        writer.write(b"".join(frames[done:sent]))
        loop = asyncio.get_running_loop()
        cap = loop.time() + self.timeout + 0.001 * batch.weight * (n - done)
        buf, pos = b"", 0
        ok, ok_len, run, run_len = _OK, len(_OK), _OK_RUN, len(_OK_RUN)
        fast = not keep  # a success's data ([] in the constant frame) is not wanted
        try:
            async with asyncio.timeout(None) as deadline:
                while done < n:
                    deadline.reschedule(min(loop.time() + self.timeout, cap))
                    chunk = await reader.read(65536)
                    if not chunk:
                        raise ConnectionError("the server closed the connection")
                    buf = buf[pos:] + chunk if pos < len(buf) else chunk
                    pos, end = 0, len(buf)
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
                            head = buf[pos:pos + 4]
                            if not head.isdigit():
                                if done <= n:  # the replies before it count
                                    batch.done = done
                                raise ConnectionError(f"bad reply frame header {head!r}")
                            stop = pos + 4 + int(head)
                            if stop > end:
                                break
                            if done < n:
                                try:
                                    value = _decode(buf[pos + 4:stop])
                                    if keep:
                                        out[done] = value
                                except DqError as exc:
                                    out[done] = exc
                                except ValueError:  # not JSON: as a broken connection
                                    batch.done = done  # (done < n here)
                                    raise
                            pos = stop
                            done += 1
                    if done > n:  # these replies cannot be matched to requests
                        raise ConnectionError(f"the server sent {done - n} replies more "
                                              "than it was sent requests")
                    batch.done = done
                    if sent - done <= window - step and n < done + window:
                        grown = batch.fill(done + window)
                        cap += 0.001 * batch.weight * (grown - n)
                        n = grown
                    if sent < n and sent - done <= window - step:
                        upto = min(n, done + window)
                        writer.write(b"".join(frames[sent:upto]))
                        sent = upto
        except BaseException:
            if self._conn is not None and self._conn[1] is writer:
                # Replies still owed on this connection would answer later requests.
                writer.close()
                self._conn = None
            raise

    async def _one(self, frame: bytes) -> Any:
        res = (await self._exchange([frame]))[0]
        if isinstance(res, DqError):
            raise res
        return res

    async def add(self, topic: str, job_id: str | int, body: Mapping[str, Any] | None = None,
                  *, delay: float | None = None, fix_time: str | int | None = None,
                  due_ms: int | None = None) -> None:
        await self._one(add_frame(topic, job_id, body, delay=delay, fix_time=fix_time,
                                  due_ms=due_ms))

    async def add_many(self, jobs: Iterable[Mapping[str, Any]], *, window: int = WINDOW,
                       chunk: int | None = None, connections: int = 1) -> list[Any]:
        """Adds sent together. Each job is a dict of add()'s arguments (topic, id, body,
        ...). Returns, in job order, None for each job stored or the DqError it got.

        Jobs go up to MAX_MANY (200) to an add_many frame, each one an add of its own on
        the server, and frames are pipelined: up to about `window` adds are in flight on a
        connection (`chunk` is its old name), more are written while replies stream back.
        dq before 0.3 refuses add_many frames: it is then sent one add frame per job.
        php-delayqueue's server does not answer them at all: make clients for it with
        `many_frames=False`. If the connection fails part way, the adds
        not yet answered are sent again to the next server. That is safe because an add is
        idempotent: the same topic:id replaces the job, so an add that was stored but whose
        reply was lost is stored once, not twice. Raises DqError('unavailable') when no
        server can take the rest.

        `connections` > 1 spreads the adds over that many connections (kept open for the
        next call), so that several dq-server processes (`--servers`, or several dq
        instances) share the work: one connection is served by one process. Adds of the
        same topic:id always take the same connection, so they stay in order."""
        jobs = list(jobs)
        if connections <= 1:
            return await self._add_many(jobs, chunk or window)
        while len(self._lanes) < connections - 1:
            self._lanes.append(AsyncDqClient(self._server_list, timeout=self.timeout,
                                             connect_timeout=self.connect_timeout,
                                             many_frames=self._many.on))
        lanes = [self, *self._lanes[:connections - 1]]
        for lane in lanes:
            # One at a time: connections made at the same instant tend to be accepted by
            # the same server process, which would leave the others idle.
            if lane._conn is None:
                await lane.ping()
        picks: list[list[int]] = [[] for _ in lanes]
        for i, job in enumerate(jobs):
            # A job without a topic or id still goes (to be refused alone, as with one lane).
            key = _key(job) if isinstance(job, Mapping) else ""
            picks[zlib.crc32(key.encode()) % len(lanes)].append(i)
        used = [(lane, pick) for lane, pick in zip(lanes, picks, strict=True) if pick]
        tasks = [asyncio.ensure_future(lane._add_many([jobs[i] for i in pick], chunk or window))
                 for lane, pick in used]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:  # one lane could not finish (or we are cancelled): stop all
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        out: list[Any] = [None] * len(jobs)
        for (_, pick), replies in zip(used, results, strict=True):
            for i, res in zip(pick, replies, strict=True):
                out[i] = res
        return out

    async def _add_many(self, jobs: Sequence[Mapping[str, Any]], window: int) -> list[Any]:
        """add_many on this client's connection: add_many frames (one add frame per job
        to a server that refuses them), about `window` jobs in flight."""
        out: list[Any] = [None] * len(jobs)
        again = list(range(len(jobs)))
        failed: dict[int, DqError] = {}
        if self._many.use() and jobs:
            frames: list[_ManyFrame] = []

            def more() -> Iterator[list[bytes]]:  # encoded while the first are stored
                for lo in range(0, len(jobs), _MANY_SLICE):
                    made = self._many.frames(jobs[lo:lo + _MANY_SLICE], lo, failed)
                    frames.extend(made)
                    yield [f.data for f in made]

            try:
                replies = await self._exchange([], window=max(2, window // MAX_MANY),
                                               more=more(), weight=MAX_MANY)
            except DqError as exc:
                if exc.err != UNAVAILABLE:
                    raise
                raise DqError(UNAVAILABLE, f"{exc.msg} (php-delayqueue's server does not "
                              "answer add_many frames: make its clients with "
                              "many_frames=False)") from None
            assert sum(f.stop - f.start for f in frames) + len(failed) == len(jobs)
            again = self._many.spread(jobs, frames, replies, out)
        sent, singles = _singles(jobs, again, failed)
        if singles:
            res = await self._exchange(singles, window=window, data=False)
            for i, r in zip(sent, res, strict=True):
                out[i] = r
        for i, error in failed.items():
            out[i] = error
        return out

    async def get(self, topic: str, job_id: str | int) -> dict[str, Any] | None:
        try:
            data = await self._one(_cmd_frame("get", topic, job_id))
        except DqError as exc:
            if exc.err == NOT_FOUND:
                return None
            raise
        return data if isinstance(data, dict) else {}

    async def delete(self, topic: str, job_id: str | int) -> bool:
        try:
            await self._one(_cmd_frame("del", topic, job_id))
        except DqError as exc:
            if exc.err == NOT_FOUND:
                return False
            raise
        return True

    async def ping(self) -> bool:
        await self._one(encode_frame({"cmd": "ping"}))
        return True
