"""The one input processor: prompts as strings, token ids or chat messages -> checked token ids.

The BOS rule, stated once: a string prompt is tokenized with the tokenizer's
special tokens (a BOS where the tokenizer adds one); a chat prompt is rendered
by the chat template, which writes its own special tokens, and tokenized
without adding any; token ids are taken as given. `LLM`, `RemoteLLM`'s server,
the HTTP front, datasets and the TRL adapter all come through here, so a bad
prompt gets the same message wherever it was sent.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Prompt:
    """A processed prompt: its token ids and the text the model sees (None when given as ids)."""

    token_ids: list[int]
    text: str | None = None


def is_conversation(value) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(m, dict) for m in value)


def _is_token_ids(value) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and isinstance(value[0], int)


def as_prompt_list(prompts) -> list:
    """One prompt (a string, token ids, a conversation) or a list of them -> a list of prompts."""
    if isinstance(prompts, (str, Prompt)) or _is_token_ids(prompts) or is_conversation(prompts):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a string, a list of token ids, a conversation (list of message dicts) "
                        f"or a list of those; got {type(prompts).__name__}")
    return list(prompts)


class InputProcessor:
    """Encodes and checks prompts for one engine.

    `check(token_ids, params) -> str | None` is the engine's own verdict (vocabulary, context length,
    KV capacity, logprob widths); every problem is raised as `ValueError("<where>: <problem>")`.
    """

    def __init__(self, tokenizer, check):
        self.tokenizer = tokenizer
        self._check = check

    def render_chat(self, messages, where: str, chat_template_kwargs: dict | None = None) -> str:
        """The conversation as the chat template renders it, ready for the assistant's turn."""
        if self.tokenizer is None:
            raise ValueError(f"{where}: a conversation needs a tokenizer (the engine has none); pass token ids")
        if not is_conversation(messages):
            raise ValueError(f"{where} must be a non-empty list of message dicts")
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
            raise TypeError(f"chat_template_kwargs must be a dict, got {type(chat_template_kwargs).__name__}")
        try:
            return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True,
                                                      **(chat_template_kwargs or {}))
        except Exception as e:  # jinja and tokenizer errors come in many types
            raise ValueError(f"{where}: the chat template failed: {type(e).__name__}: {e}") from None

    def encode(self, prompt, where: str, chat_template_kwargs: dict | None = None) -> Prompt:
        """A string, token ids, a conversation or a `Prompt` -> a `Prompt` (not yet checked against the engine)."""
        if isinstance(prompt, Prompt):
            return prompt
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{where} is a string but the engine has no tokenizer; pass token ids")
            if not prompt:
                raise ValueError(f"{where}: the prompt is empty")
            return Prompt(list(self.tokenizer(prompt).input_ids), prompt)
        if is_conversation(prompt):
            text = self.render_chat(prompt, where, chat_template_kwargs)
            return Prompt(list(self.tokenizer(text, add_special_tokens=False).input_ids), text)
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                            for t in prompt):
            raise TypeError(f"{where} must be a string, a list of int token ids or a conversation "
                            f"(a list of message dicts), got {type(prompt).__name__}")
        return Prompt(list(prompt))

    def encode_texts(self, texts: list[str], chat: list[bool]) -> list[list[int]]:
        """Token ids of many texts at once (a batched tokenizer call per kind); `chat[i]`: text i is a rendered
        chat template (no special tokens added)."""
        ids: list[list[int]] = [[] for _ in texts]
        for flag in (False, True):
            where = [i for i, c in enumerate(chat) if c == flag]
            if where:
                encoded = self.tokenizer([texts[i] for i in where], add_special_tokens=not flag).input_ids
                for i, token_ids in zip(where, encoded):
                    ids[i] = list(token_ids)
        return ids

    def problem(self, prompt: Prompt, params) -> str | None:
        """Why the engine cannot run this prompt with these params, or None when it can."""
        return self._check(prompt.token_ids, params)

    def check(self, prompt: Prompt, params, where: str) -> None:
        """Raises `ValueError` naming `where` when the engine cannot run this prompt with these params."""
        problem = self.problem(prompt, params)
        if problem:
            raise ValueError(f"{where}: {problem}")

    def process(self, prompt, params, where: str, chat_template_kwargs: dict | None = None) -> Prompt:
        """`encode` then `check`."""
        encoded = self.encode(prompt, where, chat_template_kwargs)
        self.check(encoded, params, where)
        return encoded
