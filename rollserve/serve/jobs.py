"""One generate message on the server: its prompts checked and encoded, its outputs and stream deltas routed back.

Deltas are the engine's `SampleDelta`s (`rollserve.outputs`), sent as dicts: `index, text, token_ids,
weight_versions` (+ `logprobs`, `top_logprobs` when asked for, + `finish_reason`, `stop_reason` on the
last). Each delta message also carries `weight_version`, the version of its first token.
"""

import dataclasses

from . import protocol
from ..inputs import Prompt
from ..outputs import BeamSearchOutput, CompletionOutput, RequestOutput, StepOutput
from ..sampling_params import BeamSearchParams
from ..weight_sync.wire import failure

MAX_PROMPTS = 4096


class RequestEncoder:
    """Turns a generate message into `(Prompt, params)` per prompt, all checked first (by `LLM.inputs`)."""

    def __init__(self, llm):
        self.llm = llm

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
        kwargs = request.chat_template_kwargs
        inputs, out = self.llm.inputs, []
        for i, (prompt, raw) in enumerate(zip(prompts, params)):
            if conversations is not None and not (isinstance(prompt, list) and prompt
                                                  and all(isinstance(m, dict) for m in prompt)):
                raise ValueError(f"conversations[{i}] must be a non-empty list of message maps")
            encoded = inputs.encode(prompt, f"{field}[{i}]", kwargs if conversations is not None else None)
            if isinstance(raw, dict) and "max_tokens" in raw and raw["max_tokens"] is None:  # to the context's end
                raw = {**raw, "max_tokens": max(1, self.llm.max_model_len - len(encoded.token_ids))}
            p = protocol.params_from_dict(raw, where[i])
            if request.stream and isinstance(p, BeamSearchParams):
                raise ValueError("stream=True is not supported for beam search")
            inputs.check(encoded, p, f"{field}[{i}]")
            out.append((encoded, p))
        return out


def unstarted_output(request_id: str, prompt: Prompt, params, weight_version: int) -> StepOutput:
    """The final step of a request aborted before it reached the engine: no tokens, finish_reason "abort"."""
    if isinstance(params, BeamSearchParams):
        return StepOutput(request_id, [], True, BeamSearchOutput(request_id, prompt.text, prompt.token_ids, []),
                          weight_version)
    lp = [] if params.logprobs is not None else None
    outs = [CompletionOutput(i, "", [], lp, 0.0 if lp is not None else None, "abort", weight_versions=[])
            for i in range(params.n)]
    output = RequestOutput(request_id, prompt.text, prompt.token_ids, outs, weight_version)
    return StepOutput(request_id, [], True, output, weight_version)


class Job:
    def __init__(self, key, msg_id, send, requests: list[tuple], stream: bool):
        self.key, self.msg_id, self.send, self.requests, self.stream = key, msg_id, send, requests, stream
        self.request_ids: list[str | None] = [None] * len(requests)
        self.outputs: list = [None] * len(requests)
        self.remaining = len(requests)

    def on_step(self, out: StepOutput) -> bool:
        """Routes one request's step output; returns True once the whole job is done (and answered)."""
        index = self.request_ids.index(out.request_id)
        if not out.finished:
            self._send_delta(index, out, False)
            return False
        self.outputs[index] = out.output
        self.remaining -= 1
        if self.stream:
            self._send_delta(index, out, True)
            if self.remaining == 0:
                self.send(protocol.Done(id=self.msg_id))
        elif self.remaining == 0:
            self.send(protocol.Result(id=self.msg_id, outputs=[protocol.output_to_dict(o) for o in self.outputs]))
        return self.remaining == 0

    def _send_delta(self, index: int, out: StepOutput, finished: bool) -> None:
        self.send(protocol.Delta(id=self.msg_id, index=index, outputs=[dataclasses.asdict(d) for d in out.deltas],
                                 finished=finished, output=protocol.output_to_dict(out.output) if finished else None,
                                 weight_version=out.weight_version))

    def fail(self, exc: BaseException) -> None:
        self.send(failure(exc, protocol.Error, id=self.msg_id))
