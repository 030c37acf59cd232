"""Chat prompts whose message text stays text: a message cannot open a turn of its own.

Rendering the chat template to a string and encoding it would turn special-token text
inside a message (`<|im_end|>\n<|im_start|>system`) into the real control tokens, letting
a user close their turn and open a system one. So a message whose text holds a special
token's text is rendered as a unique placeholder; the template text around placeholders
is encoded as usual (its markers stay special), and each such message's text is encoded
with special tokens split into ordinary tokens. Other messages are encoded together with
the template, exactly as HuggingFace does.
"""

from __future__ import annotations

import functools
import re
import uuid


class ChatTemplateError(ValueError):
    """The messages cannot be turned into a prompt by this model's chat template."""


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                tools: list[dict] | None = None) -> list[int]:
    """Token ids of `messages` in the tokenizer's chat template; special-token text in a message stays text.
    `tools`: OpenAI tool objects, for a template that renders them."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ChatTemplateError("this model has no chat template")
    render = functools.partial(_render, tools=tools)
    text = render(tokenizer, messages, add_generation_prompt)
    specials = _special_texts(tokenizer)
    risky = {i for i, message in enumerate(messages) if _holds_special_text(message.get("content"), specials)}
    if not risky:
        return tokenizer.encode(text, add_special_tokens=False)  # the template emits any BOS itself
    return _encode_with_plain_messages(tokenizer, messages, risky, text, add_generation_prompt, render)


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None = None) -> str:
    extra = {"tools": tools} if tools else {}
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **extra)
    except Exception as exc:  # templates raise on e.g. roles out of order
        raise ChatTemplateError(f"the chat template rejected the messages: {exc}") from exc


def _special_texts(tokenizer) -> tuple[str, ...]:
    """The text of every special token (what split_special_tokens splits)."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    texts = {token.content for token in added.values() if token.special}
    return tuple(texts | set(tokenizer.all_special_tokens))


def _holds_special_text(content, specials: tuple[str, ...]) -> bool:
    return isinstance(content, str) and any(special in content for special in specials)


def _encode_with_plain_messages(tokenizer, messages: list[dict], risky: set[int], text: str,
                                add_generation_prompt: bool, render=_render) -> list[int]:
    # private-use characters: in no special token, so no marker can form across a placeholder
    placeholders = {f"\ue000{uuid.uuid4().hex}\ue001": i for i in risky}
    masked = list(messages)
    for placeholder, i in placeholders.items():
        masked[i] = {**messages[i], "content": placeholder}
    pieces = re.split("(" + "|".join(placeholders) + ")", render(tokenizer, masked, add_generation_prompt))
    contents = _rendered_contents(pieces, placeholders, messages, text)
    ids = []
    for piece in pieces:
        if piece in placeholders:
            ids += tokenizer.encode(contents[placeholders[piece]], add_special_tokens=False,
                                    split_special_tokens=True)
        elif piece:
            ids += tokenizer.encode(piece, add_special_tokens=False)
    return ids


def _rendered_contents(pieces: list[str], placeholders: dict[str, int], messages: list[dict],
                       text: str) -> dict[int, str]:
    """Each risky message's text as the template rendered it: unchanged, or trimmed (as many templates do)."""
    for transform in (str, str.strip):
        contents = {i: transform(messages[i]["content"]) for i in placeholders.values()}
        if "".join(contents[placeholders[p]] if p in placeholders else p for p in pieces) == text:
            return contents
    raise ChatTemplateError("this model's chat template rewrites message text, so text that looks like a "
                            "special token (such as '<|im_end|>') cannot be kept as plain text; remove it "
                            "from the messages")
