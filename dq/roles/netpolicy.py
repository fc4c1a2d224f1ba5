"""Where a callback may connect: the callback network policy.

Whoever may register a topic chooses its callback URL, and a callback's reply can be read
back (a dead letter keeps an excerpt): without a policy, a topic could make dq fetch what
only dq's machine can reach, such as a cloud metadata service or dq's own Redis. The policy
judges the address a connection is actually made to, after DNS (dq/roles/callback.py gives
aiohttp a resolver that drops refused addresses, and `refuse_socket` as its socket factory,
which every connection attempt passes through), so a name that resolves elsewhere later
(DNS rebinding), an IP literal and odd host spellings (2130706433, 0x7f.1,
[::ffff:169.254.169.254]) are all judged by where they lead. An IPv4-mapped IPv6 address
is judged as its IPv4 address.

- Refused by default (`DEFAULT_DENY`): link-local addresses (169.254.0.0/16, where cloud
  metadata services answer, and fe80::/10), the metadata addresses fd00:ec2::254 (AWS,
  IPv6) and 100.100.100.200 (Alibaba Cloud), and unspecified addresses (0.0.0.0/8, ::),
  which reach this machine.
- Always refused: dq's own services, the host:port of every Redis shard, of the registry
  database and of the console (`web_port`) and the TCP server (`port`). When such a service
  is on this machine (or bound to every address), every local address at its port is
  refused: 127.0.0.2:6379 reaches a Redis on 0.0.0.0:6379 too.
- `callback_deny` (addresses or CIDR ranges) refuses more, e.g. 127.0.0.0/8 or 10.0.0.0/8;
  `callback_allow` makes exceptions to the default and `callback_deny` ranges (never to
  dq's own services). Private ranges and loopback stay allowed by default: in-house
  receivers live there.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from dq.config import Settings
from dq.sharding import clusterurl, shardurl

log = logging.getLogger("dq.netpolicy")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_DENY: tuple[tuple[str, str], ...] = (
    ("169.254.0.0/16", "link-local (cloud metadata services answer at 169.254.169.254)"),
    ("fe80::/10", "link-local"),
    ("fd00:ec2::254/128", "a cloud metadata address (AWS's, over IPv6)"),
    ("100.100.100.200/32", "a cloud metadata address (Alibaba Cloud's)"),
    ("0.0.0.0/8", "unspecified (it reaches this machine)"),
    ("::/128", "unspecified (it reaches this machine)"),
)
# The default port of a registry URL's dialect (SQLAlchemy's names); sqlite has none.
DB_PORTS = {"mysql": 3306, "mariadb": 3306, "postgresql": 5432, "postgres": 5432,
            "mssql": 1433, "oracle": 1521}
REDIS_PORT = 6379


class CallbackRefused(OSError):
    """A connection the callback network policy does not allow; its text says why."""


def parse_address(text: str) -> Address:
    """An address from its text (an IPv6 zone such as %eth0 dropped); an IPv4-mapped IPv6
    address is its IPv4 address. ValueError when it is not an address."""
    addr = ipaddress.ip_address(text.strip("[]").partition("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def parse_networks(items: Iterable[str], setting: str) -> tuple[Network, ...]:
    """CIDR ranges (or single addresses) from a setting; ValueError saying which is bad."""
    out = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{setting}: {item!r} is not an IP address or CIDR range, e.g. "
                             "10.0.0.0/8, 127.0.0.1 or fd00::/8") from None
    return tuple(out)


@functools.lru_cache(maxsize=4096)
def is_local(addr: Address) -> bool:
    """Whether `addr` is one of this machine's addresses (loopback, unspecified, or one an
    interface holds: binding to it succeeds)."""
    if addr.is_loopback or addr.is_unspecified:
        return True
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((str(addr), 0))
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class Own:
    """One of dq's own services: callbacks may not connect to it."""

    what: str  # e.g. "Redis shard 10.0.0.5:6379" (never a password)
    address: Address
    port: int
    local: bool  # on this machine: every local address at `port` reaches it

    def matches(self, addr: Address, port: int) -> bool:
        if port != self.port:
            return False
        return addr == self.address or (self.local and is_local(addr))


