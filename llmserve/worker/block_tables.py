"""A host copy of the running requests' block tables, kept between steps, keyed by request id.

Converting every block id of every request from Python ints each step cost ~0.5 ms at
256 requests (more than the rest of the input preparation). Block tables only grow while
a request runs, so each request keeps a row here and a step copies just its new ids. The
runner adds a row when a request arrives (new, or resumed after preemption) and removes it
when the scheduler says the request finished or was preempted.
"""

from __future__ import annotations

import numpy as np


class BlockTableRows:
    """Rows of block ids, one per request; `gather` returns a [B, max_blocks] batch."""

    def __init__(self, num_rows: int = 64, num_cols: int = 64):
        self.table = np.zeros((num_rows, num_cols), dtype=np.int64)
        self.lengths = np.zeros(num_rows, dtype=np.int64)  # block ids held by each row
        self.row_of: dict[str, int] = {}
        self.free_rows = list(range(num_rows - 1, -1, -1))

    def add(self, request_id: str, block_ids: list[int]) -> None:
        """A row for a request the runner has just taken on."""
        assert request_id not in self.row_of, f"request {request_id} already has a block-table row"
        if not self.free_rows:
            self._grow(rows=2 * self.table.shape[0])
        row = self.free_rows.pop()
        self.row_of[request_id] = row
        self.lengths[row] = 0
        self.table[row] = 0  # the padding past the request's blocks is zeros, whoever had the row before
        self.extend(request_id, block_ids)

    def extend(self, request_id: str, block_ids: list[int]) -> None:
        """Append the blocks the request got this step."""
        row = self.row_of[request_id]
        have = int(self.lengths[row])
        end = have + len(block_ids)
        if end > self.table.shape[1]:
            self._grow(cols=2 * end)
        self.table[row, have:end] = block_ids
        self.lengths[row] = end

    def remove(self, request_id: str) -> None:
        """Free the request's row; unknown ids are ignored."""
        row = self.row_of.pop(request_id, None)
        if row is not None:
            self.free_rows.append(row)

    def gather(self, request_ids: list[str]) -> np.ndarray:
        """[B, W] block ids of the requests, zero padded; W the longest of their tables."""
        rows = [self.row_of[request_id] for request_id in request_ids]
        width = int(self.lengths[rows].max())
        return self.table[rows, :width]

    def _grow(self, rows: int = 0, cols: int = 0) -> None:
        old = self.table
        self.table = np.zeros((max(rows, old.shape[0]), max(cols, old.shape[1])), dtype=np.int64)
        self.table[:old.shape[0], :old.shape[1]] = old
        self.lengths = np.concatenate([self.lengths, np.zeros(self.table.shape[0] - old.shape[0], dtype=np.int64)])
        self.free_rows.extend(range(self.table.shape[0] - 1, old.shape[0] - 1, -1))
