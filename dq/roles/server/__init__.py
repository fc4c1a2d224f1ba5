"""The TCP server: the original's framing, add / get / del / ping, many clients at once.

Each connection is an asyncio Protocol. Requests on one connection are handled
concurrently and answered in order (clients may pipeline); every Redis call goes through
the shard's batching queue, so requests from many connections share round trips. A
connection that sends garbage, stalls inside a frame or never reads its replies (or, with
`idle_timeout` set, idles too long) is answered or closed on its own; it never holds up the
others. A client that half-closes is answered in full, then closed. A reload hands every
connection, once what it sent is answered, to a server of the new generation
(dq/runtime/handover.py), so a client that never reconnects keeps its connection.

A request flows through the modules in this order:

    listener.py    Server: accepts (and adopts handed-over) sockets, drains, hands over
    connection.py  Connection: frames in, flow control, requests started in order
    handler.py     Handler: validates a request and runs it against the Store
    replies.py     Pending / _Many / ReplyQueue / Coalescer: replies in order, one write
                   per connection per batch
    role.py        run(ctx): the role's entry (open, serve, drain, close)
"""

from dq.roles.server.listener import Server
from dq.roles.server.role import run

__all__ = ["Server", "run"]
