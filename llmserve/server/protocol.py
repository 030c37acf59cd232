"""Request parsing: an OpenAI JSON body -> prompts as token ids plus SamplingParams.

Range checks of sampling values live in SamplingParams; this module checks JSON types,
OpenAI-only fields, and turns SamplingParams' ValueError into a 400 naming the field.

Special tokens: text in chat messages never becomes a control token (frontend/chat_template.py),
so a message cannot open a turn of another role. A /v1/completions text prompt is encoded as
written, special-token text included (as vLLM does): its author owns the whole prompt and may
write a chat template by hand; a server that lets others fill in a completions prompt must
strip such text itself.
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass, field

from llmserve.frontend.chat_template import ChatTemplateError, encode_chat
from llmserve.sampling_params import SamplingParams, StructuredOutputs
from llmserve.server.errors import bad_request
from llmserve.server.fields import (get_bool, get_int, get_int_list, get_number, get_object, get_str,
                                    get_str_list, is_token_ids)
from llmserve.server.structured import parse_structured_outputs
from llmserve.server.tools import (ToolCalling, check_tool_calls, check_tool_results, parse_tools, prompt_messages,
                                   template_renders_tools)

CHAT_ROLES = ("system", "user", "assistant", "tool")
# fields whose meaning we cannot honour: refusing beats silently ignoring them
UNSUPPORTED = ("functions", "function_call", "suffix")
MAX_LOGIT_BIAS = 300  # entries per request, as OpenAI allows
# Every generated token is checked against each stop string and stop id, inside the engine step
# that all requests share: unbounded lists let one request slow every other stream. OpenAI
# allows 4 stop strings; these bounds leave room for real uses and keep the cost per token small.
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256  # setting up the matcher costs time linear in the total length
MAX_STOP_TOKEN_IDS = 64
STOP_LIMIT_REASON = " (every generated token is checked against each one, in the step all requests share)"


@dataclass(slots=True)
class GenerationRequest:
    """A validated request: one or more prompts, `params.n` choices for each."""

    model: str | None
    prompts: list[list[int]]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    prompt_texts: list[str] | None = None  # set only when echo is on
    score_only: bool = False  # echo with max_tokens 0: the prompt scored, nothing generated
    tool_calling: ToolCalling | None = None  # chat with tools the model may call
    prompt_logprobs: int | None = None  # vLLM's `prompt_logprobs` extension: shown with this many alternatives


@dataclass(slots=True)
class Limits:
    """What the server allows on top of SamplingParams' own ranges."""

    vocab_size: int
    max_n: int
    max_prompts: int
    defaults: dict = field(default_factory=dict)  # the model's generation defaults for omitted fields
    # checks a structured output against the model's tokenizer (grammar.compiler.GrammarCompiler); None:
    # this engine cannot constrain its output
    grammars: object | None = None


def parse_chat(body: dict, tokenizer, limits: Limits) -> GenerationRequest:
    """A /v1/chat/completions body; the chat template is applied with the generation prompt."""
    messages = _messages(body)
    logprobs = get_bool(body, "logprobs")
    top_logprobs = get_int(body, "top_logprobs", 0)
    if top_logprobs and not logprobs:
        raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    calling = parse_tools(body)
    structured, structured_field = parse_structured_outputs(body)
    if calling is not None and calling.forces_call:
        if structured is not None:
            raise bad_request(f"'{structured_field}' cannot be combined with a forced tool call ('tool_choice')",
                              structured_field)
        structured, structured_field = calling.constraint(), "tool_choice"
    params = _sampling_params(body, limits, default_max_tokens=None,
                              logprobs=top_logprobs if logprobs else None, logprobs_field="top_logprobs",
                              structured=structured, structured_field=structured_field)
    native = template_renders_tools(tokenizer)
    tools = calling.tools if calling is not None and native else None
    prompt = apply_chat_template(tokenizer, prompt_messages(messages, calling, native), tools)
    return GenerationRequest(_model(body), [prompt], params, *_stream(body), tool_calling=calling,
                             prompt_logprobs=params.prompt_logprobs)


