"""A small order service that lets dq cancel unpaid orders (stdlib HTTP server + SQLite).

Routes:

- `POST /orders` creates an order ('unpaid') and adds the dq job `order_timeout/<id>`,
  due after the order's payment window.
- `POST /orders/<id>/pay` marks it 'paid' if still unpaid (409 once cancelled) and deletes
  the dq job; the delete is only a saving, the callback leaves paid orders alone anyway.
- `GET /orders/<id>` shows it.
- `POST /dq/cancel` is the topic's callback. It checks X-Dq-Signature when a secret is set
  (401 if wrong, missing or older than 5 minutes), then cancels the order only if it is
  still unpaid. Every verified delivery is recorded by (X-Dq-Id, X-Dq-Attempt): a repeat
  changes nothing and gets the first answer again. Anything that needs no retry answers
  200, so dq does not retry a paid or unknown order.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

from dq.client import DqClient
from dq.errors import DqError

log = logging.getLogger(__name__)

TOPIC = "order_timeout"
MAX_SKEW = 300  # seconds a signed callback stays valid; older ones are replays

SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    status TEXT NOT NULL DEFAULT 'unpaid',  -- unpaid | paid | cancelled
    created_at REAL NOT NULL,
    closed_at REAL                          -- when it was paid or cancelled
);
CREATE TABLE IF NOT EXISTS deliveries (
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    result TEXT NOT NULL,                   -- what the first delivery did
    received INTEGER NOT NULL DEFAULT 1,    -- how many times it arrived
    PRIMARY KEY (job_id, attempt)
);
"""


