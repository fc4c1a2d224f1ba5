"""The callback network policy (dq/roles/netpolicy.py): what it refuses, where it is enforced
(every connection a consumer makes, judged after DNS), and how a refusal shows: a 422 at
registration (API and console form), a dead letter saying why at delivery. Real
redis-server, real HTTP receiver, the console over ASGI."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dq.config import Settings, load_settings
from dq.errors import ConfigError
from dq.registry.core import Registry, Topic
from dq.roles import consumer, timer
from dq.roles.callback import ExprCache, call, open_session
from dq.roles.netpolicy import CallbackPolicy, is_local, judge_url
from dq.runtime.context import Context, open_store
from dq.storage.store import Claimed
from tests.support.procs import free_port
from tests.support.receiver import Receiver
from tests.support.redisproc import RedisProcess
from tests.support.web import Web, login, open_web

REDIS_PORT = 16379  # a port no test listens on: the policy is judged, nothing is called


def policy(**kw: Any) -> CallbackPolicy:
    base: dict[str, Any] = {"redis": (f"redis://127.0.0.1:{REDIS_PORT}/0",),
                            "db": "mysql+pymysql://dq:pw@10.9.9.9/dq", "web_port": 18088,
                            "port": 16789}
    return CallbackPolicy.build(Settings(**{**base, **kw}), base["redis"])


def own_address() -> str:
    """One of this machine's non-loopback addresses (loopback when it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: it picks a route
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


# -- the rules --------------------------------------------------------------------------

@pytest.mark.parametrize(("host", "port", "why"), [
    ("169.254.169.254", 80, "link-local"),
    ("169.254.0.1", 8080, "link-local"),
    ("::ffff:169.254.169.254", 80, "link-local"),  # judged as the IPv4 address
    ("fe80::1%lo", 80, "link-local"),
    ("fd00:ec2::254", 80, "metadata"),
    ("100.100.100.200", 80, "metadata"),
    ("0.0.0.0", 8080, "unspecified"),
    ("0.1.2.3", 8080, "unspecified"),
    ("::", 8080, "unspecified"),
    ("127.0.0.1", REDIS_PORT, "Redis shard 127.0.0.1:16379"),
    ("127.0.0.2", REDIS_PORT, "Redis shard"),  # a Redis on 0.0.0.0 answers there too
    ("::1", REDIS_PORT, "Redis shard"),
    ("::ffff:127.0.0.1", REDIS_PORT, "Redis shard"),
    ("10.9.9.9", 3306, "registry database 10.9.9.9:3306"),
    ("127.0.0.1", 18088, "console"),
    ("127.0.0.1", 16789, "TCP server"),
])
def test_refused_by_default(host: str, port: int, why: str) -> None:
    assert why in policy().refusal(host, port)


@pytest.mark.parametrize(("host", "port"), [
    ("127.0.0.1", 8080), ("::1", 8080), ("10.0.0.5", 80), ("192.168.1.20", 443),
    ("172.16.0.1", REDIS_PORT), ("10.9.9.8", 3306), ("10.9.9.9", 3307),
    ("93.184.216.34", 80), ("2001:db8::1", 443), ("169.253.255.255", 80),
])
def test_allowed_by_default(host: str, port: int) -> None:
    """Private ranges and loopback stay open: in-house receivers live there. A remote
    service's port is refused only on its own address."""
    assert policy().refusal(host, port) == ""


def test_every_local_address_at_an_own_port_is_refused() -> None:
    mine = own_address()
    assert is_local(ipaddress.ip_address(mine))
    assert "Redis shard" in policy().refusal(mine, REDIS_PORT)
    assert policy().refusal(mine, REDIS_PORT + 1) == ""


def test_deny_and_allow_settings() -> None:
    p = policy(callback_deny=("127.0.0.0/8", "10.0.0.0/8", "fd00::/8"))
    assert "listed in callback_deny" in p.refusal("127.0.0.1", 8080)
    assert "10.0.0.0/8" in p.refusal("10.1.2.3", 80)
    assert "callback_deny" in p.refusal("fd12::1", 80)
    assert p.refusal("192.168.0.1", 80) == ""
    p = policy(callback_deny=("10.0.0.0/8",), callback_allow=("10.1.0.0/16", "169.254.169.254"))
    assert p.refusal("10.1.2.3", 80) == "" and p.refusal("10.2.0.1", 80) != ""
    assert p.refusal("169.254.169.254", 80) == ""  # an exception to a default range
    assert "link-local" in p.refusal("169.254.169.253", 80)
    # dq's own services are never an exception
    p = policy(callback_allow=("127.0.0.0/8", "::/0", "0.0.0.0/0"))
    assert "Redis shard" in p.refusal("127.0.0.1", REDIS_PORT)