def parse_completion(body: dict, tokenizer, limits: Limits) -> GenerationRequest:
    """A /v1/completions body: prompt as text, texts, token ids, or lists of token ids; special-token text in
    a text prompt is encoded as the special token."""
    prompts, texts = _prompts(body, tokenizer, limits)
    echo = get_bool(body, "echo")
    # what evaluation tools send to score a prompt: echo, logprobs and max_tokens 0 (one token is run
    # for the engine's sake and left out of the response)
    score_only = echo and body.get("max_tokens") == 0 and not isinstance(body.get("max_tokens"), bool)
    logprobs = get_int(body, "logprobs")
    if body.get("tools"):
        raise bad_request("'tools' belongs to /v1/chat/completions", "tools")
    structured, structured_field = parse_structured_outputs(body)
    params = _sampling_params({**body, "max_tokens": 1} if score_only else body, limits, default_max_tokens=16,
                              logprobs=logprobs, logprobs_field="logprobs",
                              structured=structured, structured_field=structured_field)
    if echo:
        texts = [text if text is not None else tokenizer.decode(ids) for text, ids in zip(texts, prompts)]
    asked = params.prompt_logprobs  # the extension's, shown as its own field
    if echo and logprobs is not None:  # the echoed prompt's tokens get log-probabilities too, from its prefill
        params = dataclasses.replace(params, prompt_logprobs=max(logprobs, asked or 0))
    return GenerationRequest(_model(body), prompts, params, *_stream(body), echo=echo,
                             prompt_texts=texts if echo else None, score_only=score_only, prompt_logprobs=asked)


