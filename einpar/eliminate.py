"""Solving a Problem (solve.py) by dynamic programming over the program's graph.

The price of a plan is a sum of small terms: each op's own price (a function
of its choice), and for each value the moves into the layouts its readers
need (a function of its maker's choice and its readers' choices). That is a
sum of factors over few variables each, minimized by variable elimination
(bucket elimination; Dechter, "Bucket elimination: a unifying framework for
reasoning", Artificial Intelligence 113, 1999): pick an op, add up every
factor it appears in, and replace them by their minimum over its choices, a
factor over its neighbours; when every op is gone, walk back and take the
choices that reached the minimum. The answer is exact, and the work is the
size of the largest factor made, exponential only in the program graph's
induced width: a layer of a transformer, where each value has a few
readers, stays in the thousands of entries.

Where a factor would pass `MAX_ENTRIES`, `eliminate` gives up (None) and the
integer program of solve.py is used instead.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from .layout import Layout

# The most entries any factor may have (the table of a value read by 5 ops of 9 choices
# each, with its maker's, has 9^6 = 531,441).
MAX_ENTRIES = 200_000


class TooWide(Exception):
    """A factor would pass MAX_ENTRIES."""


def eliminate(problem) -> list[int] | None:
    """The cheapest choice per node, or None where the program's graph is too wide."""
    sizes = [len(node) for node in problem.nodes]
    try:
        scopes, maker = _scopes(problem)
        # The order and its widest bucket follow from the scopes alone: a problem too wide
        # is given up before any table is priced.
        order = _order([(i,) for i in range(len(sizes))] + [scope for _, scope in scopes], sizes)
    except TooWide:
        return None
    return _minimize(_factors(problem, scopes, maker), sizes, order)


def _scopes(problem) -> tuple[list[tuple[str, tuple[int, ...]]], dict[str, int]]:
    """(value, the nodes its moves depend on: its maker and readers, in increasing order) for
    every value read or asked for; and the node that makes each value made."""
    maker: dict[str, int] = {}
    readers: dict[str, list[int]] = {}
    for index, node in enumerate(problem.nodes):
        for choice in node:
            for value, _ in choice.makes:
                maker[value] = index
            for value, _ in choice.needs:
                if index not in readers.setdefault(value, []):
                    readers[value].append(index)
    required: dict[str, set[Layout]] = {}
    for value, layout in problem.required:
        required.setdefault(value, set()).add(layout)
    scopes = []
    for value in dict.fromkeys(list(readers) + list(required)):
        scope = sorted(set(readers.get(value, [])) | ({maker[value]} if value in maker else set()))
        if math.prod(len(problem.nodes[i]) for i in scope) > MAX_ENTRIES:
            raise TooWide()
        scopes.append((value, tuple(scope)))
    return scopes, maker


def _factors(problem, scopes, maker: dict[str, int]) -> list[tuple[tuple[int, ...], np.ndarray]]:
    """(scope: the nodes it depends on, in increasing order; its table) for every term."""
    required: dict[str, set[Layout]] = {}
    for value, layout in problem.required:
        required.setdefault(value, set()).add(layout)
    factors = [((index,), np.array([choice.price for choice in node], dtype=float))
               for index, node in enumerate(problem.nodes)]
    for value, scope in scopes:
        factors.append((scope, _memo_table(problem, value, list(scope), maker.get(value),
                                           required.get(value, set()))))
    return factors


def _memo_table(problem, value: str, scope: list[int], maker: int | None,
                required: set[Layout]) -> np.ndarray:
    """`_value_table`, kept in `problem.tables` where the problem has one: the axis-by-axis
    search solves a level several times, and a loop body once per carried layout, mostly
    with the same choices (the partitioner caches them), so most tables recur. The key
    holds the choices themselves (by identity, the entry keeping them alive)."""
    if problem.tables is None or problem.value_type is None:
        return _value_table(problem, value, scope, maker, required)
    nodes = tuple(tuple(problem.nodes[i]) for i in scope)
    key = (value, problem.value_type(value), tuple(tuple(map(id, node)) for node in nodes),
           None if maker is None else scope.index(maker), frozenset(required),
           problem.fixed.get(value) if maker is None else None)
    entry = problem.tables.get(key)
    if entry is None:
        entry = problem.tables[key] = (_value_table(problem, value, scope, maker, required), nodes)
    return entry[0]


