"""The environment protocol of multi-turn episodes, and how its methods are called off the engine thread."""

import asyncio
import inspect
from typing import Any, Protocol, Union

Message = dict[str, Any]
# What an environment answers: chat messages (rendered by the chat template) or token ids (appended as given).
Observation = Union[Message, list[Message], list[int]]


class Environment(Protocol):
    """One episode's environment. `env_factory()` makes a fresh one per episode.

    `reset(prompt, **row)` returns the first observation appended after the prompt (or None);
    `row` holds the prompt row's other fields. `step(completion_text, completion_ids)` is given
    each model turn and returns `(observation | None, reward, done)`. Either may be `async def`.
    An episode's observations are all chat messages (a `{"role": "user" | "tool", "content": ...}`
    dict or a list of them) when its prompt is text or a conversation, all token ids when its
    prompt is token ids.
    """

    def reset(self, prompt, **row) -> Observation | None: ...

    def step(self, completion_text: str, completion_ids: list[int]) -> tuple[Observation | None, float, bool]: ...


def call(fn, *args, **kwargs):
    """Calls `fn`; a coroutine it returns is run to completion here (a pool thread has no event loop)."""
    result = fn(*args, **kwargs)
    if inspect.isawaitable(result):
        return asyncio.run(_await(result))
    return result


async def _await(awaitable):
    return await awaitable


def is_token_ids(value) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def as_messages(observation, where: str) -> list[Message]:
    """A message or a list of them -> a list of messages; anything else raises `TypeError` naming `where`."""
    if isinstance(observation, dict):
        observation = [observation]
    if not isinstance(observation, list) or not observation or not all(
            isinstance(m, dict) and "role" in m for m in observation):
        raise TypeError(f"{where} must be a chat message (a dict with a 'role'), a list of them, or token ids; "
                        f"got {observation!r:.120}")
    return observation
