"""The system tests' lanes: each lane is one xdist group, run in turn on one worker
(tests/conftest.py). A lane runs its tests one after another, so the suite lasts as long
as its longest lane: the tests are dealt longest first, each to the lane with the least
time so far (from tests/durations.json, each laned test's seconds in a recorded run; a
test not there counts as the median).

Refresh the record after adding or changing system tests (any machine: only the
proportions matter):

    python3 -m pytest -q -n auto --junitxml=/tmp/junit.xml
    python3 -m tests.support.lanes /tmp/junit.xml [more runs' reports: averaged]
"""

from __future__ import annotations

import heapq
import json
import statistics
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

RECORD = Path(__file__).resolve().parent.parent / "durations.json"


def load(path: Path = RECORD) -> dict[str, float]:
    """The recorded seconds of each laned test, by node id ({} without a record)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    return {str(k): float(v) for k, v in data.items()}


def deal(nodeids: Sequence[str], lanes: int, seconds: dict[str, float]) -> dict[str, int]:
    """Each node id's lane: longest first, each to the lane with the least time so far
    (ties: the lower lane). Without a record, the order given, in turn."""
    if not seconds:
        return {nid: k % lanes for k, nid in enumerate(nodeids)}
    usual = statistics.median(seconds.values())
    order = sorted(nodeids, key=lambda nid: -seconds.get(nid, usual))
    heap = [(0.0, lane) for lane in range(lanes)]
    out: dict[str, int] = {}
    for nid in order:
        total, lane = heapq.heappop(heap)
        out[nid] = lane
        heapq.heappush(heap, (total + seconds.get(nid, usual), lane))
    return out


def from_junit(xml: Path) -> dict[str, float]:
    """The laned tests' seconds in a junit report of an xdist run (their names end in
    `@system-N`, the xdist group)."""
    out: dict[str, float] = {}
    for case in ET.parse(xml).iter("testcase"):
        name = case.get("name", "")
        if "@system-" not in name:
            continue
        path = case.get("classname", "").replace(".", "/") + ".py"
        out[f"{path}::{name.rsplit('@', 1)[0]}"] = round(float(case.get("time", 0)), 1)
    return out


def averaged(reports: Sequence[Path]) -> dict[str, float]:
    """Each laned test's mean seconds over the reports that ran it."""
    runs = [from_junit(xml) for xml in reports]
    names = {name for run in runs for name in run}
    return {name: round(statistics.mean(run[name] for run in runs if name in run), 1)
            for name in names}


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python3 -m tests.support.lanes JUNIT_XML... (runs with -n auto)")
    record = averaged([Path(a) for a in sys.argv[1:]])
    if not record:
        sys.exit(f"{' '.join(sys.argv[1:])}: no laned test in it (run the suite with -n auto)")
    RECORD.write_text(json.dumps(dict(sorted(record.items())), indent=1) + "\n")
    print(f"{RECORD}: {len(record)} tests, {sum(record.values()):.0f} s")
