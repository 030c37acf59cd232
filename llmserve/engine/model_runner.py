"""Turns a SchedulerOutput into flat batch tensors, runs the model and samples.

Owns the model, the KV cache (one preallocated tensor, views per layer) and the
sampler. One device-to-host transfer of sampled ids (and logprobs) per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llmserve.checkpoint.model_config import ModelConfig
from llmserve.config import CacheConfig, DeviceConfig
from llmserve.engine.sampler import Sampler
from llmserve.engine.scheduler import SchedulerOutput
from llmserve.engine.sequence import Sequence
from llmserve.ops.attention import AttentionMetadata

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(slots=True)
class SampledToken:
    """One sampled token with its log-probabilities when the request asked for them."""

    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass(slots=True)
class BatchInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [B_sample]: last token of each sampling sequence
    order: list[int]  # schedule index of each sequence in batch order (decodes first)
    sample_seqs: list[Sequence]  # sampling sequences, in batch order


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * config.head_dim * elem


class ModelRunner:
    """Executes one scheduled step on the model and returns the sampled tokens."""

    def __init__(self, model: torch.nn.Module, config: ModelConfig, cache_config: CacheConfig,
                 device_config: DeviceConfig, num_blocks: int, max_model_len: int = 0, max_num_seqs: int = 0):
        self.model = model
        self.config = config
        self.block_size = cache_config.block_size
        self.device = torch.device(device_config.device)
        self.dtype = DTYPES[device_config.dtype]
        self.num_blocks = num_blocks
        # [L, 2, N + 1, S, Hkv, D]: one allocation, each layer gets a view; the extra
        # block is scratch space that padded CUDA-graph rows write into
        self.kv_cache = torch.zeros(
            config.num_hidden_layers, 2, num_blocks + 1, self.block_size,
            config.num_key_value_heads, config.head_dim, dtype=self.dtype, device=self.device)
        self.kv_caches = list(self.kv_cache.unbind(0))
        self.sampler = Sampler(eos_token_ids=config.eos_token_id)
        self.graphs = None
        if self.device.type == "cuda" and not device_config.enforce_eager and max_num_seqs:
            from llmserve.engine.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(model, self.kv_caches, max_num_seqs, -(-max_model_len // self.block_size),
                                       scratch_block=num_blocks, block_size=self.block_size)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> list[SampledToken]:
        """Run the step; returns one SampledToken per sampling sequence, in schedule order."""
        batch = self.prepare_inputs(out)
        hidden = self._forward(batch)
        if not batch.sample_seqs:
            return []
        logits = self.model.compute_logits(hidden[batch.logits_indices])  # [B, V]
        sampled = self._sample(logits, batch.sample_seqs)
        by_seq = dict(zip(map(id, batch.sample_seqs), sampled))
        return [by_seq[id(seq)] for i, seq in enumerate(out.seqs) if out.samples(i)]

    def _forward(self, batch: BatchInputs) -> torch.Tensor:
        num_seqs = len(batch.meta.query_lens_host)
        decode_only = batch.meta.num_decodes == num_seqs
        if self.graphs is not None and decode_only and self.graphs.bucket(num_seqs) is not None:
            return self.graphs.run(batch.input_ids, batch.positions, batch.meta)
        return self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta)

    def prepare_inputs(self, out: SchedulerOutput) -> BatchInputs:
        """Flatten scheduled sequences (decodes first) into the model's input tensors."""
        order = sorted(range(len(out.seqs)), key=lambda i: out.num_scheduled_tokens[i] != 1)
        input_ids, positions, slots, tables = [], [], [], []
        query_lens, context_lens, logits_indices, sample_seqs = [], [], [], []
        block_size = self.block_size
        for i in order:
            seq, num_new = out.seqs[i], out.num_scheduled_tokens[i]
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new
            if num_new == 1:  # the common decode case, without per-token generators
                input_ids.append(seq.token_at(start))
                positions.append(start)
                slots.append(seq.block_table[start // block_size] * block_size + start % block_size)
            else:
                input_ids.extend(seq.token_ids()[start:end])
                positions.extend(range(start, end))
                slots.extend(self._slot(seq, p) for p in range(start, end))
            tables.append(seq.block_table)
            query_lens.append(num_new)
            context_lens.append(end)
            if out.samples(i):
                logits_indices.append(len(input_ids) - 1)
                sample_seqs.append(seq)
        num_decodes = sum(1 for n in query_lens if n == 1)
        ids, pos, slot, ctx, qsl, logit_idx, table = self._to_device(
            [input_ids, positions, slots, context_lens, _cumsum0(query_lens), logits_indices], _pad(tables))
        meta = AttentionMetadata(
            slot_mapping=slot, block_tables=table, context_lens=ctx, query_start_loc=qsl,
            num_decodes=num_decodes, max_context_len=max(context_lens),
            query_lens_host=query_lens, context_lens_host=context_lens)
        return BatchInputs(input_ids=ids, positions=pos, meta=meta, logits_indices=logit_idx,
                           order=order, sample_seqs=sample_seqs)

    def _slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def _to_device(self, vectors: list[list[int]], table: np.ndarray) -> list[torch.Tensor]:
        """One host-to-device copy of every int input; the int32 ones are cast on the device."""
        sizes = [len(v) for v in vectors] + [table.size]
        flat = np.empty(sum(sizes), dtype=np.int64)
        offset = 0
        for vector in vectors:
            flat[offset:offset + len(vector)] = vector
            offset += len(vector)
        flat[offset:] = table.ravel()
        host = torch.from_numpy(flat)
        if self.device.type == "cuda":
            host = host.pin_memory().to(self.device, non_blocking=True)
        ids, pos, slot, ctx, qsl, logit_idx, table_flat = host.split(sizes)
        as_int32 = [t.to(torch.int32) for t in (ctx, qsl, table_flat)]
        return [ids, pos, slot, as_int32[0], as_int32[1], logit_idx, as_int32[2].view(table.shape)]

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampledToken]:
        for seq in seqs:
            if seq.params.seed is not None and seq.generator is None:
                seq.generator = torch.Generator(device=self.device).manual_seed(seq.params.seed)
        result = self.sampler(logits, seqs)
        return _to_host(result, seqs)


def _to_host(result, seqs: list[Sequence]) -> list[SampledToken]:
    # One transfer: pack everything the host needs into a single tensor.
    token_ids = result.token_ids.tolist() if result.logprobs is None else None
    if token_ids is not None:
        return [SampledToken(t) for t in token_ids]
    parts = [result.token_ids.double().unsqueeze(1), result.logprobs.double().unsqueeze(1)]
    if result.top_token_ids is not None:
        parts += [result.top_token_ids.double(), result.top_logprobs.double()]
    packed = torch.cat(parts, dim=1).cpu().tolist()
    k = 0 if result.top_token_ids is None else result.top_token_ids.shape[1]
    tokens = []
    for row, seq in zip(packed, seqs):
        token = SampledToken(int(row[0]))
        if seq.params.logprobs is not None:
            token.logprob = row[1]
            n = min(seq.params.logprobs, k)
            token.top_logprobs = [(int(row[2 + j]), row[2 + k + j]) for j in range(n)]
        tokens.append(token)
    return tokens


def _pad(tables: list[list[int]]) -> np.ndarray:
    """Block tables as one [B, max_blocks] array, zero padded."""
    out = np.zeros((len(tables), max(len(t) for t in tables)), dtype=np.int64)
    for row, table in zip(out, tables):
        row[:len(table)] = table
    return out


def _cumsum0(values: list[int]) -> list[int]:
    out = [0]
    for v in values:
        out.append(out[-1] + v)
    return out
