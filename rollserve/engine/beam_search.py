"""Beam search inside the engine: beams are sequences that share KV blocks.

A beam request starts as one sequence. Each time one of its live beams has
the logits of its newest token, its `2 * beam_width` best continuations under
`log_softmax(logits)` are kept on it. Once every live beam has them (beams may
be computed in different steps after a preemption; candidates survive it),
the request picks the `beam_width` best candidates by cumulative logprob: a
candidate ending the beam (EOS, a stop id) among the top `beam_width` becomes
a finished hypothesis, the others continue. A parent chosen k times forks
k - 1 children (block ref counts; the partial last block is copied on write
at the next append); a parent chosen 0 times is freed. The search ends once
`beam_width` hypotheses finished or the live beams reached `max_tokens`.
"""

import torch

from ..outputs import BeamSearchOutput
from .request import BeamHypothesis, BeamRequest
from .scheduler import Scheduler
from .sequence import Sequence


class BeamSearcher:
    """Owned by the engine; advances beam requests from the logits rows of their sequences.

    It asks the engine for requests, EOS ids, the context length and the weight version, tells it of
    generated tokens and finished requests, and forks and frees beams through the scheduler.
    """

    def __init__(self, engine, scheduler: Scheduler):
        self.engine = engine
        self.scheduler = scheduler

    def process(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[BeamSearchOutput]:
        """logits[i]: the newest token's logits of beam sequence seqs[i]."""
        logp = torch.log_softmax(logits, dim=-1)
        touched = {}
        for row, seq in zip(logp, seqs):
            request = self.engine.request(seq.request_id)
            k = min(2 * request.params.beam_width, row.shape[0])
            vals, ids = torch.topk(row, k)
            seq.beam.candidates = (vals.tolist(), ids.tolist())
            touched[request.request_id] = request
        finished = []
        for request in touched.values():
            if all(s.beam.candidates is not None for s in request.live):
                if self._advance(request):
                    finished.append(self._finish(request))
        return finished

    def _ends(self, request: BeamRequest, token: int) -> bool:
        p = request.params
        return token in p.stop_token_ids or (not p.ignore_eos and token in self.engine.eos_token_ids)

    def _advance(self, request: BeamRequest) -> bool:
        """One selection round; returns True when the search of `request` is over."""
        width = request.params.beam_width
        cands = []
        for seq in request.live:
            vals, ids = seq.beam.candidates
            cands.extend((seq.beam.cumulative_logprob + v, i, v, seq) for v, i in zip(vals, ids))
        cands.sort(key=lambda c: c[0], reverse=True)
        chosen: list[tuple[Sequence, int, float]] = []
        for rank, (cum, token, lp, seq) in enumerate(cands):
            if self._ends(request, token):
                if rank < width:
                    request.finished.append(BeamHypothesis(seq.completion_token_ids + [token],
                                                           seq.beam.logprobs + [lp], cum, "stop"))
                continue
            chosen.append((seq, token, lp))
            if len(chosen) == width:
                break
        if len(request.finished) >= width or not chosen:
            return True
        self._apply(request, chosen)
        first = request.live[0]
        if first.num_completion_tokens >= request.params.max_tokens or first.num_tokens >= self.engine.max_model_len:
            for seq in request.live:
                request.finished.append(BeamHypothesis(seq.completion_token_ids, list(seq.beam.logprobs),
                                                       seq.beam.cumulative_logprob, "length"))
            return True
        return False

    def _apply(self, request: BeamRequest, chosen: list[tuple[Sequence, int, float]]) -> None:
        by_parent: dict[int, list[tuple[int, float]]] = {}
        for seq, token, lp in chosen:
            by_parent.setdefault(seq.seq_id, []).append((token, lp))
        version = self.engine.weight_version
        live = []
        for parent in request.live:
            picks = by_parent.get(parent.seq_id)
            if not picks:
                self.scheduler.finish(parent)  # pruned: its blocks go back (shared ones stay with their other users)
                continue
            children = [request.fork(parent) for _ in picks[1:]]
            self.scheduler.fork(parent, children)
            for seq, (token, lp) in zip([parent] + children, picks):
                seq.token_ids.append(token)
                seq.weight_versions.append(version)
                seq.beam.advance(lp)
                live.append(seq)
            self.engine.count_generated_tokens(len(picks))
        request.live = live

    def _finish(self, request: BeamRequest) -> BeamSearchOutput:
        for seq in request.live:
            self.scheduler.finish(seq)
        request.live = []
        self.engine.remove_request(request.request_id)
        return request.output(self.engine.detokenize)
