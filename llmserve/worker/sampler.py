"""Picks the next token of each sequence from its logits, batch-wise and with no host syncs.

Order (as vLLM): logprobs of the raw logits; repetition, presence and frequency penalties;
logit_bias; the grammar bitmask of constrained rows; the min_tokens mask on stop ids; then
greedy rows take the argmax and random rows go through temperature -> top-k -> top-p -> min-p
-> the exponential race.
A seeded row's noise is a counter-based hash of (seed, output position, token id), computed
for all seeded rows at once: the same tokens alone or in any batch, at about the cost of an
unseeded row, and with no generator state to keep.
Shapes: B rows, V vocabulary, L padded token-id length, K top logprobs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from llmserve.ops.exponential_noise import exponential_noise, mix64, signed64
from llmserve.ops.token_bitmask import apply_token_bitmask
from llmserve.sampling_params import SamplingParams


@dataclass(slots=True)
class SamplerOutput:
    """Sampled ids; logprobs are of the raw logits, present when any row asked for them."""

    token_ids: torch.Tensor  # [B] int64, on the logits' device
    logprobs: torch.Tensor | None  # [B] float32: the chosen token's
    top_token_ids: torch.Tensor | None  # [B, K] int64, best first; K = max logprobs asked
    top_logprobs: torch.Tensor | None  # [B, K] float32


class SamplingRow(Protocol):
    """What the sampler reads of each request (the runner's RequestState fits)."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]


class Sampler:
    """Samples one token per row; `eos_token_ids` are hidden (with stop ids) until min_tokens."""

    def __init__(self, eos_token_ids: Sequence[int] = ()):
        self.eos_token_ids = list(eos_token_ids)

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow],
                 grammar_masks: torch.Tensor | None = None) -> SamplerOutput:
        """Sample from `logits` [B, V] (any float dtype; computed in float32); never mutates it.
        `grammar_masks` on the logits' device: the constrained rows' bitmasks with their batch rows
        (`ops.token_bitmask`)."""
        assert logits.dim() == 2 and logits.shape[0] == len(rows), "logits must be [len(rows), V]"
        raw = logits.float()
        logits = apply_penalties(raw, rows)
        logits = apply_logit_bias(logits, rows)
        logits = apply_token_bitmask(logits, grammar_masks)
        logits = mask_stop_ids(logits, rows, self.eos_token_ids)
        token_ids = _pick(logits, rows)
        return _with_logprobs(token_ids, raw, rows)


def _pick(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    greedy_ids = logits.argmax(dim=-1)  # [B]; ties -> lowest id, as HF generate
    if all(row.params.greedy for row in rows):
        return greedy_ids
    is_greedy = _to_device([row.params.greedy for row in rows], torch.bool, logits.device)
    return torch.where(is_greedy, greedy_ids, sample_random(logits, rows))


# ---- penalties ------------------------------------------------------------------------
def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """HF repetition penalty over prompt+output ids; OpenAI presence/frequency over output ids."""
    params = [row.params for row in rows]
    if any(p.repetition_penalty != 1.0 for p in params):
        seen = _token_counts([row.prompt_token_ids + row.output_token_ids for row in rows], logits) > 0
        penalty = _column([p.repetition_penalty for p in params], logits)  # [B, 1]
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalised, logits)
    if any(p.presence_penalty or p.frequency_penalty for p in params):
        counts = _token_counts([row.output_token_ids for row in rows], logits)  # [B, V]
        presence = _column([p.presence_penalty for p in params], logits)
        frequency = _column([p.frequency_penalty for p in params], logits)
        logits = logits - frequency * counts - presence * (counts > 0)
    return logits