def test_bad_settings_say_what_to_write(tmp_path: Path) -> None:
    for name in ("callback_deny", "callback_allow"):
        with pytest.raises(ConfigError, match=f"{name}: 'ten/8' is not an IP address or CIDR"):
            load_settings(env={f"DQ_{name.upper()}": "10.0.0.0/8,ten/8"})
    s = load_settings(env={"DQ_CALLBACK_DENY": "127.0.0.0/8, 10.0.0.0/8"})
    assert s.callback_deny == ("127.0.0.0/8", "10.0.0.0/8")
    conf = tmp_path / "dq.toml"
    conf.write_text('callback_allow = ["169.254.169.254/32"]\n')
    assert load_settings(config_file=str(conf), env={}).callback_allow == ("169.254.169.254/32",)


@pytest.mark.parametrize("host", ["2130706433", "0x7f.1", "017700000001", "127.1",
                                  "0x7f000001", "localhost", "[::ffff:127.0.0.1]"])
def test_odd_host_spellings_are_judged_by_what_they_resolve_to(host: str) -> None:
    why = judge_url(policy(), f"http://{host}:{REDIS_PORT}/")
    assert "dq will not call this callback" in why and "Redis shard" in why


@pytest.mark.parametrize("host", ["2130706433", "0x7f.1", "017700000001", "127.1"])
def test_a_numeric_spelling_of_an_allowed_address_is_refused_too(host: str) -> None:
    assert "numeric spelling of 127.0.0.1: write the address as 127.0.0.1" in judge_url(
        policy(), f"http://{host}:8080/")


def test_judge_url_lets_through_what_is_allowed_or_not_resolvable() -> None:
    p = policy()
    assert judge_url(p, "http://127.0.0.1:8080/hook") == ""
    assert judge_url(p, "http://localhost:8080/hook") == ""
    assert judge_url(p, "https://no-such-host.invalid/hook") == ""  # judged at each call
    assert "link-local" in judge_url(p, "http://[::ffff:169.254.169.254]/latest/meta-data/")
    assert "169.254.169.254 is link-local" in judge_url(p, "http://169.254.169.254/")


# -- enforced where the request is made ---------------------------------------------------

def claimed(job_id: str = "1") -> Claimed:
    return Claimed(shard=None, tid=f"t:{job_id}", topic="t", id=job_id,  # type: ignore[arg-type]
                   version="v", priority=2, attempt=0, due_ms=0, set_ms=0, body={"a": 1},
                   claimed_ms=0)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as r:
        yield r


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "0x7f.1",
                                  "127.0.0.2"])
async def test_a_refused_address_is_never_connected_to(receiver: Receiver, host: str) -> None:
    """The receiver's port is declared one of dq's own (a Redis shard there): by IP literal
    (the socket factory), by name (the resolver) and by odd spellings, the call is refused
    before connecting, as a permanent failure that says why. The same session still calls
    the receiver's other paths on an allowed address."""
    if host == "[::ffff:127.0.0.1]" and not socket.has_ipv6:
        pytest.skip("no IPv6")
    p = CallbackPolicy.build(Settings(web=False, port=0),
                             [f"redis://127.0.0.1:{receiver.port}/0"])
    t = Topic(topic="t", name="t", callback=f"http://{host}:{receiver.port}/x", method="POST")
    async with open_session(4, p) as session:
        out = await call(session, ExprCache(), t, claimed(), 2.0)
        assert not out.ok and out.permanent, out
        assert out.error.startswith("refused by the callback network policy") \
            and "dq's own Redis shard" in out.error, out.error
    assert receiver.requests == []
    other = CallbackPolicy.build(Settings(web=False, port=0), ["redis://127.0.0.1:1/0"])
    async with open_session(4, other) as session:
        t = Topic(topic="t", name="t", callback=receiver.url("/ok"), method="POST")
        assert (await call(session, ExprCache(), t, claimed(), 2.0)).ok


async def test_default_session_refuses_metadata_without_connecting() -> None:
    """open_session without a policy still refuses the default ranges (nothing listens at
    169.254.169.254 here: a connection attempt would time out, the refusal is at once)."""
    async with open_session(2) as session:
        for url in ("http://169.254.169.254/latest/meta-data/",
                    "http://[::ffff:169.254.169.254]/", "http://0.0.0.0:1/"):
            t = Topic(topic="t", name="t", callback=url, method="GET")
            out = await call(session, ExprCache(), t, claimed(), 5.0)
            assert out.permanent and "policy" in out.error and out.ms < 4000, (url, out)


# -- the attack end to end: a topic pointed at dq's own Redis --------------------------------

@contextlib.asynccontextmanager
async def workers(settings: Settings) -> AsyncIterator[None]:
    ctxs = [Context(settings, "timer"), Context(settings, "consumer")]
    tasks = [asyncio.create_task(timer.run(ctxs[0])), asyncio.create_task(consumer.run(ctxs[1]))]
    try:
        yield
    finally:
        for c in ctxs:
            c.stopping.set()
        await asyncio.gather(*tasks)


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'dq.sqlite3'}"


@pytest.fixture
def registry(db: str) -> Iterator[Registry]:
    reg = Registry(db)
    yield reg
    reg.close()


