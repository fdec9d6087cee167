"""TRL's GRPOTrainer and RLOOTrainer generating with a colocated rollserve engine.

One call for users: `rollserve.integrations.trl.GRPOTrainer(...)` (or `RLOOTrainer`)
takes TRL's own arguments plus `rollserve_config=RollserveConfig(...)`; `attach(trainer)`
does the same to a trainer already built. The trainer then generates as it does with
`use_vllm=True`: it calls `trainer.vllm_generation.sync_weights()` when the optimizer step
changed and `trainer.vllm_generation.generate(prompts, images, num_generations)`, and with
GRPO's `vllm_importance_sampling_correction` compares the engine's logprobs
(`log_softmax(logits / T)`, rollserve's "policy" mode) with its own.
`rollout_func(config)` is the same engine behind TRL's (experimental) `rollout_func` hook.

Distributed training (several processes: DDP, DeepSpeed, FSDP) follows TRL's colocate
vLLM layout: every rank holds its own engine and generates its own share of the batch;
at each sync every rank takes part in the gathers (ZeRO-3, FSDP2) and fills its engine.
"""

import copy
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields

import torch

from ..config import EngineConfig, resolve_dtype
from ..llm import LLM
from ..sampling_params import SamplingParams

try:
    import trl
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("rollserve.integrations.trl needs TRL: pip install 'trl==1.16.0'") from e


