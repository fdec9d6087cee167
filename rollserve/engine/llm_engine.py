"""The step loop: schedule -> run the model -> sample -> append tokens, stop, free."""

from dataclasses import dataclass

import torch

from ..config import EngineConfig
from ..outputs import CompletionOutput, RequestOutput
from .block_manager import BlockManager
from .model_runner import ModelRunner
from .sampler import Sampler
from .scheduler import Scheduler
from .sequence import Sequence


@dataclass
class EngineStats:
    num_steps: int = 0
    num_prefill_tokens: int = 0  # prompt tokens run through the model
    num_decode_tokens: int = 0  # sampled tokens run through the model (one per sequence per step)
    num_recomputed_tokens: int = 0  # completion tokens run again after a preemption
    num_generated_tokens: int = 0


class Request:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params, weight_version: int):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.weight_version = weight_version
        self.seqs: list[Sequence] = []
        self.num_finished = 0

    def output(self, detokenize) -> RequestOutput:
        outs, with_lp = [], self.params.logprobs is not None
        for seq in sorted(self.seqs, key=lambda s: s.index):
            outs.append(CompletionOutput(
                index=seq.index,
                text=detokenize(seq.completion_token_ids),
                token_ids=seq.completion_token_ids,
                logprobs=list(seq.logprobs) if with_lp else None,
                cumulative_logprob=float(sum(seq.logprobs)) if with_lp else None,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
            ))
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outs, self.weight_version)


def _seeded_generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63))


class LLMEngine:
    def __init__(self, model, config: EngineConfig, eos_token_ids: set[int], max_model_len: int, detokenize):
        self.config = config
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.detokenize = detokenize
        bytes_per_block = ModelRunner.bytes_per_block(model.config, config.block_size, next(model.parameters()).dtype)
        num_blocks = config.kv_cache_memory // bytes_per_block
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory={config.kv_cache_memory} bytes holds no KV block "
                             f"(one block of {config.block_size} tokens takes {bytes_per_block} bytes)")
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(model, num_blocks, config.block_size)
        self.sampler = Sampler(config.seed)
        self.requests: dict[str, Request] = {}
        self.stats = EngineStats()
        self.weight_version = 0

    @property
    def max_tokens_per_seq(self) -> int:
        return self.block_manager.num_blocks * self.config.block_size

    def add_request(self, request_id: str, prompt_token_ids: list[int], params, prompt: str | None = None) -> None:
        if request_id in self.requests:
            raise ValueError(f"request_id={request_id!r} is already in use")
        request = Request(request_id, prompt, list(prompt_token_ids), params, self.weight_version)
        seq = Sequence(request_id, prompt_token_ids, params, num_samples=params.n)
        if params.seed is not None:
            seq.generator = _seeded_generator(params.seed, 0)
        request.seqs.append(seq)
        self.requests[request_id] = request
        self.scheduler.add(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        """Runs one forward pass over everything scheduled; returns the requests that finished."""
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return []
        logits, rows, order = self.runner.run(batch)
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
        targets, logit_rows = [], []
        for k, seq in enumerate(s for s, r in zip(order, rows) if r >= 0):
            group = [seq] + self._fork(seq)
            targets.extend(group)
            logit_rows.extend([k] * len(group))
        if not targets:
            return []
        if len(logit_rows) != logits.shape[0]:
            logits = logits[torch.tensor(logit_rows, device=logits.device)]
        out = self.sampler(logits, [s.params for s in targets], [s.generator for s in targets])
        return self._postprocess(targets, out.token_ids.tolist(), out.logprobs.tolist())

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

    def _postprocess(self, seqs: list[Sequence], tokens: list[int], logprobs: list[float]) -> list[RequestOutput]:
        finished = []
        for seq, token, lp in zip(seqs, tokens, logprobs):
            seq.token_ids.append(token)
            seq.logprobs.append(lp)
            self.stats.num_generated_tokens += 1
            if not self._check_stop(seq, token):
                continue
            self.scheduler.finish(seq)
            request = self.requests[seq.request_id]
            request.num_finished += 1
            if request.num_finished == request.params.n:
                del self.requests[seq.request_id]
                finished.append(request.output(self.detokenize))
        return finished

    def _check_stop(self, seq: Sequence, token: int) -> bool:
        params = seq.params
        if token in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif not params.ignore_eos and token in self.eos_token_ids:
            seq.finish_reason = "stop"
        elif seq.num_completion_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"
        return seq.finish_reason is not None

    def abort_all(self) -> list[RequestOutput]:
        """Stops every request in flight, frees its blocks, returns what each had (finish_reason "abort")."""
        for seq in self.scheduler.abort_all():
            seq.finish_reason = seq.finish_reason or "abort"
        outputs = [r.output(self.detokenize) for r in self.requests.values()]
        self.requests.clear()
        return outputs

    def reset_prefix_cache(self) -> None:
        self.block_manager.reset_prefix_cache()

    def weights_updated(self, version: int) -> None:
        """New weights are in place: KV computed with the old ones must never be found again."""
        self.block_manager.reset_prefix_cache()
        self.weight_version = version
