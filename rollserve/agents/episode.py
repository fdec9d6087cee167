"""`Episode`: what one multi-turn rollout returns to the trainer."""

from dataclasses import dataclass, field


@dataclass
class Episode:
    """One episode: the prompt, every model turn and every environment turn as one token sequence.

    `token_ids[i]` was sampled by the model where `mask[i] == 1` and came from the prompt or the
    environment where it is 0. `logprobs[i]` and `weight_versions[i]` are the sampled token's
    logprob (`SamplingParams.logprobs_mode`) and the weight version that produced it, None where
    `mask[i] == 0`. `rewards[t]` is what the environment gave turn t. `finish_reason`: "done" (the
    environment ended it), "max_turns", "length" (`max_total_tokens` or the model's context ran out)
    or "error" (the environment raised; `error` says what). `messages` is the conversation
    (None for an episode of token ids).
    """

    prompt_index: int
    sample_index: int
    num_prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    weight_versions: list[int | None] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    num_turns: int = 0
    finish_reason: str | None = None
    error: str | None = None
    messages: list[dict] | None = None

    @property
    def reward(self) -> float:
        return float(sum(self.rewards))

    @property
    def completion_ids(self) -> list[int]:
        """Everything after the prompt: model and environment tokens (`completion_mask` tells them apart)."""
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def completion_mask(self) -> list[int]:
        return self.mask[self.num_prompt_tokens:]

    def append(self, token_ids: list[int], sampled: bool, logprobs=None, weight_versions=None) -> None:
        self.token_ids.extend(token_ids)
        self.mask.extend([int(sampled)] * len(token_ids))
        self.logprobs.extend(logprobs if sampled else [None] * len(token_ids))
        self.weight_versions.extend(weight_versions if sampled else [None] * len(token_ids))