class Reject(Exception):
    """A request answered with `status` and a one-line reason, changing nothing."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def verify(secret: str, headers: Any, body: bytes, now: float) -> None:
    """Raise Reject(401) unless the callback carries a fresh, valid signature (dq/roles/callback.py:
    hex HMAC-SHA256 of `timestamp + "." + raw body`, keyed with the topic's secret)."""
    ts, sig = headers.get("X-Dq-Timestamp", ""), headers.get("X-Dq-Signature", "")
    if not ts.isdigit() or not sig:
        raise Reject(401, "missing X-Dq-Timestamp or X-Dq-Signature")
    if abs(now - int(ts)) > MAX_SKEW:
        raise Reject(401, "stale X-Dq-Timestamp")
    want = hmac.new(secret.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(want, sig):
        raise Reject(401, "bad X-Dq-Signature")


def callback_fields(content_type: str, body: bytes) -> dict[str, Any]:
    """The job body dq sent: JSON for body_format 'json', else form fields."""
    if content_type.split(";")[0].strip() == "application/json":
        data = json.loads(body or b"{}")
        if not isinstance(data, dict):
            raise Reject(400, "the JSON body is not an object")
        return data
    return {k: v[-1] for k, v in parse_qs(body.decode("utf-8"), keep_blank_values=True).items()}


class OrderStore:
    """The orders and deliveries tables; every change is one short transaction."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with closing(sqlite3.connect(path)) as db:
            db.executescript(SCHEMA)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        # One connection per transaction: handler threads never share one.
        with closing(sqlite3.connect(self.path, timeout=10, isolation_level=None)) as db:
            db.row_factory = sqlite3.Row
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def create(self) -> int:
        with self._tx() as db:
            cur = db.execute("INSERT INTO orders (created_at) VALUES (?)", (time.time(),))
            return int(cur.lastrowid or 0)

    def drop(self, order_id: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM orders WHERE id = ?", (order_id,))

    def get(self, order_id: int) -> dict[str, Any] | None:
        with self._tx() as db:
            row = db.execute("SELECT * FROM orders WHERE id = ?", (order_id,)).fetchone()
            return dict(row) if row else None

    def _close(self, db: sqlite3.Connection, order_id: int, status: str) -> str:
        """Move an unpaid order to `status`; returns the status it has afterwards."""
        cur = db.execute("UPDATE orders SET status = ?, closed_at = ? "
                         "WHERE id = ? AND status = 'unpaid'", (status, time.time(), order_id))
        if cur.rowcount:
            return status
        row = db.execute("SELECT status FROM orders WHERE id = ?", (order_id,)).fetchone()
        return str(row["status"]) if row else "unknown"

    def pay(self, order_id: int) -> str:
        with self._tx() as db:
            return self._close(db, order_id, "paid")

    def cancel_once(self, job_id: str, attempt: int, order_id: int) -> tuple[str, bool]:
        """Cancel the order if unpaid, once per delivery: (result, was it a repeat)."""
        with self._tx() as db:
            row = db.execute("SELECT result FROM deliveries WHERE job_id = ? AND attempt = ?",
                             (job_id, attempt)).fetchone()
            if row:
                db.execute("UPDATE deliveries SET received = received + 1 "
                           "WHERE job_id = ? AND attempt = ?", (job_id, attempt))
                return str(row["result"]), True
            after = self._close(db, order_id, "cancelled")
            db.execute("INSERT INTO deliveries (job_id, attempt, result) VALUES (?, ?, ?)",
                       (job_id, attempt, after))
            return after, False

    def deliveries(self) -> list[dict[str, Any]]:
        with self._tx() as db:
            return [dict(r) for r in db.execute("SELECT * FROM deliveries ORDER BY rowid")]


class OrderService:
    """The HTTP service on 127.0.0.1 (port 0 = any free one), run in a background thread."""

    def __init__(self, db_path: Path, dq_servers: Sequence[str], *, secret: str = "",
                 pay_within: float = 3.0, port: int = 0) -> None:
        self.store = OrderStore(db_path)
        self.dq = DqClient(list(dq_servers))
        self.dq_lock = threading.Lock()  # DqClient keeps one connection: one user at a time
        self.secret = secret
        self.pay_within = pay_within
        self.stats = Counter[str]()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler_for(self))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread: threading.Thread | None = None

    def start(self) -> OrderService:
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        log.info("order service started on %s (pay within %.1fs, signed callbacks %s)",
                 self.url, self.pay_within, "required" if self.secret else "off")
        return self

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
        self.httpd.server_close()
        self.dq.close()
        log.info("order service stopped: %s", dict(self.stats) or "no requests")

    def __enter__(self) -> OrderService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # what the routes do; each returns (HTTP status, JSON reply)

    def create_order(self) -> tuple[int, dict[str, Any]]:
        order_id = self.store.create()
        try:
            with self.dq_lock:
                self.dq.add(TOPIC, str(order_id), {"order_id": order_id},
                            delay=self.pay_within)
        except DqError as exc:
            # An order nobody would ever cancel is worse than no order: take it back.
            log.warning("order %d: could not schedule its timeout (%s); order dropped",
                        order_id, exc.msg)
            self.store.drop(order_id)
            raise Reject(503, "could not schedule the payment timeout; try again") from exc
        self.stats["created"] += 1
        return 201, {"id": order_id, "status": "unpaid", "pay_within": self.pay_within}

    def pay_order(self, order_id: int) -> tuple[int, dict[str, Any]]:
        after = self.store.pay(order_id)
        if after == "unknown":
            raise Reject(404, f"no order {order_id}")
        if after == "cancelled":
            raise Reject(409, f"order {order_id} was cancelled: its payment window closed")
        self.stats["paid"] += 1
        try:
            with self.dq_lock:
                self.dq.delete(TOPIC, str(order_id))
        except DqError as exc:
            log.warning("order %d: paid, but its dq job was not deleted (%s); the callback "
                        "will find it paid", order_id, exc.msg)
        return 200, {"id": order_id, "status": after}

    def show_order(self, order_id: int) -> tuple[int, dict[str, Any]]:
        order = self.store.get(order_id)
        if order is None:
            raise Reject(404, f"no order {order_id}")
        return 200, order

    def cancel_callback(self, headers: Any, body: bytes) -> tuple[int, dict[str, Any]]:
        if self.secret:
            try:
                verify(self.secret, headers, body, time.time())
            except Reject:
                self.stats["refused"] += 1
                raise
        fields = callback_fields(headers.get("Content-Type", ""), body)
        job_id = unquote(headers.get("X-Dq-Id", ""))
        attempt = headers.get("X-Dq-Attempt", "")
        order_id = str(fields.get("order_id", job_id))
        if not job_id or not attempt.isdigit() or not order_id.isdigit():
            raise Reject(400, "needs X-Dq-Id, X-Dq-Attempt and a numeric order_id")
        result, repeat = self.store.cancel_once(job_id, int(attempt), int(order_id))
        self.stats["repeat" if repeat else f"callback_{result}"] += 1
        log.info("callback for order %s (attempt %s): %s%s", order_id, attempt, result,
                 " (repeat delivery, nothing changed)" if repeat else "")
        return 200, {"code": 0, "order": int(order_id), "result": result, "repeat": repeat}


_ORDER = re.compile(r"^/orders/(\d+)$")
_PAY = re.compile(r"^/orders/(\d+)/pay$")


def _handler_for(service: OrderService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            m = _ORDER.match(self.path)
            self._answer(lambda: service.show_order(int(m.group(1))) if m else None)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            path = self.path.split("?", 1)[0]
            pay = _PAY.match(path)
            if path == "/orders":
                self._answer(service.create_order)
            elif pay:
                self._answer(lambda: service.pay_order(int(pay.group(1))))
            elif path == "/dq/cancel":
                self._answer(lambda: service.cancel_callback(self.headers, body))
            else:
                self._answer(lambda: None)

        def _answer(self, route: Any) -> None:
            try:
                status, reply = route() or (404, {"error": "no such route"})
            except Reject as exc:
                status, reply = exc.status, {"error": exc.reason}
            except ValueError as exc:  # a body that is not JSON or not UTF-8
                status, reply = 400, {"error": f"unreadable body: {exc}"}
            data = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

    return Handler