@dataclass
class RollserveConfig(EngineConfig):
    """How the rollserve engine inside a TRL trainer is built and used.

    The engine fields are `rollserve.EngineConfig`'s, with its defaults (`dtype="auto"` is the
    trainer model's parameter dtype); `seed` and the fields below are the trainer's own.
    """

    seed: int | None = field(default=None, metadata={
        "help": "sampling seed of the engine; None: the trainer's args.seed + the process index"})
    zero_copy: bool | None = field(default=None, metadata={
        "help": "run the engine on the trainer's own parameters, so a weight sync only advances the weight "
                "version. None: when possible (a plain PreTrainedModel, not PEFT, no DeepSpeed or FSDP plan in "
                "the trainer's accelerator, and dtype the trainer's); True: required (an error says why it is "
                "not possible); False: never (the engine holds a copy, updated in place each step)"})
    sleep_mode: bool = field(default=False, metadata={
        "help": "free the KV cache after each generation, while the trainer steps, and restore it before the "
                "next (LLM.sleep / LLM.wake_up)"})
    sleep_level: int = field(default=1, metadata={
        "help": "1: the KV cache; 2: the KV cache and the engine's copy of the weights (moved to host memory). "
                "In zero-copy mode the weights are the trainer's and never move"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.zero_copy not in (None, True, False):
            raise ValueError(f"RollserveConfig.zero_copy={self.zero_copy!r} is invalid: must be None, True or False")
        if not isinstance(self.sleep_mode, bool):
            raise ValueError(f"RollserveConfig.sleep_mode={self.sleep_mode!r} is invalid: must be a bool")
        if self.sleep_level not in (1, 2) or isinstance(self.sleep_level, bool):
            raise ValueError(f"RollserveConfig.sleep_level={self.sleep_level!r} is invalid: must be 1 or 2")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            raise ValueError(f"RollserveConfig.seed={self.seed!r} is invalid: must be None or an int >= 0")


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _sharding(accelerator) -> str | None:
    """The sharding the trainer's accelerator will apply to the model (it may not have yet), or None."""
    state = getattr(accelerator, "state", None)
    ds_plugin = getattr(state, "deepspeed_plugin", None)
    if ds_plugin is not None:
        return f"DeepSpeed ZeRO-{ds_plugin.zero_stage}"
    fsdp_plugin = getattr(state, "fsdp_plugin", None)
    if fsdp_plugin is not None:
        return f"FSDP{getattr(fsdp_plugin, 'fsdp_version', 1)}"
    return None


def _zero_copy_obstacle(model, dtype: torch.dtype, accelerator=None) -> str | None:
    """Why the engine cannot run on `model`'s own parameters, or None when it can."""
    from transformers import PreTrainedModel

    sharding = _sharding(accelerator)
    if sharding is not None:  # the trainer shards or flattens the parameters when it prepares the model
        return f"the trainer runs under {sharding}"
    if _is_peft(model):
        return "the model is a PEFT model (the engine runs the base model with the adapter merged)"
    if not isinstance(model, PreTrainedModel):
        return f"the model is a {type(model).__name__}, not a transformers PreTrainedModel"
    for name, p in model.named_parameters():
        if hasattr(p, "ds_id"):
            return "its parameters are partitioned by DeepSpeed ZeRO-3"
        if type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor":
            return "its parameters are sharded by FSDP2"
        if "_fsdp_wrapped_module" in name:
            return "it is wrapped by FSDP"
        if p.dtype != dtype:
            return f"the engine dtype {dtype} differs from the trainer's {p.dtype} ({name})"
    return None


def _base_config(model):
    base = model.get_base_model() if _is_peft(model) else model
    return copy.deepcopy(base.config)


def _engine_model(model, dtype: torch.dtype, device: torch.device):
    """An uninitialised module of the trainer's architecture; the first weight sync fills it."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = _base_config(model)
    with torch.device(device), no_init_weights(), _without_zero3_init():
        module = AutoModelForCausalLM.from_config(config, dtype=dtype)
    module.tie_weights()  # skipped under no_init_weights
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        module.generation_config = copy.deepcopy(generation_config)
    return module.eval()


@contextmanager
def _without_zero3_init():
    """Under a ZeRO-3 training config, transformers partitions every new model (`deepspeed.zero.Init`).

    The engine's module is a whole copy on each rank: build it with that switched off.
    """
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # pragma: no cover - depends on the transformers version
        yield
        return
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def _model_dtype(model) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def _runs(prompts: list[list[int]]) -> list[tuple[list[int], int]]:
    """Consecutive identical prompts as (prompt, count): TRL repeats each prompt num_generations times in a row."""
    runs: list[tuple[list[int], int]] = []
    for p in prompts:
        if runs and runs[-1][0] == p:
            runs[-1] = (p, runs[-1][1] + 1)
        else:
            runs.append((p, 1))
    return runs


class RollserveGeneration:
    """TRL's `VLLMGeneration` shape backed by an in-process rollserve engine.

    `generate(prompts, images, num_generations)` returns `(prompt_ids, completion_ids,
    logprobs, logprob_token_ids)`, one row per prompt row, in order; `sync_weights()`
    brings the trainer's current weights into the engine and advances its weight version.
    `llm` is the engine (`rollserve.LLM`).
    """

    def __init__(self, model, accelerator, processing_class, config: RollserveConfig | None = None, *,
                 max_completion_length: int = 16, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 min_p: float | None = 0.0, repetition_penalty: float = 1.0, logprobs: int | None = 0,
                 generation_kwargs: dict | None = None, eos_token_ids=(), seed: int = 0):
        config = RollserveConfig() if config is None else config
        if not isinstance(config, RollserveConfig):
            raise TypeError(f"config must be a RollserveConfig, got {type(config).__name__}")
        self.model = model
        self.accelerator = accelerator
        self.config = config
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        dtype = resolve_dtype(config.dtype) or _model_dtype(model)
        obstacle = _zero_copy_obstacle(model, dtype, accelerator)
        if config.zero_copy and obstacle:
            raise ValueError(f"RollserveConfig.zero_copy=True is not possible: {obstacle}")
        self.zero_copy = config.zero_copy is not False and obstacle is None
        module = model if self.zero_copy else _engine_model(model, dtype, accelerator.device)
        engine_args = {f.name: getattr(config, f.name) for f in fields(EngineConfig)}
        engine_args.update(dtype=dtype, seed=seed if config.seed is None else config.seed)
        self.llm = LLM(module, tokenizer=tokenizer, **engine_args)
        self._synced_once = self.zero_copy
        self._sampling = dict(
            temperature=temperature, top_p=top_p, top_k=top_k, min_p=0.0 if min_p is None else min_p,
            repetition_penalty=repetition_penalty, max_tokens=max_completion_length, logprobs=logprobs,
            logprobs_mode="policy", stop_token_ids=sorted(set(eos_token_ids or ())),
        )
        for key, value in (generation_kwargs or {}).items():
            if key not in SamplingParams.__dataclass_fields__ or key in ("n", "logprobs_mode"):
                raise ValueError(f"generation_kwargs[{key!r}] is not a rollserve SamplingParams field "
                                 f"that can be set here")
            self._sampling[key] = value
        SamplingParams(**self._sampling)  # a bad value fails now, naming the field
        self.sleep_level = 1 if self.zero_copy else config.sleep_level
        if config.sleep_mode:
            self.llm.sleep(self.sleep_level)

    @property
    def weight_version(self) -> int:
        return self.llm.weight_version

    def sync_weights(self) -> int:
        """Brings the trainer's weights into the engine; returns the new weight version.

        Zero-copy: the engine already runs on them, only the version advances (and cached
        prefixes are dropped). Otherwise the weight-sync sources yield full tensors (ZeRO-3
        gathered a bucket at a time, FSDP2 DTensors made full, PEFT LoRA merged) and
        `LLM.update_weights` copies them in place; every rank takes part in the gathers.
        """
        if self.zero_copy:
            return self.llm.advance_weight_version()
        from ..weight_sync.sources import iter_named_weights

        peft = _is_peft(self.model)
        named = iter_named_weights(self.model, consumer_rank=None, only_adapted=peft and self._synced_once)
        version = self.llm.update_weights(named, require_all=not self._synced_once)
        self._synced_once = True
        return version

    def generate(self, prompts: list[list[int]], images=None, num_generations: int = 1, profiler=None) -> tuple:
        """Generates one completion per row of `prompts` (token ids; rows repeated `num_generations` times).

        Each run of identical rows is one request with `n` samples (its prompt is prefilled
        once). Returns `(prompt_ids, completion_ids, logprobs, logprob_token_ids)` in row
        order; `logprobs[i][t]` lists the sampled token's logprob first (then the top
        alternatives, most likely first, when `logprobs > 0`), or None when `logprobs=None`.
        """
        if images is not None and any(img is not None for img in images):
            raise ValueError("images: rollserve generates from text only; this batch has images")
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError(f"prompts must be a non-empty list of token-id lists, got {prompts!r:.80}")
        if self.llm.is_sleeping:
            self.llm.wake_up()
        runs = _runs([list(p) for p in prompts])
        params = [SamplingParams(n=count, **self._sampling) for _, count in runs]
        with profiler or nullcontext():
            outputs = self.llm.generate([p for p, _ in runs], params, use_tqdm=False)
        prompt_ids, completion_ids, logprobs, logprob_ids = [], [], [], []
        for out in outputs:
            for c in out.outputs:
                prompt_ids.append(list(out.prompt_token_ids))
                completion_ids.append(list(c.token_ids))
                if c.logprobs is not None:
                    ids, lps = _ranked(c)
                    logprob_ids.append(ids)
                    logprobs.append(lps)
        if self.config.sleep_mode:
            self.llm.sleep(self.sleep_level)
        if self._sampling["logprobs"] is None:
            return prompt_ids, completion_ids, None, None
        return prompt_ids, completion_ids, logprobs, logprob_ids


def _ranked(c) -> tuple[list[list[int]], list[list[float]]]:
    if c.top_logprobs is None:
        return [[t] for t in c.token_ids], [[lp] for lp in c.logprobs]
    ids, lps = [], []
    for t, lp, top in zip(c.token_ids, c.logprobs, c.top_logprobs):
        others = sorted(((i, v) for i, v in top.items() if i != t), key=lambda kv: -kv[1])
        ids.append([t] + [i for i, _ in others])
        lps.append([lp] + [v for _, v in others])
    return ids, lps


def _check_trainer(trainer) -> None:
    if not isinstance(trainer, (trl.GRPOTrainer, trl.RLOOTrainer)):
        raise TypeError(f"trainer must be a trl.GRPOTrainer or trl.RLOOTrainer, got {type(trainer).__name__}")


def _backend(trainer, config: RollserveConfig | None) -> RollserveGeneration:
    args = trainer.args
    return RollserveGeneration(
        trainer.model, trainer.accelerator, trainer.processing_class, config,
        max_completion_length=trainer.max_completion_length, temperature=trainer.temperature,
        top_p=trainer.top_p, top_k=trainer.top_k, min_p=trainer.min_p, repetition_penalty=trainer.repetition_penalty,
        # GRPO's importance-sampling correction needs the sampled tokens' logprobs; RLOO uses none.
        logprobs=0 if isinstance(trainer, trl.GRPOTrainer) else None,
        generation_kwargs=args.generation_kwargs, eos_token_ids=getattr(trainer, "eos_token_ids", ()),
        seed=args.seed + trainer.accelerator.process_index,
    )


def attach(trainer, config: RollserveConfig | None = None) -> RollserveGeneration:
    """Makes a built `trl.GRPOTrainer` / `trl.RLOOTrainer` generate with rollserve; returns the backend.

    The trainer then takes its `use_vllm=True` path with `trainer.vllm_generation` being
    the rollserve backend (`vllm_mode` reads "rollserve"). Call before `trainer.train()`.
    """
    _check_trainer(trainer)
    backend = _backend(trainer, config)
    trainer.vllm_generation = backend
    trainer.use_vllm = True
    trainer.vllm_mode = "rollserve"
    trainer._last_loaded_step = -1  # TRL's tag: sync at the first generation, then once per optimizer step
    return backend


@contextmanager
def _without_vllm(args):
    """TRL would start vLLM itself when `use_vllm=True`: build the trainer with it off, then attach."""
    if args is None or not getattr(args, "use_vllm", False):
        yield
        return
    args.use_vllm = False
    try:
        yield
    finally:
        args.use_vllm = True


def _training_args(args: tuple, kwargs: dict):
    return kwargs["args"] if "args" in kwargs else (args[2] if len(args) > 2 else None)


class _RollserveTrainerMixin:
    """Builds the TRL trainer with vLLM switched off, then attaches a rollserve backend."""

    def __init__(self, *args, rollserve_config: RollserveConfig | None = None, **kwargs):
        if rollserve_config is not None and not isinstance(rollserve_config, RollserveConfig):
            raise TypeError(f"rollserve_config must be a RollserveConfig, got {type(rollserve_config).__name__}")
        with _without_vllm(_training_args(args, kwargs)):
            super().__init__(*args, **kwargs)
        attach(self, rollserve_config)


class GRPOTrainer(_RollserveTrainerMixin, trl.GRPOTrainer):
    """`trl.GRPOTrainer` that generates with rollserve: TRL's arguments plus `rollserve_config`.

    `use_vllm` in the `GRPOConfig` is ignored (rollserve takes that path);
    `vllm_importance_sampling_correction` (TRL's default True) keeps logging
    `sampling/sampling_logp_difference/*` and `sampling/importance_sampling_ratio/*`.
    """


class RLOOTrainer(_RollserveTrainerMixin, trl.RLOOTrainer):
    """`trl.RLOOTrainer` that generates with rollserve: TRL's arguments plus `rollserve_config`."""


class RolloutFunc:
    """A TRL `rollout_func(prompts, trainer)` generating with rollserve (TRL marks that hook experimental).

    Built lazily on the first call from `trainer.model`; syncs the weights whenever the
    trainer's `global_step` changed. Prompts are strings or conversations (the chat
    template is applied), repeated `num_generations` times; returns one completion per
    row with `prompt_ids`, `completion_ids` and the sampled tokens' `logprobs`.
    """

    def __init__(self, config: RollserveConfig | None = None):
        if config is not None and not isinstance(config, RollserveConfig):
            raise TypeError(f"config must be a RollserveConfig, got {type(config).__name__}")
        self.config = config
        self.backend: RollserveGeneration | None = None
        self._synced_step = None

    def __call__(self, prompts: list, trainer) -> dict:
        _check_trainer(trainer)
        if self.backend is None:
            self.backend = _backend(trainer, self.config)
        if trainer.state.global_step != self._synced_step:
            self.backend.sync_weights()
            self._synced_step = trainer.state.global_step
        inputs = self.backend.llm.inputs
        prompt_ids = [inputs.encode(p, f"prompts[{i}]").token_ids for i, p in enumerate(prompts)]
        training = trainer.model.training
        n = trainer.num_generations if training else trainer.num_generations_eval
        prompt_ids, completion_ids, logprobs, _ = self.backend.generate(prompt_ids, None, n)
        sampled = [[lp[0] for lp in seq] for seq in logprobs] if logprobs is not None else None
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": sampled}


def rollout_func(config: RollserveConfig | None = None) -> RolloutFunc:
    """`trl.GRPOTrainer(..., rollout_func=rollout_func(RollserveConfig(...)))`: rollserve behind TRL's hook.

    TRL then warns that `rollout_func` is experimental (`TRL_EXPERIMENTAL_SILENCE=1` hides
    it). TRL applies no importance-sampling correction on this path (it does so only with
    `use_vllm`); use `GRPOTrainer(..., rollserve_config=...)` for that.
    """
    return RolloutFunc(config)


__all__ = ["RollserveConfig", "RollserveGeneration", "GRPOTrainer", "RLOOTrainer", "attach", "rollout_func",
           "RolloutFunc"]
