"""A tool-calling environment: Python functions the model calls in the Hermes/Qwen format.

The model writes `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (one or more); each
call runs with a timeout and its result comes back as a `{"role": "tool", ...}` message. A call
that cannot be parsed, names an unknown tool, has wrong arguments, raises or times out becomes an
error message to the model, never a crash: the episode goes on. A turn without a tool call ends
the episode, scored by `reward(completion_text)`. The tools are rendered by the chat template
from their JSON schemas (`transformers.utils.get_json_schema`: type hints and a Google-style
docstring); `run_episodes` passes an environment's `tools` to the template as `tools=`.
"""

import inspect
import json
import re
import threading
from dataclasses import dataclass

from .environment import call

TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


@dataclass
class ToolCall:
    """One parsed call, or why it could not be parsed (`error`, with `name` when it was found)."""

    name: str | None
    arguments: dict | None
    error: str | None = None


def parse_tool_calls(text: str) -> list[ToolCall]:
    """The `<tool_call>{json}</tool_call>` blocks of `text`, in order (an unterminated block is an error)."""
    calls = [_parse_one(body) for body in TOOL_CALL.findall(text)]
    if text.count("<tool_call>") > len(calls):
        calls.append(ToolCall(None, None, "a <tool_call> block is not closed by </tool_call>"))
    return calls


def _parse_one(body: str) -> ToolCall:
    try:
        value = json.loads(body)
    except json.JSONDecodeError as e:
        return ToolCall(None, None, f"the tool call is not valid JSON ({e.msg} at character {e.pos})")
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return ToolCall(None, None, 'a tool call must be a JSON object {"name": ..., "arguments": {...}}')
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):  # some templates and models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    if not isinstance(arguments, dict):
        return ToolCall(value["name"], None, f"the arguments of {value['name']!r} must be a JSON object")
    return ToolCall(value["name"], arguments)


def run_with_timeout(fn, arguments: dict, timeout: float):
    """`fn(**arguments)` (awaited if a coroutine) in a daemon thread; raises `TimeoutError` after `timeout`
    seconds. Python cannot stop a thread: a call that timed out runs on in the background, ignored."""
    box: dict = {}

    def target():
        try:
            box["result"] = call(fn, **arguments)
        except BaseException as e:  # handed to the caller
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True, name=f"rollserve-tool-{getattr(fn, '__name__', 'tool')}")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"timed out after {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["result"]


class ToolEnvironment:
    """An environment whose model calls `tools` (Python functions) until it answers without a call.

    `timeout`: seconds per call. `reward(completion_text) -> float` scores the final answer (default 0).
    `tools` (the attribute) holds the JSON schemas the chat template renders.
    """

    def __init__(self, tools, timeout: float = 10.0, reward=None):
        from transformers.utils import get_json_schema

        if not tools or not all(callable(t) for t in tools):
            raise TypeError("tools must be a non-empty list of functions")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout={timeout!r} is invalid: must be a number of seconds > 0")
        self.functions = {t.__name__: t for t in tools}
        self.tools = [get_json_schema(t) for t in tools]
        self.timeout = timeout
        self.reward = reward

    def reset(self, prompt, **row):
        return None

    def step(self, completion_text: str, completion_ids: list[int]):
        calls = parse_tool_calls(completion_text)
        if not calls:
            return None, float(self.reward(completion_text)) if self.reward else 0.0, True
        return [self._message(c) for c in calls], 0.0, False

    def _message(self, c: ToolCall) -> dict:
        return {"role": "tool", "name": c.name or "", "content": self._result(c)}

    def _result(self, c: ToolCall) -> str:
        if c.error is not None:
            return f"Error: {c.error}"
        fn = self.functions.get(c.name)
        if fn is None:
            return f"Error: unknown tool {c.name!r}; the tools are {sorted(self.functions)}"
        try:
            inspect.signature(fn).bind(**c.arguments)
        except TypeError as e:
            return f"Error: wrong arguments for {c.name!r}: {e}"
        try:
            result = run_with_timeout(fn, c.arguments, self.timeout)
        except Exception as e:  # a tool's failure is news for the model, not a crash of the run
            return f"Error: {c.name!r} raised {type(e).__name__}: {e}"
        return result if isinstance(result, str) else json.dumps(result, default=str)
