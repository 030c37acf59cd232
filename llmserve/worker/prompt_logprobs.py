"""Prompt log-probabilities: what the model thought of each prompt token, given the ones before it.

Row p of a prefill chunk predicts token p + 1, so a chunk covering positions [start, end) scores
prompt tokens start + 1 .. min(end, P - 1) (the last prompt position predicts the first output,
which the sampler handles). Evaluation tools read these through the completions API (`echo` with
`logprobs`). They are computed in float32 from the step's logits and copied to the host at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmserve.core.messages import PromptLogprobs, TokenLogprobs


@dataclass(slots=True)
class PromptScoring:
    """The step's rows that score prompt tokens: row indices, target token ids, and per request its span."""

    rows: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    spans: list[tuple[str, int, int, int]] = field(default_factory=list)  # (request, first position, count, top k)

    def add(self, state, start: int, end: int, first_row: int) -> None:
        """Request `state` runs positions [start, end) from row `first_row`."""
        last = min(end, len(state.prompt_token_ids) - 1)
        if last <= start:
            return
        self.rows.extend(range(first_row, first_row + last - start))
        self.targets.extend(state.prompt_token_ids[start + 1:last + 1])
        self.spans.append((state.request_id, start + 1, last - start, state.params.prompt_logprobs))


def score_prompt_tokens(logits: torch.Tensor, scoring: PromptScoring) -> list[PromptLogprobs]:
    """logits [R, V] of `scoring.rows` -> each request's prompt-token logprobs and top alternatives."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = torch.tensor(scoring.targets, device=logits.device)
    chosen_column = logprobs.gather(1, targets[:, None])  # [R, 1]
    chosen = chosen_column.squeeze(1).tolist()
    ranks = ((logprobs > chosen_column).sum(dim=-1) + 1).tolist()
    top_k = max(k for *_, k in scoring.spans)
    top_ids, top_lps = ([], [])
    if top_k:
        values, indices = logprobs.topk(top_k, dim=-1)
        top_ids, top_lps = indices.tolist(), values.tolist()
    out, row = [], 0
    for request_id, first_position, count, k in scoring.spans:
        entries = [TokenLogprobs(chosen[r], list(zip(top_ids[r][:k], top_lps[r][:k])) if k else [], ranks[r])
                   for r in range(row, row + count)]
        out.append(PromptLogprobs(request_id, first_position, entries))
        row += count
    return out
