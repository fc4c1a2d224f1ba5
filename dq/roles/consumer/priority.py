"""The order in which a claim tries the ready lists: priorities 1..3 drawn by weight."""

from __future__ import annotations

import bisect
import functools
import random
from collections.abc import Sequence

_RNG = random.Random()


def _orders(left: tuple[tuple[int, int], ...]) -> list[tuple[float, tuple[int, ...]]]:
    """Every order of the priorities in `left` ((priority, weight) pairs) with its odds
    when the first is drawn by weight, then the next by weight among the rest, and
    zero-weight priorities come last."""
    total = sum(w for _, w in left)
    if total <= 0:
        return [(1.0, tuple(p for p, _ in left))]
    out = []
    for i, (p, w) in enumerate(left):
        if w > 0:
            for odds, rest in _orders(left[:i] + left[i + 1:]):
                out.append((w / total * odds, (p, *rest)))
    return out


@functools.lru_cache(maxsize=32)
def _order_table(weights: tuple[int, ...]) -> tuple[list[float], list[list[int]]]:
    """Cumulative odds and the orders they pick, for one setting of the weights."""
    left = tuple((p, max(0, int(w))) for p, w in zip((1, 2, 3), weights, strict=False))
    cum, orders, acc = [], [], 0.0
    for odds, order in _orders(left):
        acc += odds
        cum.append(acc)
        orders.append(list(order))
    return cum, orders


def priority_order(weights: Sequence[int], rng: random.Random | None = None) -> list[int]:
    """Priorities 1..3 in a weighted random order: the first drawn by weight, then the next
    by weight among the rest; zero-weight priorities come last. (One random number and a
    table per weights: this runs before every claim.)"""
    cum, orders = _order_table(tuple(weights))
    i = bisect.bisect_right(cum, (rng or _RNG).random() * cum[-1])
    return list(orders[min(i, len(orders) - 1)])
