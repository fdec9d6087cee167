"""Weights to every replica: buckets through Ray's object store, two-phase updates, the committed weights.

A bucket is `weight_sync.wire`'s: one uint8 buffer with every tensor at an aligned
offset, and its `BucketEntry` list. It goes into the object store as a numpy
array (one `ray.put` per bucket), which replicas on the same node map without a
copy; `Replica.stage_weights` rebuilds the tensors as views over it.

`CommittedWeights` keeps, for every tensor name ever updated, the bucket that
holds its newest value (buckets whose names all have newer values are dropped),
so a replica that comes back from the model's initial weights reaches the
cluster's current ones by one more staged update.
"""

import itertools
import threading
import time

import ray
import torch
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from ..weight_sync.updater import WeightUpdateError, next_version, normalize_name
from ..weight_sync.wire import bucket_entries, plan_buckets, write_bucket
from .broadcast import BroadcastGroup
from .replica import ReplicaBehind
from .replicas import ClusterError

TRANSPORTS = ("ray", "distributed")


def put_buckets(named_tensors, bucket_bytes: int) -> list[tuple[object, set[str]]]:
    """`(name, tensor)` pairs -> `(object ref, names)` per bucket of `(entries, uint8 array)` (copied to host)."""
    buckets = []
    for batch, used in plan_buckets(named_tensors, bucket_bytes):
        bucket = torch.empty(used, dtype=torch.uint8)
        write_bucket(bucket, [(name, t.detach().cpu(), offset) for name, t, offset in batch])
        buckets.append((ray.put((bucket_entries(batch), bucket.numpy())), {name for name, _, _ in batch}))
    return buckets


class CommittedWeights:
    """The newest committed value of every updated tensor, as buckets in the object store."""

    def __init__(self):
        self.version = 0
        self._buckets: list[tuple[object, set[str]]] = []  # (ref, names whose newest value it holds)

    def record(self, version: int, buckets: list[tuple[object, set[str]]]) -> None:
        """An update of `version` was committed: `(ref, names)` buckets now hold these names' newest values."""
        buckets = [(ref, {normalize_name(n) for n in names}) for ref, names in buckets]
        new = set().union(*(names for _, names in buckets))
        kept = [(ref, names - new) for ref, names in self._buckets]
        self._buckets = [(ref, names) for ref, names in kept if names] + buckets
        self.version = version

    def buckets(self) -> list[tuple[object, set[str]]]:
        """`(ref, names to take from it)` that bring the model's initial weights to `version`."""
        return list(self._buckets)


