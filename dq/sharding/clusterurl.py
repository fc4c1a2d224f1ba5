"""Redis Cluster shard URLs and partition hash tags, without importing redis (the master
and the settings read these; dq/sharding/cluster.py does the talking).

`redis+cluster://[:password@]host:port[,host:port...]` names a whole cluster (the nodes
are seeds: any one that answers gives the slot map). dq cuts the cluster into a fixed
number of partitions (the `cluster_partitions` setting), each a shard whose keys all carry
one hash tag, so all of a partition's keys are in one slot.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

SCHEMES = ("redis+cluster", "rediss+cluster")
SLOTS = 16384
DEFAULT_PORT = 6379
MAX_PARTITIONS = 256
FORM = "redis+cluster://[:password@]host:port[,host:port...] (rediss+cluster:// with TLS)"

Addr = tuple[str, int]


@dataclass(frozen=True)
class ClusterUrl:
    """A parsed cluster URL: its seed nodes and credentials."""

    url: str
    tls: bool
    seeds: tuple[Addr, ...]
    userinfo: str  # "user:password@" or ":password@" as written, or ""


def _mask(text: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", text)


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_CRC16 = _crc16_table()


def key_slot(key: bytes) -> int:
    """The cluster slot of a key: CRC16 (XMODEM) of its hash tag (the text between the
    first { and the next }, when not empty), else of the whole key, mod 16384."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1:end]
    crc = 0
    for byte in key:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[((crc >> 8) ^ byte) & 0xFF]
    return crc % SLOTS


def is_cluster_url(url: str) -> bool:
    return "://" in url and url.split("://", 1)[0].strip().lower() in SCHEMES


def parse_url(url: str) -> ClusterUrl:
    """The parsed cluster URL; ValueError saying what is wrong and what to write."""
    text = url.strip()
    scheme, _, rest = text.partition("://")
    if scheme.lower() not in SCHEMES:
        raise ValueError(f"{_mask(text)!r} is not a cluster URL; write {FORM}")
    rest = rest.split("?", 1)[0]
    netloc, _, path = rest.partition("/")
    if path.strip("/") not in ("", "0"):
        raise ValueError(f"redis shard {_mask(text)!r}: a Redis Cluster has only database "
                         f"0; drop {'/' + path!r} and write {FORM}")
    creds, at, hosts = netloc.rpartition("@")
    seeds: list[Addr] = []
    for part in hosts.split(","):
        part = part.strip()
        if not part:
            continue
        if part.startswith("["):
            host, _, tail = part[1:].partition("]")
            port_text = tail[1:]
        else:
            host, _, port_text = part.partition(":")
        if not host or (port_text and not (port_text.isdigit()
                                           and 0 < int(port_text) < 65536)):
            raise ValueError(f"redis shard {_mask(text)!r}: node {part!r} is not host:port;"
                             f" write {FORM}")
        seeds.append((host, int(port_text) if port_text else DEFAULT_PORT))
    if not seeds:
        raise ValueError(f"redis shard {_mask(text)!r} names no cluster node; write {FORM}")
    return ClusterUrl(text, scheme.lower().startswith("rediss"), tuple(seeds),
                      creds + at if at else "")


def join_parts(items: list[str]) -> tuple[str, ...]:
    """Shard URLs from DQ_REDIS's comma-separated parts: a part without a scheme is the
    next node of the cluster URL before it ("redis+cluster://a:7000,b:7001,redis://c" is
    two shards)."""
    out: list[str] = []
    for part in items:
        part = part.strip()
        if not part:
            continue
        if out and "://" not in part and is_cluster_url(out[-1]):
            out[-1] += "," + part
        else:
            out.append(part)
    return tuple(out)


@functools.cache
def partition_tags(n: int) -> tuple[str, ...]:
    """The hash tags of `n` partitions: partition i's tag hashes to a slot in the i-th of
    n equal slot ranges (`{dq:i}` when it does, else `{dq:i.k}` with the least k that does),
    so partitions spread over the masters as evenly as the slots do. Fixed for a given n."""
    tags = []
    for i in range(n):
        lo, hi = i * SLOTS // n, (i + 1) * SLOTS // n
        k = 0
        while True:
            inner = f"dq:{i}" if k == 0 else f"dq:{i}.{k}"
            if lo <= key_slot(inner.encode()) < hi:
                break
            k += 1
        tags.append("{" + inner + "}")
    return tuple(tags)
