"""The requests in flight: sampling requests (`n` sequences each) and beam-search requests (live beams).

Both keep what the caller asked for (id, prompt, parameters, the weight version at arrival) and know
which of their sequences still hold blocks and how to build their final output.
"""

from abc import ABC, abstractmethod
from typing import NamedTuple

import torch

from ..outputs import BeamSearchOutput, BeamSearchSequence, CompletionOutput, RequestOutput, StepOutput
from .deltas import final_delta, sample_delta, top_logprob_dicts
from .sequence import BeamState, Sequence


class BaseRequest(ABC):
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params, weight_version: int):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.weight_version = weight_version

    @abstractmethod
    def unfinished_seqs(self) -> list[Sequence]:
        """The sequences still scheduled (running or waiting): what an abort must free."""

    @abstractmethod
    def output(self, detokenize):
        """The request's result so far; `detokenize(token_ids, skip_special_tokens) -> str`."""

    def step_output(self, output) -> StepOutput:
        """The final `StepOutput` of this request."""
        return StepOutput(self.request_id, [], True, output, self.weight_version)


class Request(BaseRequest):
    """A sampling request: one sequence until its prompt is computed, then `params.n` of them."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params, weight_version: int,
                 stream: bool = False, park: bool = False):
        super().__init__(request_id, prompt, prompt_token_ids, params, weight_version)
        self.stream = stream  # report every step's new tokens, not only the final output
        self.park = park  # finished samples keep their KV blocks for a resumed request (scheduler.py)
        self.seqs: list[Sequence] = []
        self.num_finished = 0
        self.prompt_logprobs: list[tuple] = []  # (targets, logprobs, top ids, top logprobs) per computed chunk

    def unfinished_seqs(self) -> list[Sequence]:
        return [seq for seq in self.seqs if not seq.is_finished]

    def output(self, detokenize) -> RequestOutput:
        p = self.params
        outs = [_completion(seq, p, detokenize) for seq in sorted(self.seqs, key=lambda s: s.index)]
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outs, self.first_token_version,
                             self._prompt_logprobs() if p.prompt_logprobs is not None else None)

    @property
    def first_token_version(self) -> int:
        """The weight version of the request's first token (all samples start in the same step)."""
        first = self.seqs[0].weight_versions if self.seqs else []
        return first[0] if first else self.weight_version

    def step_output(self, output: RequestOutput) -> StepOutput:
        """The final `StepOutput`: the output and, when streamed, what each sample has not sent yet."""
        by_index = {seq.index: seq for seq in self.seqs}
        deltas = [final_delta(by_index.get(c.index), c) for c in output.outputs] if self.stream else []
        version = deltas[0].weight_versions[0] if deltas and deltas[0].weight_versions else output.weight_version
        return StepOutput(self.request_id, deltas, True, output, version)

    def deltas(self) -> list:
        """What each unfinished sample gained since its last delta."""
        return [d for seq in self.seqs if not seq.is_finished and (d := sample_delta(seq)) is not None]

    def _prompt_logprobs(self) -> list:
        out: list = [None]
        k = self.params.prompt_logprobs
        for targets, sel, ids, vals in self.prompt_logprobs:
            targets, sel = targets.tolist(), sel.tolist()
            ids, vals = (ids[:, :k].tolist(), vals[:, :k].tolist()) if k else ([[]] * len(sel), [[]] * len(sel))
            out.extend(top_logprob_dicts(targets, sel, ids, vals))
        return out


def _completion(seq: Sequence, p, detokenize) -> CompletionOutput:
    token_ids = seq.completion_token_ids
    text = detokenize(token_ids, p.skip_special_tokens)
    if seq.stop_text_end is not None:  # cut at the stop string, found again in the full decode
        stop = seq.stop_reason
        # Where it was found in seq.text, counted from the end (both texts end with the newest tokens): an
        # earlier occurrence, e.g. one inside the first min_tokens tokens, did not stop the sequence.
        found = seq.stop_text_end - (len(stop) if p.include_stop_str_in_output else 0)
        i = text.find(stop, max(0, len(text) - (len(seq.text) - found)))
        text = text[:i + (len(stop) if p.include_stop_str_in_output else 0)] if i >= 0 else seq.text[:seq.stop_text_end]
    logprobs = cumulative = top = ranks = None
    if p.logprobs is not None:
        lps = torch.stack(seq.logprobs) if seq.logprobs else torch.zeros(0)
        logprobs = lps.tolist()
        cumulative = float(lps.double().sum())
        if p.logprobs > 0:
            k = p.logprobs
            # Each step's top ids are as wide as that step's batch needed (its largest `logprobs`): cut first.
            ids = torch.stack([t[:k] for t in seq.top_ids]).tolist()
            vals = torch.stack([t[:k] for t in seq.top_logprobs]).tolist()
            top = top_logprob_dicts(token_ids, logprobs, ids, vals)
            ranks = torch.stack(seq.ranks).tolist()
    return CompletionOutput(
        index=seq.index, text=text, token_ids=token_ids, logprobs=logprobs, cumulative_logprob=cumulative,
        finish_reason=seq.finish_reason, stop_reason=seq.stop_reason, top_logprobs=top, token_ranks=ranks,
        weight_versions=list(seq.weight_versions),
    )


class BeamHypothesis(NamedTuple):
    token_ids: list[int]  # completion tokens
    logprobs: list[float]
    cumulative_logprob: float
    finish_reason: str  # "stop", "length" or "abort"


class BeamRequest(BaseRequest):
    """A beam-search request: its live beams (sequences sharing blocks) and the hypotheses that ended."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params, weight_version: int):
        super().__init__(request_id, prompt, prompt_token_ids, params, weight_version)
        self.live: list[Sequence] = []
        self.finished: list[BeamHypothesis] = []
        self.next_index = 1  # of the next forked beam

    def first_beam(self) -> Sequence:
        """The one sequence the search starts from (its prompt is prefilled once for every beam)."""
        seq = Sequence(self.request_id, self.prompt_token_ids, self.params, beam=BeamState())
        self.live.append(seq)
        return seq

    def fork(self, parent: Sequence) -> Sequence:
        """A new beam continuing `parent` (a live beam) with a copy of its search state."""
        child = parent.fork(self.next_index)
        self.next_index += 1
        return child

    def score(self, cumulative: float, length: int) -> float:
        return cumulative / (max(length, 1) ** self.params.length_penalty)

    def unfinished_seqs(self) -> list[Sequence]:
        return list(self.live)

    def output(self, detokenize) -> BeamSearchOutput:
        hyps = list(self.finished)
        if not hyps:  # aborted before any beam ended
            hyps = [BeamHypothesis(s.completion_token_ids, list(s.beam.logprobs), s.beam.cumulative_logprob, "abort")
                    for s in self.live]
        ranked = sorted(hyps, key=lambda h: self.score(h.cumulative_logprob, len(h.token_ids)),
                        reverse=True)[:self.params.beam_width]
        seqs = [BeamSearchSequence(h.token_ids, detokenize(h.token_ids, True), h.logprobs, h.cumulative_logprob,
                                   self.score(h.cumulative_logprob, len(h.token_ids)), h.finish_reason)
                for h in ranked]
        return BeamSearchOutput(self.request_id, self.prompt, self.prompt_token_ids, seqs)
