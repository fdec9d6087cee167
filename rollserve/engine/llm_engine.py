"""The step loop: schedule -> run the model -> sample -> append tokens, stop, free."""

from dataclasses import dataclass

import torch

from ..config import EngineConfig, resolve_dtype
from ..kernels.backend import choose_sampling_backend, sampling_kernel
from ..outputs import StepOutput
from .beam_search import BeamSearcher
from .block_manager import BlockManager
from .model_runner import ModelRunner
from .request import BaseRequest, BeamRequest, Request
from .sampler import Sampler, SamplingBatch, prompt_logprobs
from .scheduler import Scheduler
from .sequence import Sequence


@dataclass
class EngineStats:
    num_steps: int = 0
    num_prefill_tokens: int = 0  # prompt tokens run through the model
    num_decode_tokens: int = 0  # sampled tokens run through the model (one per sequence per step)
    num_recomputed_tokens: int = 0  # completion tokens run again after a preemption
    num_generated_tokens: int = 0


def _seeded_generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63))


def kv_cache_dtype(requested, weight: torch.Tensor) -> torch.dtype:
    """The KV cache's dtype for `EngineConfig.kv_cache_dtype=requested` and a model whose weights are like `weight`.

    The weights' dtype ('auto'), or a 16-bit cache under float32 weights on the CPU, where the decode kernel
    reads it (the CUDA paths read a cache of the model's dtype only). Anything else raises ValueError."""
    dtype = resolve_dtype(requested) or weight.dtype
    if dtype == weight.dtype:
        return dtype
    if weight.dtype == torch.float32 and dtype in (torch.bfloat16, torch.float16) and weight.device.type == "cpu":
        return dtype
    raise ValueError(f"EngineConfig.kv_cache_dtype={requested!r} is invalid: the KV cache holds the weights' dtype "
                     f"({weight.dtype}), or bfloat16/float16 under float32 weights on the CPU; the model is "
                     f"{weight.dtype} on {weight.device.type}")


