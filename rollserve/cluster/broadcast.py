"""The first phase of a cluster weight update through a `torch.distributed` group (weight_transport="distributed").

The driver (the trainer's process) is rank 0 of a gloo group, each live replica one more rank. The
driver broadcasts the update with `weight_sync`'s `DistributedSender` (the `wire` bucket format);
each replica receives it with a `DistributedReceiver` whose target stages instead of applying, so
the status it reports in the group means "staged" or its refusal. Each replica's Ray call returns
its token or raises its refusal, and the commit (or discard) goes through Ray calls, as with the
object store: the two-phase guarantees are `ClusterWeights`'.

A group is fixed at its start: a replica that dies breaks it (the driver drops its end, so the
others' collectives fail at once instead of waiting for the timeout), and one that Ray restarts
cannot join it mid-flight. So the group is built again (a new port) at the next update whenever its
members changed or a collective failed. A replica that comes back is brought to the cluster's
weights from the object store (`CommittedWeights`), before it serves or joins a group.
"""

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from ..weight_sync.distributed import DistributedSender, weight_sync_group
from .replica import read_buckets
from .replicas import ClusterError


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class BroadcastGroup:
    """The driver's end of the cluster's broadcast group, and who its members are."""

    def __init__(self, replicas, bucket_bytes: int):
        self.replicas = replicas
        self.bucket_bytes = bucket_bytes
        self._sender: DistributedSender | None = None
        self._members: tuple = ()  # (index, incarnation) per rank from 1 on

    def stage(self, live: list, buckets: list, version: int, expected_version: int, require_all: bool) -> dict:
        """Starts `stage_from_group` on every replica of `live` and broadcasts `buckets` to them (object refs of
        `put_buckets`); returns each replica's pending call by slot index, to be read like `stage_weights`'."""
        self._join(live)
        calls = {s.index: s.actor.stage_from_group.remote(expected_version) for s in live}
        values = ray.get([ref for ref, _ in buckets])  # the driver's own object store: no copy
        try:
            self._sender.send(read_buckets(values), version, require_all)
        except (ValueError, TypeError):
            pass  # a refusal: the replicas' calls say whose, and the group is still in step
        except BaseException as e:
            self.close()  # a collective failed or was interrupted: the group is unusable; the others fail now
            if not isinstance(e, Exception):
                raise
        return calls

    def _join(self, live: list) -> None:
        members = tuple((s.index, s.incarnation) for s in live)
        if self._sender is not None and members == self._members:
            return
        self.close()
        init_method = f"tcp://{ray.util.get_node_ip_address()}:{_free_port()}"
        timeout = self.replicas.replica_timeout
        world = len(live) + 1
        joins = [s.actor.join_weight_group.remote(init_method, rank, world, timeout)
                 for rank, s in enumerate(live, start=1)]
        try:
            group = weight_sync_group(init_method, 0, world, timeout)
            self.replicas.get(joins)
        except Exception as e:
            died = []
            for slot, ref in zip(live, joins):
                try:
                    ray.get(ref, timeout=0)
                except (RayActorError, GetTimeoutError):
                    self.replicas.down(slot)
                    died.append(slot.index)
            raise ClusterError(f"replicas {died} could not join the weight broadcast group ({type(e).__name__}: "
                               f"{e}); the update was applied nowhere") from e
        self._sender = DistributedSender(group, bucket_bytes=self.bucket_bytes)
        self._members = members

    def close(self) -> None:
        """Drops the driver's end: the group's sockets close, and the next update builds a new group."""
        self._sender, self._members = None, ()