@dataclass(frozen=True)
class CallbackPolicy:
    """Which addresses callbacks may connect to (see the module's docstring)."""

    deny: tuple[tuple[Network, str], ...]
    allow: tuple[Network, ...] = ()
    own: tuple[Own, ...] = ()

    @classmethod
    def default(cls) -> CallbackPolicy:
        """The default ranges only: no setting, no own service known."""
        return cls(tuple((ipaddress.ip_network(n), why) for n, why in DEFAULT_DENY))

    @classmethod
    def build(cls, settings: Settings, shard_urls: Sequence[str] = ()) -> CallbackPolicy:
        """The policy of these settings, with dq's own services: `shard_urls` (the shards
        in use, the registry's included), the registry database, the console and the TCP
        port. Resolves host names, so call it off the event loop."""
        deny = cls.default().deny + tuple(
            (n, f"in {n}, listed in callback_deny")
            for n in parse_networks(settings.callback_deny, "callback_deny"))
        allow = parse_networks(settings.callback_allow, "callback_allow")
        return cls(deny, allow, tuple(own_services(settings, shard_urls)))

    def refusal(self, host: str, port: int) -> str:
        """'' when a connection to address `host` (an IP address's text), port `port`, is
        allowed; else why not."""
        try:
            addr = parse_address(host)
        except ValueError:
            return f"{host!r} is not an IP address"
        for own in self.own:
            if own.matches(addr, port):
                return f"{addr} port {port} is dq's own {own.what}"
        if any(addr in net for net in self.allow):
            return ""
        for net, why in self.deny:
            if addr in net:
                return f"{addr} is {why}"
        return ""

    def refuse_socket(self, addr_info: tuple[Any, ...]) -> socket.socket:
        """aiohttp's socket factory: the socket to connect to `addr_info`'s address, or
        CallbackRefused. Every connection attempt passes here, IP literals included."""
        family, type_, proto, _, sockaddr = addr_info
        why = self.refusal(sockaddr[0], sockaddr[1])
        if why:
            raise CallbackRefused(why)
        return socket.socket(family=family, type=type_, proto=proto)


def _endpoints(host: str, port: int) -> list[Address]:
    """The addresses `host` resolves to ([] when it does not)."""
    try:
        return [parse_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        log.warning("callback policy: cannot resolve %s (%s); callbacks to it are judged by "
                    "the other rules only", host, exc)
        return []
    return list(dict.fromkeys(parse_address(str(i[4][0])) for i in infos))


def _own(what: str, host: str, port: int) -> list[Own]:
    if not port:
        return []
    return [Own(f"{what} {host}:{port}", a, port, is_local(a)) for a in _endpoints(host, port)]


_DB_URL = re.compile(r"(?P<dialect>[\w]+)(?:\+\w+)?://(?:[^@/?]*@)?"
                     r"(?:\[(?P<v6>[^\]/?]+)\]|(?P<host>[^/:?]+))?(?::(?P<port>\d+))?")


def own_services(settings: Settings, shard_urls: Sequence[str]) -> list[Own]:
    """dq's own services, as addresses and ports."""
    out: list[Own] = []
    for url in shard_urls:
        if "://" not in url:  # the original's host:port[:password] rows
            name, number = [*url.split(":"), str(REDIS_PORT)][:2]
            url = f"redis://{name}:{number}"
        if clusterurl.is_cluster_url(url):  # its seed nodes (the rest are found later)
            try:
                seeds = clusterurl.parse_url(url).seeds
            except ValueError:
                continue
            for host, port in seeds:
                out += _own("Redis Cluster node", host, port)
            continue
        if shardurl.kind_of(url) == shardurl.SENTINEL:  # its sentinels (masters: found later)
            try:
                sentinels = shardurl.parse(url).sentinels
            except ValueError:
                continue
            for host, port in sentinels:
                out += _own("Redis sentinel", host, port)
            continue
        parts = urlsplit(url)
        if parts.scheme in ("redis", "rediss") and parts.hostname:
            try:
                port = parts.port or REDIS_PORT
            except ValueError:
                continue
            out += _own("Redis shard", parts.hostname, port)
    m = _DB_URL.match(settings.db)
    if m and (host := m.group("v6") or m.group("host")):
        port = int(m.group("port") or DB_PORTS.get(m.group("dialect"), 0))
        out += _own("registry database", host, port)
    if settings.web:
        out += _own("console", settings.web_host or "0.0.0.0", settings.web_port)
    out += _own("TCP server", settings.host or "0.0.0.0", settings.port)
    return out


def judge_url(policy: CallbackPolicy, url: str) -> str:
    """Why `url` would be refused now, or '' (also when its host does not resolve yet: it
    is judged again at each call). Resolves the host, so call it off the event loop."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return ""
    if not host:
        return ""
    port = port or (443 if parts.scheme == "https" else 80)
    literal = True
    try:
        parse_address(host)
    except ValueError:
        literal = False
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return ""
    addrs = list(dict.fromkeys(str(i[4][0]) for i in infos))
    refusals = [policy.refusal(a, port) for a in addrs]
    if all(refusals):
        lead = "" if literal else f"its host {host} resolves to {', '.join(addrs)}: "
        return (f"dq will not call this callback: {lead}{'; '.join(dict.fromkeys(refusals))}. "
                "Use another address (callback_allow lists exceptions to the refused ranges)")
    if not literal and _numeric(host):
        return (f"callback host {host!r} is a numeric spelling of {addrs[0]}: write the "
                f"address as {addrs[0]}")
    return ""


def _numeric(host: str) -> bool:
    """A host name that the C library reads as an IPv4 address in an old form (2130706433,
    0x7f.1, 017700000001, 127.1): not a name, and HTTP clients differ on it."""
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True