class LLMEngine:
    def __init__(self, model, config: EngineConfig, eos_token_ids: set[int], max_model_len: int, detokenize):
        """`detokenize(token_ids, skip_special_tokens) -> str`."""
        self.config = config
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.detokenize = detokenize
        self.vocab_size = model.get_input_embeddings().num_embeddings
        out_emb = model.get_output_embeddings()
        self.logits_size = getattr(out_emb, "out_features", None) or self.vocab_size
        kv_dtype = kv_cache_dtype(config.kv_cache_dtype, next(model.parameters()))
        bytes_per_block = ModelRunner.bytes_per_block(model.config, config.block_size, kv_dtype)
        num_blocks = config.kv_cache_memory // bytes_per_block
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory={config.kv_cache_memory} bytes holds no KV block "
                             f"(one block of {config.block_size} tokens takes {bytes_per_block} bytes)")
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(model, num_blocks, config.block_size, config.attention_backend,
                                  config.cuda_graphs, config.max_num_seqs, max_model_len, kv_dtype)
        self.sampler = Sampler(config.seed, sampling_kernel(choose_sampling_backend(config.sampling_backend,
                                                                                    self.runner.device)))
        self.requests: dict[str, BaseRequest] = {}
        self.stats = EngineStats()
        self.weight_version = 0
        self.beam_searcher = BeamSearcher(self, self.scheduler)

    @property
    def max_tokens_per_seq(self) -> int:
        return self.block_manager.num_blocks * self.config.block_size

    def check_request(self, prompt_token_ids: list[int], params) -> str | None:
        """Why this request cannot run here (a message), or None when it can."""
        if not prompt_token_ids:
            return "the prompt is empty"
        bad = [t for t in prompt_token_ids if not (isinstance(t, int) and 0 <= t < self.vocab_size)]
        if bad:
            return f"the prompt has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}"
        if len(prompt_token_ids) >= self.max_model_len:
            return (f"the prompt has {len(prompt_token_ids)} tokens; the model's context is {self.max_model_len} "
                    f"(prompt + at least one generated token must fit)")
        need = min(len(prompt_token_ids) + params.max_tokens, self.max_model_len)
        if need > self.max_tokens_per_seq:
            return (f"{len(prompt_token_ids)} prompt tokens + max_tokens={params.max_tokens} need {need} KV slots "
                    f"but the cache holds {self.max_tokens_per_seq}; raise kv_cache_memory or lower max_tokens")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name, None)
            if k is not None and k > self.logits_size:
                return f"{name}={k} exceeds the vocabulary size {self.logits_size}"
        bad = [t for t in params.stop_token_ids if t >= self.logits_size]
        if bad:
            return f"stop_token_ids {bad[:5]} are outside the vocabulary [0, {self.logits_size})"
        return None

    def add_request(self, request_id: str, prompt_token_ids: list[int], params, prompt: str | None = None,
                    stream: bool = False, park: bool = False, resumes=None) -> None:
        """Queues a request; an invalid one raises `ValueError` and changes nothing (others keep running).

        `stream`: `step()` reports the request's new tokens every step (not for beam search). `park`: each
        finished sample keeps its KV blocks under `(request_id, index)` (see scheduler.py). `resumes`: the key
        of a parked sample whose tokens begin `prompt_token_ids` (its KV is taken over if still there)."""
        if request_id in self.requests:
            raise ValueError(f"request_id={request_id!r} is already in use")
        problem = self.check_request(prompt_token_ids, params)
        if problem:
            raise ValueError(f"request {request_id!r}: {problem}")
        if getattr(params, "beam_width", None) is not None:  # BeamSearchParams
            if stream:
                raise ValueError("stream=True is not supported for beam search")
            request = BeamRequest(request_id, prompt, list(prompt_token_ids), params, self.weight_version)
            self.requests[request_id] = request
            self.scheduler.add(request.first_beam())
            return
        request = Request(request_id, prompt, list(prompt_token_ids), params, self.weight_version, stream, park)
        seq = Sequence(request_id, prompt_token_ids, params, num_samples=params.n)
        seq.resumes = resumes
        seq.tracks_text = seq.tracks_text or stream
        if params.seed is not None:
            seq.generator = _seeded_generator(params.seed, 0)
        request.seqs.append(seq)
        self.requests[request_id] = request
        self.scheduler.add(seq)

    def resume(self, request_id: str, parked: tuple[str, int], extra_token_ids: list[int], params,
               stream: bool = False, park: bool = False) -> None:
        """Queues request `request_id` continuing the parked sample `parked` = (request id, index) with
        `extra_token_ids` appended; it computes only those (and the sample's last token) while the sample's KV
        is still parked, else it recomputes. Raises `ValueError` for an unknown sample or `params.n != 1`."""
        seq = self.scheduler.parked.get(parked)
        if seq is None:
            raise ValueError(f"no parked sample {parked[1]} of request {parked[0]!r} (add it with park=True; "
                             f"a sample can be resumed once)")
        if getattr(params, "n", None) != 1:
            raise ValueError(f"a resumed request continues one sample: params.n must be 1, got "
                             f"{getattr(params, 'n', None)!r}")
        claim = ("resumed by", request_id)  # the sample stays parked (evictable) under a key only this request has
        self.add_request(request_id, seq.token_ids + list(extra_token_ids), params, stream=stream, park=park,
                         resumes=claim)
        self.scheduler.parked[claim] = self.scheduler.parked.pop(parked)

    def release(self, parked: tuple[str, int]) -> None:
        """Forgets a parked sample and frees its KV (a no-op when there is none)."""
        self.scheduler.release(parked)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def request(self, request_id: str) -> BaseRequest:
        """The request in flight with this id."""
        return self.requests[request_id]

    def remove_request(self, request_id: str) -> None:
        """Forgets a request whose sequences are all finished (their blocks already freed)."""
        del self.requests[request_id]

    def count_generated_tokens(self, num_tokens: int) -> None:
        self.stats.num_generated_tokens += num_tokens

    def step(self) -> list[StepOutput]:
        """Runs one forward pass over everything scheduled; returns what finished, and what streamed requests gained."""
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return []
        logits, rows, order, prompt_rows = self.runner.run(batch)
        self.stats.num_steps += 1
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            prompt_part = max(0, min(start + n, seq.num_prompt_tokens) - start)
            decode_part = int(start + n == seq.num_tokens and start + n > seq.num_prompt_tokens)
            self.stats.num_prefill_tokens += prompt_part
            self.stats.num_decode_tokens += decode_part
            self.stats.num_recomputed_tokens += n - prompt_part - decode_part
            seq.num_computed_tokens += n
            self.block_manager.commit(seq)
        num_sampled = sum(r >= 0 for r in rows)
        if prompt_rows:
            self._record_prompt_logprobs(logits[num_sampled:], prompt_rows)
        targets, logit_rows, beams, beam_rows = [], [], [], []
        for k, seq in enumerate(s for s, r in zip(order, rows) if r >= 0):
            if seq.is_beam:
                beams.append(seq)
                beam_rows.append(k)
                continue
            group = [seq] + self._fork(seq)
            targets.extend(group)
            logit_rows.extend([k] * len(group))
        logits = logits[:num_sampled]
        finished = []
        if beams:
            rows = logits[torch.tensor(beam_rows, device=logits.device)]
            finished = [StepOutput(o.request_id, [], True, o, self.weight_version)
                        for o in self.beam_searcher.process(rows, beams)]
        if not targets:
            return finished
        if len(logit_rows) != num_sampled:
            logits = logits[torch.tensor(logit_rows, device=logits.device)]
        batch = SamplingBatch(targets, self.eos_token_ids, logits.shape[1], logits.device)
        return finished + self._postprocess(targets, self.sampler(logits, batch))

    def _record_prompt_logprobs(self, logits: torch.Tensor, prompt_rows) -> None:
        offset = 0
        for seq, _, first, count in prompt_rows:
            x = logits[offset:offset + count]
            offset += count
            targets = torch.tensor(seq.token_ids[first + 1:first + 1 + count], device=x.device)
            sel, ids, vals = prompt_logprobs(x, targets, seq.params, seq.params.prompt_logprobs)
            self.requests[seq.request_id].prompt_logprobs.append((targets, sel, ids, vals))
            seq.num_prompt_logprobs = first + count
            if seq.num_prompt_logprobs >= seq.num_prompt_tokens - 1:
                seq.skip_prefix_cache = False

    def _fork(self, seq: Sequence) -> list[Sequence]:
        if seq.num_samples == 1:
            return []
        request = self.requests[seq.request_id]
        children = [seq.fork(i) for i in range(1, seq.num_samples)]
        seq.num_samples = 1
        for child in children:
            if seq.params.seed is not None:
                child.generator = _seeded_generator(seq.params.seed, child.index)
        request.seqs.extend(children)
        self.scheduler.fork(seq, children)
        return children

    def _postprocess(self, seqs: list[Sequence], out) -> list[StepOutput]:
        finished, streamed = [], {}
        tokens = out.token_ids.tolist()
        logprobs = out.logprobs.unbind(0)
        has_top = out.top_ids is not None
        if has_top:
            top_ids, top_lps, ranks = out.top_ids.unbind(0), out.top_logprobs.unbind(0), out.ranks.unbind(0)
        version = self.weight_version
        for i, (seq, token) in enumerate(zip(seqs, tokens)):
            seq.token_ids.append(token)
            seq.weight_versions.append(version)
            k = seq.params.logprobs
            if k is not None:
                seq.logprobs.append(logprobs[i])
                if k > 0 and has_top:
                    seq.top_ids.append(top_ids[i])
                    seq.top_logprobs.append(top_lps[i])
                    seq.ranks.append(ranks[i])
            self.stats.num_generated_tokens += 1
            new_text = self._update_text(seq) if seq.tracks_text else ""
            request = self.requests[seq.request_id]
            if request.stream:
                streamed[seq.request_id] = request
            if not self._check_stop(seq, token, new_text):
                continue
            self.scheduler.finish(seq, (seq.request_id, seq.index) if request.park else None)
            request.num_finished += 1
            if request.num_finished == request.params.n:
                del self.requests[seq.request_id]
                streamed.pop(seq.request_id, None)
                finished.append(request.step_output(request.output(self.detokenize)))
        for request in streamed.values():
            deltas = request.deltas()
            if deltas:
                finished.append(StepOutput(request.request_id, deltas, False, None, deltas[0].weight_versions[0]))
        return finished

    def _check_stop(self, seq: Sequence, token: int, new_text: str) -> bool:
        params = seq.params
        at_limit = seq.num_completion_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len
        if seq.num_completion_tokens < params.min_tokens and not at_limit:
            return False  # EOS and stop ids were masked out by the sampler; stop strings are not looked for yet
        if not params.ignore_eos and token in self.eos_token_ids:
            seq.finish_reason = "stop"
        elif token in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif params.stop and self._stop_string(seq, new_text):
            seq.finish_reason = "stop"
        elif at_limit:
            seq.finish_reason = "length"
        return seq.finish_reason is not None

    def _update_text(self, seq: Sequence) -> str:
        """Incremental detokenisation: the text the newest tokens add (empty while a character is incomplete)."""
        skip = seq.params.skip_special_tokens
        before = self.detokenize(seq.token_ids[seq.prefix_offset:seq.read_offset], skip)
        after = self.detokenize(seq.token_ids[seq.prefix_offset:], skip)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        new = after[len(before):]
        seq.text += new
        seq.prefix_offset, seq.read_offset = seq.read_offset, seq.num_tokens
        return new

    def _stop_string(self, seq: Sequence, new: str) -> bool:
        if not new:
            return False
        params, text = seq.params, seq.text
        longest = max(len(s) for s in params.stop)
        start = max(0, len(text) - len(new) - longest + 1)
        best = None
        for stop in params.stop:
            i = text.find(stop, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, stop)
        if best is None:
            return False
        i, stop = best
        seq.stop_reason = stop
        seq.stop_text_end = i + (len(stop) if params.include_stop_str_in_output else 0)
        return True

    def abort_all(self) -> list[StepOutput]:
        """Stops every request in flight, frees its blocks, returns what each had (finish_reason "abort")."""
        for seq in self.scheduler.abort_all():
            seq.finish_reason = seq.finish_reason or "abort"
        outputs = [self._final(r) for r in self.requests.values()]
        self.requests.clear()
        return outputs

    def abort_request(self, request_id: str) -> StepOutput | None:
        """Stops one request, frees its blocks; returns what it had (finish_reason "abort"), None if unknown."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.unfinished_seqs():
            seq.finish_reason = seq.finish_reason or "abort"
            self.scheduler.finish(seq)
        return self._final(request)

    def _final(self, request) -> StepOutput:
        return request.step_output(request.output(self.detokenize))

    def reset_prefix_cache(self) -> None:
        self.block_manager.reset_prefix_cache()

    def weights_updated(self, version: int) -> None:
        """New weights are in place: KV computed with the old ones must never be found again (parked KV
        included: a resumed sample recomputes)."""
        while self.scheduler.evict_parked():
            pass
        self.block_manager.reset_prefix_cache()
        self.runner.weights_changed()
        self.weight_version = version

    @property
    def is_sleeping(self) -> bool:
        return self.runner.kv_cache is None

    def sleep(self) -> None:
        """Frees the KV cache; cached prefixes are forgotten with it. Nothing may be in flight."""
        if self.requests:
            raise RuntimeError(f"sleep() with {len(self.requests)} requests in flight; wait for them or abort them")
        while self.scheduler.evict_parked():
            pass
        self.block_manager.reset_prefix_cache()
        self.runner.release_kv_cache()

    def wake_up(self) -> None:
        self.runner.allocate_kv_cache()