def _value_table(problem, value: str, scope: list[int], maker: int | None,
                 required: set[Layout]) -> np.ndarray:
    """The moves of `value` for every combination of its maker's and readers' choices: each
    reader's choice as a bit set of the layouts it needs, their union priced once from the
    layout the maker's choice makes."""
    layouts: dict[Layout, int] = {layout: i for i, layout in enumerate(sorted(required, key=str))}
    masks = {}
    for i in scope:
        row = []
        for choice in problem.nodes[i]:
            mask = 0
            for v, layout in choice.needs:
                if v == value:
                    mask |= 1 << layouts.setdefault(layout, len(layouts))
            row.append(mask)
        masks[i] = row
    required_mask = sum(1 << layouts[layout] for layout in required)
    if maker is not None:
        made = [dict(choice.makes)[value] for choice in problem.nodes[maker]]
    else:
        made = [problem.fixed[value]]
    sources = list(dict.fromkeys(made))
    source_of = [sources.index(layout) for layout in made]
    by_index = list(layouts)
    prices = []
    for source in sources:
        row = []
        for layout in by_index:
            cost = problem.move(value, source, layout)
            row.append(math.inf if cost is None else cost)
        prices.append(row)
    cache: dict[tuple[int, int], float] = {}

    def price(source: int, mask: int) -> float:
        key = (source, mask)
        if key not in cache:
            row = prices[source]
            cache[key] = sum(row[bit] for bit in range(mask.bit_length()) if mask >> bit & 1)
        return cache[key]

    shape = tuple(len(problem.nodes[i]) for i in scope)
    rows = [masks[i] for i in scope]
    position = scope.index(maker) if maker is not None else None
    if len(layouts) < 63:  # bit sets fit a machine word: the whole table at once
        mask = np.full(shape, required_mask, dtype=np.uint64)
        for axis, row in enumerate(rows):
            view = [1] * len(shape)
            view[axis] = len(row)
            mask = mask | np.array(row, dtype=np.uint64).reshape(view)
        source = np.zeros(shape, dtype=np.uint64)
        if position is not None:
            view = [1] * len(shape)
            view[position] = len(source_of)
            source = source + np.array(source_of, dtype=np.uint64).reshape(view)
        # One integer per (source, layouts needed) pair, so that each distinct pair is priced
        # once; a 1-D unique is far cheaper than a unique over columns.
        width = len(layouts)
        if len(sources) << width < 1 << 63:
            keys, inverse = np.unique((source << np.uint64(width) | mask).ravel(),
                                      return_inverse=True)
            # Each pair's price at once: the prices of the layouts its bits name, summed.
            bits = (keys[:, None] >> np.arange(width, dtype=np.uint64)) & np.uint64(1)
            rows_of = np.array(prices, dtype=float).reshape(len(sources), width)
            source_rows = rows_of[(keys >> np.uint64(width)).astype(np.intp)]
            prices_of = np.where(bits.astype(bool), source_rows, 0.0).sum(axis=1)
            return prices_of[inverse.ravel()].reshape(shape)
        else:
            columns, inverse = np.unique(np.stack([source.ravel(), mask.ravel()]), axis=1,
                                         return_inverse=True)
            pairs = [(int(s), int(m)) for s, m in columns.T]
        prices_of = np.array([price(s, m) for s, m in pairs])
        return prices_of[inverse.ravel()].reshape(shape)
    table = np.empty(shape)
    for combo in itertools.product(*(range(size) for size in shape)):
        mask = required_mask
        for row, pick in zip(rows, combo):
            mask |= row[pick]
        table[combo] = price(source_of[combo[position]] if position is not None else 0, mask)
    return table


def _aligned(scope: tuple[int, ...], table: np.ndarray, union: tuple[int, ...]) -> np.ndarray:
    """`table` with an axis of length 1 for each node of `union` it does not depend on."""
    shape = [table.shape[scope.index(i)] if i in scope else 1 for i in union]
    return table.reshape(shape)  # scopes and unions are both in increasing order


def _order(scopes: list[tuple[int, ...]], sizes: list[int]) -> list[int]:
    """The order nodes are eliminated in: the node whose bucket is smallest next (ties: the
    lowest index). TooWide where a bucket would pass MAX_ENTRIES."""
    remaining = set(range(len(sizes)))
    # Each node's neighbours (itself included): the union of the scopes of its factors,
    # kept up to date as nodes go, so that a bucket's size is known without a scan.
    neighbours = {node: {node} for node in remaining}
    for scope in scopes:
        for node in scope:
            neighbours[node].update(scope)
    order = []
    while remaining:
        def bucket_size(node: int) -> int:
            return math.prod(sizes[i] for i in neighbours[node])

        node = min(sorted(remaining), key=bucket_size)
        if bucket_size(node) > MAX_ENTRIES * max(sizes[node], 1):
            raise TooWide()
        rest_of = neighbours.pop(node) - {node}
        for other in rest_of:
            neighbours[other].discard(node)
            neighbours[other] |= rest_of
        order.append(node)
        remaining.discard(node)
    return order


def _minimize(factors, sizes: list[int], order: list[int]) -> list[int]:
    eliminated = []  # (node, its bucket's scope, the bucket's table), in order
    for node in order:
        bucket = [(scope, table) for scope, table in factors if node in scope]
        factors = [(scope, table) for scope, table in factors if node not in scope]
        union = tuple(sorted(set().union(*(scope for scope, _ in bucket)) | {node}))
        total = np.zeros([sizes[i] for i in union])
        for scope, table in bucket:
            total = total + _aligned(scope, table, union)
        eliminated.append((node, union, total))
        rest = tuple(i for i in union if i != node)
        factors.append((rest, total.min(axis=union.index(node))))
    picks: dict[int, int] = {}
    for node, union, total in reversed(eliminated):
        index = tuple(picks[i] if i != node else slice(None) for i in union)
        picks[node] = int(np.argmin(total[index]))
    return [picks[i] for i in range(len(sizes))]
