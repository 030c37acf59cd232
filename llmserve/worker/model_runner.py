"""Turns a SchedulerOutput into flat batch tensors, runs the model and samples.

Owns the model, the KV cache (one preallocated tensor, views per layer) and the
sampler. One device-to-host transfer of sampled ids (and logprobs) per step. `launch`
queues a step on the device and returns at once; `collect` waits for its tokens. Between
the two the host can schedule and launch the next step, whose decode inputs may be
placeholders: their ids are copied on the device from the previous step's samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llmserve.checkpoint.model_config import ModelConfig
from llmserve.config import CacheConfig, DeviceConfig
from llmserve.worker.block_tables import BlockTableRows
from llmserve.worker.sampler import Sampler
from llmserve.core.scheduler import SchedulerOutput
from llmserve.core.sequence import PLACEHOLDER, Sequence
from llmserve.ops.attention import AttentionMetadata

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(slots=True)
class SampledToken:
    """One sampled token with its log-probabilities when the request asked for them."""

    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass(slots=True)
class LaunchedStep:
    """A step queued on the device: its sampled ids there, and their copy on the way to the host."""

    out: SchedulerOutput
    sample_seqs: list[Sequence]  # in batch order, matching the rows of token_ids
    token_ids: torch.Tensor | None  # [B_sample] on the device; the next step's placeholder inputs
    host: torch.Tensor | None  # the packed copy being made (pinned on CUDA)
    ready: object | None  # a CUDA event recorded after that copy
    num_top: int  # top logprobs per row in `host`
    has_logprobs: bool

    def row_of(self) -> dict[int, int]:
        return {id(seq): row for row, seq in enumerate(self.sample_seqs)}


@dataclass(slots=True)
class BatchInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [B_sample]: last token of each sampling sequence
    order: list[int]  # schedule index of each sequence in batch order (decodes first)
    sample_seqs: list[Sequence]  # sampling sequences, in batch order


def kv_cache_dtype(cache_config: CacheConfig, device_config: DeviceConfig) -> torch.dtype:
    return torch.float8_e4m3fn if cache_config.kv_cache_dtype == "fp8" else DTYPES[device_config.dtype]


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
            config.num_key_value_heads, config.head_dim, dtype=kv_cache_dtype(cache_config, device_config),
            device=self.device)
        self.kv_caches = list(self.kv_cache.unbind(0))
        self.sampler = Sampler(eos_token_ids=config.eos_token_id)
        self.block_rows = BlockTableRows(num_rows=2 * max(max_num_seqs, 32))
        self.graphs = None
        if self.device.type == "cuda" and not device_config.enforce_eager and max_num_seqs:
            from llmserve.worker.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(model, self.kv_caches, max_num_seqs, -(-max_model_len // self.block_size),
                                       scratch_block=num_blocks, block_size=self.block_size)

    def execute(self, out: SchedulerOutput) -> list[SampledToken]:
        """Run the step; returns one SampledToken per sampling sequence, in schedule order."""
        return self.collect(self.launch(out))

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, previous: LaunchedStep | None = None) -> LaunchedStep:
        """Queue the step on the device (CPU: run it); `previous` supplies placeholder inputs."""
        batch = self.prepare_inputs(out, previous)
        hidden = self._forward(batch)
        if not batch.sample_seqs:
            return LaunchedStep(out, [], None, None, None, 0, False)
        logits = self.model.compute_logits(hidden[batch.logits_indices])  # [B, V]
        result = self.sampler(logits, batch.sample_seqs)
        return _start_copy(out, batch.sample_seqs, result)

    def collect(self, step: LaunchedStep) -> list[SampledToken]:
        """Wait for the step's samples; one SampledToken per sampling sequence, in schedule order."""
        if not step.sample_seqs:
            return []
        sampled = _finish_copy(step)
        by_seq = dict(zip(map(id, step.sample_seqs), sampled))
        return [by_seq[id(seq)] for i, seq in enumerate(step.out.seqs) if step.out.samples(i)]

    def _forward(self, batch: BatchInputs) -> torch.Tensor:
        num_seqs = len(batch.meta.query_lens_host)
        decode_only = batch.meta.num_decodes == num_seqs
        if self.graphs is not None and decode_only and self.graphs.bucket(num_seqs) is not None:
            return self.graphs.run(batch.input_ids, batch.positions, batch.meta)
        return self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta)

    def prepare_inputs(self, out: SchedulerOutput, previous: LaunchedStep | None = None) -> BatchInputs:
        """Flatten scheduled sequences (decodes first) into the model's input tensors."""
        order = sorted(range(len(out.seqs)), key=lambda i: out.num_scheduled_tokens[i] != 1)
        input_ids, positions, slots, batch_seqs = [], [], [], []
        query_lens, context_lens, logits_indices, sample_seqs = [], [], [], []
        fill_rows, fill_sources = [], []  # placeholder inputs <- rows of previous.token_ids
        previous_row = previous.row_of() if previous is not None else {}
        block_size = self.block_size
        for i in order:
            seq, num_new = out.seqs[i], out.num_scheduled_tokens[i]
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new
            if num_new == 1:  # the common decode case, without per-token generators
                token = seq.token_at(start)
                if token == PLACEHOLDER:
                    fill_rows.append(len(input_ids))
                    fill_sources.append(previous_row[id(seq)])
                    token = 0
                input_ids.append(token)
                positions.append(start)
                slots.append(seq.block_table[start // block_size] * block_size + start % block_size)
            else:
                input_ids.extend(seq.token_ids()[start:end])
                positions.extend(range(start, end))
                slots.extend(self._slot(seq, p) for p in range(start, end))
            batch_seqs.append(seq)
            query_lens.append(num_new)
            context_lens.append(end)
            if out.samples(i):
                logits_indices.append(len(input_ids) - 1)
                sample_seqs.append(seq)
        num_decodes = sum(1 for n in query_lens if n == 1)
        ids, pos, slot, ctx, qsl, logit_idx, rows, sources, table = self._to_device(
            [input_ids, positions, slots, context_lens, _cumsum0(query_lens), logits_indices, fill_rows,
             fill_sources], self.block_rows.gather(batch_seqs))
        if fill_rows:  # on the device: no wait for the previous step
            ids.index_copy_(0, rows, previous.token_ids.index_select(0, sources))
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
        ids, pos, slot, ctx, qsl, logit_idx, rows, sources, table_flat = host.split(sizes)
        as_int32 = [t.to(torch.int32) for t in (ctx, qsl, table_flat)]
        return [ids, pos, slot, as_int32[0], as_int32[1], logit_idx, rows, sources, as_int32[2].view(table.shape)]



def _start_copy(out: SchedulerOutput, seqs: list[Sequence], result) -> LaunchedStep:
    """Start the one device-to-host copy of the step: ids, plus logprobs when asked."""
    has_logprobs, k = result.logprobs is not None, 0
    packed = result.token_ids.unsqueeze(1)  # [B, 1]
    if has_logprobs:  # [B, 2 + 2K] as float64: ids, chosen logprob, top ids, top logprobs
        parts = [packed.double(), result.logprobs.double().unsqueeze(1)]
        if result.top_token_ids is not None:
            k = result.top_token_ids.shape[1]
            parts += [result.top_token_ids.double(), result.top_logprobs.double()]
        packed = torch.cat(parts, dim=1)
    host, ready = packed, None
    if packed.is_cuda:
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
    return LaunchedStep(out, seqs, result.token_ids, host, ready, k, has_logprobs)


def _finish_copy(step: LaunchedStep) -> list[SampledToken]:
    if step.ready is not None:
        step.ready.synchronize()
    rows = step.host.tolist()
    if not step.has_logprobs:
        return [SampledToken(row[0]) for row in rows]
    k = step.num_top
    tokens = []
    for row, seq in zip(rows, step.sample_seqs):
        token = SampledToken(int(row[0]))
        if seq.params.logprobs is not None:
            token.logprob = row[1]
            n = min(seq.params.logprobs, k)
            token.top_logprobs = [(int(row[2 + j]), row[2 + k + j]) for j in range(n)]
        tokens.append(token)
    return tokens


def _cumsum0(values: list[int]) -> list[int]:
    out = [0]
    for v in values:
        out.append(out[-1] + v)
    return out
