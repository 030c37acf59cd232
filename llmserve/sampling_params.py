"""Per-request sampling and stopping parameters (vLLM-compatible names)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# The sampler works in float32, where CPUs running with flush-to-zero and GPUs read subnormal values
# as 0: a divisor or threshold must be a normal float32, and no value may overflow to inf.
FLOAT32_MIN_NORMAL = 1.1754943508222875e-38
FLOAT32_MAX = 3.4028234663852886e38
STRUCTURED_KINDS = ("json", "regex", "grammar", "choice")


@dataclass(slots=True, frozen=True)
class StructuredOutputs:
    """A constraint on the output text, as plain data: `kind` says how to read `spec`.

    json: a JSON schema (JSON text); regex: a regular expression the whole output matches;
    grammar: a Lark or GBNF grammar; choice: a JSON list of the strings the output may be.
    Compiled by llguidance (llmserve/grammar) where tokens are sampled.
    """

    kind: str
    spec: str

    def __post_init__(self) -> None:
        _check(self.kind in STRUCTURED_KINDS, f"structured output kind must be one of {STRUCTURED_KINDS}, "
                                              f"got {self.kind!r}")
        _check(isinstance(self.spec, str) and bool(self.spec), "a structured output needs a non-empty spec")


@dataclass(slots=True)
class SamplingParams:
    """How to pick each next token and when to stop; validated on construction."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0  # HF-style, over prompt and output tokens
    presence_penalty: float = 0.0  # OpenAI-style, over output tokens
    frequency_penalty: float = 0.0
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k >= 0: chosen token plus top-k
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # OpenAI's logit_bias: token id -> added to its logit before sampling (greedy too), in [-100, 100]
    logit_bias: dict[int, float] | None = None
    # log-probabilities of the prompt's tokens (each given the ones before it), with this many top
    # alternatives; None: not computed. Such a request recomputes its prompt (no prefix-cache hit).
    prompt_logprobs: int | None = None
    # constrain the output (JSON schema, regex, grammar, choice); None: free text
    structured_outputs: StructuredOutputs | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        if self.top_k == -1:
            self.top_k = 0
        _check(self.n >= 1, f"n must be >= 1, got {self.n}")
        # an inf or 0 in float32 would turn logits into nan (temperature, repetition_penalty) or
        # remove every token (top_p)
        _check(0.0 <= self.temperature <= FLOAT32_MAX,
               f"temperature must be in [0, 3.4e38] (the float32 maximum), got {self.temperature}")
        _check(FLOAT32_MIN_NORMAL <= self.top_p <= 1.0,
               f"top_p must be in (0, 1] and at least 1.2e-38 (the smallest normal float32), got {self.top_p}")
        _check(self.top_k >= 0, f"top_k must be -1, 0 or positive, got {self.top_k}")
        _check(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}")
        _check(FLOAT32_MIN_NORMAL <= self.repetition_penalty <= FLOAT32_MAX,
               f"repetition_penalty must be > 0 and a normal float32 (between 1.2e-38 and 3.4e38), "
               f"got {self.repetition_penalty}")
        _check(-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        _check(-2.0 <= self.frequency_penalty <= 2.0, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        _check(self.max_tokens is None or self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}")
        _check(self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}")
        _check(self.logprobs is None or 0 <= self.logprobs <= 20, f"logprobs must be in [0, 20], got {self.logprobs}")
        _check(self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
               f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}")
        if self.logit_bias is not None:
            self.logit_bias = {int(token): float(bias) for token, bias in self.logit_bias.items()} or None
            _check(all(token >= 0 for token in self.logit_bias or ()), "logit_bias keys must be token ids >= 0")
            _check(all(-100.0 <= bias <= 100.0 for bias in (self.logit_bias or {}).values()),
                   "logit_bias values must be in [-100, 100]")
        # torch generators take any int64 or uint64 seed; seed + n - 1 must stay in range
        _check(self.seed is None or -2**63 <= self.seed <= 2**64 - self.n,
               f"seed must be a 64-bit integer, got {self.seed}")

    def for_choice(self, index: int) -> "SamplingParams":
        """Parameters of the index-th of `n` completions: n=1 and its own seed (seed + index)."""
        seed = None if self.seed is None else self.seed + index
        return dataclasses.replace(self, n=1, seed=seed)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1

    @property
    def uses_output_ids(self) -> bool:
        """Whether sampling reads the ids generated so far (the penalties do)."""
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty or self.frequency_penalty)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
