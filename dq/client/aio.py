"""AsyncDqClient: the asyncio client, over the shared core (dq.client.core)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from dq.client.core import (
    WINDOW,
    Request,
    _Attempts,
    _Batch,
    _Replies,
    _Servers,
    _Window,
    add_request,
    delete_request,
    get_request,
    ping_request,
)
from dq.client.many import ManyAdd, _Many, lanes_of
from dq.errors import UNAVAILABLE, DqError
from dq.wire.requests import MAX_MANY

T = TypeVar("T")


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

    async def _connect(self, server: tuple[str, int]) -> None:
        if self._conn is None or self._server != server:
            await self._drop()
            self._conn = await asyncio.wait_for(asyncio.open_connection(*server),
                                                self.connect_timeout)
            self._server = server

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
        async with self._lock:
            attempts = _Attempts(self._servers,
                                 self._server if self._conn is not None else None)
            for server in attempts:
                before = batch.done
                try:
                    await self._connect(server)
                    await self._stream(batch)
                    return batch.out
                except (OSError, ConnectionError, asyncio.IncompleteReadError,
                        TimeoutError, ValueError) as exc:
                    attempts.failed(server, str(exc) or type(exc).__name__)
                    await self._drop()
                if batch.done > before:
                    attempts.restart()
        raise attempts.error()

    async def _stream(self, batch: _Batch) -> None:
        """Run batch.frames[batch.done:] over the current connection: write ahead while
        replies stream back (_Window), and match them to the frames as they arrive
        (_Replies)."""
        assert self._conn is not None
        reader, writer = self._conn
        loop = asyncio.get_running_loop()
        window = _Window(batch, self.timeout, loop.time)
        replies = _Replies(batch)
        writer.write(window.first())
        try:
            async with asyncio.timeout(None) as deadline:
                while batch.done < window.n:
                    deadline.reschedule(window.due(loop.time()))
                    chunk = await reader.read(65536)
                    if not chunk:
                        raise ConnectionError("the server closed the connection")
                    replies.feed(chunk, window.n)
                    more = window.more()
                    if more:
                        writer.write(more)
        except BaseException:
            if self._conn is not None and self._conn[1] is writer:
                # Replies still owed on this connection would answer later requests.
                writer.close()
                self._conn = None
            raise

    async def _call(self, request: Request[T]) -> T:
        return request.result((await self._exchange([request.frame]))[0])

    async def add(self, topic: str, job_id: str | int, body: Mapping[str, Any] | None = None,
                  *, delay: float | None = None, fix_time: str | int | None = None,
                  due_ms: int | None = None) -> None:
        await self._call(add_request(topic, job_id, body, delay=delay, fix_time=fix_time,
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
        lanes = await self._open_lanes(connections)
        used = [(lane, pick) for lane, pick in zip(lanes, lanes_of(jobs, len(lanes)),
                                                   strict=True) if pick]
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

    async def _open_lanes(self, connections: int) -> list[AsyncDqClient]:
        """This client and connections - 1 more (kept for the next call), connected."""
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
        return lanes

    async def _add_many(self, jobs: Sequence[Mapping[str, Any]], window: int) -> list[Any]:
        """add_many on this client's connection: add_many frames (one add frame per job
        to a server that refuses them), about `window` jobs in flight."""
        plan = ManyAdd(self._many, jobs)
        if plan.use_many:
            # The frames are encoded as the window reaches them, while the first are stored.
            try:
                replies = await self._exchange([], window=max(2, window // MAX_MANY),
                                               more=plan.many_frames(), weight=MAX_MANY)
            except DqError as exc:
                if exc.err != UNAVAILABLE:
                    raise
                raise DqError(UNAVAILABLE, f"{exc.msg} (php-delayqueue's server does not "
                              "answer add_many frames: make its clients with "
                              "many_frames=False)") from None
            plan.many_replies(replies)
        singles = plan.singles()
        return plan.results(await self._exchange(singles, window=window, data=False)
                            if singles else [])

    async def get(self, topic: str, job_id: str | int) -> dict[str, Any] | None:
        """The job (its body and times), or None when there is no such job."""
        return await self._call(get_request(topic, job_id))

    async def delete(self, topic: str, job_id: str | int) -> bool:
        """Delete a job; False when there was no such job."""
        return await self._call(delete_request(topic, job_id))

    async def ping(self) -> bool:
        return await self._call(ping_request())
