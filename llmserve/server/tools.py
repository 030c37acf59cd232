"""OpenAI tool calling: tools described in the prompt, calls read back from the output (streamed as
they are generated), and forced calls (`required`, a named function) held to the functions' JSON
schemas by a grammar.

Calls travel in the output as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks, the
format Hermes- and Qwen-style chat templates teach. A template that renders `tools` itself gets them
(with assistant `tool_calls` and `tool` messages as they are); for one that does not, such as the
default model's, the tools are described in a system message and past calls and results are written
in that same block format.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from llmserve.grammar.compiler import JSON_OPTIONS
from llmserve.sampling_params import StructuredOutputs
from llmserve.server.errors import bad_request

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_TOOLS = 128


@dataclass(slots=True)
class ToolCalling:
    """The tools of a chat request and how the model may use them."""

    tools: list[dict]  # the request's tool objects, validated
    choice: str  # "auto", "required" or "function" (the one named in `function`)
    function: str | None = None
    parallel: bool = True

    @property
    def forces_call(self) -> bool:
        return self.choice != "auto"

    def functions(self) -> list[dict]:
        return [tool["function"] for tool in self.tools]

    def constraint(self) -> StructuredOutputs | None:
        """For a forced call: the grammar of one call block (several with `parallel`) whose arguments
        follow the function's parameters schema."""
        if not self.forces_call:
            return None
        chosen = [f for f in self.functions() if self.choice == "required" or f["name"] == self.function]
        calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                  "properties": {"name": {"const": f["name"]},
                                 "arguments": f.get("parameters") or {"type": "object"}}} for f in chosen]
        schema = {"x-guidance": JSON_OPTIONS, "anyOf": calls}
        repeat = ' ("\\n" call)*' if self.parallel and self.choice == "required" else ""
        lark = (f'start: call{repeat}\n'
                f'call: "{CALL_OPEN}\\n" body "\\n{CALL_CLOSE}"\n'
                f'body: %json {json.dumps(schema)}\n')
        return StructuredOutputs("grammar", lark)


def parse_tools(body: dict) -> ToolCalling | None:
    """`tools`, `tool_choice` and `parallel_tool_calls`; None when no tool may be called."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise bad_request("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    if tools is None or tools == []:
        if choice not in (None, "none"):
            raise bad_request("'tool_choice' is only allowed when 'tools' are given", "tool_choice")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise bad_request(f"'tools' must be an array of at most {MAX_TOOLS} tools", "tools")
    checked = [_tool(tool, i) for i, tool in enumerate(tools)]
    names = [tool["function"]["name"] for tool in checked]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise bad_request(f"'tools' names the function {duplicate!r} twice", "tools")
    if choice in (None, "auto"):
        return ToolCalling(checked, "auto", parallel=parallel)
    if choice == "none":
        return None
    if choice == "required":
        return ToolCalling(checked, "required", parallel=parallel)
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(named, str):
        raise bad_request("'tool_choice' must be 'none', 'auto', 'required' or "
                          "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
    if named not in names:
        raise bad_request(f"'tool_choice' names the function {named!r}, which is not in 'tools'", "tool_choice")
    return ToolCalling(checked, "function", named, parallel)


def _tool(tool, index: int) -> dict:
    param = f"tools[{index}]"
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise bad_request(f"{param} must be {{\"type\": \"function\", \"function\": {{...}}}}", param)
    function = tool["function"]
    name = function.get("name")
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise bad_request(f"{param}.function.name must be 1 to 64 letters, digits, '_' or '-'", f"{param}.function.name")
    if not isinstance(function.get("description", ""), str):
        raise bad_request(f"{param}.function.description must be a string", f"{param}.function.description")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise bad_request(f"{param}.function.parameters must be a JSON schema object", f"{param}.function.parameters")
    return {"type": "function", "function": {k: v for k, v in function.items()
                                             if k in ("name", "description", "parameters", "strict")}}


# ---- messages --------------------------------------------------------------------------
def check_tool_calls(calls, param: str) -> list[dict]:
    """An assistant message's `tool_calls`, validated (arguments a JSON object in a string)."""
    if not isinstance(calls, list) or not calls:
        raise bad_request(f"{param} must be a non-empty array", param)
    checked = []
    for i, call in enumerate(calls):
        where = f"{param}[{i}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(call.get("id"), str) \
                or not isinstance(function.get("name"), str) or not isinstance(function.get("arguments"), str):
            raise bad_request(f"{where} must have a string id and a function with string name and arguments", where)
        try:
            arguments = json.loads(function["arguments"])
        except ValueError:
            raise bad_request(f"{where}.function.arguments is not valid JSON", f"{where}.function.arguments") from None
        checked.append({"id": call["id"], "type": "function",
                        "function": {"name": function["name"], "arguments": arguments}})
    return checked


def check_tool_results(messages: list[dict]) -> None:
    """Every `tool` message answers a call an earlier assistant message made (by tool_call_id)."""
    called: set[str] = set()
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            called.update(call["id"] for call in message.get("tool_calls", ()))
        elif message["role"] == "tool" and message["tool_call_id"] not in called:
            raise bad_request(f"messages[{i}] answers tool call {message['tool_call_id']!r}, which no earlier "
                              f"assistant message made", f"messages[{i}].tool_call_id")


def template_renders_tools(tokenizer) -> bool:
    """Whether the chat template itself reads `tools` (else the tools go in a system message)."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


def prompt_messages(messages: list[dict], calling: ToolCalling | None, native: bool) -> list[dict]:
    """The messages for a template that does not render tools: tools described in the system message,
    past calls as call blocks, tool results as user turns. Unchanged for a template that does."""
    if native:
        return messages
    rendered = []
    for message in messages:
        if message.get("tool_calls"):
            blocks = [f"{CALL_OPEN}\n{json.dumps(_call_body(call))}\n{CALL_CLOSE}" for call in message["tool_calls"]]
            content = "\n".join(filter(None, [message["content"], *blocks]))
            rendered.append({"role": "assistant", "content": content})
        elif message["role"] == "tool":
            rendered.append({"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"})
        else:
            rendered.append(message)
    if calling is None:
        return rendered
    instructions = _instructions(calling)
    if rendered and rendered[0]["role"] == "system":
        return [{"role": "system", "content": f"{rendered[0]['content']}\n\n{instructions}"}, *rendered[1:]]
    return [{"role": "system", "content": instructions}, *rendered]


def _call_body(call: dict) -> dict:
    return {"name": call["function"]["name"], "arguments": call["function"]["arguments"]}


def _instructions(calling: ToolCalling) -> str:
    signatures = "\n".join(json.dumps(f) for f in calling.functions())
    return ("You can call functions to help answer. Their signatures, one JSON object per line:\n"
            f"<tools>\n{signatures}\n</tools>\n"
            f"To call one, answer with a block like this, one block per call:\n"
            f'{CALL_OPEN}\n{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}\n{CALL_CLOSE}')
