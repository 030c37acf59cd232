"""CUDA graphs for decode-only steps at bucketed batch sizes.

A decode step launches hundreds of small kernels; replaying a captured graph removes
their launch cost. Each bucket owns static input buffers; a smaller batch is padded up
to its bucket with rows that write into a scratch KV block nobody reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmserve.ops.attention import AttentionMetadata


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_num_seqs."""
    sizes = [b for b in (1, 2, 4, 8) if b <= max_num_seqs]
    sizes += list(range(16, max_num_seqs + 1, 16))
    if sizes[-1] < max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


@dataclass(slots=True)
class _Graph:
    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor  # [B]
    positions: torch.Tensor  # [B]
    slot_mapping: torch.Tensor  # [B]
    block_tables: torch.Tensor  # [B, max_blocks]
    context_lens: torch.Tensor  # [B]
    hidden: torch.Tensor  # [B, E]: the captured output


class DecodeGraphs:
    """Captured decode forwards, one per bucket; `run` pads, copies inputs and replays."""

    def __init__(self, model, kv_caches: list[torch.Tensor], max_num_seqs: int, max_blocks_per_seq: int,
                 scratch_block: int, block_size: int):
        self.model = model
        self.kv_caches = kv_caches
        self.max_blocks = max_blocks_per_seq
        self.scratch_slot = scratch_block * block_size
        self.scratch_block = scratch_block
        self.graphs: dict[int, _Graph] = {}
        self.pool = None
        for size in reversed(graph_batch_sizes(max_num_seqs)):  # largest first: shares its pool
            self.graphs[size] = self._capture(size)

    def bucket(self, batch_size: int) -> int | None:
        return next((size for size in sorted(self.graphs) if size >= batch_size), None)

    def run(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        """Decode hidden states [B, E] for a decode-only batch of B <= max bucket."""
        b = input_ids.shape[0]
        g = self.graphs[self.bucket(b)]
        g.input_ids[:b].copy_(input_ids)
        g.positions[:b].copy_(positions)
        g.slot_mapping[:b].copy_(meta.slot_mapping)
        g.context_lens[:b].copy_(meta.context_lens)
        width = meta.block_tables.shape[1]
        g.block_tables[:b, :width].copy_(meta.block_tables)
        self._pad(g, b)
        g.graph.replay()
        return g.hidden[:b]

    def _pad(self, g: _Graph, b: int) -> None:
        g.input_ids[b:].zero_()
        g.positions[b:].zero_()
        g.slot_mapping[b:].fill_(self.scratch_slot)
        g.context_lens[b:].fill_(1)
        g.block_tables[b:].fill_(self.scratch_block)

    def _capture(self, size: int) -> _Graph:
        device = self.kv_caches[0].device
        g = _Graph(
            graph=torch.cuda.CUDAGraph(),
            input_ids=torch.zeros(size, dtype=torch.int64, device=device),
            positions=torch.zeros(size, dtype=torch.int64, device=device),
            slot_mapping=torch.full((size,), self.scratch_slot, dtype=torch.int64, device=device),
            block_tables=torch.full((size, self.max_blocks), self.scratch_block, dtype=torch.int32, device=device),
            context_lens=torch.ones(size, dtype=torch.int32, device=device),
            hidden=None,
        )
        meta = AttentionMetadata(
            slot_mapping=g.slot_mapping, block_tables=g.block_tables, context_lens=g.context_lens,
            query_start_loc=torch.arange(size + 1, dtype=torch.int32, device=device),
            num_decodes=size, max_context_len=self.max_blocks, query_lens_host=[1] * size,
            context_lens_host=[1] * size)
        for _ in range(2):  # warm up (Triton autotune / compile) outside the capture
            self.model(g.input_ids, g.positions, self.kv_caches, meta)
        torch.cuda.synchronize()
        with torch.cuda.graph(g.graph, pool=self.pool):
            g.hidden = self.model(g.input_ids, g.positions, self.kv_caches, meta)
        self.pool = g.graph.pool()
        return g
