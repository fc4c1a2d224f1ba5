"""Single Redis vs Sentinel vs Redis Cluster, each with replica_acks 0 and 1, in one run.

Starts each store once and keeps it up for the whole run, all with AOF (fsync every
second): plain (one redis-server), replica (a master and 1 replica, dq given the master's
redis:// URL), sentinel (a master, 1 replica and 3 sentinels, a redis+sentinel:// URL)
and cluster (3 masters + 3 replicas, a redis+cluster:// URL), as bench/common.py's
`stores` makes them. Then, round after round, every
measurement runs on every configuration (setup x replica_acks), the configurations in a
rotated order each round so that the machine's drift hits them alike; every store is
flushed before each measurement. The measurements are bench/add.py and bench/delivery.py
run as subprocesses on the store's URL (`--redis`), each with its own dq:

    add50   python bench/add.py --client dqload --conns 50 --n ADD_N --redis URL --replica-acks A
    pipe    python bench/add.py --client pipelined --n PIPE_N --redis URL --replica-acks A
    burst   python bench/delivery.py --n BURST_N --redis URL --replica-acks A

    python bench/ha.py                # 2 rounds, plain, sentinel and cluster: about 8 minutes
    python bench/ha.py --setups plain,replica,sentinel,cluster     # about 10 minutes
    python bench/ha.py --rounds 1 --add-n 20 --pipe-n 500 --burst-n 300   # a quick check

A measurement that takes longer than --limit seconds is stopped and counted as missing.
plain with replica_acks 1 has no replica: every add is refused (`unavailable`), so its
add rates are 0 and its burst is not run. Prints a table of min-max over the rounds and,
as its last line, `RESULT add50_plain_ra0=... pipe_sentinel_ra1=... burst_cluster_ra0=...`
(medians over the rounds: adds/s for add50 and pipe, seconds from the due instant to the
last callback for burst).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, tempdir

MEASURES = ("add50", "pipe", "burst")
SETUP_NAMES = ("plain", "replica", "sentinel", "cluster")
Config = tuple[str, int]  # (setup, replica_acks)


class Store:
    """One store kept up for the whole run: its dq URL, and how to empty it."""

    def __init__(self, name: str, url: str, flush_ports: list[int]) -> None:
        self.name, self.url, self.flush_ports = name, url, flush_ports

    def flush(self) -> None:
        import redis

        for port in self.flush_ports:
            r = redis.Redis(port=port, socket_timeout=30)
            try:
                r.flushall()
            except redis.ResponseError:
                pass  # a replica (READONLY): its master's FLUSHALL reaches it
            finally:
                r.close()


@contextmanager
def start_store(name: str, tmp: Path) -> Iterator[Store]:
    tmp.mkdir()
    if name == "cluster":
        from tests.support.rediscluster import RedisCluster

        c = RedisCluster(tmp)
        try:
            c.start()
            yield Store(name, c.url, [n.port for n in c.nodes])
        finally:
            c.stop()
    elif name in ("replica", "sentinel"):
        from tests.support.sentinels import SentinelSetup

        s = SentinelSetup(tmp, replicas=1)
        try:
            s.start()
            master = s.master_port()
            url = s.url if name == "sentinel" else f"redis://127.0.0.1:{master}/0"
            yield Store(name, url, [master])
        finally:
            s.stop()
    else:
        from bench.common import redis_servers

        with redis_servers(1, tmp, appendonly=True) as procs:
            url = procs[0][0]
            yield Store(name, url, [int(url.rsplit(":", 1)[1].split("/")[0])])


def command(measure: str, store: Store, acks: int, args: argparse.Namespace) -> list[str]:
    common = ["--redis", store.url, "--replica-acks", str(acks)]
    if measure == "add50":
        return [sys.executable, "bench/add.py", "--client", "dqload", "--conns", "50",
                "--n", str(args.add_n), *common]
    if measure == "pipe":
        return [sys.executable, "bench/add.py", "--client", "pipelined", "--n",
                str(args.pipe_n), *common]
    return [sys.executable, "bench/delivery.py", "--n", str(args.burst_n), "--timeout",
            str(max(1.0, args.limit - 30)), *common]


def run_one(cmd: list[str], limit: float, log: Path) -> dict[str, str] | None:
    """Run a measurement in its own process group, stopped after `limit` seconds; the
    key=value pairs of its RESULT line, or None."""
    with open(log, "ab") as out:
        out.write(("\n$ " + " ".join(cmd) + "\n").encode())
        out.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=out, start_new_session=True)
        try:
            stdout, _ = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, _ = proc.communicate()
            out.write(stdout + f"\n[stopped after {limit:.0f}s]\n".encode())
            return None
        out.write(stdout)
    lines = [ln for ln in stdout.decode().splitlines() if ln.startswith("RESULT ")]
    if not lines:
        return None
    return dict(kv.split("=", 1) for kv in lines[-1].split()[1:] if "=" in kv)


def figure(measure: str, res: dict[str, str] | None) -> tuple[float, str] | None:
    """(the figure, a note) of one measurement: adds/s and p99 ms, or burst seconds."""
    if res is None:
        return None
    if measure == "burst":
        if int(res.get("delivered", "0")) == 0:
            return None
        return float(res["seconds"]), f"{res['per_s']}/s"
    return float(res["qps"]), f"p50 {float(res['p50_ms']):.1f} p99 {float(res['p99_ms']):.1f}" \
        + (f" fail {res['fail']}" if res.get("fail", "0") != "0" else "")


def configs(setups: list[str]) -> list[Config]:
    return [(s, a) for s in setups for a in (0, 1)]


def skipped(measure: str, cfg: Config) -> bool:
    return measure == "burst" and cfg == ("plain", 1)  # every add refused: nothing to deliver


def run_rounds(stores: dict[str, Store], args: argparse.Namespace, log: Path,
               ) -> dict[tuple[str, Config], list[tuple[float, str]]]:
    found: dict[tuple[str, Config], list[tuple[float, str]]] = {}
    cfgs = configs(list(stores))
    for rnd in range(args.rounds):
        order = cfgs[rnd % len(cfgs):] + cfgs[:rnd % len(cfgs)]
        for measure in MEASURES:
            for cfg in order:
                if skipped(measure, cfg):
                    continue
                stores[cfg[0]].flush()
                t0 = time.monotonic()
                got = figure(measure, run_one(command(measure, stores[cfg[0]], cfg[1], args),
                                              args.limit, log))
                print(f"round {rnd + 1} {measure:5} {cfg[0]:8} ra{cfg[1]}: "
                      f"{'-' if got is None else f'{got[0]:.2f} ({got[1]})'} "
                      f"[{time.monotonic() - t0:.0f}s, load {os.getloadavg()[0]:.1f}]",
                      flush=True)
                if got is not None:
                    found.setdefault((measure, cfg), []).append(got)
    return found


def span(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return format(lo, fmt) if lo == hi else f"{format(lo, fmt)}-{format(hi, fmt)}"


def report(found: dict[tuple[str, Config], list[tuple[float, str]]], setups: list[str],
           ) -> None:
    cfgs = configs(setups)
    print("\n| min-max over rounds | " + " | ".join(f"{s}, acks {a}" for s, a in cfgs) + " |")
    print("|---" * (len(cfgs) + 1) + "|")
    names = {"add50": "adds/s, 50 connections", "pipe": "pipelined adds/s",
             "burst": "burst: due to last callback, s"}
    for measure in MEASURES:
        fmt = ".1f" if measure == "burst" else ",.0f"
        cells = [span([v for v, _ in found.get((measure, c), [])], fmt) for c in cfgs]
        print(f"| {names[measure]} | " + " | ".join(cells) + " |")
    p99 = [span([float(re.findall(r"p99 ([\d.]+)", n)[0]) for _, n in
                 found.get(("add50", c), [])], ".1f") for c in cfgs]
    print("| p99 ms, 50 connections | " + " | ".join(p99) + " |")
    medians = {f"{m}_{s}_ra{a}": statistics.median(v for v, _ in vals)
               for (m, (s, a)), vals in found.items()}
    ratios = {}
    for m in MEASURES:
        for s in setups:
            for a in (0, 1):
                base, other = medians.get(f"{m}_plain_ra{a}"), medians.get(f"{m}_{s}_ra{a}")
                if s != "plain" and base and other is not None:
                    ratios[f"{m}_{s}_vs_plain_ra{a}"] = other / base
            r0, r1 = medians.get(f"{m}_{s}_ra0"), medians.get(f"{m}_{s}_ra1")
            if r0 and r1 is not None:
                ratios[f"{m}_{s}_ra1_vs_ra0"] = r1 / r0
    print("ratios of medians: " + " ".join(f"{k}={v:.2f}" for k, v in ratios.items()))
    print("RESULT " + " ".join(f"{k}={v:.3f}" if k.startswith("burst") else f"{k}={v:.0f}"
                               for k, v in medians.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--setups", default="plain,sentinel,cluster",
                    help=f"comma-separated, of {','.join(SETUP_NAMES)}")
    ap.add_argument("--add-n", type=int, default=300, help="add50: adds per connection")
    ap.add_argument("--pipe-n", type=int, default=30000, help="pipe: adds in one add_many")
    ap.add_argument("--burst-n", type=int, default=20000, help="burst: jobs due at once")
    ap.add_argument("--limit", type=float, default=90.0,
                    help="seconds a measurement may take before it is stopped")
    ap.add_argument("--log", default="", help="where the measurements' output goes "
                    "(default: a file in the run's temp dir, kept only when named)")
    args = ap.parse_args()
    setups = [s for s in args.setups.split(",") if s]
    if bad := [s for s in setups if s not in SETUP_NAMES]:
        sys.exit(f"unknown setup(s): {bad}")
    print(f"rounds={args.rounds} setups={','.join(setups)} add_n={args.add_n}x50 "
          f"pipe_n={args.pipe_n} burst_n={args.burst_n} cpus={os.cpu_count()} "
          f"load={' '.join(f'{x:.1f}' for x in os.getloadavg())} "
          f"start={time.strftime('%H:%M:%S', time.gmtime())} UTC", flush=True)
    with tempdir() as t, ExitStack() as stack:
        log = Path(args.log) if args.log else Path(t) / "ha.log"
        stores = {s: stack.enter_context(start_store(s, Path(t) / s)) for s in setups}
        found = run_rounds(stores, args, log)
    print(f"end={time.strftime('%H:%M:%S', time.gmtime())} UTC "
          f"load={' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    report(found, setups)


if __name__ == "__main__":
    main()
