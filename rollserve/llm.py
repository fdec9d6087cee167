"""`LLM`: the in-process engine users call."""

from contextlib import contextmanager, nullcontext
from itertools import count
import threading
import time

import torch

from .config import EngineConfig, resolve_dtype
from .engine.llm_engine import LLMEngine
from .model_loader import load_model
from .inputs import InputProcessor, Prompt, as_prompt_list, is_conversation
from .outputs import BeamSearchOutput, RequestOutput, StepOutput
from .sampling_params import BeamSearchParams, SamplingParams
from .weight_sync import updater


def _eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)


class LLM:
    """A paged, continuously batched generation engine over a `transformers` causal LM.

    `model` is an HF folder, a `.gguf` file (converted once to a cached HF
    folder) or a live `PreTrainedModel` (the trainer's own module, used in
    place unless `dtype` asks for another). `tokenizer`: a tokenizer, a folder
    to load one from, or None (the model folder's). The engine arguments are
    keywords, the fields of `rollserve.EngineConfig` (`dtype="bf16"`,
    `kv_cache_memory="2GiB"`, `max_num_seqs=64`, ...), checked there.
    """

    def __init__(self, model, tokenizer=None, **engine_args):
        config = EngineConfig(**engine_args)
        self.model, tokenizer_source = load_model(model, resolve_dtype(config.dtype))
        self.tokenizer = self._load_tokenizer(tokenizer, tokenizer_source)
        self.vocab_size = self.model.get_input_embeddings().num_embeddings
        limit = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        if config.max_model_len is not None and limit is not None and config.max_model_len > limit:
            raise ValueError(f"max_model_len={config.max_model_len} exceeds the model's max_position_embeddings={limit}")
        self.max_model_len = config.max_model_len or limit or 2048
        self.engine = LLMEngine(self.model, config, _eos_ids(self.model, self.tokenizer), self.max_model_len,
                                self._detokenize)
        self.logits_size = self.engine.logits_size  # the LM head's width (>= vocab_size where it is padded)
        self.inputs = InputProcessor(self.tokenizer, self.engine.check_request)
        self._request_ids = count()
        self._step_lock = threading.Lock()  # held around each engine step and each weight update
        self._update_gate = threading.Lock()  # a waiting update holds it, so the step loop cannot starve it
        self._weight_buffers = updater.WeightBuffers() if config.double_buffer_weights else None

    @staticmethod
    def _load_tokenizer(tokenizer, source):
        if tokenizer is not None and not isinstance(tokenizer, str):
            return tokenizer
        if tokenizer is None and source is None:
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tokenizer or source)

    def _detokenize(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def get_tokenizer(self):
        return self.tokenizer

    @property
    def stats(self):
        return self.engine.stats

    @property
    def weight_version(self) -> int:
        return self.engine.weight_version

    def reset_prefix_cache(self) -> None:
        """Forgets every cached prefix block (blocks in use stay valid)."""
        self.engine.reset_prefix_cache()

    # -- weights ------------------------------------------------------------
    @contextmanager
    def _engine_turn(self):
        with self._update_gate:
            self._step_lock.acquire()
        try:
            yield
        finally:
            self._step_lock.release()

    def update_weights(self, named_tensors, version: int | None = None, require_all: bool = False) -> int:
        """Copies new weights into the engine in place; returns the new weight version.

        `named_tensors`: `(name, tensor)` pairs (or a mapping) of full tensors, e.g.
        `trainer_model.named_parameters()` or `rollserve.weight_sync.sources.iter_named_weights(...)`.
        Wrapper prefixes (`module.`, `_fsdp_wrapped_module.`, `_checkpoint_wrapped_module.`,
        `base_model.model.`, `.base_layer`, `modules_to_save.default.`) are stripped; either
        name of tied weights is accepted. Everything is checked before anything is written:
        unknown or repeated names, wrong shapes, non-floating dtypes, non-finite values (also
        after the cast to the engine dtype), an iterable that raises, and with `require_all`
        any parameter not given. A bad update raises `WeightUpdateError` (a `ValueError`)
        listing the offending names and changes nothing. Tensors already in the engine's
        dtype and device are read in place, so they must not change until this returns. With
        `double_buffer_weights=True` the update is copied into spare storage and checked there
        while generation goes on, then swapped in (parameters then change address).

        `version` must be an int greater than `weight_version` (default: +1). Called
        from another thread while `generate` runs, the update waits for the current
        engine step and applies between steps; sequences in flight continue with the
        new weights. The prefix cache is dropped, blocks in use included.
        """
        new_version = updater.next_version(self.weight_version, version)
        buffers = self._weight_buffers
        with buffers.lock if buffers is not None else nullcontext():
            staged = updater.stage_update(self.model, named_tensors, require_all, buffers)
            with self._update_gate, self._step_lock:
                new_version = updater.next_version(self.weight_version, version)  # another update may have won
                staged.apply()
                self.engine.weights_updated(new_version)
        return new_version

    def advance_weight_version(self, version: int | None = None) -> int:
        """Records that the weights changed in place without `update_weights`; returns the new version.

        For an engine that runs on the trainer's own parameter storage (`LLM(trainer_model)`):
        after an optimizer step nothing needs copying, but tokens must carry a new version and
        KV computed with the old weights must never be reused. `version` as in `update_weights`.
        """
        with self._update_gate, self._step_lock:
            new_version = updater.next_version(self.weight_version, version)
            self.engine.weights_updated(new_version)
        return new_version

    # -- colocation memory --------------------------------------------------
    @property
    def is_sleeping(self) -> bool:
        return self.engine.is_sleeping

    def sleep(self, level: int = 1) -> None:
        """Frees memory while a colocated trainer steps; `wake_up()` restores it.

        `level=1` frees the KV cache (cached prefixes are forgotten). `level=2` also moves
        the engine's weights to host memory (a no-op where they already are; an engine that
        runs on a trainer's module in place should use level 1, or the trainer's weights
        move too). The spare weights of `double_buffer_weights` are freed at either level.
        Requests may not be in flight; `generate` raises until `wake_up()`.
        """
        if level not in (1, 2) or isinstance(level, bool):
            raise ValueError(f"level={level!r} is invalid: must be 1 (KV cache) or 2 (KV cache and owned weights)")
        with self._weight_buffers.lock if self._weight_buffers is not None else nullcontext():
            if self._weight_buffers is not None:
                self._weight_buffers.clear()  # spares are made again by the next update
        with self._update_gate, self._step_lock:
            self.engine.sleep()
            if level == 2:
                self._move_weights("cpu")

    def wake_up(self) -> None:
        """Restores what `sleep()` freed (a fresh, empty KV cache); a no-op when awake."""
        with self._update_gate, self._step_lock:
            self._move_weights(self.engine.runner.device)
            self.engine.wake_up()

    def _check_awake(self) -> None:
        if self.engine.is_sleeping:
            raise RuntimeError("the engine is asleep (LLM.sleep() freed its KV cache): call LLM.wake_up() first")

    def _move_weights(self, device) -> None:
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            if t.device != torch.device(device):
                t.data = t.data.to(device)

    def weights_fingerprint(self) -> str:
        """Hash of every parameter's name, shape, dtype and bytes.

        Compare with `rollserve.weight_sync.weights_fingerprint(trainer_model.named_parameters(),
        dtype=...)`; equal values mean bit-equal weights. Steps wait while it runs.
        """
        with self._update_gate, self._step_lock:
            return updater.weights_fingerprint(self.model.named_parameters())

    # -- the step API -------------------------------------------------------
    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    def add_request(self, prompt, params: SamplingParams | BeamSearchParams | None = None,
                    request_id: str | None = None, *, stream: bool = False,
                    chat_template_kwargs: dict | None = None) -> str:
        """Queues one request for `step()`; returns its id.

        `prompt`: a string, token ids, a conversation (a list of message dicts, rendered by the chat
        template) or a `rollserve.inputs.Prompt`. `params`: `SamplingParams` (default) or
        `BeamSearchParams`. `request_id`: any unused string (default: a fresh one). `stream=True`:
        every `step()` that gives the request tokens reports them (`StepOutput.deltas`); otherwise
        it reports only once, when it finishes. A bad prompt or parameter raises and queues nothing.
        """
        params = SamplingParams() if params is None else params
        if not isinstance(params, (SamplingParams, BeamSearchParams)):
            raise TypeError(f"params must be a SamplingParams or BeamSearchParams, got {type(params).__name__}")
        if request_id is not None and (not isinstance(request_id, str) or not request_id):
            raise TypeError(f"request_id must be a non-empty str or None, got {request_id!r}")
        if not isinstance(stream, bool):
            raise TypeError(f"stream must be True or False, got {stream!r}")
        if stream and isinstance(params, BeamSearchParams):
            raise ValueError("stream=True is not supported for beam search")
        self._check_awake()
        encoded = self.inputs.process(prompt, params, "prompt", chat_template_kwargs)
        with self._engine_turn():
            return self._add(encoded, params, request_id, stream)

    def _add(self, prompt: Prompt, params, request_id: str | None, stream: bool) -> str:
        rid = str(next(self._request_ids)) if request_id is None else request_id
        self.engine.add_request(rid, prompt.token_ids, params, prompt=prompt.text, stream=stream)
        return rid

    def step(self) -> list[StepOutput]:
        """Runs one engine step (under the step lock, so weight updates fall between steps).

        Returns a `StepOutput` per request that finished in it (`finished=True`, with its final output)
        and per streaming request that gained tokens (`deltas`); empty when there was nothing to run.
        """
        with self._engine_turn():
            return self.engine.step()

    def abort(self, request_id: str) -> StepOutput | None:
        """Stops a request and frees its KV blocks; returns its final `StepOutput` (finish_reason "abort")
        or None when no such request is in flight."""
        with self._engine_turn():
            return self.engine.abort_request(request_id)

    def has_unfinished(self) -> bool:
        """Whether any request is in flight."""
        return self.engine.has_unfinished_requests()

    @property
    def num_unfinished(self) -> int:
        return len(self.engine.requests)

    def metrics(self) -> dict:
        """Counters and gauges of the engine: tokens, steps, queue depths, KV use, prefix-cache hit rate."""
        engine = self.engine
        sched, blocks, stats = engine.scheduler, engine.block_manager, engine.stats
        queries = sched.stats.prefix_cache_queries
        return {"generation_tokens": stats.num_generated_tokens, "prefill_tokens": stats.num_prefill_tokens,
                "num_steps": stats.num_steps, "num_running": len(sched.running), "num_waiting": len(sched.waiting),
                "num_preemptions": sched.stats.num_preemptions,
                "kv_cache_usage": 1 - blocks.num_free_blocks / blocks.num_blocks,
                "prefix_cache_hit_rate": sched.stats.prefix_cache_hits / queries if queries else 0.0,
                "weight_version": engine.weight_version}

    # -- generation ---------------------------------------------------------
    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True, chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """Generates completions for each prompt; returns one `RequestOutput` per prompt, in prompt order.

        A prompt is a string, token ids or a conversation (see `add_request`). Every prompt is
        checked before any is queued: a bad one raises `ValueError` and nothing runs.
        """
        prompts = as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        for i, p in enumerate(params):
            if not isinstance(p, SamplingParams):
                raise TypeError(f"sampling_params[{i}] must be a SamplingParams, got {type(p).__name__}")
        return self._run_all(prompts, params, use_tqdm, chat_template_kwargs)

    def beam_search(self, prompts, params: BeamSearchParams, use_tqdm: bool = True) -> list[BeamSearchOutput]:
        """Beam search over each prompt inside the engine (beams share KV blocks); one output per prompt, in order.

        Every prompt is checked before any is queued: a bad one raises and nothing runs.
        """
        if not isinstance(params, BeamSearchParams):
            raise TypeError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        prompts = as_prompt_list(prompts)
        return self._run_all(prompts, [params] * len(prompts), use_tqdm, None)

    def chat(self, conversations, sampling_params=None, use_tqdm: bool = True,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """Applies the tokenizer's chat template to each conversation (a list of messages) and generates."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer")
        if is_conversation(conversations):
            conversations = [conversations]
        if not isinstance(conversations, (list, tuple)) or not conversations:
            raise ValueError("conversations must be a conversation (a list of message dicts) or a list of them")
        for i, conv in enumerate(conversations):
            if not is_conversation(conv):
                raise ValueError(f"conversations[{i}] must be a non-empty list of message dicts")
        return self.generate(list(conversations), sampling_params, use_tqdm, chat_template_kwargs)

    def _run_all(self, prompts: list, params: list, use_tqdm: bool, chat_template_kwargs) -> list:
        self._check_awake()
        encoded = [self.inputs.encode(prompt, f"prompts[{i}]", chat_template_kwargs) for i, prompt in enumerate(prompts)]
        for i, (e, p) in enumerate(zip(encoded, params)):
            self.inputs.check(e, p, f"prompts[{i}]")
        with self._engine_turn():
            ids = [self._add(e, p, None, False) for e, p in zip(encoded, params)]
        return self._run(ids, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list:
        results: dict = {}
        pending = set(request_ids)
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(request_ids), desc="Generating", unit="req", dynamic_ncols=True)
        start, tokens0 = time.perf_counter(), self.engine.stats.num_generated_tokens
        try:
            while pending:
                for out in self.step():
                    if out.finished and out.request_id in pending:
                        pending.discard(out.request_id)
                        results[out.request_id] = out.output
                        if bar is not None:
                            bar.update(1)
                if bar is not None:
                    rate = (self.engine.stats.num_generated_tokens - tokens0) / max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix_str(f"{rate:.0f} tok/s", refresh=False)
        except BaseException:
            with self._engine_turn():
                for rid in pending:
                    self.engine.abort_request(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[r] for r in request_ids]
