"""OpenAI response shapes for chat and legacy completions, streamed or whole."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from llmserve.core.sampled_token import SampledToken
from llmserve.frontend.engine_client import RequestOutput
from llmserve.server.logprobs import TokenPieces, chat_logprobs, completion_logprobs, prompt_logprobs_entries
from llmserve.server.tool_parser import ToolCallParser
from llmserve.server.tools import ToolCalling


@dataclass(slots=True)
class ChoiceState:
    """What one choice has produced so far."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[SampledToken] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    prompt_logprobs: list[SampledToken] | None = None  # prompt tokens 1.. (echo with logprobs)
    score_only: bool = False  # echo with max_tokens 0: what the engine generates is not shown

    def add(self, output: RequestOutput) -> None:
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
        self.num_prompt_tokens = output.num_prompt_tokens
        self.num_cached_tokens = output.num_cached_tokens
        if output.finished:
            self.finish_reason, self.stop_reason = output.finish_reason, output.stop_reason
        if self.score_only:
            self.finish_reason, self.stop_reason = ("length", None) if output.finished else (None, None)
            return
        self.text += output.new_text
        self.token_ids.extend(output.new_token_ids)
        if output.new_logprobs is not None:
            self.logprobs = (self.logprobs or []) + output.new_logprobs
        self.num_output_tokens = output.num_output_tokens


def usage(prompts: list[list[int]], choices: list[ChoiceState], n: int) -> dict:
    """Token counts: each prompt once (however many choices it has), every choice's output."""
    num_prompt = sum(len(p) for p in prompts)
    num_output = sum(c.num_output_tokens for c in choices)
    num_cached = sum(c.num_cached_tokens for c in choices[::n])
    return {"prompt_tokens": num_prompt, "completion_tokens": num_output, "total_tokens": num_prompt + num_output,
            "prompt_tokens_details": {"cached_tokens": num_cached}}


class Renderer:
    """Builds the JSON objects of one response; subclasses give the endpoint's shapes."""

    object_name = ""
    chunk_object_name = ""
    prompt_param = ""

    def __init__(self, response_id: str, model: str, pieces: TokenPieces, include_usage: bool = False,
                 prompt_logprobs: int | None = None):
        """`prompt_logprobs`: vLLM's extension was asked, with this many alternatives per prompt token."""
        self.response_id = response_id
        self.model = model
        self.pieces = pieces
        self.include_usage = include_usage
        self.prompt_logprobs = prompt_logprobs
        self.created = int(time.time())

    def _envelope(self, object_name: str, choices: list[dict]) -> dict:
        return {"id": self.response_id, "object": object_name, "created": self.created, "model": self.model,
                "choices": choices}

    def chunk(self, choices: list[dict]) -> dict:
        body = self._envelope(self.chunk_object_name, choices)
        if self.include_usage:
            body["usage"] = None  # only the last chunk carries usage
        return body

    def usage_chunk(self, usage_body: dict) -> dict:
        return {**self._envelope(self.chunk_object_name, []), "usage": usage_body}

    def response(self, choices: list[ChoiceState], usage_body: dict) -> dict:
        return {**self._envelope(self.object_name, [self.choice(c) for c in choices]), "usage": usage_body}

    def opening_chunks(self, num_choices: int) -> list[dict]:
        return []

    def delta_chunks(self, choice: ChoiceState, output: RequestOutput) -> list[dict]:
        raise NotImplementedError

    def choice(self, choice: ChoiceState) -> dict:
        raise NotImplementedError

    def _prompt_logprobs(self, scored) -> list[dict | None]:
        return prompt_logprobs_entries(self.pieces, scored or [], self.prompt_logprobs)


class ChatRenderer(Renderer):
    """`chat.completion` and `chat.completion.chunk`."""

    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"
    prompt_param = "messages"

    def __init__(self, *args, tool_calling: ToolCalling | None = None, **kwargs):
        """`tool_calling`: the request's tools; the output is then split into content and tool calls."""
        super().__init__(*args, **kwargs)
        self.tool_calling = tool_calling
        self._parsers: dict[int, ToolCallParser] = {}  # per streamed choice

    def opening_chunks(self, num_choices: int) -> list[dict]:
        return [self.chunk([_chat_delta(i, {"role": "assistant", "content": ""})]) for i in range(num_choices)]

    def response(self, choices: list[ChoiceState], usage_body: dict) -> dict:
        body = super().response(choices, usage_body)
        if self.prompt_logprobs is not None:  # one prompt, whatever n: vLLM puts it beside `choices`
            body["prompt_logprobs"] = self._prompt_logprobs(choices[0].prompt_logprobs)
        return body

    def delta_chunks(self, choice: ChoiceState, output: RequestOutput) -> list[dict]:
        chunks = self._delta_chunks(choice, output)
        if self.prompt_logprobs is not None and output.prompt_logprobs is not None:
            chunks = chunks or [self.chunk([_chat_delta(choice.index, {})])]
            chunks[0]["prompt_logprobs"] = self._prompt_logprobs(output.prompt_logprobs)
        return chunks

    def _delta_chunks(self, choice: ChoiceState, output: RequestOutput) -> list[dict]:
        logprobs = chat_logprobs(self.pieces, output.new_logprobs) if output.new_logprobs else None
        if self.tool_calling is None:
            deltas = [{"content": output.new_text}] if output.new_text or logprobs else []
            finish_reason = output.finish_reason
        else:
            parser = self._parsers.setdefault(choice.index, ToolCallParser())
            deltas = parser.feed(output.new_text)
            if output.finished:
                deltas += parser.finish()
            if logprobs and not deltas:
                deltas = [{}]  # the tokens are held back (a call may be starting); their logprobs are not
            finish_reason = _tool_finish_reason(output.finish_reason, parser.calls)
        chunks = [self.chunk([_chat_delta(choice.index, delta, logprobs if i == 0 else None)])
                  for i, delta in enumerate(deltas)]
        if output.finished:
            chunks.append(self.chunk([_chat_delta(choice.index, {}, finish_reason=finish_reason)]))
        return chunks

    def choice(self, choice: ChoiceState) -> dict:
        logprobs = chat_logprobs(self.pieces, choice.logprobs) if choice.logprobs is not None else None
        message, finish_reason = {"role": "assistant", "content": choice.text}, choice.finish_reason
        if self.tool_calling is not None:
            parser = ToolCallParser()
            parser.feed(choice.text)
            parser.finish()
            message["content"], calls = parser.message()
            if calls:
                message["tool_calls"] = calls
            finish_reason = _tool_finish_reason(finish_reason, calls)
        return {"index": choice.index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason,
                "stop_reason": choice.stop_reason}


