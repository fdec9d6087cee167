"""What `LLM.generate`, `LLM.beam_search` and `LLM.step` return."""

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

    `weight_version` is the version that produced the request's first token (the version it was
    admitted with while it has none); `CompletionOutput.weight_versions` has every token's.
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


@dataclass
class SampleDelta:
    """What one sample of a streaming request gained in one step: its new tokens and the text they complete.

    Text is held back while it would end inside a character, and by the longest stop string minus one
    character, so a stop string is never streamed; the last delta of a sample (`finish_reason` set)
    carries the rest, and the deltas' texts add up to the final `CompletionOutput.text`.
    """

    index: int
    token_ids: list[int]
    text: str
    weight_versions: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class StepOutput:
    """One request's news from one `LLM.step()`.

    A streaming request (`add_request(..., stream=True)`) reports every step that gave it tokens, with a
    `SampleDelta` per sample that advanced; any request reports the step that finished it, with
    `finished=True` and its final `output` (a `RequestOutput`, or a `BeamSearchOutput` for beam search).
    `weight_version` is the version of the first token in `deltas` (of the request when there are none).
    """

    request_id: str
    deltas: list[SampleDelta]
    finished: bool
    output: "RequestOutput | BeamSearchOutput | None" = None
    weight_version: int = 0
