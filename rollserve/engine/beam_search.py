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

from ..outputs import BeamSearchOutput, BeamSearchSequence
from .sequence import Sequence


class BeamRequest:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params, weight_version: int):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.weight_version = weight_version
        self.live: list[Sequence] = []
        self.finished: list[tuple[list[int], list[float], float, str]] = []  # tokens, logprobs, cumulative, reason
        self.next_index = 1

    def score(self, cumulative: float, length: int) -> float:
        return cumulative / (max(length, 1) ** self.params.length_penalty)

    def output(self, detokenize) -> BeamSearchOutput:
        hyps = list(self.finished)
        if not hyps:  # aborted before any beam ended
            hyps = [(s.completion_token_ids, list(s.beam_logprobs), s.beam_cumulative, "abort") for s in self.live]
        ranked = sorted(hyps, key=lambda h: self.score(h[2], len(h[0])), reverse=True)[:self.params.beam_width]
        seqs = [BeamSearchSequence(tokens, detokenize(tokens, True), lps, cum, self.score(cum, len(tokens)), reason)
                for tokens, lps, cum, reason in ranked]
        return BeamSearchOutput(self.request_id, self.prompt, self.prompt_token_ids, seqs)


def new_beam_sequence(request: BeamRequest) -> Sequence:
    seq = Sequence(request.request_id, request.prompt_token_ids, request.params)
    seq.is_beam = True
    seq.beam_cumulative = 0.0
    seq.beam_logprobs = []
    seq.beam_candidates = None
    request.live.append(seq)
    return seq


class BeamSearcher:
    """Owned by the engine; advances beam requests from the logits rows of their sequences."""

    def __init__(self, engine):
        self.engine = engine

    def process(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[BeamSearchOutput]:
        """logits[i]: the newest token's logits of beam sequence seqs[i]."""
        logp = torch.log_softmax(logits, dim=-1)
        touched = {}
        for row, seq in zip(logp, seqs):
            request = self.engine.requests[seq.request_id]
            k = min(2 * request.params.beam_width, row.shape[0])
            vals, ids = torch.topk(row, k)
            seq.beam_candidates = (vals.tolist(), ids.tolist())
            touched[request.request_id] = request
        finished = []
        for request in touched.values():
            if all(s.beam_candidates is not None for s in request.live):
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
            vals, ids = seq.beam_candidates
            cands.extend((seq.beam_cumulative + v, i, v, seq) for v, i in zip(vals, ids))
        cands.sort(key=lambda c: c[0], reverse=True)
        chosen: list[tuple[Sequence, int, float]] = []
        for rank, (cum, token, lp, seq) in enumerate(cands):
            if self._ends(request, token):
                if rank < width:
                    request.finished.append((seq.completion_token_ids + [token], seq.beam_logprobs + [lp], cum, "stop"))
                continue
            chosen.append((seq, token, lp))
            if len(chosen) == width:
                break
        if len(request.finished) >= width or not chosen:
            return True
        self._apply(request, chosen)
        p, eng = request.params, self.engine
        first = request.live[0]
        if first.num_completion_tokens >= p.max_tokens or first.num_tokens >= eng.max_model_len:
            for seq in request.live:
                request.finished.append((seq.completion_token_ids, list(seq.beam_logprobs), seq.beam_cumulative,
                                         "length"))
            return True
        return False

    def _apply(self, request: BeamRequest, chosen: list[tuple[Sequence, int, float]]) -> None:
        scheduler = self.engine.scheduler
        by_parent: dict[int, list[tuple[int, float]]] = {}
        for seq, token, lp in chosen:
            by_parent.setdefault(seq.seq_id, []).append((token, lp))
        live = []
        for parent in request.live:
            picks = by_parent.get(parent.seq_id)
            if not picks:
                scheduler.finish(parent)  # pruned: its blocks go back (shared ones stay with their other users)
                continue
            children = []
            for _ in picks[1:]:
                child = parent.fork(request.next_index)
                request.next_index += 1
                child.is_beam = True
                child.beam_cumulative = parent.beam_cumulative
                child.beam_logprobs = list(parent.beam_logprobs)
                children.append(child)
            scheduler.fork(parent, children)
            for seq, (token, lp) in zip([parent] + children, picks):
                seq.token_ids.append(token)
                seq.beam_cumulative += lp
                seq.beam_logprobs.append(lp)
                seq.beam_candidates = None
                seq.weight_versions.append(self.engine.weight_version)
                live.append(seq)
            self.engine.stats.num_generated_tokens += len(picks)
        request.live = live

    def _finish(self, request: BeamRequest) -> BeamSearchOutput:
        for seq in request.live:
            self.engine.scheduler.finish(seq)
        request.live = []
        del self.engine.requests[request.request_id]
        return request.output(self.engine.detokenize)
