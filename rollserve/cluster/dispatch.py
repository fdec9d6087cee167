"""Requests in flight on a cluster's replicas: routed in batches, their outputs collected as they finish,
and the unfinished requests of a replica that dies run again on the others.

`RolloutCluster.generate` and the cluster's step API (`add_request` / `step` / `abort`) are both loops
over a `Dispatcher`. Each batch is one streaming `Replica.run` call, read by a thread of its own that
turns what arrives into events on one queue; `step` is the only place that acts on them.
"""

import queue
import threading
from dataclasses import dataclass

import ray
from ray.exceptions import RayActorError, RayTaskError

from ..inputs import Prompt
from ..sampling_params import BeamSearchParams, SamplingParams
from .replica import ReplicaBehind
from .replicas import Slot


@dataclass
class Job:
    key: object  # the caller's name for it: a prompt's position (generate) or a request id (step API)
    prompt: Prompt
    params: SamplingParams | BeamSearchParams
    cost: int  # what the router counts: prompt tokens + n (or beam_width) * max_tokens


def job(key, prompt: Prompt, params) -> Job:
    width = params.beam_width if isinstance(params, BeamSearchParams) else params.n
    return Job(key, prompt, params, len(prompt.token_ids) + width * params.max_tokens)


@dataclass
class _Output:
    wire_id: str
    output: object


@dataclass
class _BatchEnd:
    slot: Slot
    unfinished: list[str]  # wire ids the replica never returned
    error: BaseException | None


class Dispatcher:
    """Jobs waiting to be routed and jobs running on a replica, each under a wire request id of its own.

    A job gets a new wire id each time it is sent (`request_ids`, shared by the cluster's dispatchers,
    keeps them unique on every replica), so a job re-run after its replica died is never confused with
    its first run. Not thread-safe: one caller drives it.
    """

    def __init__(self, replicas, router, weights, request_ids):
        self.replicas, self.router, self.weights = replicas, router, weights
        self._request_ids = request_ids
        self._pending: list[Job] = []
        self._running: dict[str, tuple[Slot, Job]] = {}  # wire id -> the replica running it, the job
        self._events: queue.SimpleQueue = queue.SimpleQueue()

    @property
    def num_unfinished(self) -> int:
        return len(self._pending) + len(self._running)

    def add(self, job: Job) -> None:
        self._pending.append(job)

    def keys(self) -> set:
        return {j.key for j in self._pending} | {j.key for _, j in self._running.values()}

    def abort(self, key) -> None:
        """Forgets the job named `key`; a replica running it is told to stop (its output is dropped)."""
        self._pending = [j for j in self._pending if j.key != key]
        for wire_id, (slot, j) in list(self._running.items()):
            if j.key == key:
                del self._running[wire_id]
                slot.actor.abort.remote(wire_id)

    def step(self) -> list[tuple[Job, object]]:
        """Sends the pending jobs, waits until something happens on a replica (when any job runs), and
        returns `(job, final output)` of every job that finished meanwhile."""
        self._send()
        if not self._running:
            return []
        finished: list[tuple[Job, object]] = []
        event = self._events.get()
        while event is not None:
            self._take(event, finished)
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                event = None
        self._send()  # what a dead replica left, on the others at once
        return finished

    def _take(self, event, finished: list) -> None:
        if isinstance(event, _Output):
            running = self._running.pop(event.wire_id, None)
            if running is not None:  # None: aborted meanwhile
                finished.append((running[1], event.output))
            return
        lost = [self._running.pop(w)[1] for w in event.unfinished if w in self._running]
        if event.error is None:
            return
        if isinstance(event.error, (RayActorError, ReplicaBehind)):
            self.replicas.down(event.slot)
            self._pending += lost
        else:
            raise event.error

    def _send(self) -> None:
        if not self._pending:
            return
        jobs, self._pending = self._pending, []
        live = self.replicas.live()
        batches: dict[int, list[tuple[str, Job]]] = {}
        with self.replicas.lock:
            alive = {s.index for s in live}
            for j in jobs:
                replica = self.router.choose(j.prompt.token_ids, j.cost, alive)
                batches.setdefault(replica, []).append((str(next(self._request_ids)), j))
                self.replicas.slots[replica].requests += 1
        for replica, batch in batches.items():
            slot = self.replicas.slots[replica]
            for wire_id, j in batch:
                self._running[wire_id] = (slot, j)
            threading.Thread(target=self._read, args=(slot, batch), name="rollserve-cluster-batch",
                             daemon=True).start()

    def _read(self, slot: Slot, batch: list[tuple[str, Job]]) -> None:
        """One batch on one replica (its own thread): each output as it arrives, then how the batch ended."""
        left = dict(batch)
        try:
            requests = [(wire_id, j.prompt, j.params) for wire_id, j in batch]
            for ref in slot.actor.run.remote(requests, self.weights.version):
                out = ray.get(ref)
                j = left.pop(out.request_id)
                with self.replicas.lock:
                    self.router.done(slot.index, j.cost)
                self._events.put(_Output(out.request_id, out))
            self._events.put(_BatchEnd(slot, [], None))
        except BaseException as e:
            with self.replicas.lock:
                for j in left.values():
                    self.router.done(slot.index, j.cost)
            self._events.put(_BatchEnd(slot, list(left), e.cause if isinstance(e, RayTaskError) else e))