def apply_logit_bias(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Add each row's logit_bias to its logits (one scatter for the batch; ids beyond V are ignored)."""
    biases = [row.params.logit_bias or {} for row in rows]
    if not any(biases):
        return logits
    num_rows, vocab = logits.shape
    ids = [[t for t in bias if t < vocab] for bias in biases]
    index = _padded_ids(ids, vocab, logits.device)  # [B, L], padding V
    values = _to_device([[bias[t] for t in row] + [0.0] * (index.shape[1] - len(row)) for row, bias in zip(ids, biases)],
                        torch.float32, logits.device)
    added = torch.zeros(num_rows, vocab + 1, dtype=torch.float32, device=logits.device).scatter_add_(1, index, values)
    return logits + added[:, :vocab]


def _token_counts(token_ids: list[list[int]], logits: torch.Tensor) -> torch.Tensor:
    """[B, V] float32: how often each id occurs in each row's list."""
    num_rows, vocab = logits.shape
    counts = torch.zeros(num_rows, vocab + 1, dtype=torch.float32, device=logits.device)
    index = _padded_ids(token_ids, vocab, logits.device)  # [B, L]
    if index is not None:
        counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float32))
    return counts[:, :vocab]


def _padded_ids(token_ids: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor | None:
    """[B, L] ids padded with V (an extra column the caller drops), so ragged rows scatter in one call."""
    width = max(map(len, token_ids), default=0)
    if not width:
        return None
    return _to_device([ids + [vocab] * (width - len(ids)) for ids in token_ids], torch.int64, device)


def mask_stop_ids(logits: torch.Tensor, rows: Sequence[SamplingRow], eos_token_ids: Sequence[int]) -> torch.Tensor:
    """Hide stop_token_ids (and EOS unless ignore_eos) from rows with fewer than min_tokens outputs."""
    num_rows, vocab = logits.shape
    hidden = [_hidden_ids(row, eos_token_ids, vocab) for row in rows]
    index = _padded_ids(hidden, vocab, logits.device)  # [B, L]
    if index is None:
        return logits
    # a scattered mask, not index_put_: advanced-index assignment syncs with the host on CUDA
    mask = torch.zeros(num_rows, vocab + 1, dtype=torch.bool, device=logits.device).scatter_(1, index, True)
    return logits.masked_fill(mask[:, :vocab], float("-inf"))


def _hidden_ids(row: SamplingRow, eos_token_ids: Sequence[int], vocab: int) -> list[int]:
    params = row.params
    # a grammar decides itself when the output may end: hiding EOS could leave no token allowed
    if len(row.output_token_ids) >= params.min_tokens or params.structured_outputs is not None:
        return []
    ids = list(params.stop_token_ids) + ([] if params.ignore_eos else list(eos_token_ids))
    return [t for t in ids if 0 <= t < vocab]


# ---- random sampling --------------------------------------------------------------------
def sample_random(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """[B] ids drawn from softmax(logits / T) after top-k, top-p and min-p; greedy rows ride along unfiltered."""
    params = [_random_params(row.params) for row in rows]
    logits = logits / _column([p.temperature for p in params], logits)
    if any(p.top_k or p.top_p < 1.0 for p in params):
        logits = apply_top_k_top_p(logits, [p.top_k for p in params], [p.top_p for p in params])
    probs = logits.softmax(dim=-1)  # [B, V]
    if any(p.min_p for p in params):
        probs = apply_min_p(probs, [p.min_p for p in params])
    return exponential_race(probs, rows)


def _random_params(params: SamplingParams) -> SamplingParams | _Neutral:
    # greedy rows are picked by argmax; keep their filters out of the way
    return _NEUTRAL if params.greedy else params


@dataclass(slots=True, frozen=True)
class _Neutral:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0


_NEUTRAL = _Neutral()


def apply_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Set to -inf all but the k best ids (0: all) and, of those, the smallest set with mass >= p."""
    vocab = logits.shape[1]
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)  # [B, V] each
    ranks = torch.arange(vocab, device=logits.device)  # [V]
    k = _column([kk if 0 < kk < vocab else vocab for kk in top_k], logits, torch.int64)  # [B, 1]
    remove = ranks >= k  # [B, V], in sorted order
    if any(p < 1.0 for p in top_p):
        p = _column(top_p, logits)  # [B, 1]
        probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # exactly 0 for the best id: it always stays
        remove |= (mass_before >= p) & (p < 1.0)
    remove = torch.empty_like(remove).scatter_(1, sorted_ids, remove)  # back to vocabulary order
    return logits.masked_fill(remove, float("-inf"))


def apply_min_p(probs: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    """Zero the ids whose probability is below min_p times the row's best."""
    threshold = _column(min_p, probs) * probs.amax(dim=-1, keepdim=True)  # [B, 1]
    return probs.masked_fill(probs < threshold, 0.0)


def exponential_race(probs: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """argmax(probs / Exp(1) noise) samples from probs.

    Unseeded rows draw from the device's default generator; seeded rows get the counter-based
    `exponential_noise` of their `seeded_key`, all of them in one batched computation.
    """
    seeded = [i for i, row in enumerate(rows) if row.params.seed is not None]
    if all(row.params.seed is not None or row.params.greedy for row in rows):
        # no row needs the default generator (greedy rows' noise is never used): leave it untouched
        keys = [seeded_key(row) if row.params.seed is not None else 0 for row in rows]
        noise = exponential_noise(_to_device(keys, torch.int64, probs.device), probs.shape[1])
        return (probs / noise).argmax(dim=-1)
    noise = _default_exponential(probs)  # [B, V]
    if seeded:
        packed = _to_device(seeded + [seeded_key(rows[i]) for i in seeded], torch.int64, probs.device)
        index, keys = packed.split(len(seeded))  # one host-to-device copy for both
        noise.index_copy_(0, index, exponential_noise(keys, probs.shape[1]))
    return (probs / noise).argmax(dim=-1)


def _default_exponential(like: torch.Tensor) -> torch.Tensor:
    """Exp(1) draws shaped like `like` from the device's default generator (every device alike: exponential_
    measured 3-4x slower on CPU, and whether it can return exactly 0 on CUDA is not documented)."""
    return exponential_from_uniform(torch.rand_like(like))


def exponential_from_uniform(u: torch.Tensor) -> torch.Tensor:
    """Exp(1) draws from uniform u in [0, 1), in place: -log(u), never 0.

    Not -log(1 - u): u is exactly 0 once in 2^24 draws (float32), which made a 0 draw, and a token
    whose probability was 1e-35 then beat the one of probability ~1 (probs / noise); over a 49k
    vocabulary that was a garbage token about once every 340 sampled tokens. Here u = 0 gives an
    infinite draw, whose token cannot win.
    """
    return u.log_().neg_()


def seeded_key(row: SamplingRow) -> int:
    """A signed 64-bit hash of the row's seed and the index of the token being sampled.

    The index counts outputs so far, in-flight placeholders included: the key, and so the
    token, is the same alone, in any batch, with async scheduling and after preemption.
    """
    return signed64(mix64(mix64(row.params.seed) ^ len(row.output_token_ids)))


# ---- logprobs ---------------------------------------------------------------------------
def _with_logprobs(token_ids: torch.Tensor, raw: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
    asked = [row.params.logprobs for row in rows if row.params.logprobs is not None]
    if not asked:
        return SamplerOutput(token_ids, None, None, None)
    logprobs = raw.log_softmax(dim=-1)  # [B, V]
    chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)  # [B]
    k = min(max(asked), logprobs.shape[1])
    if k == 0:
        return SamplerOutput(token_ids, chosen, None, None)
    top = logprobs.topk(k, dim=-1)  # sorted, best first
    return SamplerOutput(token_ids, chosen, top.indices, top.values)


# ---- host -> device ---------------------------------------------------------------------
def _column(values: list, like: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, 1] tensor of per-row values on `like`'s device."""
    return _to_device(values, dtype, like.device).unsqueeze(1)


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    tensor = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        # pinned + non_blocking: an asynchronous copy, never a host sync
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
