"""add_many without its I/O: jobs into add_many frames (or add frames, for a server that
refuses those), each job's result out of the replies, the jobs to send again, and the
spreading of jobs over several connections."""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from dq.client.frames import _add_frame_of, _add_frames
from dq.errors import BAD_REQUEST, TOO_LARGE, UNAVAILABLE, DqError
from dq.wire.frames import MAX_FRAME
from dq.wire.requests import MAX_MANY

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


class ManyAdd:
    """One add_many on one connection, the I/O left to the client: first the jobs in
    add_many frames (when the client sends those), then in add frames those jobs that
    did not settle that way; then each job's result (None, or its DqError)."""

    def __init__(self, many: _Many, jobs: Sequence[Mapping[str, Any]],
                 slice_: int = _MANY_SLICE) -> None:
        self.many, self.jobs, self.slice = many, jobs, slice_
        self.use_many = many.use() and bool(jobs)  # else: add frames only
        self.out: list[Any] = [None] * len(jobs)
        self.failed: dict[int, DqError] = {}  # jobs that cannot be encoded
        self.frames: list[_ManyFrame] = []
        self.again = list(range(len(jobs)))  # jobs for add frames
        self.sent: list[int] = []

    def many_frames(self) -> Iterator[list[bytes]]:
        """The add_many frames, made `slice` jobs at a time as the caller asks for more."""
        for lo in range(0, len(self.jobs), self.slice):
            made = self.many.frames(self.jobs[lo:lo + self.slice], lo, self.failed)
            self.frames.extend(made)
            yield [f.data for f in made]

    def many_replies(self, replies: Sequence[Any]) -> None:
        """The replies to all of many_frames()'s frames."""
        assert sum(f.stop - f.start for f in self.frames) + len(self.failed) == len(self.jobs)
        self.again = self.many.spread(self.jobs, self.frames, replies, self.out)

    def singles(self) -> list[bytes]:
        """The add frames to send next (perhaps none)."""
        self.sent, frames = _singles(self.jobs, self.again, self.failed)
        return frames

    def results(self, replies: Sequence[Any]) -> list[Any]:
        """Each job's result, given the replies to singles()'s frames."""
        for i, r in zip(self.sent, replies, strict=True):
            self.out[i] = r if isinstance(r, DqError) else None
        for i, error in self.failed.items():
            self.out[i] = error
        return self.out


def lanes_of(jobs: Sequence[Any], lanes: int) -> list[list[int]]:
    """The jobs each of `lanes` connections sends (indexes, in order): the adds of one
    topic:id always take the same connection, so they stay in order."""
    picks: list[list[int]] = [[] for _ in range(lanes)]
    for i, job in enumerate(jobs):
        # A job without a topic or id still goes (to be refused alone, as with one lane).
        key = _key(job) if isinstance(job, Mapping) else ""
        picks[zlib.crc32(key.encode()) % lanes].append(i)
    return picks
