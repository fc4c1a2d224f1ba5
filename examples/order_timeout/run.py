"""Unpaid orders cancelled by dq, end to end: `python examples/order_timeout/run.py`.

Starts a dq-master (embedded Redis, in a temp dir) unless `--dq host:port` names a running
one, registers the topic `order_timeout` with the order service's /dq/cancel as its signed
callback, creates two orders, pays one, and shows that only the unpaid one was cancelled.
Exits 0 when that is what happened.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from order_service import TOPIC, OrderService

import dq
from dq.client import DqClient
from dq.errors import UNAVAILABLE, UNKNOWN_TOPIC, DqError
from dq.registry.core import Registry, Topic

DQ_ROOT = Path(dq.__file__).resolve().parent.parent  # so the master runs this same dq


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def register_topic(db_url: str, callback: str, secret: str) -> Topic:
    """Create or update the topic in the registry dq-master reads."""
    registry = Registry(db_url)
    try:
        return registry.save_topic(Topic(
            topic=TOPIC, name="cancel unpaid orders", callback=callback, method="POST",
            body_format="json", secret=secret, timeout_ms=3000, max_attempts=5))
    finally:
        registry.close()


@contextmanager
def dq_master(data_dir: Path, db_url: str, port: int, *, redis: str = "",
              env: dict[str, str] | None = None) -> Iterator[str]:
    """A `python -m dq.cli` subprocess on 127.0.0.1:port; yields its "host:port" and stops
    it with TERM (its graceful stop) on the way out, printing its log tail on an error."""
    argv = [sys.executable, "-m", "dq.cli", "--host", "127.0.0.1", "--port", str(port),
            "--data-dir", str(data_dir), "--db", db_url, "--no-web", "--timers", "1",
            "--consumers", "1", *(["--redis", redis] if redis else [])]
    path = os.pathsep.join(p for p in (str(DQ_ROOT), os.environ.get("PYTHONPATH")) if p)
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "master.log"
    with open(log_path, "wb") as out:
        # Its own session: a Ctrl-C here must not also reach the master as a second signal.
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": path, **(env or {})},
                                start_new_session=True)
    try:
        yield f"127.0.0.1:{port}"
    except BaseException:
        tail = log_path.read_text(errors="replace").splitlines()[-20:]
        print("--- dq-master log tail ---", *tail, sep="\n", file=sys.stderr)
        raise
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_for_topic(server: str, timeout: float = 30.0) -> None:
    """Wait until dq is up and accepts jobs for the topic (workers re-read the registry
    every couple of seconds, so a topic registered a moment ago may not be known yet)."""
    deadline = time.monotonic() + timeout
    with DqClient([server], connect_timeout=0.5) as client:
        while True:
            try:
                client.add(TOPIC, "probe", {}, delay=86400)
                client.delete(TOPIC, "probe")
                return
            except DqError as exc:
                if exc.err not in (UNAVAILABLE, UNKNOWN_TOPIC) or time.monotonic() > deadline:
                    raise
            time.sleep(0.2)


def call(method: str, url: str) -> dict[str, Any]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=10) as resp:
        reply: dict[str, Any] = json.load(resp)
        return reply


def demo(service_url: str, pay_within: float) -> bool:
    """Two orders, one paid: True when the unpaid one is cancelled and the paid one not."""
    unpaid = call("POST", f"{service_url}/orders")["id"]
    paid = call("POST", f"{service_url}/orders")["id"]
    print(f"created orders {unpaid} and {paid}; each must be paid within {pay_within:g}s")
    call("POST", f"{service_url}/orders/{paid}/pay")
    print(f"order {paid} paid")
    deadline = time.monotonic() + pay_within + 10
    while call("GET", f"{service_url}/orders/{unpaid}")["status"] == "unpaid":
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    time.sleep(1.0)  # room for a wrong cancellation of the paid order to show up
    got = {o: call("GET", f"{service_url}/orders/{o}")["status"] for o in (unpaid, paid)}
    print(f"order {unpaid} (not paid): {got[unpaid]}")
    print(f"order {paid} (paid):     {got[paid]}")
    return got == {unpaid: "cancelled", paid: "paid"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dq", metavar="HOST:PORT",
                        help="a running dq-master (needs --db: the registry it uses)")
    parser.add_argument("--db", metavar="URL", help="the dq registry, a SQLAlchemy URL "
                        "(default: SQLite in a temp dir, shared with the started master)")
    parser.add_argument("--redis", metavar="URL",
                        help="Redis for the started dq-master (default: embedded)")
    parser.add_argument("--pay-within", type=float, default=3.0, metavar="SECONDS")
    parser.add_argument("--verbose", action="store_true", help="log the service's requests")
    args = parser.parse_args(argv)
    if args.dq and not args.db:
        parser.error("--dq needs --db, the registry that dq-master reads its topics from")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dq-orders-")))
        db_url = args.db or f"sqlite:///{tmp / 'registry.sqlite3'}"
        port = free_port()
        server = args.dq or f"127.0.0.1:{port}"
        secret = secrets.token_hex(16)
        service = stack.enter_context(OrderService(
            tmp / "orders.sqlite3", [server], secret=secret, pay_within=args.pay_within))
        register_topic(db_url, f"{service.url}/dq/cancel", secret)
        print(f"order service on {service.url}; topic {TOPIC!r} calls {service.url}/dq/cancel")
        if not args.dq:
            stack.enter_context(dq_master(tmp / "dq", db_url, port, redis=args.redis or ""))
            print(f"dq-master started on {server}")
        wait_for_topic(server)
        ok = demo(service.url, args.pay_within)
    print("OK: the unpaid order was cancelled, the paid one was not" if ok else
          "FAILED: see the order statuses above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
