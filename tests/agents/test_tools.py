"""The tool-calling environment: parsing Hermes/Qwen `<tool_call>` blocks, tools run with a timeout, every
failure an error message to the model, and tools rendered by the chat template end to end."""

import time

import pytest
from transformers import AutoTokenizer

from rollserve import LLM, SamplingParams
from rollserve.agents import ToolEnvironment, parse_tool_calls, run_episodes

from helpers import one_thread, save_tiny_llama  # noqa: F401 (fixtures)


def add(a: int, b: int) -> int:
    """Adds two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a + b


def explode(reason: str) -> str:
    """Always fails.

    Args:
        reason: Why.
    """
    raise RuntimeError(f"boom: {reason}")


def slow(seconds: float) -> str:
    """Sleeps.

    Args:
        seconds: How long.
    """
    time.sleep(seconds)
    return "awake"


def call(name, **arguments) -> str:
    import json

    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def test_parse_valid_calls():
    text = 'Let me add. <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call> and ' \
           '<tool_call>{"name": "add", "arguments": "{\\"a\\": 3, \\"b\\": 4}"}</tool_call>'
    calls = parse_tool_calls(text)
    assert [(c.name, c.arguments, c.error) for c in calls] == [("add", {"a": 1, "b": 2}, None),
                                                              ("add", {"a": 3, "b": 4}, None)]
    assert parse_tool_calls("The answer is 3.") == []


@pytest.mark.parametrize("text,problem", [
    ('<tool_call>{"name": "add", "arguments": {"a": 1,</tool_call>', "not valid JSON"),
    ('<tool_call>["add"]</tool_call>', "must be a JSON object"),
    ('<tool_call>{"arguments": {}}</tool_call>', "must be a JSON object"),
    ('<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>', "arguments of 'add' must be a JSON object"),
    ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}', "not closed"),
])
def test_parse_malformed_calls(text, problem):
    [c] = parse_tool_calls(text)
    assert c.error is not None and problem in c.error


def _observe(env, text):
    observation, reward, done = env.step(text, [])
    assert not done and reward == 0.0
    return [m["content"] for m in observation]


def test_tool_results_and_errors_are_messages_to_the_model():
    env = ToolEnvironment([add, explode, slow], timeout=0.3)
    assert [s["function"]["name"] for s in env.tools] == ["add", "explode", "slow"]
    assert env.tools[0]["function"]["parameters"]["required"] == ["a", "b"]
    assert _observe(env, call("add", a=2, b=40)) == ["42"]
    [unknown] = _observe(env, call("subtract", a=1, b=2))
    assert "unknown tool 'subtract'" in unknown and "add" in unknown
    [missing] = _observe(env, call("add", a=1))
    assert missing.startswith("Error: wrong arguments for 'add'") and "b" in missing
    [extra] = _observe(env, call("add", a=1, b=2, c=3))
    assert extra.startswith("Error: wrong arguments for 'add'")
    [bad_json] = _observe(env, '<tool_call>{"name": "add", </tool_call>')
    assert bad_json.startswith("Error: the tool call is not valid JSON")
    [raised] = _observe(env, call("explode", reason="test"))
    assert raised == "Error: 'explode' raised RuntimeError: boom: test"
    start = time.perf_counter()
    [timed_out] = _observe(env, call("slow", seconds=5))
    assert time.perf_counter() - start < 3
    assert timed_out == "Error: 'slow' raised TimeoutError: timed out after 0.3 s"
    both = _observe(env, call("add", a=1, b=1) + call("slow", seconds=0.01))
    assert both == ["2", "awake"]


def test_an_answer_without_a_call_ends_the_episode_with_its_reward():
    env = ToolEnvironment([add], reward=lambda text: float("42" in text))
    assert env.step("It is 42.", []) == (None, 1.0, True)


# A template that renders tools (Qwen-style: in the system turn, results as <tool_response> in a user turn).
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nYou may call these tools:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n"
    "</tool_response><|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class ScriptedCaller(ToolEnvironment):
    """A tool environment fed fixed "model" turns (a tiny random model never writes a tool call): a good call,
    a tool that raises, one that times out, then an answer."""

    SCRIPT = [call("add", a=20, b=22), call("explode", reason="disk full"), call("slow", seconds=5), "Done."]

    def __init__(self):
        super().__init__([add, explode, slow], timeout=0.2)
        self.turn = 0

    def step(self, completion_text, completion_ids):
        text = self.SCRIPT[self.turn]
        self.turn += 1
        return super().step(text, completion_ids)


def test_tool_episode_end_to_end(tmp_path, smollm2_path):
    save_tiny_llama(tmp_path, smollm2_path, max_position_embeddings=1024, tie_word_embeddings=True)  # room for tools
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    tokenizer.chat_template = TOOL_TEMPLATE
    llm = LLM(tmp_path, tokenizer=tokenizer, dtype="float32", kv_cache_memory=16 << 20)
    [e] = run_episodes(llm, ["What is 20 + 22?"], ScriptedCaller, SamplingParams(max_tokens=6, seed=0), max_turns=5)
    assert e.finish_reason == "done" and e.num_turns == 4
    results = [m["content"] for m in e.messages if m["role"] == "tool"]
    assert results[0] == "42" and "boom: disk full" in results[1] and "timed out after 0.2 s" in results[2]
    text = tokenizer.decode(e.token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert '"name": "add"' in text.split("<|im_end|>")[0]  # the tools rendered in the system turn
    assert "<tool_response>\n42\n</tool_response>" in text
    assert e.mask.count(1) == sum(1 for lp in e.logprobs if lp is not None) > 0
