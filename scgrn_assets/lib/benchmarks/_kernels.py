"""Numba kernels of the enrichment nulls: targets redrawn by reference in-degree, and degree-preserving
rewiring (double-edge swaps) over an open-addressing set of edges."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True)
def is_true_pair(key, sorted_true_keys):
    position = np.searchsorted(sorted_true_keys, key)
    return position < len(sorted_true_keys) and sorted_true_keys[position] == key


@numba.njit(cache=True)
def in_degree_null_hits_kernel(
    source_genes, n_draws, weighted_genes, weights, sorted_true_keys, n_genes, directed, n_null, seed
):
    """Hits per (null replicate, source) when each source's targets are redrawn from ``weighted_genes``
    with probability proportional to ``weights``, without replacement, never the source itself."""
    np.random.seed(seed)
    n_weighted = len(weighted_genes)
    base_cumulative = np.cumsum(weights)
    total_weight = base_cumulative[-1] if n_weighted else 0.0
    position_of_gene = np.full(n_genes, -1, np.int64)
    for position in range(n_weighted):
        position_of_gene[weighted_genes[position]] = position
    hits = np.zeros((n_null, len(source_genes)), np.int64)
    drawn = np.zeros(n_weighted, np.bool_)
    drawn_positions = np.empty(n_weighted, np.int64)
    cumulative = base_cumulative.copy()
    for replicate in range(n_null):
        for source_slot in range(len(source_genes)):
            source = source_genes[source_slot]
            n_drawn = 0
            excluded_weight = 0.0
            self_position = position_of_gene[source]
            if self_position >= 0:
                drawn[self_position] = True
                drawn_positions[0] = self_position
                n_drawn = 1
                excluded_weight = weights[self_position]
            n_wanted = min(n_draws[source_slot], n_weighted - n_drawn) + n_drawn
            current_total = total_weight
            rebuilt = False
            while n_drawn < n_wanted:
                if excluded_weight > 0.5 * current_total:
                    # rejection gets slow once half the weight is drawn: drop the drawn genes from the table
                    running = 0.0
                    for position in range(n_weighted):
                        if not drawn[position]:
                            running += weights[position]
                        cumulative[position] = running
                    current_total = running
                    excluded_weight = 0.0
                    rebuilt = True
                position = np.searchsorted(cumulative, np.random.random() * current_total, side="right")
                position = min(position, n_weighted - 1)
                if drawn[position]:
                    continue
                drawn[position] = True
                drawn_positions[n_drawn] = position
                n_drawn += 1
                excluded_weight += weights[position]
                target = weighted_genes[position]
                if directed:
                    key = source * n_genes + target
                else:
                    key = min(source, target) * n_genes + max(source, target)
                if is_true_pair(key, sorted_true_keys):
                    hits[replicate, source_slot] += 1
            for slot in range(n_drawn):
                drawn[drawn_positions[slot]] = False
            if rebuilt:
                cumulative[:] = base_cumulative
    return hits


EMPTY_SLOT = -1
DELETED_SLOT = -2


@numba.njit(cache=True)
def slot_of(key, mask):
    return np.int64((np.uint64(key) * np.uint64(11400714819323198485)) >> np.uint64(40)) & mask


@numba.njit(cache=True)
def table_contains(table, mask, key):
    slot = slot_of(key, mask)
    while table[slot] != EMPTY_SLOT:
        if table[slot] == key:
            return True
        slot = (slot + 1) & mask
    return False


@numba.njit(cache=True)
def table_insert(table, mask, key):
    """Insert an absent key; returns 1 when it took an empty slot (0 when it reused a deleted one)."""
    slot = slot_of(key, mask)
    while table[slot] >= 0:
        slot = (slot + 1) & mask
    took_empty = 1 if table[slot] == EMPTY_SLOT else 0
    table[slot] = key
    return took_empty


@numba.njit(cache=True)
def fill_table(table, mask, sources, targets, n_genes, directed):
    """(Re)build the table of present pairs; returns the number of empty slots left."""
    table[:] = EMPTY_SLOT
    for edge in range(len(sources)):
        a, b = sources[edge], targets[edge]
        table_insert(table, mask, a * n_genes + b if directed else min(a, b) * n_genes + max(a, b))
    return len(table) - len(sources)


@numba.njit(cache=True)
def table_remove(table, mask, key):
    slot = slot_of(key, mask)
    while table[slot] != key:
        slot = (slot + 1) & mask
    table[slot] = DELETED_SLOT


@numba.njit(cache=True)
def rewire(edge_sources, edge_targets, n_genes, directed, n_swaps, seed):
    """Degree-preserving double-edge swaps (a->b, c->d) -> (a->d, c->b), refusing self-loops and duplicates.

    Present pairs live in an open-addressing hash table (numba's own set is several times slower).
    """
    np.random.seed(seed)
    sources = edge_sources.copy()
    targets = edge_targets.copy()
    n_edges = len(sources)
    table_size = 16
    while table_size < 8 * n_edges:
        table_size *= 2
    mask = table_size - 1
    table = np.empty(table_size, np.int64)
    n_empty = fill_table(table, mask, sources, targets, n_genes, directed)
    if n_edges < 2:
        return sources, targets
    for _ in range(n_swaps):
        first = np.random.randint(n_edges)
        second = np.random.randint(n_edges)
        a, b = sources[first], targets[first]
        c, d = sources[second], targets[second]
        if first == second or a == d or c == b:
            continue
        if directed:
            old_first, old_second = a * n_genes + b, c * n_genes + d
            new_first, new_second = a * n_genes + d, c * n_genes + b
        else:
            old_first = min(a, b) * n_genes + max(a, b)
            old_second = min(c, d) * n_genes + max(c, d)
            new_first = min(a, d) * n_genes + max(a, d)
            new_second = min(c, b) * n_genes + max(c, b)
        if new_first == new_second or table_contains(table, mask, new_first):
            continue
        if table_contains(table, mask, new_second):
            continue
        table_remove(table, mask, old_first)
        table_remove(table, mask, old_second)
        n_empty -= table_insert(table, mask, new_first) + table_insert(table, mask, new_second)
        targets[first] = d
        targets[second] = b
        if 4 * n_empty < table_size:  # deleted slots lengthen probes: rebuild before the table clogs
            n_empty = fill_table(table, mask, sources, targets, n_genes, directed)
    return sources, targets


@numba.njit(cache=True)
def rewired_null_hits_kernel(edge_sources, edge_targets, source_slot, n_sources, sorted_true_keys, n_genes, directed,
                       n_null, n_swaps, seed):
    hits = np.zeros((n_null, n_sources), np.int64)
    for replicate in range(n_null):
        _, targets = rewire(edge_sources, edge_targets, n_genes, directed, n_swaps, seed + replicate)
        for edge in range(len(targets)):
            a, b = edge_sources[edge], targets[edge]
            key = a * n_genes + b if directed else min(a, b) * n_genes + max(a, b)
            if is_true_pair(key, sorted_true_keys):
                hits[replicate, source_slot[edge]] += 1
    return hits
