"""One engine replica: an `LLM` and the thread that steps it, run as a Ray actor by `RolloutCluster`.

Requests come in batches (`run`, a generator that yields each output as its
request finishes), so the driver knows what a replica that dies had not finished.
One loop thread steps the engine for every batch in flight; weight updates,
stats and checks run on the actor's other threads and meet the loop at the
engine's step lock. Every call that depends on the weights names the version
the cluster expects: a replica that restarted (Ray re-runs `__init__`, from
the model's initial weights) refuses until the cluster has brought it up to date.
"""

import os
import queue
import threading
import uuid
import warnings

import numpy as np
import torch

from ..inputs import Prompt
from ..llm import LLM
from ..weight_sync.distributed import DistributedReceiver, weight_sync_group
from ..weight_sync.updater import normalize_name
from ..weight_sync.wire import read_bucket


def read_buckets(buckets, names: set[str] | None = None):
    """`(name, tensor view)` of every bucket, in order (with `names`, only those, by normalised name)."""
    for entries, array in buckets:
        with warnings.catch_warnings():  # the object store's buffer is read-only; the engine only reads it
            warnings.simplefilter("ignore", UserWarning)
            bucket = torch.from_numpy(np.asarray(array))
        for name, tensor in read_bucket(bucket, entries):
            if names is None or normalize_name(name) in names:
                yield name, tensor


class ReplicaBehind(RuntimeError):
    """The replica's weight version is not the cluster's (it restarted); the cluster syncs it and retries."""


class _GroupStager:
    """The target of a replica's `DistributedReceiver`: it stages what the group sent instead of applying it,
    so the status the receiver reports means "staged" (or the refusal); the commit comes by a Ray call."""

    def __init__(self, llm: LLM):
        self.llm = llm
        self.expected_version = 0
        self.token: int | None = None

    def update_weights(self, named_tensors, version: int | None = None, require_all: bool = False) -> int:
        self.token = None
        if self.llm.weight_version != self.expected_version:  # refused inside the collective: every rank stays in step
            raise ReplicaBehind(f"replica at weight version {self.llm.weight_version}, the cluster at "
                                f"{self.expected_version}")
        self.token = self.llm.stage_weights(named_tensors, version, require_all)
        return version


class Replica:
    def __init__(self, model, tokenizer, engine_args: dict, num_threads: int | None):
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.llm = LLM(model, tokenizer, **engine_args)
        self._incarnation = uuid.uuid4().hex
        self._waiting: dict[str, queue.SimpleQueue] = {}  # request id -> where its output goes
        self._lock = threading.Lock()  # adding requests vs the loop deciding there is nothing to run
        self._work = threading.Event()
        self._receiver: DistributedReceiver | None = None  # in the cluster's broadcast group, once it joined one
        threading.Thread(target=self._loop, name="rollserve-replica-loop", daemon=True).start()

    def identity(self) -> tuple[str, int, int]:
        """`(incarnation, pid, weight_version)`; the incarnation is new each time Ray (re)starts the actor."""
        return self._incarnation, os.getpid(), self.llm.weight_version

    def tokenizer(self):
        return self.llm.tokenizer

    def model_info(self) -> tuple[str, torch.dtype]:
        """The model's name (its `_name_or_path`, else its class) and its weights' dtype."""
        model = self.llm.model
        return getattr(model.config, "_name_or_path", "") or type(model).__name__, model.dtype

    def _expect(self, version: int, exact: bool) -> None:
        behind = self.llm.weight_version != version if exact else self.llm.weight_version < version
        if behind:
            raise ReplicaBehind(f"replica at weight version {self.llm.weight_version}, the cluster at {version}")

    # -- generation ---------------------------------------------------------
    def check(self, items: list) -> None:
        """Raises the engine's `ValueError` for the first `(where, Prompt, params)` it cannot run."""
        for where, prompt, params in items:
            self.llm.inputs.check(prompt, params, where)

    def problem(self, token_ids: list[int], params) -> str | None:
        """The engine's reason it cannot run this prompt, or None."""
        return self.llm.inputs.problem(Prompt(token_ids), params)

    def abort(self, request_id: str) -> None:
        """Stops a request of a running batch; `run` yields its output (finish_reason "abort") at once."""
        with self._lock:
            out = self.llm.abort(request_id)
            if out is not None:
                self._waiting.pop(request_id).put(out.output)

    def run(self, requests: list, expected_version: int):
        """Runs `(request_id, Prompt, params)` requests; yields each final output as its request finishes."""
        self._expect(expected_version, exact=False)  # an update may have landed since
        self.check([(rid, prompt, params) for rid, prompt, params in requests])
        outputs: queue.SimpleQueue = queue.SimpleQueue()
        with self._lock:
            for rid, prompt, params in requests:
                self._waiting[rid] = outputs
                self.llm.add_request(prompt, params, request_id=rid)
            self._work.set()
        for _ in requests:
            out = outputs.get()
            if isinstance(out, BaseException):
                raise out
            yield out

    def _loop(self) -> None:
        while True:
            self._work.wait()
            try:
                finished = [out for out in self.llm.step() if out.finished]
            except Exception as e:  # the engine failed: every waiting batch hears it
                with self._lock:
                    for rid in list(self._waiting):
                        self.llm.abort(rid)
                        self._waiting.pop(rid).put(e)
                    self._work.clear()
                continue
            with self._lock:
                for out in finished:
                    self._waiting.pop(out.request_id).put(out.output)
                if not self.llm.has_unfinished():
                    self._work.clear()

    # -- weights ------------------------------------------------------------
    def stage_weights(self, buckets: list, version: int, expected_version: int, require_all: bool = False) -> int:
        """Stages `(bucket ref, names or None)` buckets as one update of `version`; returns `(incarnation, token)`
        (a commit must reach this same incarnation)."""
        import ray

        self._expect(expected_version, exact=True)
        values = ray.get([ref for ref, _ in buckets])
        named = (item for value, (_, names) in zip(values, buckets) for item in read_buckets([value], names))
        return self._incarnation, self.llm.stage_weights(named, version, require_all)

    def join_weight_group(self, init_method: str, rank: int, world_size: int, timeout_s: float) -> None:
        """Becomes `rank` of the cluster's new broadcast group (weight_transport="distributed"), leaving the last."""
        group = weight_sync_group(init_method, rank, world_size, timeout_s)
        self._receiver = DistributedReceiver(_GroupStager(self.llm), group)

    def stage_from_group(self, expected_version: int) -> tuple[str, int]:
        """Receives one update broadcast in the group and stages it; returns `(incarnation, token)` like
        `stage_weights`. Raises the refusal (reported to the sender in the group too)."""
        stager = self._receiver.target
        stager.expected_version = expected_version
        self._receiver.receive()
        return self._incarnation, stager.token

    def commit_weights(self, token: int) -> int:
        return self.llm.commit_weights(token)

    def discard_weights(self, token: int) -> None:
        self.llm.discard_weights(token)

    def weights_fingerprint(self) -> str:
        return self.llm.weights_fingerprint()

    # -- the rest of LLM's surface ------------------------------------------
    def sleep(self, level: int) -> None:
        self.llm.sleep(level)

    def wake_up(self) -> None:
        self.llm.wake_up()

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()

    def metrics(self) -> dict:
        return self.llm.metrics()
