"""Per gene pair streaming moments (n, mean, M2) in an open-addressing hash map, for large gene universes.

The dense accumulator of :mod:`scgrn_assets.lib.network.dense_moments` keeps one slot per possible
pair: ``n_genes·(n_genes − 1)/2`` of them, 4.8 GB of state at 20,000 genes and 10.8 GB at
30,000. A cell contributes at most ``256·255/2`` pairs, so the pairs actually seen are far
fewer; this map holds only those. Memory grows with the pairs seen (32 bytes per slot, the
load kept at most ``max_load``, 0.5 by default: 64–128 bytes per pair, ×1.5 while growing),
not with ``n_genes²``.

Layout: one ``(n_slots, 4)`` int64 table, a row per slot, so an update touches one cache
line, not three arrays: column 0 the pair key + 1 (0 marks an empty slot, so a fresh table
is plain zeroed memory), column 1 ``n``, columns 2 and 3 ``mean`` and ``M2`` as float64 (the
same memory viewed as float64; integer and float columns are never accessed through the
other view). The key is the dense accumulator's pair index ``high·(high − 1)/2 + low``.
Slots are found by Fibonacci hashing (the top bits of ``key·2⁶⁴/φ``) and linear probing.
Updates land on random rows of a table of up to gigabytes, so each one is a cache (and
TLB) miss; the kernels first compute the home rows of a cell's pairs, then issue a software
prefetch ``PREFETCH_DISTANCE`` updates ahead, so a dozen misses are in flight at once
instead of one (about 1.6× fewer CPU seconds per cell than probing one pair at a time).
When an insertion would push the load past ``max_load`` the kernel stops where it is (a
cell boundary, or a value for pair lists), the table is rebuilt twice as large (or more)
and the kernel resumes there, so nothing is applied twice or skipped.

Updates are the dense kernel's, operation for operation: a single value is Welford's update
(Chan et al.'s merge with ``n_b = 1``), so the two accumulators agree bit for bit; merged
moments use Chan's general formula.

Shards: the table may be split into ``n_shards`` equal parts by the higher gene of a pair
(``high % n_shards``); each shard is a hash map of its own, updated by its own thread
(numba ``prange``) that walks all cells and skips the rows of other shards. A pair's updates
run in the same order whatever the number of shards, so results do not depend on it.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir as llvm_ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio, odd
DEFAULT_INITIAL_CAPACITY = 2**16
DEFAULT_MAX_LOAD = 0.5
PREFETCH_DISTANCE = 12  # updates between a row's prefetch and its use
# The prefetch intrinsic is overloaded on the pointer type: "p0" with opaque pointers (LLVM ≥ 17), "p0i8" before.
_PREFETCH_INTRINSIC = "llvm.prefetch.p0" if llvm_binding.llvm_version_info[0] >= 17 else "llvm.prefetch.p0i8"


@intrinsic
def _prefetch_row(typingctx, table, row):
    """Ask the CPU to fetch, for writing, the cache line of ``table[row, 0]`` (no fault, no wait)."""
    signature = types.void(table, row)

    def codegen(context, builder, signature, arguments):
        table_type = signature.args[0]
        array = context.make_array(table_type)(context, builder, arguments[0])
        pointer = cgutils.get_item_pointer2(
            context, builder, data=array.data, shape=cgutils.unpack_tuple(builder, array.shape),
            strides=cgutils.unpack_tuple(builder, array.strides), layout=table_type.layout,
            inds=[arguments[1], context.get_constant(types.intp, 0)], wraparound=False, boundscheck=False)
        byte_pointer = llvm_ir.IntType(8).as_pointer()
        int32 = llvm_ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, llvm_ir.FunctionType(llvm_ir.VoidType(), [byte_pointer, int32, int32, int32]),
            _PREFETCH_INTRINSIC)
        # rw = 1 (write), locality = 3 (keep in all cache levels), cache type = 1 (data).
        builder.call(function, [builder.bitcast(pointer, byte_pointer), llvm_ir.Constant(int32, 1),
                                llvm_ir.Constant(int32, 3), llvm_ir.Constant(int32, 1)])
        return context.get_dummy_value()

    return signature, codegen


@numba.njit(cache=True, nogil=True, inline="always")
def _home(bits: int, stored: int) -> int:
    """Home slot of ``stored`` in a shard of ``2**bits`` slots: the top bits of ``stored·2⁶⁴/φ``."""
    return np.int64((np.uint64(stored) * _GOLDEN) >> np.uint64(64 - bits))


@numba.njit(cache=True, nogil=True, inline="always")
def _probe(table: np.ndarray, base: int, bits: int, stored: int, slot: int) -> int:
    """Row of ``stored`` (key + 1) in the shard starting at ``base``, or of the empty slot where it
    goes; linear probing from ``slot``, its home."""
    mask = (np.int64(1) << bits) - 1
    while True:
        current = table[base + slot, 0]
        if current == stored or current == 0:
            return base + slot
        slot = (slot + 1) & mask


@numba.njit(cache=True, nogil=True, inline="always")
def _welford(table: np.ndarray, floats: np.ndarray, row: int, value: float) -> None:
    """Chan et al.'s merge of one observation (``n_b = 1``, ``M2_b = 0``): Welford's update.

    Operation for operation the dense kernel's ``_chan_update_one``: ``n = n_a + 1``,
    ``δ = x − mean_a``, ``mean = mean_a + δ/n``, ``M2 = M2_a + δ·(x − mean)``.
    """
    n = table[row, 1] + 1
    mean = floats[row, 2]
    delta = value - mean
    new_mean = mean + delta / np.float64(n)
    table[row, 1] = n
    floats[row, 2] = new_mean
    floats[row, 3] += delta * (value - new_mean)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _triangles_shard(table, floats, occupied, shard, gene_shard, capacity, bits, limit, high_offset,
                     sorted_genes, n_valid, values, start_cell) -> int:
    """Every valid pair of cells ``start_cell…`` whose higher gene is in ``shard``, in triangle order.

    Pair ``(i, j)``, ``i < j``, of a cell is ``values[cell, j·(j − 1)/2 + i]``, genes
    ``sorted_genes[cell, i] < sorted_genes[cell, j]``. Returns the cell it stopped before
    because its new pairs might push the shard past ``limit`` entries, or ``n_cells``.
    Per cell: the shard's pairs with their home rows first, then the updates, each row
    prefetched ``PREFETCH_DISTANCE`` updates ahead.
    """
    base = shard * capacity
    count = occupied[shard]
    n_cells, n_slots = sorted_genes.shape
    max_pairs = n_slots * (n_slots - 1) // 2
    pending_stored = np.empty(max_pairs, np.int64)
    pending_home = np.empty(max_pairs, np.int64)
    pending_value = np.empty(max_pairs, np.float64)
    for cell in range(start_cell, n_cells):
        n_pending = 0
        for j in range(1, n_valid[cell]):
            high = sorted_genes[cell, j]
            if gene_shard[high] != shard:
                continue
            row_key = high_offset[high] + 1  # stored keys are key + 1
            pair = j * (j - 1) // 2
            for i in range(j):
                stored = row_key + sorted_genes[cell, i]
                pending_stored[n_pending] = stored
                pending_home[n_pending] = _home(bits, stored)
                pending_value[n_pending] = values[cell, pair + i]
                n_pending += 1
        if count + n_pending > limit:  # at most this many are new
            occupied[shard] = count
            return cell
        for index in range(min(PREFETCH_DISTANCE, n_pending)):
            _prefetch_row(table, base + pending_home[index])
        for index in range(n_pending):
            if index + PREFETCH_DISTANCE < n_pending:
                _prefetch_row(table, base + pending_home[index + PREFETCH_DISTANCE])
            stored = pending_stored[index]
            row = _probe(table, base, bits, stored, pending_home[index])
            if table[row, 0] == 0:
                table[row, 0] = stored
                count += 1
            _welford(table, floats, row, pending_value[index])
    occupied[shard] = count
    return n_cells


@numba.njit(cache=True, nogil=True, parallel=True)
def _triangles_parallel(table, floats, occupied, gene_shard, capacity, bits, limit, high_offset, sorted_genes,
                        n_valid, values, start_cells, stop_cells) -> None:
    for shard in numba.prange(occupied.shape[0]):
        stop_cells[shard] = _triangles_shard(table, floats, occupied, shard, gene_shard, capacity, bits, limit,
                                             high_offset, sorted_genes, n_valid, values, start_cells[shard])


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _pairs_shard(table, floats, occupied, shard, value_shard, capacity, bits, limit, keys, n_b, mean_b, m2_b,
                 start) -> int:
    """Merge parts ``start…`` of ``shard`` (pair ``keys[t]``: ``n_b[t]``, ``mean_b[t]``, ``M2_b[t]``).

    A single value (``n_b = 1``) takes Welford's form of the update, like the dense kernel;
    otherwise Chan et al.: ``n = n_a + n_b``, ``δ = mean_b − mean_a``, ``mean = mean_a + δ·n_b/n``,
    ``M2 = M2_a + M2_b + δ²·n_a·n_b/n``. Returns the part it stopped before because inserting
    it would pass ``limit`` entries, or ``len(keys)``.
    """
    base = shard * capacity
    count = occupied[shard]
    n_parts = keys.shape[0]
    for index in range(start, n_parts):
        ahead = index + PREFETCH_DISTANCE
        if ahead < n_parts and value_shard[ahead] == shard:
            _prefetch_row(table, base + _home(bits, keys[ahead] + 1))
        if value_shard[index] != shard or n_b[index] == 0:
            continue
        stored = keys[index] + 1
        row = _probe(table, base, bits, stored, _home(bits, stored))
        if table[row, 0] == 0:
            if count + 1 > limit:
                occupied[shard] = count
                return index
            table[row, 0] = stored
            count += 1
        if n_b[index] == 1:
            _welford(table, floats, row, mean_b[index])
            floats[row, 3] += m2_b[index]
        else:
            n_a = table[row, 1]
            n = n_a + n_b[index]
            mean = floats[row, 2]
            delta = mean_b[index] - mean
            share = np.float64(n_b[index]) / np.float64(n)
            table[row, 1] = n
            floats[row, 2] = mean + delta * share
            floats[row, 3] += m2_b[index] + delta * delta * np.float64(n_a) * share
    occupied[shard] = count
    return n_parts


@numba.njit(cache=True, nogil=True, parallel=True)
def _pairs_parallel(table, floats, occupied, value_shard, capacity, bits, limit, keys, n_b, mean_b, m2_b,
                    start, stop) -> None:
    for shard in numba.prange(occupied.shape[0]):
        stop[shard] = _pairs_shard(table, floats, occupied, shard, value_shard, capacity, bits, limit, keys, n_b,
                                   mean_b, m2_b, start[shard])


@numba.njit(cache=True, nogil=True)
def _rehash_shard(old, old_capacity, new, new_capacity, new_bits, shard) -> None:
    """Move shard ``shard``'s entries from ``old`` into ``new`` (a zeroed, larger table).

    A chunk of old rows at a time: the entries and their new homes first, then the
    insertions, each prefetched ahead.
    """
    new_base = shard * new_capacity
    chunk = 4096
    rows = np.empty(chunk, np.int64)
    homes = np.empty(chunk, np.int64)
    for first in range(shard * old_capacity, (shard + 1) * old_capacity, chunk):
        n_entries = 0
        for slot in range(first, min(first + chunk, (shard + 1) * old_capacity)):
            if old[slot, 0] != 0:
                rows[n_entries] = slot
                homes[n_entries] = _home(new_bits, old[slot, 0])
                n_entries += 1
        for index in range(min(PREFETCH_DISTANCE, n_entries)):
            _prefetch_row(new, new_base + homes[index])
        for index in range(n_entries):
            if index + PREFETCH_DISTANCE < n_entries:
                _prefetch_row(new, new_base + homes[index + PREFETCH_DISTANCE])
            slot = rows[index]
            row = _probe(new, new_base, new_bits, old[slot, 0], homes[index])
            for column in range(4):
                new[row, column] = old[slot, column]


@numba.njit(cache=True, nogil=True, parallel=True)
def _rehash_parallel(old, old_capacity, new, new_capacity, new_bits) -> None:
    n_shards = old.shape[0] // old_capacity
    for shard in numba.prange(n_shards):
        _rehash_shard(old, old_capacity, new, new_capacity, new_bits, shard)


@numba.njit(cache=True, nogil=True)
def _packed_entries(table, high_offset, row_bits, packed) -> None:
    """One int64 per entry, ``(low·n_genes + high) << row_bits | row``: sorting them sorts by (low, high)."""
    n_genes = high_offset.shape[0] - 1
    entry = 0
    for row in range(table.shape[0]):
        stored = table[row, 0]
        if stored == 0:
            continue
        key = stored - 1
        # Invert key = high·(high − 1)/2 + low: high = ⌊(1 + √(1 + 8·key)) / 2⌋, corrected for rounding.
        high = min(np.int64((1.0 + np.sqrt(1.0 + 8.0 * key)) / 2.0), n_genes - 1)
        while high_offset[high] > key:
            high -= 1
        while high_offset[high + 1] <= key:
            high += 1
        low = key - high_offset[high]
        packed[entry] = ((low * n_genes + high) << row_bits) | row
        entry += 1


@numba.njit(cache=True, nogil=True)
def _unpack_entries(table, floats, n_genes, row_bits, packed, gene_i, gene_j, n, mean, m2) -> None:
    """Entries in the order of ``packed`` (sorted :func:`_packed_entries`), rows prefetched ahead."""
    row_mask = (np.int64(1) << row_bits) - 1
    total = packed.shape[0]
    for index in range(min(PREFETCH_DISTANCE, total)):
        _prefetch_row(table, packed[index] & row_mask)
    for index in range(total):
        if index + PREFETCH_DISTANCE < total:
            _prefetch_row(table, packed[index + PREFETCH_DISTANCE] & row_mask)
        row = packed[index] & row_mask
        pair = packed[index] >> row_bits
        gene_i[index] = pair // n_genes
        gene_j[index] = pair % n_genes
        n[index] = table[row, 1]
        mean[index] = floats[row, 2]
        m2[index] = floats[row, 3]


def _next_power_of_two(value: int) -> int:
    return 1 << max(int(value) - 1, 1).bit_length()


class PairMomentHashMap:
    """(n, mean, M2) per gene pair seen, over a universe of ``n_genes`` genes (see the module doc).

    Parameters
    ----------
    n_genes
        Genes are ``0 … n_genes − 1``; pair keys are ``high·(high − 1)/2 + low`` (int64).
    n_shards
        Independent parts, each updated by its own numba thread (1: no threads).
    initial_capacity
        Slots per shard to start with (rounded up to a power of two); the table grows as needed.
    max_load
        Entries per slot above which the table is rebuilt larger (0 < max_load ≤ 0.9).
    """

    def __init__(self, n_genes: int, n_shards: int = 1, initial_capacity: int = DEFAULT_INITIAL_CAPACITY,
                 max_load: float = DEFAULT_MAX_LOAD):
        if not 0.0 < max_load <= 0.9:
            raise ValueError(f"max_load must be in (0, 0.9], not {max_load}")
        if n_shards < 1:
            raise ValueError(f"n_shards must be at least 1, not {n_shards}")
        self.n_genes = int(n_genes)
        self.n_shards = int(n_shards)
        self.max_load = float(max_load)
        high = np.arange(self.n_genes + 1, dtype=np.int64)
        self._high_offset = high * (high - 1) // 2
        # Pairs go to the shard of their higher gene; pairs per higher gene grow with its index,
        # so interleaving the genes balances the shards.
        self._gene_shard = (high % self.n_shards).astype(np.int64)
        self._occupied = np.zeros(self.n_shards, dtype=np.int64)
        self.n_rehashes = 0
        self._allocate(_next_power_of_two(max(initial_capacity, 2)))
        self.peak_nbytes = self.nbytes

    def _allocate(self, capacity: int) -> None:
        self.capacity = capacity
        self._bits = capacity.bit_length() - 1
        self._limit = int(self.max_load * capacity)
        # Lazily zeroed pages (numpy asks for huge pages for big arrays). Touching fresh memory is
        # the main cost of growing on some virtual machines (~2 s per GB measured here, whether
        # zeroed in one pass first or touched by the inserts), so the table is never pre-filled.
        self._table = np.zeros((self.n_shards * capacity, 4), dtype=np.int64)
        self._floats = self._table.view(np.float64)

    @property
    def n_pairs(self) -> int:
        """Pairs held (distinct pairs seen)."""
        return int(self._occupied.sum())

    @property
    def nbytes(self) -> int:
        """Bytes of the table (``peak_nbytes``: the most held at once, old and new table while growing)."""
        return self._table.nbytes

    def load(self) -> float:
        """Entries per slot of the fullest shard."""
        return float(self._occupied.max()) / self.capacity

    def _grow(self, entries_needed: int) -> None:
        """Rebuild the table at least twice as large, and large enough for ``entries_needed`` per shard."""
        capacity = 2 * self.capacity
        while int(self.max_load * capacity) < entries_needed:
            capacity *= 2
        old, old_capacity = self._table, self.capacity
        self._allocate(capacity)
        self.peak_nbytes = max(self.peak_nbytes, old.nbytes + self.nbytes)
        if self.n_shards == 1:
            _rehash_shard(old, old_capacity, self._table, capacity, self._bits, 0)
        else:
            with _numba_threads(self.n_shards):
                _rehash_parallel(old, old_capacity, self._table, capacity, self._bits)
        self.n_rehashes += 1

    def add_triangles(self, sorted_genes: np.ndarray, n_valid: np.ndarray, values: np.ndarray) -> None:
        """Add each cell's pairs in triangle form, Welford's update per value.

        Parameters
        ----------
        sorted_genes
            Shape (n_cells, n_slots), int64: a cell's first ``n_valid`` slots hold distinct genes
            in ascending order (not checked here), the rest are ignored.
        n_valid
            Shape (n_cells,), int64.
        values
            Shape (n_cells, n_slots·(n_slots − 1)/2), float64: pair ``(i, j)``, ``i < j``, at
            ``j·(j − 1)/2 + i``.
        """
        sorted_genes = np.ascontiguousarray(sorted_genes, dtype=np.int64)
        n_valid = np.ascontiguousarray(n_valid, dtype=np.int64)
        values = np.ascontiguousarray(values, dtype=np.float64)
        n_cells = sorted_genes.shape[0]
        start = np.zeros(self.n_shards, dtype=np.int64)
        stop = np.empty_like(start)
        while True:
            if self.n_shards == 1:
                stop[0] = _triangles_shard(self._table, self._floats, self._occupied, 0, self._gene_shard,
                                           self.capacity, self._bits, self._limit, self._high_offset, sorted_genes,
                                           n_valid, values, start[0])
            else:
                with _numba_threads(self.n_shards):
                    _triangles_parallel(self._table, self._floats, self._occupied, self._gene_shard, self.capacity,
                                        self._bits, self._limit, self._high_offset, sorted_genes, n_valid, values,
                                        start, stop)
            stopped = np.flatnonzero(stop < n_cells)
            if not len(stopped):
                return
            needed = [self._occupied[shard] + int(n_valid[stop[shard]]) * (int(n_valid[stop[shard]]) - 1) // 2
                      for shard in stopped]
            self._grow(max(needed))
            start = stop.copy()

    def add_values(self, low: np.ndarray, high: np.ndarray, values: np.ndarray) -> None:
        """Add one value per ``(low[t], high[t])`` observation (``low < high``; pairs may repeat)."""
        ones = np.ones(len(values), dtype=np.int64)
        self.add_moments(low, high, ones, values, np.zeros(len(values)))

    def add_moments(self, low: np.ndarray, high: np.ndarray, n: np.ndarray, mean: np.ndarray,
                    m2: np.ndarray) -> None:
        """Merge moments of pairs ``(low[t], high[t])``, ``low < high`` (Chan et al.; parts may repeat)."""
        low, high = np.asarray(low, dtype=np.int64), np.asarray(high, dtype=np.int64)
        if len(low) and not (low.min() >= 0 and high.max() < self.n_genes and np.all(low < high)):
            raise ValueError("pairs need 0 <= low < high < n_genes")
        keys = self._high_offset[high] + low
        n = np.ascontiguousarray(n, dtype=np.int64)
        mean = np.ascontiguousarray(mean, dtype=np.float64)
        m2 = np.ascontiguousarray(m2, dtype=np.float64)
        value_shard = self._gene_shard[high]
        start = np.zeros(self.n_shards, dtype=np.int64)
        stop = np.empty_like(start)
        while True:
            if self.n_shards == 1:
                stop[0] = _pairs_shard(self._table, self._floats, self._occupied, 0, value_shard, self.capacity,
                                       self._bits, self._limit, keys, n, mean, m2, start[0])
            else:
                with _numba_threads(self.n_shards):
                    _pairs_parallel(self._table, self._floats, self._occupied, value_shard, self.capacity,
                                    self._bits, self._limit, keys, n, mean, m2, start, stop)
            if not np.any(stop < len(keys)):
                return
            self._grow(int(self._occupied.max()) + 1)
            start = stop.copy()

    def sorted_entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``gene_i`` (low, int32), ``gene_j`` (high, int32), ``n`` (int64), ``mean``, ``m2``, one per pair held,
        sorted by (``gene_i``, ``gene_j``): keys decoded and packed with their row into one int64, sorted, unpacked."""
        total = self.n_pairs
        gene_i, gene_j = np.empty(total, np.int32), np.empty(total, np.int32)
        n, mean, m2 = np.empty(total, np.int64), np.empty(total), np.empty(total)
        row_bits = max(len(self._table) - 1, 1).bit_length()
        if (max(self.n_genes, 1) ** 2).bit_length() + row_bits > 63:
            raise ValueError(f"{self.n_genes} genes and {len(self._table)} slots do not pack into 63 bits")
        packed = np.empty(total, np.int64)
        _packed_entries(self._table, self._high_offset, row_bits, packed)
        packed.sort()
        _unpack_entries(self._table, self._floats, self.n_genes, row_bits, packed, gene_i, gene_j, n, mean, m2)
        return gene_i, gene_j, n, mean, m2


class _numba_threads:
    """Run numba's parallel regions on at most ``n`` threads (numba's own limit applies too)."""

    def __init__(self, n: int):
        self.n = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))

    def __enter__(self):
        self.previous = numba.get_num_threads()
        numba.set_num_threads(self.n)

    def __exit__(self, *exc_info):
        numba.set_num_threads(self.previous)