async def test_a_callback_to_dqs_own_redis_is_a_dead_letter_saying_why(
        redis_server: RedisProcess, registry: Registry, db: str, receiver: Receiver,
        tmp_path: Path) -> None:
    """The reported attack: a topic whose callback is dq's own Redis shard, with retry_when
    "true" and max_attempts 1 so the reply lands in the dead letter. Now no request goes
    out: the job is a dead letter at once (no attempt burnt), whose error says why and
    which holds no reply. A topic on an allowed address is delivered meanwhile."""
    port = redis_server.url.rsplit(":", 1)[1].split("/")[0]
    settings = Settings(redis=(redis_server.url,), db=db, buckets=2, timers=1,
                        lease=5.0, timer_tick=0.2, registry_refresh=0.2, max_attempts=3,
                        data_dir=str(tmp_path), web=False, port=0)
    for key, url in (("evil", f"http://127.0.0.1:{port}/"), ("good", receiver.url("/good")),
                     ("meta", "http://169.254.169.254/latest/meta-data/")):
        registry.save_topic(Topic(topic=key, name=key, callback=url, method="POST",
                                  retry_when="true", max_attempts=1))
    store = open_store(settings)
    try:
        for key in ("evil", "good", "meta"):
            await store.add(key, "1", {"cmd": "FLUSHALL"}, delay_ms=0)
        async with workers(settings):
            await receiver.wait_calls(1, path="/good")
            async with asyncio.timeout(10):
                while len(dead := await store.dead_letters()) < 3:
                    await asyncio.sleep(0.05)
        by_topic = {d.topic: d for d in dead}
        evil = by_topic["evil"].error or {}
        assert "refused by the callback network policy" in evil["error"]
        assert f"127.0.0.1 port {port} is dq's own Redis shard" in evil["error"]
        assert evil["reply"] == "" and evil["status"] == 0 and evil["attempts"] == 0
        meta = by_topic["meta"].error or {}
        assert "169.254.169.254 is link-local" in meta["error"] and meta["reply"] == ""
        # "good" failed by retry_when "true" after a real call: its reply is kept
        assert by_topic["good"].error is not None and by_topic["good"].error["attempts"] == 1
        stats = await store.stats.topic_stats("evil")
        assert stats.get("dead") == 1 and not stats.get("notifies")
    finally:
        await store.shards.close()


# -- refused at registration -----------------------------------------------------------------

@pytest.fixture(name="web")
async def web_fixture(redis_server: RedisProcess, db: str) -> AsyncIterator[Web]:
    async with open_web(redis_server.url, db) as w:
        yield w


def refused_callbacks(web: Web) -> list[str]:
    port = web.settings.redis[0].rsplit(":", 1)[1].split("/")[0]
    return [f"http://127.0.0.1:{port}/", f"http://localhost:{port}/", f"http://2130706433:{port}/",
            "http://169.254.169.254/latest/meta-data/", "http://[::ffff:169.254.169.254]/",
            "http://0.0.0.0:8080/", f"http://127.0.0.1:{web.settings.web_port}/api/topics"]


async def test_api_refuses_a_callback_that_resolves_to_a_refused_address(web: Web) -> None:
    for url in refused_callbacks(web):
        r = await web.api.post("/api/topics", json={"topic": "t", "callback": url})
        assert r.status_code == 422, (url, r.text)
        assert "dq will not call this callback" in r.json()["errors"]["callback"], r.text
    assert web.registry.topics() == {}
    ok = f"http://127.0.0.1:{free_port()}/hook"
    r = await web.api.post("/api/topics", json={"topic": "t", "callback": ok})
    assert r.status_code == 201, r.text
    r = await web.api.put("/api/topics/t", json={"callback": refused_callbacks(web)[0]})
    assert r.status_code == 422 and "Redis shard" in r.json()["errors"]["callback"]
    assert (web.registry.get_topic("t") or Topic()).callback == ok
    r = await web.api.put("/api/topics/t", json={"callback": "http://2130706433:8080/"})
    assert r.status_code == 422 and "write the address as 127.0.0.1" in r.text


async def test_console_form_refuses_a_callback_that_resolves_to_a_refused_address(
        web: Web) -> None:
    token = await login(web.anon)
    form = {"topic": "t", "name": "t", "delay": "0", "method": "POST", "timeout_ms": "3000",
            "body_format": "form", "priority": "2", "max_attempts": "0", "status": "online",
            "retry_when": "", "emails": "", "secret": "", "creator": "", "csrf": token,
            "callback": "http://169.254.169.254/latest/meta-data/iam/"}
    r = await web.anon.post("/topics/new", data=form)
    assert r.status_code == 422 and "dq will not call this callback" in r.text
    assert "169.254.169.254 is link-local" in r.text and web.registry.topics() == {}


def test_aiohttp_has_the_socket_factory() -> None:
    """The policy's last gate (every connection attempt) needs aiohttp >= 3.12."""
    major, minor = (int(x) for x in aiohttp.__version__.split(".")[:2])
    assert (major, minor) >= (3, 12)
