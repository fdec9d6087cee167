"""Token in, token out: the next turn's prompt is the tokens so far plus the environment's tokens.

The environment's messages become tokens by rendering the whole conversation with the chat
template and tokenizing only the text that follows what the episode already holds. The history
is never tokenized again, so the model is trained on exactly the tokens it sampled. That needs
the template's prefix property: the rendering of a longer conversation starts with the text of
the shorter one and the model's turn as sampled. A template that rewrites earlier turns (strips
whitespace, drops reasoning, reformats tool calls) breaks it, and `TemplatePrefixError` says so.
"""


class TemplatePrefixError(ValueError):
    """The chat template rendered a conversation whose beginning differs from the episode's tokens so far."""


class ChatSuffix:
    """Renders conversations for one engine (`llm.inputs`) and one tokenizer; `kwargs` go to the chat
    template (`tools=[...]` for a tool environment)."""

    def __init__(self, inputs, tokenizer):
        self.inputs = inputs
        self.tokenizer = tokenizer

    def first(self, messages: list[dict], where: str, kwargs: dict) -> tuple[list[int], str]:
        """The token ids and text of the first prompt."""
        prompt = self.inputs.encode(messages, where, kwargs)
        return prompt.token_ids, prompt.text

    def decode(self, token_ids: list[int]) -> str:
        """The text of sampled tokens as the template sees it (special tokens kept, no clean-up)."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def extend(self, history: str, messages: list[dict], where: str, kwargs: dict) -> tuple[list[int], str]:
        """The token ids of what the conversation `messages` adds after `history` (the text of the tokens so
        far), and the new history text."""
        full = self.inputs.render_chat(messages, where, kwargs)
        if not full.startswith(history):
            i = next((k for k, (a, b) in enumerate(zip(history, full)) if a != b), min(len(history), len(full)))
            name = getattr(self.tokenizer, "name_or_path", None) or type(self.tokenizer).__name__
            raise TemplatePrefixError(
                f"{where}: the chat template of {name!r} does not have the prefix property: rendering the "
                f"conversation gives {full[max(0, i - 40):i + 40]!r} where the episode's tokens so far read "
                f"{history[max(0, i - 40):i + 40]!r} (character {i}). Multi-turn episodes append the environment's "
                f"tokens to the sampled ones and never re-tokenize the history; use a template that renders "
                f"earlier turns unchanged, or an environment that answers in token ids")
        suffix = full[len(history):]
        ids = list(self.tokenizer(suffix, add_special_tokens=False).input_ids) if suffix else []
        return ids, full
