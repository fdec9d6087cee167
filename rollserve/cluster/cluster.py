"""`RolloutCluster`: engine replicas as Ray actors behind one `LLM`-like driver."""

import itertools
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..config import EngineConfig
from ..inputs import InputProcessor, Prompt, as_prompt_list, is_conversation
from ..llm import sampling_params_list
from ..outputs import BeamSearchOutput, RequestOutput
from ..sampling_params import BeamSearchParams, SamplingParams
from ..weight_sync.updater import WeightUpdateError, next_version
from ..weight_sync.wire import DEFAULT_BUCKET_BYTES
from .replica import Replica, ReplicaBehind
from .router import Router
from .weights import CommittedWeights, put_buckets

_RESOURCES = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}
_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
_PROBE_S = 0.2  # how often a call with no live replica looks for one that came back


class ClusterError(RuntimeError):
    """The cluster cannot do what was asked: no replica is alive, or replicas died in a weight update."""


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


@dataclass
class _Slot:
    index: int
    actor: object
    incarnation: str = ""
    pid: int | None = None
    alive: bool = True
    probe: object = None  # a pending identity() call on a replica that is down
    restarts: int = 0
    requests: int = 0


def _cost(prompt: Prompt, params) -> int:
    width = params.beam_width if isinstance(params, BeamSearchParams) else params.n
    return len(prompt.token_ids) + width * params.max_tokens


def _bundle(resources: dict) -> dict:
    unknown = sorted(set(resources) - set(_RESOURCES))
    if unknown or not resources:
        raise ValueError(f"replica_resources={resources!r} is invalid: give some of {sorted(_RESOURCES)}")
    return {_RESOURCES[k]: v for k, v in resources.items()}


