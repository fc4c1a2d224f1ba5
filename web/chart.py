"""The dashboard's last-hour chart as plain numbers for an inline SVG (no JS library).

Three series per minute: jobs written, callbacks that succeeded, callbacks that failed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Final
from zoneinfo import ZoneInfo

WIDTH: Final = 1100  # about the width it is drawn at, so text keeps its size
HEIGHT: Final = 240
LEFT: Final = 48
RIGHT: Final = 16
TOP: Final = 12
BOTTOM: Final = 26
SERIES: Final = (("writes", "Written"), ("ok", "Delivered"), ("fail", "Failed"))


@dataclass(frozen=True)
class Tick:
    pos: float
    label: str
    anchor: str = "middle"  # SVG text-anchor


@dataclass(frozen=True)
class Column:
    """One minute: where its hover area is and what its tooltip says."""

    x: float
    width: float
    title: str


@dataclass(frozen=True)
class Line:
    key: str
    label: str
    points: str  # "x,y x,y ..." for <polyline>
    total: int


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    left: int
    right: float
    top: int
    bottom: float
    lines: tuple[Line, ...]
    y_ticks: tuple[Tick, ...]
    x_ticks: tuple[Tick, ...]
    columns: tuple[Column, ...]
    empty: bool


def nice_scale(peak: int, most: int = 5) -> tuple[int, int]:
    """(step, top) of the y axis: the step is 1, 2 or 5 times a power of ten, the smallest
    that reaches `peak` in at most `most` steps (a peak under 4 counts as 4), and the top is
    the first multiple of it that is >= peak, so every tick is a round number."""
    value = max(peak, 4)
    step = 1
    while True:
        for m in (1, 2, 5):
            if -(-value // (m * step)) <= most:
                return m * step, m * step * -(-value // (m * step))
        step *= 10


def build(minutes: list[tuple[int, dict[str, int]]], zone: ZoneInfo | None = None) -> Chart:
    """Chart geometry for (epoch minute, counters) rows, oldest first."""
    n = max(len(minutes), 2)
    right, bottom = WIDTH - RIGHT, HEIGHT - BOTTOM
    plot_w, plot_h = right - LEFT, bottom - TOP
    peak = max((row.get(k, 0) for _, row in minutes for k, _ in SERIES), default=0)
    tick, top_value = nice_scale(peak)

    def x(i: int) -> float:
        return round(LEFT + plot_w * i / (n - 1), 1)

    def y(v: int) -> float:
        return round(bottom - plot_h * v / top_value, 1)

    def hhmm(minute: int) -> str:
        return datetime.fromtimestamp(minute * 60, zone).strftime("%H:%M")

    lines = tuple(
        Line(key, label, " ".join(f"{x(i)},{y(row.get(key, 0))}"
                                  for i, (_, row) in enumerate(minutes)),
             sum(row.get(key, 0) for _, row in minutes))
        for key, label in SERIES)
    y_ticks = tuple(Tick(y(v), f"{v:,}") for v in range(0, top_value + 1, tick))
    last = len(minutes) - 1
    x_ticks = tuple(Tick(x(i), hhmm(m), "end" if i == last else "start" if i == 0 else "middle")
                    for i, (m, _) in enumerate(minutes) if i % 10 == 0 or i == last)
    step = plot_w / (n - 1)
    columns = tuple(
        Column(round(x(i) - step / 2, 1), round(step, 1),
               f"{hhmm(m)}  written {row.get('writes', 0)}, delivered {row.get('ok', 0)}, "
               f"failed {row.get('fail', 0)}")
        for i, (m, row) in enumerate(minutes))
    return Chart(WIDTH, HEIGHT, LEFT, right, TOP, bottom, lines, y_ticks, x_ticks, columns,
                 empty=peak == 0)
