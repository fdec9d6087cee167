"""What `LLM.generate` and `LLM.beam_search` return."""

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One sampled completion of a prompt.

    `logprobs[i]` is the logprob of `token_ids[i]` (see `SamplingParams.logprobs_mode`).
    With `SamplingParams.logprobs=k`, `top_logprobs[i]` maps the k most likely
    token ids at step i, plus the sampled one, to their logprobs, and
    `token_ranks[i]` is the sampled token's rank (1 = most likely).
    `weight_versions[i]` is the weight version that produced `token_ids[i]`.
    The token that completed a stop string stays in `token_ids`; `text` is cut.
    """

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    cumulative_logprob: float | None
    finish_reason: str | None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    top_logprobs: list[dict[int, float]] | None = None
    token_ranks: list[int] | None = None
    weight_versions: list[int] | None = None


@dataclass
class RequestOutput:
    """All completions of one prompt, in sample-index order.

    `weight_version` is the version the request was admitted with;
    `prompt_logprobs[i]` maps prompt token i (and the top alternatives) to its
    logprob, `None` for the first.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    weight_version: int = 0
    prompt_logprobs: list[dict[int, float] | None] | None = None

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


@dataclass
class BeamSearchSequence:
    """One finished beam: `score = cumulative_logprob / len(token_ids) ** length_penalty`."""

    token_ids: list[int]
    text: str
    logprobs: list[float]
    cumulative_logprob: float
    score: float
    finish_reason: str  # "stop" | "length"


@dataclass
class BeamSearchOutput:
    """The `beam_width` best beams of one prompt, best first."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[BeamSearchSequence] = field(default_factory=list)
