"""One generate message on the server: its prompts checked and encoded, its outputs and stream deltas routed back.

Deltas are `CompletionOutput`-shaped dicts holding only what is new since the
last one: `index, text, token_ids, weight_versions` (+ `logprobs`,
`top_logprobs` when asked for, + `finish_reason`, `stop_reason` on the last).
Text is held back while it ends in an incomplete character, and by the
longest stop string minus one, so a stop string is never streamed.
"""

import torch

from . import protocol
from ..outputs import BeamSearchOutput, CompletionOutput, RequestOutput
from ..sampling_params import BeamSearchParams
from ..weight_sync.wire import failure

MAX_PROMPTS = 4096


class RequestEncoder:
    """Turns a generate message into `(prompt text, prompt token ids, params)` per prompt, all checked first."""

    def __init__(self, llm):
        self.llm = llm
        self.tokenizer = llm.tokenizer

    def encode(self, request: protocol.Generate) -> list[tuple]:
        conversations = request.conversations
        prompts = request.prompts if conversations is None else conversations
        field = "prompts" if conversations is None else "conversations"
        if not isinstance(prompts, list) or not prompts:
            raise ValueError(f"{field} must be a non-empty list")
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"{field} has {len(prompts)} entries; at most {MAX_PROMPTS} per message")
        params = request.params
        if isinstance(params, list):
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} params for {len(prompts)} {field}")
            where = [f"params[{i}]" for i in range(len(prompts))]
        else:
            params, where = [params or {}] * len(prompts), ["params"] * len(prompts)
        out = []
        for i, (prompt, raw) in enumerate(zip(prompts, params)):
            if conversations is None:
                text, ids = self.llm._encode(i, prompt)  # the same checks and messages as LLM.generate
            else:
                text, ids = self._conversation(i, prompt, request.chat_template_kwargs or {})
            if isinstance(raw, dict) and "max_tokens" in raw and raw["max_tokens"] is None:  # to the context's end
                raw = {**raw, "max_tokens": max(1, self.llm.max_model_len - len(ids))}
            p = protocol.params_from_dict(raw, where[i])
            if request.stream and isinstance(p, BeamSearchParams):
                raise ValueError("stream=True is not supported for beam search")
            problem = self.llm.engine.check_request(ids, p)
            if problem:
                raise ValueError(f"{field}[{i}]: {problem}")
            out.append((text, ids, p))
        return out

    def _conversation(self, i: int, conv, kwargs) -> tuple[str, list[int]]:
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer")
        if not isinstance(conv, list) or not conv or not all(isinstance(m, dict) for m in conv):
            raise ValueError(f"conversations[{i}] must be a non-empty list of message maps")
        if not isinstance(kwargs, dict):
            raise TypeError(f"chat_template_kwargs must be a map, got {type(kwargs).__name__}")
        try:
            text = self.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True, **kwargs)
        except Exception as e:
            raise ValueError(f"conversations[{i}]: the chat template failed: {e}") from None
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        return self.tokenizer.decode(ids), ids


def unstarted_output(request_id: str, text, ids: list[int], params, weight_version: int):
    """The output of a request aborted before it reached the engine: no tokens, finish_reason "abort"."""
    if isinstance(params, BeamSearchParams):
        return BeamSearchOutput(request_id, text, ids, [])
    lp = [] if params.logprobs is not None else None
    outs = [CompletionOutput(i, "", [], lp, 0.0 if lp is not None else None, "abort", weight_versions=[])
            for i in range(params.n)]
    return RequestOutput(request_id, text, ids, outs, weight_version)


class Job:
    def __init__(self, key, msg_id, send, requests: list[tuple], stream: bool, llm):
        self.key, self.msg_id, self.send, self.requests, self.stream = key, msg_id, send, requests, stream
        self.detokenize = llm.engine.detokenize
        self.request_ids: list[str | None] = [None] * len(requests)
        self.outputs: list = [None] * len(requests)
        self.remaining = len(requests)
        self.sent: list[dict[int, list[int]]] = [{} for _ in requests]  # per prompt: sample -> [tokens, chars]

    def finish(self, out) -> bool:
        """Records a finished request; returns True once the whole job is done (and answered)."""
        index = self.request_ids.index(out.request_id)
        self.outputs[index] = out
        self.remaining -= 1
        if self.stream:
            tails = [self._tail(index, c) for c in out.outputs]
            self.send(protocol.Delta(id=self.msg_id, index=index, outputs=tails, finished=True,
                                     output=protocol.output_to_dict(out)))
            if self.remaining == 0:
                self.send(protocol.Done(id=self.msg_id))
        elif self.remaining == 0:
            self.send(protocol.Result(id=self.msg_id, outputs=[protocol.output_to_dict(o) for o in self.outputs]))
        return self.remaining == 0

    def fail(self, exc: BaseException) -> None:
        self.send(failure(exc, protocol.Error, id=self.msg_id))

    # -- streaming ----------------------------------------------------------------
    def send_deltas(self, engine_requests: dict) -> None:
        for index, rid in enumerate(self.request_ids):
            request = engine_requests.get(rid) if rid is not None and self.outputs[index] is None else None
            if request is None:
                continue
            deltas = [d for d in (self._delta(index, seq) for seq in request.seqs) if d is not None]
            if deltas:
                self.send(protocol.Delta(id=self.msg_id, index=index, outputs=deltas))

    def _delta(self, index: int, seq) -> dict | None:
        sent = self.sent[index].setdefault(seq.index, [0, 0])
        start = sent[0]
        if seq.num_completion_tokens <= start:
            return None
        p = seq.params
        ids = seq.completion_token_ids
        entry = {"index": seq.index, "token_ids": ids[start:], "weight_versions": seq.weight_versions[start:]}
        if p.logprobs is not None:
            entry["logprobs"] = torch.stack(seq.logprobs[start:]).tolist()
            if p.logprobs > 0:
                top_ids = torch.stack(seq.top_ids[start:])[:, :p.logprobs].tolist()
                top_lps = torch.stack(seq.top_logprobs[start:])[:, :p.logprobs].tolist()
                entry["top_logprobs"] = [{**dict(zip(i, v)), t: lp} for t, lp, i, v
                                         in zip(entry["token_ids"], entry["logprobs"], top_ids, top_lps)]
        sent[0] = seq.num_completion_tokens
        text = self.detokenize(ids, p.skip_special_tokens)
        if not text.endswith("\ufffd"):
            hold = max(map(len, p.stop)) - 1 if p.stop else 0
            visible = len(text) - hold
            entry["text"] = text[sent[1]:visible] if visible > sent[1] else ""
            sent[1] = max(sent[1], visible)
        else:
            entry["text"] = ""
        return entry

    def _tail(self, index: int, c) -> dict:
        start, chars = self.sent[index].get(c.index, [0, 0])
        entry = {"index": c.index, "token_ids": c.token_ids[start:], "text": c.text[chars:],
                 "weight_versions": (c.weight_versions or [])[start:], "finish_reason": c.finish_reason,
                 "stop_reason": c.stop_reason}
        if c.logprobs is not None:
            entry["logprobs"] = c.logprobs[start:]
        if c.top_logprobs is not None:
            entry["top_logprobs"] = c.top_logprobs[start:]
        return entry
