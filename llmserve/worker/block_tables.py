"""A host copy of the scheduled sequences' block tables, kept between steps.

Converting every block id of every sequence from Python ints each step cost ~0.5 ms at
256 sequences (more than the rest of the input preparation). Block tables only grow while
a sequence runs, so each sequence keeps a row here and a step copies just its new ids. A
preempted sequence (its table cleared and rebuilt) gets a fresh row, keyed by its
preemption count; rows of finished sequences are recycled.
"""

from __future__ import annotations

import numpy as np

from llmserve.core.sequence import Sequence


class BlockTableRows:
    """Rows of block ids, one per live sequence; `gather` returns a [B, max_blocks] batch."""

    def __init__(self, num_rows: int = 64, num_cols: int = 64):
        self.table = np.zeros((num_rows, num_cols), dtype=np.int64)
        self.row_of: dict[tuple[int, int], int] = {}  # (id(seq), preemptions) -> row
        self.owner: dict[int, Sequence] = {}  # row -> sequence
        self.length: dict[int, int] = {}  # row -> block ids copied so far
        self.free_rows = list(range(num_rows - 1, -1, -1))

    def gather(self, seqs: list[Sequence]) -> np.ndarray:
        """[B, W] block ids of `seqs` (zero padded), W the longest table."""
        rows = [self._sync(seq) for seq in seqs]
        width = max(len(seq.block_table) for seq in seqs)
        return self.table[rows, :width]

    def _sync(self, seq: Sequence) -> int:
        key = (id(seq), seq.num_preemptions)
        row = self.row_of.get(key)  # rows hold their sequence, so its id is not reused meanwhile
        if row is None:
            row = self._new_row(key, seq)
        have, table = self.length[row], seq.block_table
        if len(table) > have:
            if len(table) > self.table.shape[1]:
                self._grow(cols=2 * len(table))
            self.table[row, have:len(table)] = table[have:]
            self.length[row] = len(table)
        return row

    def _new_row(self, key: tuple[int, int], seq: Sequence) -> int:
        if not self.free_rows:
            self._recycle()
        if not self.free_rows:
            self._grow(rows=2 * self.table.shape[0])
        row = self.free_rows.pop()
        self.row_of[key], self.owner[row], self.length[row] = row, seq, 0
        self.table[row] = 0
        return row

    def _recycle(self) -> None:
        """Free the rows of sequences that finished or were preempted since they got them."""
        for key, row in list(self.row_of.items()):
            seq = self.owner[row]
            if seq.is_finished or seq.num_preemptions != key[1]:
                del self.row_of[key], self.owner[row], self.length[row]
                self.free_rows.append(row)

    def _grow(self, rows: int = 0, cols: int = 0) -> None:
        old = self.table
        self.table = np.zeros((max(rows, old.shape[0]), max(cols, old.shape[1])), dtype=np.int64)
        self.table[:old.shape[0], :old.shape[1]] = old
        self.free_rows.extend(range(self.table.shape[0] - 1, old.shape[0] - 1, -1))
