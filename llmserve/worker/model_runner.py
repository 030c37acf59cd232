"""Turns a SchedulerOutput into flat batch tensors, runs the model and samples.

Owns the model, the KV cache (one preallocated tensor, views per layer), the sampler and
the per-request state it builds inputs from (request_state.py: token ids, block tables,
keyed by request id). One device-to-host transfer of sampled ids (and logprobs) per step.
`launch` queues a step on the device and returns at once; `collect` waits for its tokens
and returns them as a plain-data ModelRunnerOutput. Between the two the host can schedule
and launch the next step, whose decode inputs may be tokens still on the device: they are
copied there from the previous step's samples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import accumulate

import numpy as np
import torch

from llmserve.checkpoint.model_config import ModelConfig
from llmserve.config import CacheConfig, DeviceConfig
from llmserve.core.messages import PromptLogprobs, TokenLogprobs
from llmserve.core.scheduler_output import GrammarBitmask, ModelRunnerOutput, SchedulerOutput
from llmserve.core.sequence import PLACEHOLDER
from llmserve.ops.attention import AttentionMetadata
from llmserve.worker.prompt_logprobs import PromptScoring, score_prompt_tokens
from llmserve.worker.request_state import RequestState, RequestStates
from llmserve.worker.sampler import Sampler

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(slots=True)
class LaunchedStep:
    """A step queued on the device: its sampled ids there, and their copy on the way to the host."""

    sampled: list[tuple[RequestState, int]]  # each sampling request and the index of its pending output, batch order
    token_ids: torch.Tensor | None  # [B_sample] on the device; the next step's in-flight decode inputs
    host: torch.Tensor | None  # the packed copy being made (pinned on CUDA)
    ready: object | None  # a CUDA event recorded after that copy
    num_top: int  # top logprobs per row in `host`
    has_logprobs: bool
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)  # scored now (a host sync)


@dataclass(slots=True)
class ForwardStep:
    """A step whose forward pass is queued and whose tokens are not sampled yet."""

    logits: torch.Tensor | None  # [B_sample, V]; None when nothing samples
    states: list[RequestState]  # the sampling requests, in row order
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)


# returns the step's grammar masks when called (None: no constrained request)
GrammarSource = Callable[[], GrammarBitmask | None]


@dataclass(slots=True)
class BatchInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [B_sample]: last token of each sampling request
    sample_states: list[RequestState]  # sampling requests, in batch order
    prompt_scoring: PromptScoring | None = None  # rows whose logits score the next prompt token


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
        self.requests = RequestStates(num_rows=2 * max(max_num_seqs, 32))
        self.graphs = None
        if self.device.type == "cuda" and not device_config.enforce_eager and max_num_seqs:
            from llmserve.worker.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(model, self.kv_caches, max_num_seqs, -(-max_model_len // self.block_size),
                                       scratch_block=num_blocks, block_size=self.block_size)

    def execute(self, out: SchedulerOutput, grammar_bitmask: GrammarSource | None = None) -> ModelRunnerOutput:
        """Run the step and wait for its samples."""
        return self.collect(self.launch(out, grammar_bitmask=grammar_bitmask))

    def launch(self, out: SchedulerOutput, previous: LaunchedStep | None = None,
               grammar_bitmask: GrammarSource | None = None) -> LaunchedStep:
        """Queue the step on the device (CPU: run it); `previous` supplies in-flight decode inputs.
        `grammar_bitmask` is called once the forward pass is queued (on CPU: done), just before sampling,
        so the caller can compute the masks meanwhile (e.g. it returns a future's result)."""
        forward = self.launch_forward(out, previous)
        return self.launch_sampling(forward, grammar_bitmask() if grammar_bitmask is not None else None)

    @torch.inference_mode()
    def launch_forward(self, out: SchedulerOutput, previous: LaunchedStep | None = None) -> ForwardStep:
        """The first half of `launch`: inputs, forward pass and logits, nothing sampled yet."""
        batch = self.prepare_inputs(out, previous)
        if batch is None:
            return ForwardStep(None, [])
        hidden = self._forward(batch)
        scored = self.score_prompts(hidden, batch)
        if hidden is None or not batch.sample_states:  # None: a pipeline stage before the last (profiling run)
            return ForwardStep(None, [], scored)
        logits = self.model.compute_logits(hidden[batch.logits_indices])  # [B, V]
        return ForwardStep(logits, batch.sample_states, scored)

    @torch.inference_mode()
    def launch_sampling(self, forward: ForwardStep, grammar_bitmask: GrammarBitmask | None = None) -> LaunchedStep:
        """The second half of `launch`: sample from the step's logits, within the grammar masks."""
        if forward.logits is None:
            return LaunchedStep([], None, None, None, 0, False, forward.prompt_logprobs)
        step = self.sample(forward.logits, forward.states, grammar_bitmask)
        step.prompt_logprobs = forward.prompt_logprobs
        return step

    def score_prompts(self, hidden: torch.Tensor | None, batch: BatchInputs, keep: bool = True
                      ) -> list[PromptLogprobs]:
        """Log-probabilities of the prompt tokens this step's prefill rows predict, for the requests that
        asked; every tensor rank of the last stage joins the logits' gather, only `keep` ones score."""
        scoring = batch.prompt_scoring
        if hidden is None or scoring is None:
            return []
        rows = torch.tensor(scoring.rows, device=hidden.device)
        logits = self.model.compute_logits(hidden[rows])  # [R, V]
        return score_prompt_tokens(logits, scoring) if keep else []

    def sample(self, logits: torch.Tensor, states: list[RequestState],
               grammar_bitmask: GrammarBitmask | None = None) -> LaunchedStep:
        """Sample a token per row of `logits` [B, V], leave a placeholder in each request until `collect`."""
        result = self.sampler(logits, states, grammar_masks(grammar_bitmask, states, logits))
        sampled = []
        for row, state in enumerate(states):  # after sampling: it counts outputs so far
            state.last_sample_row = row
            sampled.append((state, len(state.output_token_ids)))
            state.output_token_ids.append(PLACEHOLDER)
        return _start_copy(sampled, result)

    def collect(self, step: LaunchedStep, result: ModelRunnerOutput | None = None) -> ModelRunnerOutput:
        """Wait for the step's samples, record them in the requests' state, return them as plain data.
        `result`: `wait_samples(step)`, when the caller has waited already."""
        result = result if result is not None else self.wait_samples(step)
        for (state, index), token_id in zip(step.sampled, result.sampled_token_ids):
            state.output_token_ids[index] = token_id  # harmless if the request was dropped meanwhile
        return result

    @staticmethod
    def wait_samples(step: LaunchedStep) -> ModelRunnerOutput:
        """Wait for the step's samples and return them without recording them: another thread may do
        this while the next step is being launched."""
        if not step.sampled:
            return ModelRunnerOutput(prompt_logprobs=step.prompt_logprobs)
        result = _finish_copy(step)
        result.prompt_logprobs = step.prompt_logprobs
        return result

    def _forward(self, batch: BatchInputs) -> torch.Tensor:
        num_seqs = len(batch.meta.query_lens_host)
        decode_only = batch.meta.num_decodes == num_seqs
        if self.graphs is not None and decode_only and self.graphs.bucket(num_seqs) is not None:
            return self.graphs.run(batch.input_ids, batch.positions, batch.meta)
        return self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta)

    def prepare_inputs(self, out: SchedulerOutput, previous: LaunchedStep | None = None) -> BatchInputs | None:
        """Apply the step to the request states, then flatten its requests (decodes first) into the
        model's input tensors; None when nothing is scheduled."""
        self.requests.update(out)
        if out.is_empty:
            return None
        scheduled = out.num_scheduled_tokens.items()
        decodes = [item for item in scheduled if item[1] == 1]
        order = decodes + [item for item in scheduled if item[1] != 1]
        input_ids, positions, slots, request_ids = [], [], [], []
        query_lens, context_lens, logits_indices, sample_states = [], [], [], []
        fill_rows, fill_sources = [], []  # in-flight decode inputs <- rows of previous.token_ids
        scoring = PromptScoring()
        states, sampling, block_size = self.requests.states, out.sampling_request_ids, self.block_size
        for request_id, num_new in order:
            state = states[request_id]
            start = state.num_computed_tokens
            end = start + num_new
            if num_new == 1:  # the common decode case, without per-token generators
                token = state.token_at(start)
                if token == PLACEHOLDER:
                    assert previous is not None, f"{request_id}: a token in flight but no previous step"
                    fill_rows.append(len(input_ids))
                    fill_sources.append(state.last_sample_row)
                    token = 0
                input_ids.append(token)
                positions.append(start)
                slots.append(state.block_ids[start // block_size] * block_size + start % block_size)
            else:
                input_ids.extend(state.token_slice(start, end))
                positions.extend(range(start, end))
                slots.extend(state.slot(p, block_size) for p in range(start, end))
            request_ids.append(request_id)
            if state.params.prompt_logprobs is not None:
                scoring.add(state, start, end, len(input_ids) - num_new)
            query_lens.append(num_new)
            context_lens.append(end)
            if request_id in sampling:
                logits_indices.append(len(input_ids) - 1)
                sample_states.append(state)
        query_start_loc = list(accumulate(query_lens, initial=0))
        ids, pos, slot, ctx, qsl, logit_idx, rows, sources, table = self._to_device(
            [input_ids, positions, slots, context_lens, query_start_loc, logits_indices, fill_rows, fill_sources],
            self.requests.block_rows.gather(request_ids))
        if fill_rows:  # on the device: no wait for the previous step
            ids.index_copy_(0, rows, previous.token_ids.index_select(0, sources))
        meta = AttentionMetadata(
            slot_mapping=slot, block_tables=table, context_lens=ctx, query_start_loc=qsl,
            num_decodes=len(decodes), max_context_len=max(context_lens),
            query_lens_host=query_lens, context_lens_host=context_lens)
        return BatchInputs(input_ids=ids, positions=pos, meta=meta, logits_indices=logit_idx,
                           sample_states=sample_states, prompt_scoring=scoring if scoring.rows else None)

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


def grammar_masks(bitmask: GrammarBitmask | None, states: list[RequestState], logits: torch.Tensor
                  ) -> torch.Tensor | None:
    """The sampler's grammar masks on the logits' device: [M, W + 1] int32, a packed row per constrained
    request followed by its row in the batch (past the batch when it is not sampled this step). One copy
    to the device, pinned, not waiting for the forward pass."""
    if bitmask is None or not bitmask.request_ids:
        return None
    num_masks = len(bitmask.request_ids)
    num_words = len(bitmask.words) // 4 // num_masks
    assert num_words * 32 >= logits.shape[1], "the grammar bitmask is narrower than the vocabulary"
    batch_row = {state.request_id: i for i, state in enumerate(states)}
    host = torch.empty((num_masks, num_words + 1), dtype=torch.int32, pin_memory=logits.is_cuda)
    packed = host.numpy()
    packed[:, :num_words] = np.frombuffer(bitmask.words, dtype=np.int32).reshape(num_masks, num_words)
    packed[:, num_words] = [batch_row.get(request_id, len(states)) for request_id in bitmask.request_ids]
    return host.to(logits.device, non_blocking=True)


def _start_copy(sampled: list[tuple[RequestState, int]], result) -> LaunchedStep:
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
    return LaunchedStep(sampled, result.token_ids, host, ready, k, has_logprobs)


def _finish_copy(step: LaunchedStep) -> ModelRunnerOutput:
    if step.ready is not None:
        step.ready.synchronize()
    request_ids = [state.request_id for state, _ in step.sampled]
    if not step.has_logprobs:
        return ModelRunnerOutput(request_ids, step.host.view(-1).tolist())
    rows, k = step.host.tolist(), step.num_top
    logprobs = []
    for row, (state, _) in zip(rows, step.sampled):
        asked = state.params.logprobs
        top = None if asked is None else [(int(row[2 + j]), row[2 + k + j]) for j in range(min(asked, k))]
        logprobs.append(None if asked is None else TokenLogprobs(row[1], top))
    return ModelRunnerOutput(request_ids, [int(row[0]) for row in rows], logprobs)
