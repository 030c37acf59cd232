"""Reading tool calls out of a chat output as it streams: `<tool_call>` blocks become OpenAI's
`tool_calls` deltas, the text around them content (server/tools.py says how calls are asked for)."""

from __future__ import annotations

import json
import re
import uuid

from llmserve.server.tools import CALL_CLOSE, CALL_OPEN

# the start of a call, up to where its arguments begin (the grammar writes name first)
_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


class ToolCallParser:
    """Splits a chat output, fed in pieces, into content and tool calls, as OpenAI's stream deltas:
    {"content": ...}, then per call {"tool_calls": [{index, id, type, function: {name, arguments: ""}}]}
    and its argument fragments. The whole message is what the deltas add up to (`message`)."""

    def __init__(self):
        self.calls: list[dict] = []
        self.content = ""
        self._state = "text"  # text -> head -> arguments -> tail -> text ...
        self._buffer = ""
        self._depth = 0  # JSON nesting inside a call's outer object, while in arguments
        self._in_string = self._escaped = False

    def feed(self, text: str) -> list[dict]:
        self._buffer += text
        deltas: list[dict] = []
        while True:
            step = getattr(self, f"_{self._state}")(deltas)
            if not step:
                return deltas

    def finish(self) -> list[dict]:
        """The end of the output: text held back (a possible block start, an unfinished block) is content."""
        deltas: list[dict] = []
        if self._state == "text":
            self._emit_content(deltas, self._buffer)
        elif self._state == "head":  # never got to its arguments: not a call
            self._emit_content(deltas, CALL_OPEN + self._buffer)
        elif self._state == "arguments":  # cut off (length): what was generated stays
            self._emit_arguments(deltas, self._buffer)
        self._buffer = ""
        return deltas

    def message(self) -> tuple[str | None, list[dict]]:
        """(content, tool_calls) of everything fed so far (call `finish` first)."""
        return (self.content or None) if self.calls else self.content, self.calls

    # ---- states: each consumes what it can and says whether another step may progress ----
    def _text(self, deltas: list[dict]) -> bool:
        start = self._buffer.find(CALL_OPEN)
        if start >= 0:
            self._emit_content(deltas, self._buffer[:start])
            self._buffer, self._state = self._buffer[start + len(CALL_OPEN):], "head"
            return True
        keep = _partial_suffix(self._buffer, CALL_OPEN)
        self._emit_content(deltas, self._buffer[:len(self._buffer) - keep])
        self._buffer = self._buffer[len(self._buffer) - keep:]
        return False

    def _head(self, deltas: list[dict]) -> bool:
        match = _CALL_HEAD.match(self._buffer)
        if match:
            self._start_call(deltas, json.loads(f'"{match.group(1)}"'))
            self._buffer, self._state, self._depth = self._buffer[match.end():], "arguments", 1
            self._in_string = self._escaped = False
            return True
        end = self._buffer.find(CALL_CLOSE)
        if end < 0:
            return False
        block, self._buffer, self._state = self._buffer[:end], self._buffer[end + len(CALL_CLOSE):], "text"
        call = _whole_call(block)  # written another way (arguments first, say): read it whole
        if call is None:
            self._emit_content(deltas, CALL_OPEN + block + CALL_CLOSE)
        else:
            self._start_call(deltas, call[0])
            self._emit_arguments(deltas, call[1])
        return True

    def _arguments(self, deltas: list[dict]) -> bool:
        if not self.calls[-1]["function"]["arguments"]:  # space after "arguments": may arrive after the colon
            self._buffer = self._buffer.lstrip()
        for i, char in enumerate(self._buffer):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
                continue
            if char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:  # the call's own closing brace: the arguments end before it
                    self._emit_arguments(deltas, self._buffer[:i].rstrip())
                    self._buffer, self._state = self._buffer[i + 1:], "tail"
                    return True
        held = len(self._buffer) - len(self._buffer.rstrip())  # trailing space may precede the brace
        self._emit_arguments(deltas, self._buffer[:len(self._buffer) - held])
        self._buffer = self._buffer[len(self._buffer) - held:]
        return False

    def _tail(self, deltas: list[dict]) -> bool:
        end = self._buffer.find(CALL_CLOSE)
        if end < 0:
            return False
        self._buffer, self._state = self._buffer[end + len(CALL_CLOSE):].lstrip(), "text"
        return True

    # ---- deltas ------------------------------------------------------------------------
    def _emit_content(self, deltas: list[dict], text: str) -> None:
        if self.calls:
            text = text.strip() and text  # only whitespace between or after calls: not content
        if text:
            self.content += text
            deltas.append({"content": text})

    def _start_call(self, deltas: list[dict], name: str) -> None:
        call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": ""}}
        self.calls.append(call)
        deltas.append({"tool_calls": [{"index": len(self.calls) - 1, **call,
                                       "function": {"name": name, "arguments": ""}}]})

    def _emit_arguments(self, deltas: list[dict], text: str) -> None:
        if text:
            self.calls[-1]["function"]["arguments"] += text
            deltas.append({"tool_calls": [{"index": len(self.calls) - 1, "function": {"arguments": text}}]})


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker` (it may continue)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def _whole_call(block: str) -> tuple[str, str] | None:
    """(name, arguments as JSON text) of a call block, or None when it is not one."""
    try:
        call = json.loads(block)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or "arguments" not in call:
        return None
    return call["name"], json.dumps(call["arguments"])
