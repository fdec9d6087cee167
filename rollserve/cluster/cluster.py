"""`RolloutCluster`: engine replicas as Ray actors behind one `LLM`-like driver."""

import itertools
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

from ray.exceptions import RayActorError

from ..config import EngineConfig
from ..inputs import InputProcessor, as_prompt_list, is_conversation
from ..llm import sampling_params_list
from ..outputs import BeamSearchOutput, RequestOutput, StepOutput
from ..sampling_params import BeamSearchParams, SamplingParams
from ..weight_sync.wire import DEFAULT_BUCKET_BYTES
from .dispatch import Dispatcher, Job, job
from .replicas import STRATEGIES, ClusterError, Replicas, bundle
from .router import Router
from .weights import TRANSPORTS, ClusterWeights


@dataclass
class ReplicaStats:
    """One replica as the driver sees it; `metrics` is its `LLM.metrics()` (None while it is down)."""

    index: int
    alive: bool
    pid: int | None
    restarts: int  # times it came back (Ray restarted it) and was brought to the cluster's weights
    outstanding_tokens: int  # routed and not yet finished: prompt tokens + n * max_tokens per request
    requests: int  # routed to it so far
    metrics: dict | None


class RolloutCluster:
    """`num_replicas` engines (`rollserve.LLM`), each a Ray actor in one placement group, used like one `LLM`.

    Joins the Ray cluster this process is connected to, or the one `ray start` began on this
    machine (`address="auto"`), or starts a local one. `replica_resources`: what one replica
    holds (`{"num_cpus": 1}`, `{"num_gpus": 1}`); a replica with `num_cpus` runs that many torch
    threads. `placement_strategy`: Ray's `"PACK"` (fill nodes) or `"SPREAD"` (one per node where
    possible). The engine arguments are `LLM`'s; `model` is a path each node can read (or a
    module, sent once through the object store).

    Requests are routed whole (a request's `n` samples stay on one replica) by consistent
    hashing on the prompt's first `prefix_blocks` KV blocks, so shared prefixes hit one prefix
    cache, unless that replica has more than `load_factor` times the mean outstanding tokens.
    A replica that dies loses nothing: its unfinished requests run again on the others. Ray
    restarts it (`max_restarts`), and it gets the cluster's weights before it serves again.
    With no replica alive for `replica_timeout` seconds, a call raises `ClusterError` (as does a
    start that takes over `start_timeout`: placing the replicas and loading their models).

    `weight_transport`: how `update_weights` moves the tensors to the replicas. `"ray"`: through
    Ray's object store, one put per bucket of `bucket_bytes`. `"distributed"`: broadcast in a
    `torch.distributed` gloo group, this process rank 0 and each live replica a rank (built at the
    first update, again when its members change). Either way an update is all or none, and the
    committed weights stay in the object store, from which a replica that comes back is brought up to date.
    """

    def __init__(self, model, num_replicas: int = 2, replica_resources: dict | None = None,
                 placement_strategy: str = "PACK", *, tokenizer=None, max_restarts: int = 3,
                 replica_timeout: float = 300.0, start_timeout: float = 600.0, prefix_blocks: int = 1,
                 load_factor: float = 1.25, bucket_bytes: int = DEFAULT_BUCKET_BYTES, weight_transport: str = "ray",
                 **engine_args):
        if not isinstance(num_replicas, int) or isinstance(num_replicas, bool) or num_replicas < 1:
            raise ValueError(f"num_replicas={num_replicas!r} is invalid: must be an int >= 1")
        if placement_strategy not in STRATEGIES:
            raise ValueError(f"placement_strategy={placement_strategy!r} is invalid: must be one of {STRATEGIES}")
        if weight_transport not in TRANSPORTS:
            raise ValueError(f"weight_transport={weight_transport!r} is invalid: must be one of {TRANSPORTS}")
        resources = {"num_cpus": 1} if replica_resources is None else dict(replica_resources)
        bundle(resources)  # bad resources and engine arguments fail here, before any actor starts
        self._config = EngineConfig(**engine_args)
        self.router = Router(num_replicas, self._config.block_size, prefix_blocks, load_factor)
        self.replicas = Replicas(model, num_replicas, resources, placement_strategy, tokenizer, engine_args,
                                 max_restarts, replica_timeout, start_timeout)
        self.weights = ClusterWeights(self.replicas, bucket_bytes, weight_transport)
        self.replicas.sync = self.weights.sync
        self._request_ids = itertools.count()
        self._sleeping = False
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="rollserve-cluster")
        try:
            first = self.replicas.slots[0].actor
            self.tokenizer, (self.model_name, self.dtype) = self.replicas.get(
                [first.tokenizer.remote(), first.model_info.remote()])
        except BaseException:
            self.shutdown()
            raise
        self.inputs = InputProcessor(self.tokenizer, self._problem)
        self._steps = Dispatcher(self.replicas, self.router, self.weights, self._request_ids)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Waits until every replica is alive and at the cluster's weights; `ClusterError` after `timeout` s
        (default `replica_timeout`)."""
        self.replicas.wait_ready(timeout)

    # -- generation -----------------------------------------------------------
    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False, chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """`LLM.generate` over the replicas: one `RequestOutput` per prompt, in prompt order."""
        prompts = as_prompt_list(prompts)
        return self._run_all(prompts, sampling_params_list(sampling_params, len(prompts)), use_tqdm,
                             chat_template_kwargs)

    def generate_async(self, prompts, sampling_params=None, chat_template_kwargs: dict | None = None) -> Future:
        """`generate` in the background: a `concurrent.futures.Future` of its outputs."""
        return self._executor.submit(self.generate, prompts, sampling_params, False, chat_template_kwargs)

    def chat(self, conversations, sampling_params=None, use_tqdm: bool = False,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """`LLM.chat`: each conversation rendered by the chat template (in the driver), then generated."""
        if is_conversation(conversations):
            conversations = [conversations]
        return self.generate(list(conversations), sampling_params, use_tqdm, chat_template_kwargs)

    def beam_search(self, prompts, params: BeamSearchParams, use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """`LLM.beam_search` over the replicas (each prompt's beams on one), in prompt order."""
        if not isinstance(params, BeamSearchParams):
            raise TypeError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        prompts = as_prompt_list(prompts)
        return self._run_all(prompts, [params] * len(prompts), use_tqdm, None)

    def _run_all(self, prompts: list, params: list, use_tqdm: bool, chat_template_kwargs) -> list:
        encoded = [self.inputs.encode(p, f"prompts[{i}]", chat_template_kwargs) for i, p in enumerate(prompts)]
        self._check([(f"prompts[{i}]", e, p) for i, (e, p) in enumerate(zip(encoded, params))])
        jobs = [job(i, e, p) for i, (e, p) in enumerate(zip(encoded, params))]
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(jobs), desc="Generating", unit="req", dynamic_ncols=True)
        try:
            return self._execute(jobs, bar)
        finally:
            if bar is not None:
                bar.close()

    def _check(self, items: list) -> None:
        """Every prompt checked by a replica's engine before any is queued (a bad one raises, nothing runs)."""
        self._ask_one("check", items)

    def _ask_one(self, method: str, *args):
        """`method(*args)` on one live replica (on another if that one died meanwhile)."""
        while True:
            slot = self.replicas.live()[0]
            try:
                return self.replicas.get(getattr(slot.actor, method).remote(*args))
            except RayActorError:
                self.replicas.down(slot)

    def _execute(self, jobs: list[Job], bar) -> list:
        dispatcher = Dispatcher(self.replicas, self.router, self.weights, self._request_ids)
        for j in jobs:
            dispatcher.add(j)
        results: dict[int, object] = {}
        while dispatcher.num_unfinished:
            for j, out in dispatcher.step():
                results[j.key] = out
                if bar is not None:
                    bar.update(1)
        return [results[j.key] for j in jobs]

    # -- the step API ---------------------------------------------------------
    @property
    def config(self) -> EngineConfig:
        """Every replica's engine configuration."""
        return self._config

    @property
    def num_replicas(self) -> int:
        return len(self.replicas.slots)

    def get_tokenizer(self):
        return self.tokenizer

    def add_request(self, prompt, params: SamplingParams | BeamSearchParams | None = None,
                    request_id: str | None = None, *, chat_template_kwargs: dict | None = None) -> str:
        """`LLM.add_request` for the cluster: queues one request (checked by a replica now) for `step()`.

        Not streamed and not parked (`stream` and `park` are `LLM`'s only); a request's samples run on
        one replica, routed when `step()` sends it.
        """
        params = SamplingParams() if params is None else params
        if not isinstance(params, (SamplingParams, BeamSearchParams)):
            raise TypeError(f"params must be a SamplingParams or BeamSearchParams, got {type(params).__name__}")
        if request_id is not None and (not isinstance(request_id, str) or not request_id):
            raise TypeError(f"request_id must be a non-empty str or None, got {request_id!r}")
        if request_id in self._steps.keys():
            raise ValueError(f"request_id={request_id!r} is already in use")
        encoded = self.inputs.process(prompt, params, "prompt", chat_template_kwargs)
        rid = f"cluster-{next(self._request_ids)}" if request_id is None else request_id
        self._steps.add(job(rid, encoded, params))
        return rid

    def step(self) -> list[StepOutput]:
        """Sends the requests added since the last call to the replicas, waits until one finishes (when any
        is in flight) and returns a finished `StepOutput` per request that finished meanwhile.

        Requests a dead replica left unfinished run again on the others; with none alive for
        `replica_timeout` s, `ClusterError`. Drive it from one thread.
        """
        finished = []
        for j, out in self._steps.step():
            out = replace(out, request_id=j.key)
            finished.append(StepOutput(j.key, [], True, out, getattr(out, "weight_version", self.weight_version)))
        return finished

    def abort(self, request_id: str) -> None:
        """Stops a request added with `add_request` (a no-op when it is not in flight). Unlike
        `LLM.abort`, its partial output is not returned."""
        self._steps.abort(request_id)

    def has_unfinished(self) -> bool:
        return self._steps.num_unfinished > 0

    @property
    def num_unfinished(self) -> int:
        return self._steps.num_unfinished

    def _problem(self, token_ids: list[int], params) -> str | None:
        """Why a replica's engine cannot run this prompt (`InputProcessor`'s check, one call to a replica)."""
        return self._ask_one("problem", token_ids, params)

    # -- weights --------------------------------------------------------------
    @property
    def weight_version(self) -> int:
        return self.weights.version

    def update_weights(self, named_tensors, version: int | None = None, require_all: bool = False) -> int:
        """`LLM.update_weights` on every live replica, all or none; returns the new version.

        The tensors go into Ray's object store once (buckets of `bucket_bytes`); every replica stages
        and checks the whole update, and only when all accept does any apply it. A refusal anywhere
        (`WeightUpdateError`, naming the replica) or a replica that dies before the commit
        (`ClusterError`) leaves every replica on the old weights and version. A replica that is down
        meanwhile gets the new weights when it comes back, before it serves.
        """
        return self.commit_weights(self.stage_weights(named_tensors, version, require_all))

    def stage_weights(self, named_tensors, version: int | None = None, require_all: bool = False) -> int:
        """The first phase of `update_weights`: every live replica stages and checks it; returns a token."""
        return self.weights.stage(named_tensors, version, require_all)

    def commit_weights(self, token: int) -> int:
        """The second phase: applies a staged update on every replica that staged it; returns the new version.

        Every replica is asked first whether it is still the one that staged; if one died meanwhile,
        the update is discarded everywhere and `ClusterError` is raised.
        """
        return self.weights.commit(token)

    def discard_weights(self, token: int) -> None:
        """Drops a staged update everywhere; weights and version stay as they were."""
        self.weights.discard(token)

    def weights_fingerprint(self) -> str:
        """`LLM.weights_fingerprint` of the live replicas; `ClusterError` when they differ."""
        live = self.replicas.live()
        prints = self.replicas.get([s.actor.weights_fingerprint.remote() for s in live])
        if len(set(prints)) > 1:
            raise ClusterError("replicas hold different weights: " +
                               ", ".join(f"replica {s.index}: {p}" for s, p in zip(live, prints)))
        return prints[0]

    # -- the rest of LLM's surface --------------------------------------------
    def _broadcast(self, method: str, *args) -> list:
        return self.replicas.get([getattr(s.actor, method).remote(*args) for s in self.replicas.live()])

    @property
    def is_sleeping(self) -> bool:
        return self._sleeping

    def sleep(self, level: int = 1) -> None:
        """`LLM.sleep` on every live replica (one that restarts meanwhile comes back awake)."""
        self._broadcast("sleep", level)
        self._sleeping = True

    def wake_up(self) -> None:
        self._broadcast("wake_up")
        self._sleeping = False

    def reset_prefix_cache(self) -> None:
        self._broadcast("reset_prefix_cache")

    def stats(self) -> list[ReplicaStats]:
        """Per replica: alive, pid, restarts, its load in outstanding tokens, requests routed, its `LLM.metrics()`."""
        self.replicas.confirmed()
        out = []
        for slot in self.replicas.slots:
            metrics = None
            if slot.alive:
                try:
                    metrics = self.replicas.get(slot.actor.metrics.remote())
                except RayActorError:
                    self.replicas.down(slot)
            with self.replicas.lock:
                out.append(ReplicaStats(slot.index, slot.alive, slot.pid, slot.restarts,
                                        self.router.loads[slot.index], slot.requests, metrics))
        return out

    def shutdown(self) -> None:
        """Stops the replicas and frees their placement group (the Ray cluster itself stays up)."""
        self.replicas.shutdown()
        if self.weights.group is not None:
            self.weights.group.close()
        self._executor.shutdown(wait=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
