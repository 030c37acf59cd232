"""The engine core's grammar state: one llguidance matcher per constrained request.

Each matcher advances with every token its request takes and answers which tokens may come next, as
a packed bitmask (one bit per vocabulary id). The masks of a step are computed for all its
constrained rows at once on llguidance's Rust threads (the GIL is released), in a helper thread
so that the caller can run the forward pass meanwhile.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from llmserve.core.scheduler_output import GrammarBitmask
from llmserve.grammar.compiler import GrammarCompiler
from llmserve.sampling_params import StructuredOutputs

logger = logging.getLogger(__name__)
T = TypeVar("T")


def bitmask_words(vocab_size: int) -> int:
    """int32 words per row of a bitmask over `vocab_size` ids."""
    return (vocab_size + 31) // 32


class GrammarMatchers:
    """Matchers by request id; not thread-safe, except that while the helper thread of `bitmask_async`
    or `bitmask_after` runs, the caller may run the forward pass and `remove` matchers (the helper
    keeps its own references), but must not use them."""

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
        rows = self._rows(request_ids)
        return self._compute(rows) if rows else None

    def bitmask_async(self, request_ids: list[str]) -> Future | None:
        """`bitmask` computed on a helper thread; None at once when no request is constrained. The
        matchers are picked now: the caller may remove (not advance) matchers while it runs."""
        rows = self._rows(request_ids)
        if not rows:
            return None
        return self._helper().submit(self._compute, rows)

    def bitmask_after(self, before: Callable[[], T], request_ids: list[str]) -> tuple[Future[T], Future]:
        """On the helper thread, run `before` (it may advance the matchers), then compute `bitmask`: a
        future of `before`'s result, set as soon as it returns, and one of the masks."""
        first: Future[T] = Future()

        def run() -> GrammarBitmask | None:
            try:
                first.set_result(before())
            except BaseException as exc:
                first.set_exception(exc)
                raise
            return self.bitmask(request_ids)
        return first, self._helper().submit(run)

    def _helper(self) -> ThreadPoolExecutor:
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
        return self._thread

    def _rows(self, request_ids) -> list[tuple[object, str]]:
        """(matcher, request id) of the constrained ones; the caller may remove matchers meanwhile."""
        rows = []
        for rid in request_ids:
            matcher = self._matchers.get(rid)
            if matcher is not None:
                rows.append((matcher, rid))
        return rows

    def _compute(self, rows: list[tuple[object, str]]) -> GrammarBitmask:
        words = np.empty((len(rows), self.words), dtype=np.int32)
        live = []
        for i, (matcher, _) in enumerate(rows):
            if matcher.is_stopped():  # its request ends this step: the row is left unconstrained
                words[i] = -1
            else:
                live.append((matcher, i))
        if live:
            # straight into the array's memory, row i at i * row bytes (llguidance.torch, which wraps
            # this, is not imported: its import runs torch.compile's set-up, ~2 s)
            self._llguidance_executor().unsafe_compute_mask_ptr(live, words.ctypes.data, self.words * 4, len(rows))
            for matcher, i in live:
                if matcher.is_error():  # a resource limit hit while computing it: end the output cleanly
                    logger.error("request %s: its grammar failed: %s", rows[i][1], matcher.get_error()[:300])
                    words[i] = self._eos_only()
        return GrammarBitmask([rid for _, rid in rows], words.data.cast("B"))  # the array's bytes, not a copy

    def _eos_only(self) -> np.ndarray:
        row = np.zeros(self.words, dtype=np.uint32)
        for token in self.compiler.eos_token_ids:
            row[token // 32] |= np.uint32(1 << (token % 32))
        return row.view(np.int32)

    def _llguidance_executor(self):
        if self._executor is None:
            from llguidance import LLExecutor

            self._executor = LLExecutor(self._num_threads)
        return self._executor
