"""The replica actors of a cluster: placed, started, watched, and taken back when Ray restarts them."""

import threading
import time
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .replica import Replica, ReplicaBehind

_RESOURCES = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
_PROBE_S = 0.2  # how often a call with no live replica looks for one that came back


class ClusterError(RuntimeError):
    """The cluster cannot do what was asked: no replica is alive, or replicas died in a weight update."""


@dataclass
class Slot:
    """One replica as the driver knows it."""

    index: int
    actor: object
    incarnation: str = ""  # Replica.identity()'s: changes when Ray restarts the actor
    pid: int | None = None
    alive: bool = True
    probe: object = None  # a pending identity() call on a replica that is down
    restarts: int = 0
    requests: int = 0


def bundle(resources: dict) -> dict:
    """`{"num_cpus": 1, "num_gpus": 1}` -> Ray's placement-group bundle `{"CPU": 1, "GPU": 1}`."""
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


class Replicas:
    """`num_replicas` `Replica` actors in one placement group, and which of them are alive.

    A replica is marked down when a call to it fails; it is taken back when it answers again,
    after `sync(slot, its_version)` has brought it to the cluster's weights (set by the cluster).
    """

    def __init__(self, model, num_replicas: int, resources: dict, strategy: str, tokenizer, engine_args: dict,
                 max_restarts: int, replica_timeout: float, start_timeout: float):
        self.replica_timeout = replica_timeout
        self.lock = threading.RLock()  # slot states (and the cluster's router loads)
        self.sync = None
        group_bundle = bundle(resources)
        _connect()
        self._group = placement_group([group_bundle] * num_replicas, strategy=strategy)
        try:
            ray.get(self._group.ready(), timeout=start_timeout)
        except GetTimeoutError:
            remove_placement_group(self._group)
            raise ClusterError(f"Ray could not place {num_replicas} replicas of {group_bundle} ({strategy}) within "
                               f"start_timeout={start_timeout}s; the cluster has {ray.cluster_resources()}") from None
        threads = int(resources["num_cpus"]) if "num_cpus" in resources else None
        self._model = model if isinstance(model, str) else ray.put(model)  # outlives every restart of a replica
        actor = ray.remote(Replica)
        self.slots = [Slot(i, actor.options(
            **resources, max_restarts=max_restarts, max_concurrency=16,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self._group, placement_group_bundle_index=i),
        ).remote(self._model, tokenizer, engine_args, threads)) for i in range(num_replicas)]
        try:
            identities = self.get([s.actor.identity.remote() for s in self.slots], start_timeout)
            for slot, (incarnation, pid, _) in zip(self.slots, identities):
                slot.incarnation, slot.pid = incarnation, pid
        except BaseException:
            self.shutdown()
            raise

    def get(self, refs, timeout: float | None = None):
        """`ray.get` within `replica_timeout`; an error raised in a replica is raised as itself."""
        try:
            return ray.get(refs, timeout=self.replica_timeout if timeout is None else timeout)
        except RayTaskError as e:
            raise e.cause from None

    def down(self, slot: Slot) -> None:
        with self.lock:
            slot.alive, slot.probe = False, None

    def _revive(self, slot: Slot) -> None:
        if slot.probe is None:
            slot.probe = slot.actor.identity.remote()
        if not ray.wait([slot.probe], timeout=0)[0]:
            return
        try:
            identity = ray.get(slot.probe)
        except RayActorError:  # restarting or gone for good: ask again next time
            slot.probe = None
            return
        self._take_back(slot, identity)

    def _take_back(self, slot: Slot, identity: tuple[str, int, int]) -> None:
        incarnation, pid, version = identity
        self.sync(slot, version)
        with self.lock:
            slot.restarts += slot.incarnation != incarnation
            slot.incarnation, slot.pid, slot.alive, slot.probe = incarnation, pid, True, None

    def refresh(self, slot: Slot) -> None:
        """Asks a replica believed alive who it is: one Ray restarted unnoticed is synced and counted."""
        try:
            self._take_back(slot, self.get(slot.actor.identity.remote()))
        except (RayActorError, ReplicaBehind, GetTimeoutError):
            self.down(slot)

    def live(self) -> list[Slot]:
        """The replicas alive now (taking back those that came back); waits up to `replica_timeout` for one."""
        deadline = time.monotonic() + self.replica_timeout
        while True:
            for slot in self.slots:
                if not slot.alive:
                    try:
                        self._revive(slot)
                    except (RayActorError, ReplicaBehind, GetTimeoutError):
                        slot.probe = None  # it died again while being synced
            live = [s for s in self.slots if s.alive]
            if live:
                return live
            if time.monotonic() > deadline:
                raise ClusterError(f"no replica is alive: all {len(self.slots)} died and none came back within "
                                   f"replica_timeout={self.replica_timeout}s")
            time.sleep(_PROBE_S)

    def confirmed(self) -> list[Slot]:
        """The replicas alive now, each having just answered who it is (see `refresh`)."""
        for slot in self.live():
            self.refresh(slot)
        return [s for s in self.slots if s.alive]

    def wait_ready(self, timeout: float | None = None) -> None:
        """Returns once every replica has answered who it is and is at the cluster's weights.

        A replica the driver still believes alive is asked too: one that died without the driver
        noticing (it had no call in flight) is marked down here and taken back, counted as a restart,
        when Ray has restarted it, instead of being reported alive.
        """
        timeout = self.replica_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while len(self.confirmed()) < len(self.slots):
            if time.monotonic() > deadline:
                down = [s.index for s in self.slots if not s.alive]
                raise ClusterError(f"replicas {down} did not come back within {timeout}s")
            time.sleep(_PROBE_S)

    def shutdown(self) -> None:
        for slot in self.slots:
            ray.kill(slot.actor, no_restart=True)
        remove_placement_group(self._group)
