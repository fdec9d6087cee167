"""Per-sequence state.

A request with `n` samples starts as a single sequence whose prompt is
prefilled once; when the prompt's last token is computed, it forks into `n`
sequences that share the prompt's KV blocks.
"""

from enum import Enum, auto
from itertools import count


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    _ids = count()

    def __init__(self, request_id: str, prompt_token_ids: list[int], params, num_samples: int = 1, index: int = 0):
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
        self.logprobs: list[float] = []
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.generator = None  # torch.Generator when the request is seeded

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
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def fork(self, index: int) -> "Sequence":
        """A sibling that shares everything computed so far (blocks are ref-counted by the block manager)."""
        child = Sequence(self.request_id, [], self.params, 1, index)
        child.token_ids = list(self.token_ids)
        child.num_prompt_tokens = self.num_prompt_tokens
        child.status = self.status
        child.num_computed_tokens = self.num_computed_tokens
        child.block_table = list(self.block_table)
        child.num_hashed_blocks = self.num_hashed_blocks
        child.logprobs = list(self.logprobs)
        return child

    def __repr__(self) -> str:
        return f"Sequence(id={self.seq_id}, req={self.request_id}, tokens={self.num_tokens}, computed={self.num_computed_tokens})"
