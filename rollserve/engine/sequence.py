"""Per-sequence state.

A request with `n` samples starts as a single sequence whose prompt is
prefilled once; when the prompt's last token is computed, it forks into `n`
sequences that share the prompt's KV blocks. A beam of a beam-search request
carries its search state (`BeamState`); a forked beam gets a copy.
"""

from dataclasses import dataclass, field
from enum import Enum, auto
from itertools import count


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass
class BeamState:
    """What beam search keeps on one beam (see beam_search.py); logprobs are under `log_softmax(logits)`."""

    cumulative_logprob: float = 0.0
    logprobs: list[float] = field(default_factory=list)  # one per completion token
    # The best continuations (logprobs, token ids) once this beam's newest logits were computed; they
    # wait here, across preemptions, until every live beam of the request has its own.
    candidates: tuple[list[float], list[int]] | None = None

    def fork(self) -> "BeamState":
        """The state of a new beam continuing this one; its candidates come from its own logits."""
        return BeamState(self.cumulative_logprob, list(self.logprobs))

    def advance(self, logprob: float) -> None:
        """The beam took a token of `logprob`; candidates are computed again for the next one."""
        self.cumulative_logprob += logprob
        self.logprobs.append(logprob)
        self.candidates = None


class Sequence:
    _ids = count()

    def __init__(self, request_id: str, prompt_token_ids: list[int], params, num_samples: int = 1, index: int = 0,
                 beam: BeamState | None = None):
        self.seq_id = next(Sequence._ids)
        self.request_id = request_id
        self.params = params
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        # Samples still to be forked from this sequence once its prompt is computed.
        self.num_samples = num_samples
        self.index = index
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.num_hashed_blocks = 0
        # Per generated token, kept as tensors until the API boundary: the logprob (0-d), the
        # top alternatives' ids and logprobs ([k]), the sampled token's rank (0-d), the weight version.
        self.logprobs: list = []
        self.top_ids: list = []
        self.top_logprobs: list = []
        self.ranks: list = []
        self.weight_versions: list[int] = []
        # Incremental detokenisation, for requests with stop strings or streamed ones.
        self.tracks_text = bool(getattr(params, "stop", None))
        self.text = ""
        self.prefix_offset = max(0, len(prompt_token_ids) - 5)
        self.read_offset = len(prompt_token_ids)
        self.stop_text_end: int | None = None  # where `text` is cut when a stop string ended it
        self.num_streamed_tokens = 0  # completion tokens and characters of `text` already streamed
        self.num_streamed_chars = 0
        # A request that wants prompt logprobs computes its whole prompt (no prefix-cache hits) until it has them.
        self.skip_prefix_cache = getattr(params, "prompt_logprobs", None) is not None
        self.num_prompt_logprobs = 0  # prompt positions whose next-token logprob has been recorded
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.generator = None  # torch.Generator when the request is seeded
        self.beam = beam  # the search state when this is a beam of a beam-search request

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_beam(self) -> bool:
        return self.beam is not None

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def fork(self, index: int) -> "Sequence":
        """A sibling that shares everything computed so far (blocks are ref-counted by the block manager)."""
        child = Sequence(self.request_id, [], self.params, 1, index, None if self.beam is None else self.beam.fork())
        child.token_ids = list(self.token_ids)
        child.num_prompt_tokens = self.num_prompt_tokens
        child.status = self.status
        child.num_computed_tokens = self.num_computed_tokens
        child.block_table = list(self.block_table)
        child.num_hashed_blocks = self.num_hashed_blocks
        for name in ("logprobs", "top_ids", "top_logprobs", "ranks", "weight_versions"):
            setattr(child, name, list(getattr(self, name)))
        child.tracks_text, child.text = self.tracks_text, self.text
        child.prefix_offset, child.read_offset = self.prefix_offset, self.read_offset
        child.num_streamed_tokens, child.num_streamed_chars = self.num_streamed_tokens, self.num_streamed_chars
        child.skip_prefix_cache = self.skip_prefix_cache
        return child

    def __repr__(self) -> str:
        return f"Sequence(id={self.seq_id}, req={self.request_id}, tokens={self.num_tokens}, computed={self.num_computed_tokens})"
