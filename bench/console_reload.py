"""How long the console is away during a reload (README: Signals).

Starts a dq-master (one redis-server, SQLite, the console on a free port), then reloads it
with USR2 several times; for each reload, polls GET /healthz every 20 ms and reports the
longest stretch without an answer and the polls that got none. Usage (from the repository):
python -m bench.console_reload [--reloads 5]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import time
import urllib.request
from pathlib import Path

from bench.common import dq_master, free_port, percentile, redis_servers, tempdir


def up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def generations(log: Path) -> int:
    return len(re.findall(r"generation \d+ is up", log.read_text(errors="replace")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reloads", type=int, default=5)
    args = parser.parse_args()
    gaps: list[float] = []
    with tempdir() as t, redis_servers(1, Path(t)) as procs:
        tmp = Path(t)
        web_port = free_port()
        health = f"http://127.0.0.1:{web_port}/healthz"
        flags = ["--redis", procs[0][0], "--db", f"sqlite:///{tmp / 'reg.sqlite3'}",
                 "--web-port", str(web_port), "--timers", "1", "--consumers", "1"]
        with dq_master(flags, free_port(), tmp) as master:
            log = tmp / "master.log"
            deadline = time.monotonic() + 60
            while generations(log) < 1 or not up(health):
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            for i in range(args.reloads):
                seen = generations(log)
                os.kill(master.pid, signal.SIGUSR2)
                longest, down_since, failed = 0.0, None, 0
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    now = time.monotonic()
                    if up(health):
                        if down_since is not None:
                            longest = max(longest, now - down_since)
                            down_since = None
                        if generations(log) > seen:
                            break
                    else:
                        failed += 1
                        if down_since is None:
                            down_since = now
                    time.sleep(0.02)
                gaps.append(longest)
                print(f"reload {i + 1}: console away {longest:.2f} s ({failed} polls "
                      "unanswered)")
                time.sleep(1.0)
    print(f"console away per reload: min {min(gaps):.2f} s, median "
          f"{percentile(gaps, 50):.2f} s, max {max(gaps):.2f} s ({len(gaps)} reloads)")


if __name__ == "__main__":
    main()