def _tool_finish_reason(finish_reason: str | None, calls: list[dict]) -> str | None:
    """OpenAI's "tool_calls" when the output ended by itself after calling tools."""
    return "tool_calls" if calls and finish_reason == "stop" else finish_reason


def _chat_delta(index: int, delta: dict, logprobs: dict | None = None, finish_reason: str | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


class CompletionRenderer(Renderer):
    """`text_completion`, streamed or whole; with echo, the prompt leads each choice's text."""

    object_name = chunk_object_name = "text_completion"
    prompt_param = "prompt"

    def __init__(self, *args, prompts: list[list[int]], n: int, echo_texts: list[str] | None = None,
                 logprobs_on: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.prompts, self.n, self.echo_texts, self.logprobs_on = prompts, n, echo_texts, logprobs_on
        self._offsets: dict[int, int] = {}  # text_offset where each choice's next token starts
        self._echoed: set[int] = set()  # choices whose echoed prompt has been streamed

    def opening_chunks(self, num_choices: int) -> list[dict]:
        if self.echo_texts is None or self.logprobs_on:
            return []  # with logprobs the echo waits for the prompt's scores: they come with the first token
        return [self.chunk([self._text_choice(i, self._echo(i), None)]) for i in range(num_choices)]

    def delta_chunks(self, choice: ChoiceState, output: RequestOutput) -> list[dict]:
        chunks = []
        if self.echo_texts is not None and self.logprobs_on and choice.index not in self._echoed:
            self._echoed.add(choice.index)
            prompt = self._prompt_tokens(choice.index, output.prompt_logprobs)
            chunks.append(self.chunk([self._text_choice(choice.index, self._echo(choice.index),
                                                        self._logprobs(choice.index, prompt))]))
        if not choice.score_only and (output.new_text or output.new_logprobs):
            chunks.append(self.chunk([self._text_choice(choice.index, output.new_text,
                                                        self._logprobs(choice.index, output.new_logprobs))]))
        if output.finished:
            chunks.append(self.chunk([self._text_choice(choice.index, "", None, choice.finish_reason)]))
        if self.prompt_logprobs is not None and output.prompt_logprobs is not None:
            chunks = chunks or [self.chunk([self._text_choice(choice.index, "", None)])]
            chunks[0]["choices"][0]["prompt_logprobs"] = self._prompt_logprobs(output.prompt_logprobs)
        return chunks

    def choice(self, choice: ChoiceState) -> dict:
        logprobs = None
        if choice.logprobs is not None or (choice.score_only and self.logprobs_on):
            tokens = self._prompt_tokens(choice.index, choice.prompt_logprobs) + (choice.logprobs or [])
            logprobs = completion_logprobs(self.pieces, tokens, 0)
        body = self._text_choice(choice.index, self._echo(choice.index) + choice.text, logprobs, choice.finish_reason)
        body["stop_reason"] = choice.stop_reason
        if self.prompt_logprobs is not None:
            body["prompt_logprobs"] = self._prompt_logprobs(choice.prompt_logprobs)
        return body

    # ---- helpers ------------------------------------------------------------------
    def _echo(self, index: int) -> str:
        return self.echo_texts[index // self.n] if self.echo_texts is not None else ""

    def _prompt_tokens(self, index: int, scored: list[SampledToken] | None = None) -> list[SampledToken]:
        """The echoed prompt's tokens: the first has no logprob (nothing precedes it), the rest the scores
        computed in the prefill (None without them)."""
        if self.echo_texts is None:
            return []
        prompt = self.prompts[index // self.n]
        rest = list(scored) if scored is not None else [SampledToken(t, None, None) for t in prompt[1:]]
        return [SampledToken(prompt[0], None, None), *rest]

    def _logprobs(self, index: int, tokens: list[SampledToken] | None) -> dict | None:
        if not tokens:
            return None
        out = completion_logprobs(self.pieces, tokens, self._offsets.get(index, 0))
        self._offsets[index] = out["text_offset"][-1] + len(out["tokens"][-1])
        return out

    @staticmethod
    def _text_choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None = None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
