"""The engine core's grammar state: one llguidance matcher per constrained request.

Each matcher advances with every token its request takes and answers which tokens may come next, as
a packed bitmask (one bit per vocabulary id). The masks of a step are computed for all its
constrained rows at once on llguidance's Rust threads (the GIL is released), in a helper thread
so that the caller can run the forward pass meanwhile.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from llmserve.core.scheduler_output import GrammarBitmask
from llmserve.grammar.compiler import GrammarCompiler
from llmserve.sampling_params import StructuredOutputs

logger = logging.getLogger(__name__)


def bitmask_words(vocab_size: int) -> int:
    """int32 words per row of a bitmask over `vocab_size` ids."""
    return (vocab_size + 31) // 32


class GrammarMatchers:
    """Matchers by request id; not thread-safe except `bitmask_async`, whose thread only reads them
    while the caller runs the forward pass."""

    def __init__(self, compiler: GrammarCompiler, num_threads: int | None = None):
        self.compiler = compiler
        self.words = bitmask_words(compiler.vocab_size)
        self._matchers: dict[str, object] = {}
        self._num_threads = num_threads
        self._executor = None  # llguidance's thread pool, built with the first mask
        self._thread: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self._matchers)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._matchers

    def add(self, request_id: str, spec: StructuredOutputs) -> None:
        """Compile the request's constraint (ValueError when it cannot be) and start its matcher."""
        self._matchers[request_id] = self.compiler.matcher(spec)

    def remove(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def accept(self, tokens: list[tuple[str, int]]) -> list[str]:
        """Advance each request's matcher by its new token, all at once on llguidance's threads; the
        requests whose output must end here: the grammar is complete, or the token broke it (logged)."""
        pairs = [(self._matchers[rid], token, rid) for rid, token in tokens if rid in self._matchers]
        if not pairs:
            return []
        accepted = self._llguidance_executor().consume_token_par([(matcher, token) for matcher, token, _ in pairs])
        ended = []
        for (matcher, token, rid), ok in zip(pairs, accepted):
            if not ok:
                logger.error("request %s: token %d rejected by its grammar: %s", rid, token,
                             matcher.get_error()[:300])
            if not ok or matcher.is_stopped():
                ended.append(rid)
        return ended

    def constrained(self, request_ids) -> list[str]:
        """Those of `request_ids` with a live matcher, in the given order."""
        return [rid for rid in request_ids if rid in self._matchers]

    def bitmask(self, request_ids: list[str]) -> GrammarBitmask | None:
        """The allowed next tokens of each constrained request in `request_ids`; None when none is."""
        rows = [(self._matchers[rid], rid) for rid in self.constrained(request_ids)]
        if not rows:
            return None
        words = torch.full((len(rows), self.words), -1, dtype=torch.int32)
        live = [(matcher, i) for i, (matcher, _) in enumerate(rows) if not matcher.is_stopped()]
        if live:  # a stopped matcher's request ends this step: its row is left unconstrained
            # straight into the tensor's memory, row i at i * row bytes (llguidance.torch, which wraps
            # this, is not imported: its import runs torch.compile's set-up, ~2 s)
            self._llguidance_executor().unsafe_compute_mask_ptr(live, words.data_ptr(), self.words * 4, len(rows))
            for matcher, i in live:
                if matcher.is_error():  # a resource limit hit while computing it: end the output cleanly
                    logger.error("request %s: its grammar failed: %s", rows[i][1], matcher.get_error()[:300])
                    words[i] = self._eos_only()
        return GrammarBitmask([rid for _, rid in rows], words.numpy().tobytes())

    def _eos_only(self) -> torch.Tensor:
        row = torch.zeros(self.words, dtype=torch.int64)
        for token in self.compiler.eos_token_ids:
            row[token // 32] |= 1 << (token % 32)
        return torch.where(row >= 2**31, row - 2**32, row).to(torch.int32)  # the words as signed int32

    def bitmask_async(self, request_ids: list[str]) -> Future | None:
        """`bitmask` computed on a helper thread; None at once when no request is constrained."""
        if not self.constrained(request_ids):
            return None
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
        return self._thread.submit(self.bitmask, list(request_ids))

    def _llguidance_executor(self):
        if self._executor is None:
            from llguidance import LLExecutor

            self._executor = LLExecutor(self._num_threads)
        return self._executor