class ClusterWeights:
    """Weight updates to every replica, two-phase: all stage and check, then all commit, or none does.

    Also brings a replica that came back (at `its_version`, from the model's initial weights) to
    the committed weights, before it serves (`Replicas.sync`).
    """

    def __init__(self, replicas, bucket_bytes: int, transport: str):
        self.replicas = replicas
        self.bucket_bytes = bucket_bytes
        self.group = BroadcastGroup(replicas, bucket_bytes) if transport == "distributed" else None
        self.committed = CommittedWeights()
        self.lock = threading.RLock()  # one update, or one replica's sync, at a time
        # token -> (version, {slot index: (incarnation that staged, its token)}, buckets)
        self._staged: dict[int, tuple[int, dict[int, tuple[str, int]], list]] = {}
        self._tokens = itertools.count()

    @property
    def version(self) -> int:
        return self.committed.version

    def stage(self, named_tensors, version: int | None, require_all: bool) -> int:
        with self.lock:
            new_version = next_version(self.version, version)
            if self.group is not None and self._staged:  # a replica receives into one set of buffers
                raise ValueError(f"weight_transport='distributed' stages one update at a time: commit or "
                                 f"discard token {next(iter(self._staged))} first")
            live = self.replicas.live()
            buckets = put_buckets(named_tensors, self.bucket_bytes)  # also what a replica that comes back replays
            if self.group is None:
                fresh = [(ref, None) for ref, _ in buckets]
                calls = {s.index: s.actor.stage_weights.remote(fresh, new_version, self.version, require_all)
                         for s in live}
            else:
                for slot in live:  # every rank must take part: one Ray restarted unnoticed is synced first
                    self.replicas.refresh(slot)
                live = [s for s in live if s.alive] or self.replicas.live()
                calls = self.group.stage(live, buckets, new_version, self.version, require_all)
            tokens, refusals, died = {}, [], []
            for index, ref in calls.items():
                try:
                    tokens[index] = ray.get(ref, timeout=self.replicas.replica_timeout)
                except RayTaskError as e:
                    if isinstance(e.cause, ReplicaBehind):  # restarted before this update: it syncs on return
                        self.replicas.down(self.replicas.slots[index])
                    else:
                        refusals.append((index, e.cause))
                except (RayActorError, GetTimeoutError):
                    died.append(index)
            if refusals or died:
                self._refuse(tokens, refusals, died, "staging")
            token = next(self._tokens)
            self._staged[token] = (new_version, tokens, buckets)
            return token

    def commit(self, token: int) -> int:
        with self.lock:
            version, tokens, buckets = self._take(token)
            died = [index for index, (staged_by, _) in tokens.items() if self._incarnation(index) != staged_by]
            if died:
                self._refuse(tokens, [], died, "committing")
            for index, (_, replica_token) in tokens.items():
                slot = self.replicas.slots[index]
                try:
                    ray.get(slot.actor.commit_weights.remote(replica_token), timeout=self.replicas.replica_timeout)
                except (RayActorError, GetTimeoutError):  # it died after every replica agreed: it syncs on return
                    self.replicas.down(slot)
            self.committed.record(version, buckets)
            return version

    def discard(self, token: int) -> None:
        with self.lock:
            self._discard(self._take(token)[1])

    def sync(self, slot, its_version: int) -> None:
        with self.lock:
            if its_version != self.version:
                _, token = self.replicas.get(slot.actor.stage_weights.remote(self.committed.buckets(), self.version,
                                                                             its_version))
                self.replicas.get(slot.actor.commit_weights.remote(token))

    def _incarnation(self, index: int) -> str | None:
        """The replica's incarnation now (None when it does not answer); one that restarted lost what it staged."""
        deadline = time.monotonic() + self.replicas.replica_timeout
        while True:
            try:
                return ray.get(self.replicas.slots[index].actor.identity.remote(),
                               timeout=max(deadline - time.monotonic(), 0))[0]
            except ActorUnavailableError:  # unreachable for now (Ray says it may come back): ask again
                if time.monotonic() > deadline:
                    return None
                time.sleep(0.1)
            except (RayActorError, GetTimeoutError):
                return None

    def _take(self, token: int):
        staged = self._staged.pop(token, None)
        if staged is None:
            raise ValueError(f"token={token!r} names no staged update (never staged, or already committed or "
                             f"discarded)")
        return staged

    def _discard(self, tokens: dict[int, tuple[str, int]]) -> None:
        for index, (_, replica_token) in tokens.items():
            try:
                ray.get(self.replicas.slots[index].actor.discard_weights.remote(replica_token),
                        timeout=self.replicas.replica_timeout)
            except (RayActorError, RayTaskError, GetTimeoutError):
                pass  # a replica that restarted holds nothing staged

    def _refuse(self, tokens: dict[int, tuple[str, int]], refusals: list, died: list[int], phase: str):
        self._discard(tokens)
        for index in died:
            self.replicas.down(self.replicas.slots[index])
        for index, error in refusals:
            if isinstance(error, WeightUpdateError):
                raise WeightUpdateError(error.problems, where=f"replica {index}") from None
        if refusals and not died:  # with a death, the others' errors are likely its echo (a broken group)
            raise refusals[0][1]
        raise ClusterError(f"replicas {died} died while {phase} the weight update; it was applied nowhere "
                           f"(every replica keeps the old weights and version)")