def apply_chat_template(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Template with the generation prompt as token ids; special-token text inside messages stays plain text."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise bad_request("this model has no chat template; use /v1/completions", "messages")
    try:
        return encode_chat(tokenizer, messages, tools=tools)
    except ChatTemplateError as exc:
        raise bad_request(str(exc), "messages") from exc


# ---- pieces --------------------------------------------------------------------------
def _model(body: dict) -> str | None:
    return get_str(body, "model")


def _stream(body: dict) -> tuple[bool, bool]:
    stream = get_bool(body, "stream")
    options = get_object(body, "stream_options")
    if options and not stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options")
    return stream, bool(get_bool(options, "include_usage"))


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array", "messages")
    checked = [_message(m, i) for i, m in enumerate(messages)]
    check_tool_results(checked)
    return checked


def _message(message, index: int) -> dict:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise bad_request(f"{param} must be an object", param)
    role = message.get("role")
    if role not in CHAT_ROLES:
        raise bad_request(f"{param}.role must be one of {', '.join(CHAT_ROLES)}", f"{param}.role")
    content = message.get("content")
    if content is None and role == "assistant":  # OpenAI allows it (a refusal, tool calls); nothing was said
        content = ""
    checked = {"role": role, "content": _content(content, f"{param}.content")}
    if message.get("tool_calls") not in (None, []):  # some clients send an empty list for "no calls"
        if role != "assistant":
            raise bad_request(f"{param}.tool_calls is only allowed in assistant messages", f"{param}.tool_calls")
        checked["tool_calls"] = check_tool_calls(message["tool_calls"], f"{param}.tool_calls")
    if role == "tool":
        if not isinstance(message.get("tool_call_id"), str):
            raise bad_request(f"{param}.tool_call_id must be the id of the call this message answers",
                              f"{param}.tool_call_id")
        checked["tool_call_id"] = message["tool_call_id"]
    return checked


def _content(content, param: str) -> str:
    """String content, or text parts joined (the only part type a text model can read)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(_is_text_part(p) for p in content):
        return "".join(p["text"] for p in content)
    raise bad_request(f"{param} must be a string or an array of text parts", param)


def _is_text_part(part) -> bool:
    return isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)


def _prompts(body: dict, tokenizer, limits: Limits) -> tuple[list[list[int]], list[str | None]]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompt = [prompt]
    elif is_token_ids(prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad_request("'prompt' must be a string, an array of strings, an array of token ids "
                          "or an array of arrays of token ids", "prompt")
    if len(prompt) > limits.max_prompts:
        raise bad_request(f"at most {limits.max_prompts} prompts per request, got {len(prompt)}", "prompt")
    if all(isinstance(p, str) for p in prompt):
        return [tokenizer.encode(p) for p in prompt], list(prompt)
    if all(is_token_ids(p) for p in prompt):
        return [list(p) for p in prompt], [None] * len(prompt)
    raise bad_request("'prompt' must not mix strings and token ids, nor hold empty entries", "prompt")


def _logit_bias(body: dict, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's `logit_bias`: an object of token id (as a string) -> bias in [-100, 100]."""
    value = get_object(body, "logit_bias")
    if len(value) > MAX_LOGIT_BIAS:
        raise bad_request(f"'logit_bias' may hold at most {MAX_LOGIT_BIAS} tokens, got {len(value)}", "logit_bias")
    bias = {}
    for key, number in value.items():
        token = int(key) if isinstance(key, str) and key.strip().isdigit() else -1
        if not 0 <= token < vocab_size:
            raise bad_request(f"'logit_bias' keys must be token ids in [0, {vocab_size - 1}]", "logit_bias")
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not -100 <= number <= 100:
            raise bad_request("'logit_bias' values must be numbers in [-100, 100]", "logit_bias")
        bias[token] = float(number)
    return bias or None


def _sampling_params(body: dict, limits: Limits, *, default_max_tokens: int | None,
                     logprobs: int | None, logprobs_field: str, structured: StructuredOutputs | None = None,
                     structured_field: str | None = None) -> SamplingParams:
    for name in UNSUPPORTED:
        if body.get(name):
            raise bad_request(f"'{name}' is not supported by this server", name)
    n = get_int(body, "n", 1)
    if n > limits.max_n:
        raise bad_request(f"'n' must be at most {limits.max_n}, got {n}", "n")
    max_tokens_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    model = limits.defaults  # the model's generation_config.json, for fields the request omits
    fields = dict(
        n=n, temperature=get_number(body, "temperature", model.get("temperature", 1.0)),
        top_p=get_number(body, "top_p", model.get("top_p", 1.0)), top_k=get_int(body, "top_k", model.get("top_k", 0)),
        min_p=get_number(body, "min_p", model.get("min_p", 0.0)), seed=get_int(body, "seed"),
        presence_penalty=get_number(body, "presence_penalty", 0.0),
        frequency_penalty=get_number(body, "frequency_penalty", 0.0),
        repetition_penalty=get_number(body, "repetition_penalty", model.get("repetition_penalty", 1.0)),
        max_tokens=get_int(body, max_tokens_field, model.get("max_tokens", default_max_tokens)),
        min_tokens=get_int(body, "min_tokens", 0),
        stop=get_str_list(body, "stop", max_items=MAX_STOP_STRINGS, max_chars=MAX_STOP_STRING_CHARS,
                          why=STOP_LIMIT_REASON),
        ignore_eos=get_bool(body, "ignore_eos"),
        stop_token_ids=get_int_list(body, "stop_token_ids", lo=0, hi=limits.vocab_size - 1,
                                    max_items=MAX_STOP_TOKEN_IDS, why=STOP_LIMIT_REASON),
        skip_special_tokens=get_bool(body, "skip_special_tokens", True),
        include_stop_str_in_output=get_bool(body, "include_stop_str_in_output"), logprobs=logprobs,
        logit_bias=_logit_bias(body, limits.vocab_size), prompt_logprobs=get_int(body, "prompt_logprobs"),
        structured_outputs=_checked_grammar(structured, structured_field, limits))
    get_str(body, "user")  # accepted for OpenAI compatibility; never logged
    try:
        return SamplingParams(**fields)
    except ValueError as exc:
        field = str(exc).split(" ", 1)[0]
        param = {"logprobs": logprobs_field, "max_tokens": max_tokens_field}.get(field, field)
        raise bad_request(str(exc).replace(field, param, 1), param) from exc


def _checked_grammar(spec: StructuredOutputs | None, param: str | None, limits: Limits) -> StructuredOutputs | None:
    """`spec`, once compiled against the model's tokenizer: a schema, regex or grammar that cannot be
    enforced is a 400 here, never prose in a 200."""
    if spec is None:
        return None
    if limits.grammars is None:
        raise bad_request("structured outputs and forced tool calls are not supported by this engine", param)
    try:
        limits.grammars.check(spec)
    except ValueError as exc:
        raise bad_request(str(exc), param) from exc
    return spec
