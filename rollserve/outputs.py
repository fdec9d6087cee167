"""What `LLM.generate` returns."""

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One sampled completion of a prompt."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    cumulative_logprob: float | None
    finish_reason: str | None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    """All completions of one prompt, in sample-index order."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    weight_version: int = 0

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)
