"""Shard URLs: which kind of Redis a shard is, and how to reach it.

A shard is a plain Redis (`redis://`, `rediss://` with TLS, `unix://`), a master found
through Redis Sentinel (`redis+sentinel://`, `rediss+sentinel://`), or a whole Redis Cluster
(`redis+cluster://`, parsed by dq/sharding/clusterurl.py, cut into partitions by
dq/sharding/shards.py).
Every place a shard URL is read (--redis, DQ_REDIS, dq.toml, dq_redis rows) checks it
here, so a wrong one is refused at start with what to write instead.

A Sentinel shard's identity (its name for rendezvous hashing, the health record, logs) is
its URL: the sentinels and the service name, never the address of the current master, so
a failover changes nothing in how jobs are routed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote

PLAIN, SENTINEL, CLUSTER = "plain", "sentinel", "cluster"
KINDS = {"redis": PLAIN, "rediss": PLAIN, "unix": PLAIN,
         "redis+sentinel": SENTINEL, "rediss+sentinel": SENTINEL,
         "redis+cluster": CLUSTER, "rediss+cluster": CLUSTER}
SENTINEL_PORT = 26379
FORMS = ("redis://[:password@]host:port/db, rediss:// (TLS), unix:///path/to/redis.sock, "
         "or redis+sentinel://[:password@]host:port[,host:port...]/service_name[/db] "
         "(rediss+sentinel:// with TLS), or redis+cluster://[:password@]host:port[,host:port"
         "...] (rediss+cluster:// with TLS)")


@dataclass(frozen=True)
class ShardUrl:
    """A parsed shard URL. For a plain one only `kind`, `scheme` and `url` matter (the
    connection reads the URL itself, as before)."""

    url: str
    scheme: str
    kind: str
    tls: bool = False
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None  # the master's (and its replicas')
    sentinel_password: str | None = None  # ?sentinel_password=: when the sentinels want one


def scheme_of(url: str) -> str:
    return url.split("://", 1)[0].strip().lower() if "://" in url else ""


def kind_of(url: str) -> str:
    """PLAIN, SENTINEL, CLUSTER, or '' for a URL dq does not take."""
    return KINDS.get(scheme_of(url), "")


def split_shard_urls(text: str) -> tuple[str, ...]:
    """Shard URLs from one comma-separated text (DQ_REDIS): a part that does not start
    with a scheme is the next sentinel (or cluster node) of the URL before it
    ("redis+sentinel://a:26379,b:26379/mymaster,redis://c:6379/0" is two shards)."""
    out: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if out and "://" not in part and (
                kind_of(out[-1]) == CLUSTER or (kind_of(out[-1]) == SENTINEL
                and "/" not in out[-1].split("://", 1)[1])):
            out[-1] += "," + part
        else:
            out.append(part)
    return tuple(out)


def _host_port(text: str, url: str) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):  # [::1]:26379
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise ValueError(f"sentinel address {text!r} in {url!r} has no host; write "
                         "host:port, e.g. 10.0.0.5:26379")
    if port_text and not (port_text.isdigit() and 0 < int(port_text) < 65536):
        raise ValueError(f"sentinel address {text!r} in {url!r} has a bad port; write "
                         "host:port, e.g. 10.0.0.5:26379")
    return host, int(port_text) if port_text else SENTINEL_PORT


def parse(url: str) -> ShardUrl:
    """The parsed shard URL; ValueError saying what is wrong and what to write."""
    text = url.strip()
    scheme = scheme_of(text)
    kind = KINDS.get(scheme)
    if kind is None:
        raise ValueError(f"redis shard {_masked(text)!r} is not a shard URL dq takes; write "
                         f"{FORMS}")
    if kind == PLAIN:
        return ShardUrl(text, scheme, kind, tls=scheme == "rediss")
    if kind == CLUSTER:
        from dq.sharding import clusterurl
        cu = clusterurl.parse_url(text)
        return ShardUrl(text, scheme, kind, tls=cu.tls)
    rest = text.split("://", 1)[1]
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    creds, _, hosts = netloc.rpartition("@")
    username = password = None
    if creds:
        user, sep, pw = creds.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if sep else None
    if not hosts.strip():
        raise ValueError(f"redis shard {_masked(text)!r} names no sentinel; write "
                         f"{scheme}://host:port[,host:port...]/service_name")
    sentinels = tuple(_host_port(h, _masked(text)) for h in hosts.split(",") if h.strip())
    parts = [unquote(p) for p in path.split("/") if p]
    if not parts:
        raise ValueError(f"redis shard {_masked(text)!r} names no service: write "
                         f"{scheme}://host:port[,host:port...]/service_name[/db] with the "
                         "name the sentinels monitor (sentinel monitor <name> ...)")
    if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise ValueError(f"redis shard {_masked(text)!r}: after the service name only a "
                         "database number may follow, e.g. /mymaster/0")
    sentinel_password = None
    for key, values in parse_qs(query, keep_blank_values=True).items():
        if key != "sentinel_password":
            raise ValueError(f"redis shard {_masked(text)!r}: unknown option {key!r}; the "
                             "only one is sentinel_password")
        sentinel_password = values[-1]
    return ShardUrl(text, scheme, kind, tls=scheme.startswith("rediss"), sentinels=sentinels,
                    service=parts[0], db=int(parts[1]) if len(parts) == 2 else 0,
                    username=username, password=password,
                    sentinel_password=sentinel_password)


def mask(text: str) -> str:
    """A shard URL with its passwords masked (the one before @, and sentinel_password)."""
    text = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", text)
    return re.sub(r"(sentinel_password=)[^&]*", r"\1***", text)


_masked = mask
