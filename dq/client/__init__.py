"""Python clients for the dq wire protocol: DqClient (blocking) and AsyncDqClient.

Both take a list of "host:port" servers, like the original PHP client: a server that
cannot be reached is skipped for a while and the request goes to another one. Failures
the server reports raise DqError with its `err` word; `get` of a missing job returns None
and `delete` of a missing job returns False.

The package: frames (what is sent, byte for byte), core (the server list and failover,
each request's frame and reply, the pipelined exchange's reply matching and window),
many (add_many's frames and results), and the two clients over them, sync and aio.
"""

from __future__ import annotations

from dq.client.aio import AsyncDqClient
from dq.client.core import DEAD_FOR, WINDOW
from dq.client.frames import _add_frame_of, _add_frame_plain, _add_frames, add_frame
from dq.client.many import MANY_RETRY, _Many
from dq.client.sync import DqClient
from dq.errors import DqError
from dq.wire.frames import MAX_FRAME
from dq.wire.requests import MAX_MANY

__all__ = [
    "DEAD_FOR",
    "MANY_RETRY",
    "MAX_FRAME",
    "MAX_MANY",
    "WINDOW",
    "AsyncDqClient",
    "DqClient",
    "DqError",
    "_Many",
    "_add_frame_of",
    "_add_frame_plain",
    "_add_frames",
    "add_frame",
]