def _connect() -> None:
    if ray.is_initialized():
        return
    try:
        ray.init(address="auto")  # a cluster started with `ray start --head` (or RAY_ADDRESS)
    except ConnectionError:
        ray.init()


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
        if placement_strategy not in _STRATEGIES:
            raise ValueError(f"placement_strategy={placement_strategy!r} is invalid: must be one of {_STRATEGIES}")
        resources = {"num_cpus": 1} if replica_resources is None else dict(replica_resources)
        bundle = _bundle(resources)
        config = EngineConfig(**engine_args)  # bad engine arguments fail here, before any actor starts
        self.replica_timeout = replica_timeout
        self.bucket_bytes = bucket_bytes
        self.router = Router(num_replicas, config.block_size, prefix_blocks, load_factor)
        self._lock = threading.RLock()  # slots and router loads
        self._weights_lock = threading.RLock()  # one weight update (or replica sync) at a time
        self._weights = CommittedWeights()
        self._staged: dict[int, tuple[int, dict[int, int], list]] = {}  # token -> (version, slot -> token, buckets)
        self._tokens = itertools.count()
        self._request_ids = itertools.count()
        self._sleeping = False
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="rollserve-cluster")
        _connect()
        self._group = placement_group([bundle] * num_replicas, strategy=placement_strategy)
        try:
            ray.get(self._group.ready(), timeout=start_timeout)
        except GetTimeoutError:
            remove_placement_group(self._group)
            raise ClusterError(f"Ray could not place {num_replicas} replicas of {bundle} ({placement_strategy}) "
                               f"within start_timeout={start_timeout}s; the cluster has {ray.cluster_resources()}"
                               ) from None
        threads = int(resources["num_cpus"]) if "num_cpus" in resources else None
        model = model if isinstance(model, str) else ray.put(model)
        self._model = model  # a module's object-store copy must outlive every restart of a replica
        actor = ray.remote(Replica)
        self._slots = [_Slot(i, actor.options(
            **resources, max_restarts=max_restarts, max_concurrency=16,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self._group, placement_group_bundle_index=i),
        ).remote(model, tokenizer, engine_args, threads)) for i in range(num_replicas)]
        try:
            identities = self._get([s.actor.identity.remote() for s in self._slots], start_timeout)
            for slot, (incarnation, pid, _) in zip(self._slots, identities):
                slot.incarnation, slot.pid = incarnation, pid
            self.tokenizer = ray.get(self._slots[0].actor.tokenizer.remote())
        except BaseException:
            self.shutdown()
            raise
        self.inputs = InputProcessor(self.tokenizer, None)  # encodes only; replicas check

    def _get(self, refs, timeout: float | None = None):
        try:
            return ray.get(refs, timeout=self.replica_timeout if timeout is None else timeout)
        except RayTaskError as e:
            raise e.cause from None

    # -- replicas that die and come back -------------------------------------
    def _down(self, slot: _Slot) -> None:
        with self._lock:
            slot.alive, slot.probe = False, None

    def _revive(self, slot: _Slot) -> None:
        """Brings a replica that is down back when it answers again, at the cluster's weights."""
        if slot.probe is None:
            slot.probe = slot.actor.identity.remote()
        if not ray.wait([slot.probe], timeout=0)[0]:
            return
        try:
            incarnation, pid, version = ray.get(slot.probe)
        except RayActorError:  # restarting or gone for good: ask again next time
            slot.probe = None
            return
        with self._weights_lock:
            if version != self._weights.version:
                buckets = self._weights.buckets()
                token = self._get(slot.actor.stage_weights.remote(buckets, self._weights.version, version))
                self._get(slot.actor.commit_weights.remote(token))
            with self._lock:
                slot.restarts += slot.incarnation != incarnation
                slot.incarnation, slot.pid, slot.alive, slot.probe = incarnation, pid, True, None

    def _live(self) -> list[_Slot]:
        """The replicas alive now; waits up to `replica_timeout` for one when none is."""
        deadline = time.monotonic() + self.replica_timeout
        while True:
            for slot in self._slots:
                if not slot.alive:
                    try:
                        self._revive(slot)
                    except (RayActorError, ReplicaBehind, GetTimeoutError):
                        slot.probe = None  # it died again while being synced
            live = [s for s in self._slots if s.alive]
            if live:
                return live
            if time.monotonic() > deadline:
                raise ClusterError(f"no replica is alive: all {len(self._slots)} died and none came back within "
                                   f"replica_timeout={self.replica_timeout}s")
            time.sleep(_PROBE_S)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Waits until every replica is alive and at the cluster's weights; `ClusterError` after `timeout` s."""
        deadline = time.monotonic() + (self.replica_timeout if timeout is None else timeout)
        while len(self._live()) < len(self._slots):
            if time.monotonic() > deadline:
                down = [s.index for s in self._slots if not s.alive]
                raise ClusterError(f"replicas {down} did not come back within {timeout}s")
            time.sleep(_PROBE_S)

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
            slot = self._live()[0]
            try:
                return self._get(slot.actor.check.remote(items))
            except RayActorError:
                self._down(slot)

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
                self._down(slot)
                pending = left
            else:
                raise error
        return [results[job.index] for job in jobs]

    def _dispatch(self, jobs: list[_Job], results: dict, finished: queue.SimpleQueue, bar) -> int:
        """Routes `jobs` over the live replicas and starts a batch on each; returns how many batches started."""
        live = self._live()
        batches: dict[int, list[_Job]] = {}
        with self._lock:
            alive = {s.index for s in live}
            for job in jobs:
                replica = self.router.choose(job.prompt.token_ids, job.cost, alive)
                batches.setdefault(replica, []).append(replace(job, request_id=str(next(self._request_ids))))
                self._slots[replica].requests += 1
        for replica, batch in batches.items():
            threading.Thread(target=self._drain, args=(self._slots[replica], batch, results, finished, bar),
                             name="rollserve-cluster-batch", daemon=True).start()
        return len(batches)

    def _drain(self, slot: _Slot, batch: list[_Job], results: dict, finished: queue.SimpleQueue, bar) -> None:
        left = {job.request_id: job for job in batch}
        try:
            requests = [(job.request_id, job.prompt, job.params) for job in batch]
            for ref in slot.actor.run.remote(requests, self._weights.version):
                out = ray.get(ref)
                job = left.pop(out.request_id)
                results[job.index] = out
                with self._lock:
                    self.router.done(slot.index, job.cost)
                if bar is not None:
                    bar.update(1)
            finished.put((slot, [], None))
        except BaseException as e:
            with self._lock:
                for job in left.values():
                    self.router.done(slot.index, job.cost)
            finished.put((slot, list(left.values()), e.cause if isinstance(e, RayTaskError) else e))

    # -- weights --------------------------------------------------------------
    @property
    def weight_version(self) -> int:
        return self._weights.version

    def update_weights(self, named_tensors, version: int | None = None, require_all: bool = False) -> int:
        """`LLM.update_weights` on every live replica, all or none; returns the new version.

        The tensors go into Ray's object store once (buckets of `bucket_bytes`); every replica stages
        and checks the whole update, and only when all accept does any apply it. A refusal anywhere
        (`WeightUpdateError`) or a replica that dies before the commit (`ClusterError`) leaves every
        replica on the old weights and version. A replica that is down meanwhile gets the new weights
        when it comes back, before it serves.
        """
        return self.commit_weights(self.stage_weights(named_tensors, version, require_all))

    def stage_weights(self, named_tensors, version: int | None = None, require_all: bool = False) -> int:
        """The first phase of `update_weights`: every live replica stages and checks it; returns a token."""
        with self._weights_lock:
            new_version = next_version(self._weights.version, version)
            live = self._live()
            buckets = put_buckets(named_tensors, self.bucket_bytes)
            fresh = [(ref, None) for ref, _ in buckets]
            calls = {s.index: s.actor.stage_weights.remote(fresh, new_version, self._weights.version, require_all)
                     for s in live}
            tokens, refusals, died = {}, [], []
            for index, ref in calls.items():
                try:
                    tokens[index] = ray.get(ref, timeout=self.replica_timeout)
                except RayTaskError as e:
                    refusals.append((index, e.cause))
                except (RayActorError, GetTimeoutError):
                    died.append(index)
            if refusals or died:
                self._discard(tokens)
                for index in died:
                    self._down(self._slots[index])
                self._raise_refused(refusals, died, "staging")
            token = next(self._tokens)
            self._staged[token] = (new_version, tokens, buckets)
            return token

    def commit_weights(self, token: int) -> int:
        """The second phase: applies a staged update on every replica that staged it; returns the new version.

        Every replica is asked whether it is still the one that staged; if one died meanwhile the
        update is discarded everywhere and `ClusterError` is raised.
        """
        with self._weights_lock:
            version, tokens, buckets = self._take(token)
            died = []
            for index in tokens:
                slot = self._slots[index]
                try:
                    incarnation = ray.get(slot.actor.identity.remote(), timeout=self.replica_timeout)[0]
                except (RayActorError, GetTimeoutError):
                    incarnation = None
                if incarnation != slot.incarnation:
                    died.append(index)
            if died:
                self._discard(tokens)
                for index in died:
                    self._down(self._slots[index])
                self._raise_refused([], died, "committing")
            for index, replica_token in tokens.items():
                try:
                    ray.get(self._slots[index].actor.commit_weights.remote(replica_token), timeout=self.replica_timeout)
                except (RayActorError, GetTimeoutError):  # it died after the others agreed: it syncs on return
                    self._down(self._slots[index])
            self._weights.record(version, buckets)
            return version

    def discard_weights(self, token: int) -> None:
        """Drops a staged update everywhere; weights and version stay as they were."""
        with self._weights_lock:
            self._discard(self._take(token)[1])

    def _take(self, token: int):
        staged = self._staged.pop(token, None)
        if staged is None:
            raise ValueError(f"token={token!r} names no staged update (never staged, or already committed or "
                             f"discarded)")
        return staged

    def _discard(self, tokens: dict[int, int]) -> None:
        for index, replica_token in tokens.items():
            try:
                ray.get(self._slots[index].actor.discard_weights.remote(replica_token), timeout=self.replica_timeout)
            except (RayActorError, RayTaskError, GetTimeoutError):
                pass  # a replica that restarted holds nothing staged

    @staticmethod
    def _raise_refused(refusals: list, died: list[int], phase: str):
        for index, error in refusals:
            if isinstance(error, WeightUpdateError):
                raise WeightUpdateError(error.problems, where=f"replica {index}") from None
        if refusals:
            index, error = refusals[0]
            raise error
        raise ClusterError(f"replicas {died} died while {phase} the weight update; it was applied nowhere "
                           f"(every replica keeps the old weights and version)")

    def weights_fingerprint(self) -> str:
        """`LLM.weights_fingerprint` of the live replicas; `ClusterError` when they differ."""
        live = self._live()
        prints = self._get([s.actor.weights_fingerprint.remote() for s in live])
        if len(set(prints)) > 1:
            raise ClusterError("replicas hold different weights: " +
                               ", ".join(f"replica {s.index}: {p}" for s, p in zip(live, prints)))
        return prints[0]

    # -- the rest of LLM's surface --------------------------------------------
    def _broadcast(self, method: str, *args) -> list:
        return self._get([getattr(s.actor, method).remote(*args) for s in self._live()])

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
        """Per replica: alive, its load in outstanding tokens, requests routed, and its `LLM.metrics()`."""
        self._live()
        out = []
        for slot in self._slots:
            metrics = None
            if slot.alive:
                try:
                    metrics = self._get(slot.actor.metrics.remote())
                except RayActorError:
                    self._down(slot)
            with self._lock:
                out.append(ReplicaStats(slot.index, slot.alive, slot.pid, slot.restarts,
                                        self.router.loads[slot.index], slot.requests, metrics))
        return out

    def shutdown(self) -> None:
        """Stops the replicas and frees their placement group (the Ray cluster itself stays up)."""
        for slot in self._slots:
            ray.kill(slot.actor, no_restart=True)
        remove_placement_group(self._group)
        self._executor.shutdown(wait=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
