"""From a request's StructuredOutputs to an llguidance matcher, and the checks that turn a bad spec
into a clear error.

Why llguidance (not xgrammar): one abi3 wheel with no dependencies (xgrammar pulls torch, triton,
pydantic and its own FFI package), a JSON-schema compiler that refuses keywords it cannot enforce
("Unimplemented keys: ...") instead of quietly ignoring them, and a batched mask fill that runs on
Rust threads with the GIL released, so the masks are computed while the forward pass runs.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

from llmserve.sampling_params import StructuredOutputs

# Compact JSON with fixed separators: with free whitespace a small model can fill its whole budget
# with newlines inside the object. A schema's own "x-guidance" options still override these.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_ERROR_CHARS = 600
_CACHE_SIZE = 256


def grammar_text(spec: StructuredOutputs) -> str:
    """The llguidance grammar of `spec` (not validated yet: that needs the tokenizer)."""
    from llguidance import LLMatcher, grammar_from

    if spec.kind == "json":
        schema = _json(spec.spec, "the JSON schema")
        if not isinstance(schema, (dict, bool)):
            raise ValueError("a JSON schema must be an object (or true/false)")
        return LLMatcher.grammar_from_json_schema(spec.spec, defaults=JSON_OPTIONS)
    if spec.kind == "regex":
        return LLMatcher.grammar_from_regex(spec.spec)
    if spec.kind == "grammar":
        return grammar_from("grammar", spec.spec)  # Lark, or GBNF (converted)
    choices = _json(spec.spec, "the choices")
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise ValueError("choice must be a non-empty list of non-empty strings")
    return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))


def _json(text: str, what: str):
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{what} is not valid JSON: {exc}") from None


class GrammarCompiler:
    """Checks specs and builds matchers for one model's tokenizer and vocabulary.

    The llguidance tokenizer is built on first use (about 0.5 s for a 49k vocabulary), so engines that
    never see a constrained request never pay for it. Validated grammars are cached by spec.
    """

    def __init__(self, load_tokenizer: Callable[[], object] | None, vocab_size: int, eos_token_ids: Sequence[int]):
        """`load_tokenizer`: returns the model's fast HF tokenizer; None when the engine has none."""
        self._load_tokenizer = load_tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self._tokenizer = None
        self._lock = threading.Lock()  # the API process checks from the event loop and from executors
        self._grammars: OrderedDict[StructuredOutputs, str] = OrderedDict()
        # a fresh matcher per spec, copied for each request: a copy is ~100x cheaper to make than a
        # matcher built from the grammar, and its first masks are cheaper too (measured, llguidance 1.9)
        self._templates: OrderedDict[StructuredOutputs, object] = OrderedDict()

    @classmethod
    def for_path(cls, tokenizer_path: str | None, vocab_size: int, eos_token_ids: Sequence[int]) -> "GrammarCompiler":
        def load():
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(tokenizer_path)

        return cls(load if tokenizer_path else None, vocab_size, eos_token_ids)

    @property
    def tokenizer(self):
        """The llguidance tokenizer over the model's whole vocabulary (ids past the tokenizer's never allowed)."""
        with self._lock:
            if self._tokenizer is None:
                if self._load_tokenizer is None:
                    raise ValueError("structured outputs need the model's tokenizer, and this engine has none")
                import llguidance.hf

                self._tokenizer = llguidance.hf.from_tokenizer(
                    self._load_tokenizer(), n_vocab=self.vocab_size, eos_token=self.eos_token_ids or None)
            return self._tokenizer

    def check(self, spec: StructuredOutputs) -> str:
        """The validated grammar of `spec`; ValueError naming what is wrong (bad JSON, unsupported schema
        keyword, bad regex or grammar)."""
        with self._lock:
            cached = self._grammars.get(spec)
            if cached is not None:
                self._grammars.move_to_end(spec)
                return cached
        grammar = grammar_text(spec)
        from llguidance import LLMatcher

        error = LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise ValueError(f"unsupported or invalid {_NAMES[spec.kind]}: {error.strip()[:MAX_ERROR_CHARS]}")
        with self._lock:
            self._grammars[spec] = grammar
            if len(self._grammars) > _CACHE_SIZE:
                self._grammars.popitem(last=False)
        return grammar

    def matcher(self, spec: StructuredOutputs):
        """A fresh llguidance LLMatcher for one request."""
        with self._lock:
            template = self._templates.get(spec)
            if template is not None:
                self._templates.move_to_end(spec)
                return template.deep_copy()
        from llguidance import LLMatcher

        template = LLMatcher(self.tokenizer, self.check(spec), log_level=0)
        if template.is_error():
            raise ValueError(f"invalid {_NAMES[spec.kind]}: {template.get_error()[:MAX_ERROR_CHARS]}")
        with self._lock:
            self._templates[spec] = template
            if len(self._templates) > _CACHE_SIZE:
                self._templates.popitem(last=False)
            return template.deep_copy()


_NAMES = {"json": "JSON schema", "regex": "regex", "grammar": "grammar", "choice": "choice"}
