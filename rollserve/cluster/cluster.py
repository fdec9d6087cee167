"""`RolloutCluster`: engine replicas as Ray actors behind one `LLM`-like driver."""

import itertools
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import ray
from ray.exceptions import RayActorError, RayTaskError

from ..config import EngineConfig
from ..inputs import InputProcessor, Prompt, as_prompt_list, is_conversation
from ..llm import sampling_params_list
from ..outputs import BeamSearchOutput, RequestOutput
from ..sampling_params import BeamSearchParams, SamplingParams
from ..weight_sync.wire import DEFAULT_BUCKET_BYTES
from .replica import ReplicaBehind
from .replicas import STRATEGIES, ClusterError, Replicas, Slot, bundle
from .router import Router
from .weights import ClusterWeights


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


@dataclass
class _Job:
    index: int  # the prompt's position in the call
    request_id: str
    prompt: Prompt
    params: SamplingParams | BeamSearchParams
    cost: int


def _cost(prompt: Prompt, params) -> int:
    width = params.beam_width if isinstance(params, BeamSearchParams) else params.n
    return len(prompt.token_ids) + width * params.max_tokens


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
    """

    def __init__(self, model, num_replicas: int = 2, replica_resources: dict | None = None,
                 placement_strategy: str = "PACK", *, tokenizer=None, max_restarts: int = 3,
                 replica_timeout: float = 300.0, start_timeout: float = 600.0, prefix_blocks: int = 1,
                 load_factor: float = 1.25, bucket_bytes: int = DEFAULT_BUCKET_BYTES, **engine_args):
        if not isinstance(num_replicas, int) or isinstance(num_replicas, bool) or num_replicas < 1:
            raise ValueError(f"num_replicas={num_replicas!r} is invalid: must be an int >= 1")
        if placement_strategy not in STRATEGIES:
            raise ValueError(f"placement_strategy={placement_strategy!r} is invalid: must be one of {STRATEGIES}")
        resources = {"num_cpus": 1} if replica_resources is None else dict(replica_resources)
        bundle(resources)  # bad resources and engine arguments fail here, before any actor starts
        config = EngineConfig(**engine_args)
        self.router = Router(num_replicas, config.block_size, prefix_blocks, load_factor)
        self.replicas = Replicas(model, num_replicas, resources, placement_strategy, tokenizer, engine_args,
                                 max_restarts, replica_timeout, start_timeout)
        self.weights = ClusterWeights(self.replicas, bucket_bytes)
        self.replicas.sync = self.weights.sync
        self._request_ids = itertools.count()
        self._sleeping = False
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="rollserve-cluster")
        try:
            self.tokenizer = self.replicas.get(self.replicas.slots[0].actor.tokenizer.remote())
        except BaseException:
            self.shutdown()
            raise
        self.inputs = InputProcessor(self.tokenizer, None)  # encodes only; replicas check

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
        jobs = [_Job(i, "", e, p, _cost(e, p)) for i, (e, p) in enumerate(zip(encoded, params))]
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
        while True:
            slot = self.replicas.live()[0]
            try:
                return self.replicas.get(slot.actor.check.remote(items))
            except RayActorError:
                self.replicas.down(slot)

    def _execute(self, jobs: list[_Job], bar) -> list:
        results: dict[int, object] = {}
        finished: queue.SimpleQueue = queue.SimpleQueue()
        pending, running = jobs, 0
        while pending or running:
            if pending:
                running += self._dispatch(pending, results, finished, bar)
                pending = []
            slot, left, error = finished.get()
            running -= 1
            if error is None:
                continue
            if isinstance(error, (RayActorError, ReplicaBehind)):
                self.replicas.down(slot)
                pending = left
            else:
                raise error
        return [results[job.index] for job in jobs]

    def _dispatch(self, jobs: list[_Job], results: dict, finished: queue.SimpleQueue, bar) -> int:
        """Routes `jobs` over the live replicas and starts a batch on each; returns how many batches started."""
        live = self.replicas.live()
        batches: dict[int, list[_Job]] = {}
        with self.replicas.lock:
            alive = {s.index for s in live}
            for job in jobs:
                replica = self.router.choose(job.prompt.token_ids, job.cost, alive)
                batches.setdefault(replica, []).append(replace(job, request_id=str(next(self._request_ids))))
                self.replicas.slots[replica].requests += 1
        for replica, batch in batches.items():
            threading.Thread(target=self._drain, args=(self.replicas.slots[replica], batch, results, finished, bar),
                             name="rollserve-cluster-batch", daemon=True).start()
        return len(batches)

    def _drain(self, slot: Slot, batch: list[_Job], results: dict, finished: queue.SimpleQueue, bar) -> None:
        left = {job.request_id: job for job in batch}
        try:
            requests = [(job.request_id, job.prompt, job.params) for job in batch]
            for ref in slot.actor.run.remote(requests, self.weights.version):
                out = ray.get(ref)
                job = left.pop(out.request_id)
                results[job.index] = out
                with self.replicas.lock:
                    self.router.done(slot.index, job.cost)
                if bar is not None:
                    bar.update(1)
            finished.put((slot, [], None))
        except BaseException as e:
            with self.replicas.lock:
                for job in left.values():
                    self.router.done(slot.index, job.cost)
            finished.put((slot, list(left.values()), e.cause if isinstance(e, RayTaskError) else e))

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
        self.replicas.live()
        out = []
        for slot in self.replicas.slots:
            metrics = None
            if slot.alive:
                self.replicas.refresh(slot)
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
        self._executor.shutdown(wait=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
