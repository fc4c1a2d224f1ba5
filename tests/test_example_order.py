"""examples/order_timeout against a real dq-master: the unpaid order is cancelled on time,
the paid one is left alone, forged callbacks are refused, repeated ones change nothing."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from dq.client import DqClient
from dq.roles.callback import sign
from tests.support.procs import free_port
from tests.support.redisproc import RedisProcess

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "order_timeout"
SECRET = "order-secret"


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> tuple[ModuleType, ModuleType]:
    """The example's order_service and run modules, imported as run.py imports them."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    service = importlib.import_module("order_service")
    spec = importlib.util.spec_from_file_location("order_timeout_run", EXAMPLE / "run.py")
    assert spec and spec.loader
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    return service, run


def http(method: str, url: str, body: bytes = b"",
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, method=method, headers=headers or {},
                                 data=body if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def signed(order_id: int, *, attempt: int = 1, ts: int | None = None, secret: str = SECRET,
           body: bytes | None = None) -> tuple[bytes, dict[str, str]]:
    """A callback as dq sends it for job `order_id` (the topic is body_format 'json')."""
    raw = json.dumps({"order_id": order_id}, separators=(",", ":")).encode()
    stamp = str(int(time.time()) if ts is None else ts)
    headers = {"Content-Type": "application/json", "X-Dq-Topic": "order_timeout",
               "X-Dq-Id": str(order_id), "X-Dq-Attempt": str(attempt),
               "X-Dq-Timestamp": stamp, "X-Dq-Signature": sign(secret, stamp, raw)}
    return (raw if body is None else body), headers


def wait_for(what: str, pred: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.mark.system  # run.dq_master starts a dq-master: out of kinds.py's sight
def test_orders_against_a_real_master(example: tuple[ModuleType, ModuleType],
                                      redis_server: RedisProcess, tmp_path: Path) -> None:
    service_mod, run = example
    db = f"sqlite:///{tmp_path / 'registry.sqlite3'}"
    port = free_port()
    svc = service_mod.OrderService(tmp_path / "orders.sqlite3", [f"127.0.0.1:{port}"],
                                   secret=SECRET, pay_within=3.0)
    with svc:
        cancel_url = f"{svc.url}/dq/cancel"
        run.register_topic(db, cancel_url, SECRET)
        with run.dq_master(tmp_path / "dq", db, port, redis=redis_server.url,
                           env={"DQ_TIMER_TICK": "0.2"}) as server:
            run.wait_for_topic(server)

            def order(oid: int) -> dict[str, Any]:
                return http("GET", f"{svc.url}/orders/{oid}")[1]

            def received(oid: int) -> list[tuple[int, str, int]]:
                return [(d["attempt"], d["result"], d["received"])
                        for d in svc.store.deliveries() if d["job_id"] == str(oid)]

            status, created = http("POST", f"{svc.url}/orders")
            assert status == 201
            unpaid = created["id"]
            paid = http("POST", f"{svc.url}/orders")[1]["id"]
            assert http("POST", f"{svc.url}/orders/{paid}/pay") == (
                200, {"id": paid, "status": "paid"})
            with DqClient([server]) as client:
                assert client.get("order_timeout", str(paid)) is None  # paying deleted it
                job = client.get("order_timeout", str(unpaid))
                assert job and job["order_id"] == unpaid

            # dq calls back on time, not early, and once.
            t0 = time.monotonic()
            wait_for("the cancellation", lambda: order(unpaid)["status"] == "cancelled", 10)
            got = order(unpaid)
            assert got["closed_at"] - got["created_at"] >= 2.9, "cancelled before its time"
            assert time.monotonic() - t0 < 10
            assert received(unpaid) == [(1, "cancelled", 1)]
            assert order(paid)["status"] == "paid" and received(paid) == []

            # Forged, stale, tampered and unsigned callbacks: 401 and nothing changes.
            victim = http("POST", f"{svc.url}/orders")[1]["id"]
            forgeries = [
                signed(victim, secret="guessed"),
                signed(victim, ts=int(time.time()) - 600),  # a replay from 10 minutes ago
                signed(victim, body=json.dumps({"order_id": unpaid}).encode()),
                (signed(victim)[0], {"Content-Type": "application/json", "X-Dq-Id":
                                     str(victim), "X-Dq-Attempt": "1"}),
            ]
            for body, headers in forgeries:
                status, reply = http("POST", cancel_url, body, headers)
                assert status == 401, reply
            assert order(victim)["status"] == "unpaid" and received(victim) == []
            assert http("POST", f"{svc.url}/orders/{victim}/pay")[0] == 200

            # The same delivery again, by hand: 200, the first answer, nothing changed.
            status, reply = http("POST", cancel_url, *signed(unpaid))
            assert (status, reply["result"], reply["repeat"]) == (200, "cancelled", True)
            assert received(unpaid) == [(1, "cancelled", 2)]
            # ...and through dq itself: the job added again is delivered as attempt 1 again.
            # A late job for a paid order (say its delete was lost) leaves the order paid.
            with DqClient([server]) as client:
                client.add("order_timeout", str(unpaid), {"order_id": unpaid}, delay=0)
                client.add("order_timeout", str(paid), {"order_id": paid}, delay=0)
            wait_for("both deliveries", lambda: received(unpaid) == [(1, "cancelled", 3)]
                     and received(paid) == [(1, "paid", 1)], 10)
            assert order(unpaid)["status"] == "cancelled"
            assert order(paid)["status"] == "paid"
            assert svc.stats["refused"] == len(forgeries)


def test_the_one_command(tmp_path: Path) -> None:
    """`python examples/order_timeout/run.py`, as the README gives it: embedded Redis."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DQ_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["TMPDIR"] = str(tmp_path)
    res = subprocess.run([sys.executable, "examples/order_timeout/run.py"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "(not paid): cancelled" in res.stdout
    assert "(paid):     paid" in res.stdout
    assert "OK: the unpaid order was cancelled" in res.stdout
    assert list(tmp_path.iterdir()) == [], "run.py leaves no temp dir behind"
