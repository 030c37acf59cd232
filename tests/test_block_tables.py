"""The runner's persistent host block tables, keyed by request id, against a freshly padded copy,
under growth, preemption (row dropped, request back later under the same id), finishing and new
arrivals (plain numpy, no model)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmserve.worker.block_tables import BlockTableRows


def padded(tables: list[list[int]]) -> np.ndarray:
    out = np.zeros((len(tables), max(map(len, tables))), dtype=np.int64)
    for row, table in zip(out, tables):
        row[:len(table)] = table
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["grow", "preempt", "finish", "arrive"]), st.integers(0, 10**6)),
                min_size=1, max_size=120))
def test_gathered_rows_always_equal_the_requests_tables(ops):
    rows = BlockTableRows(num_rows=2, num_cols=2)  # tiny, so rows and columns must grow and recycle
    tables: dict[str, list[int]] = {}  # the reference: what the runner's states hold
    for step, (op, value) in enumerate(ops):
        if op == "arrive" or not tables:
            tables[f"r{step}"] = [value % 1000]
            rows.add(f"r{step}", tables[f"r{step}"])
        live = list(tables)
        request_id = live[value % len(live)]
        if op == "grow":
            new = list(range(value % 7, value % 7 + value % 5 + 1))
            tables[request_id] += new
            rows.extend(request_id, new)
        elif op == "preempt":  # the runner drops the row; the request comes back as new, same id
            rows.remove(request_id)
            tables[request_id] = [value % 999 + 1]
            rows.add(request_id, tables[request_id])
        elif op == "finish" and len(tables) > 1:
            rows.remove(request_id)
            del tables[request_id]
        live = list(tables)
        batch = live[value % len(live):] + live[:value % len(live)]  # any order, any subset
        batch = batch[:1 + value % len(batch)]
        assert np.array_equal(rows.gather(batch), padded([tables[r] for r in batch]))
    assert len(rows.row_of) == len(tables) <= rows.table.shape[0]


def test_finished_rows_are_reused_and_unknown_ids_ignored():
    rows = BlockTableRows(num_rows=2, num_cols=4)
    rows.add("a", [5, 6, 7])
    rows.add("b", [1, 2, 3])
    rows.remove("a")
    rows.remove("never-seen")
    rows.add("c", [9])  # takes a's row: its old ids must not show through
    assert rows.table.shape == (2, 4)
    assert rows.gather(["c", "b"]).tolist() == [[9, 0, 0], [1, 2, 3]]
    with pytest.raises(AssertionError, match="already has a block-table row"):
        rows.add("c", [2])
