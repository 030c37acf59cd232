"""The runner's persistent host block tables against a freshly padded copy, under growth,
preemption, finishing and new arrivals (plain numpy, no model)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from llmserve.worker.block_tables import BlockTableRows
from llmserve.core.sequence import Sequence, SequenceStatus
from llmserve.sampling_params import SamplingParams


def padded(seqs: list[Sequence]) -> np.ndarray:
    out = np.zeros((len(seqs), max(len(s.block_table) for s in seqs)), dtype=np.int64)
    for row, seq in zip(out, seqs):
        row[:len(seq.block_table)] = seq.block_table
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["grow", "preempt", "finish", "arrive"]), st.integers(0, 10**6)),
                min_size=1, max_size=120))
def test_gathered_rows_always_equal_the_sequences_tables(ops):
    rows = BlockTableRows(num_rows=2, num_cols=2)  # tiny, so rows and columns must grow and recycle
    live: list[Sequence] = []
    for step, (op, value) in enumerate(ops):
        if op == "arrive" or not live:
            live.append(Sequence(f"s{step}", [1], SamplingParams()))
            live[-1].block_table.append(value % 1000)
        seq = live[value % len(live)]
        if op == "grow":
            seq.block_table.extend(range(value % 7, value % 7 + value % 5 + 1))
        elif op == "preempt":  # the scheduler frees the table and rebuilds it later
            seq.block_table.clear()
            seq.num_preemptions += 1
            seq.block_table.append(value % 999 + 1)
        elif op == "finish" and len(live) > 1:
            seq.status = SequenceStatus.FINISHED
            live.remove(seq)
        batch = live[value % len(live):] + live[:value % len(live)]  # any order, any subset
        batch = batch[:1 + value % len(batch)]
        assert np.array_equal(rows.gather(batch), padded(batch))
    assert len(rows.row_of) <= rows.table.shape[0]
