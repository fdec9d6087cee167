"""Streaming deltas: what a sample gained since it last reported, in O(new tokens).

The text comes from the engine's incremental detokenizer (`Sequence.text`), never from
decoding the whole completion again; only the final delta reads the finished
`CompletionOutput`, whose text is decoded once.
"""

import torch

from ..outputs import CompletionOutput, SampleDelta
from .sequence import Sequence


def top_logprob_dicts(token_ids: list[int], logprobs: list[float], ids: list[list[int]],
                      values: list[list[float]]) -> list[dict]:
    """Per position: the top alternatives' `{id: logprob}` plus the chosen token's own logprob."""
    return [{**dict(zip(i, v)), t: lp} for t, lp, i, v in zip(token_ids, logprobs, ids, values)]


def sample_delta(seq: Sequence) -> SampleDelta | None:
    """The tokens `seq` sampled since its last delta and the text that is safe to show; None when nothing is new."""
    start = seq.num_streamed_tokens
    if seq.num_completion_tokens <= start:
        return None
    p = seq.params
    token_ids = seq.token_ids[seq.num_prompt_tokens + start:]
    delta = SampleDelta(seq.index, token_ids, "", seq.weight_versions[start:])
    if p.logprobs is not None:
        delta.logprobs = torch.stack(seq.logprobs[start:]).tolist()
        if p.logprobs > 0:
            ids = torch.stack(seq.top_ids[start:])[:, :p.logprobs].tolist()
            values = torch.stack(seq.top_logprobs[start:])[:, :p.logprobs].tolist()
            delta.top_logprobs = top_logprob_dicts(token_ids, delta.logprobs, ids, values)
    seq.num_streamed_tokens = seq.num_completion_tokens
    hold = max(map(len, p.stop)) - 1 if p.stop else 0
    visible = len(seq.text) - hold
    if visible > seq.num_streamed_chars:
        delta.text = seq.text[seq.num_streamed_chars:visible]
        seq.num_streamed_chars = visible
    return delta


def final_delta(seq: Sequence | None, completion: CompletionOutput) -> SampleDelta:
    """The rest of a finished sample: tokens and text not streamed yet, with its finish reason."""
    tokens, chars = (seq.num_streamed_tokens, seq.num_streamed_chars) if seq is not None else (0, 0)
    c = completion
    return SampleDelta(c.index, c.token_ids[tokens:], c.text[chars:], (c.weight_versions or [])[tokens:],
                       None if c.logprobs is None else c.logprobs[tokens:],
                       None if c.top_logprobs is None else c.top_logprobs[tokens:], c.finish_reason, c.stop_reason)
