"""Weights across hosts: packed buckets broadcast in a dedicated `torch.distributed` group.

The group's backend follows where the buckets are: gloo for host memory, NCCL for CUDA tensors
(`weight_sync_group(..., device="cuda")`, with `device="cuda"` on the sender and the receivers), so
GPU weights go from GPU to GPU without staging through host memory.

Per bucket, the source rank broadcasts two int64 sizes, then one uint8 buffer
holding a header (a `GroupHeader`: bucket entries, commit, abort or close)
followed by the packed tensors. Every other rank is an engine: it receives each bucket into a buffer
of its own pool (grown to the size of the update, reused across syncs; the
engine holds one extra copy of the update, the price of applying it
atomically), keeps views, and on `commit` hands the whole update to
`target.update_weights`. Results come back to the source by one allgather of
fixed-size status records (`Applied` or `Refused`), so a refused update
raises there as the engine's exception and every rank stays in step for the
next sync.
"""

from datetime import timedelta
from urllib.parse import urlparse

import msgspec
import torch
import torch.distributed as dist

from .messages import (GROUP_HEADERS, REPLIES, Ack, Applied, GroupAbort, GroupBucket, GroupClose, GroupCommit,
                       GroupHeader, Refused, Reply)
from .wire import (DEFAULT_BUCKET_BYTES, align, bucket_entries, check_positive, check_update_args, failure,
                   plan_buckets, read_bucket, remote_error, write_bucket)

STATUS_BYTES = 1 << 16  # one status record per rank, a refused update's problem list included


def check_group_args(init_method: str, rank: int, world_size: int, timeout_s: float) -> None:
    """`ValueError` naming the field when `weight_sync_group` would refuse these arguments."""
    url = urlparse(init_method) if isinstance(init_method, str) else None
    try:
        port = url.port if url is not None else None
    except ValueError:  # a port that is not a number, or out of range
        port = None
    if url is None or url.scheme != "tcp" or not url.hostname or not port:
        raise ValueError(f"init_method must look like 'tcp://host:port', got {init_method!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 2:
        raise ValueError(f"world_size must be an int >= 2 (one source and at least one engine), got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    check_positive("timeout_s", timeout_s)


def group_backend(device) -> str:
    """The torch.distributed backend that moves buckets held on `device`: "nccl" for CUDA, else "gloo"."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def weight_sync_group(init_method: str, rank: int, world_size: int, timeout_s: float = 1800.0,
                      connect_timeout_s: float | None = None, device="cpu"):
    """A group of its own (rank 0 hosts the rendezvous), independent of any default process group.

    `init_method` is `tcp://host:port` reachable by every rank. `timeout_s` bounds every collective,
    so a dead peer is reported within it; a receiver idle longer than it between syncs times out too.
    `connect_timeout_s` (default `timeout_s`) bounds the wait for every rank to join. `device` is where
    this rank's buckets are (`group_backend`): gloo for the CPU, NCCL for a CUDA device, one GPU per
    rank (NCCL refuses two ranks on one GPU: colocated processes use the shared-memory transport). With
    NCCL a timed-out collective is fatal to the process (NCCL's watchdog), not an exception: give a
    receiver that may wait long between syncs a `timeout_s` longer than that wait.
    """
    check_group_args(init_method, rank, world_size, timeout_s)
    if connect_timeout_s is not None:
        check_positive("connect_timeout_s", connect_timeout_s)
    backend = group_backend(device)
    if backend == "nccl" and not dist.is_nccl_available():
        raise ValueError(f"device={device!r} needs NCCL, which this torch build lacks")
    url = urlparse(init_method)
    store = dist.PrefixStore("rollserve-weights", dist.TCPStore(
        url.hostname, url.port, world_size, is_master=rank == 0,
        timeout=timedelta(seconds=connect_timeout_s or timeout_s)))
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timedelta(seconds=timeout_s)
        return dist.ProcessGroupNCCL(store, rank, world_size, options)
    return dist.ProcessGroupGloo(store, rank, world_size, timedelta(seconds=timeout_s))


class _GroupMember:
    def __init__(self, group, src: int, device):
        if not all(callable(getattr(group, m, None)) for m in ("rank", "size", "broadcast", "allgather")):
            raise TypeError(f"group must be a torch.distributed process group (weight_sync_group(...) or "
                            f"dist.new_group(...)), got {type(group).__name__}")
        if isinstance(src, bool) or not isinstance(src, int) or not 0 <= src < group.size():
            raise ValueError(f"src must be a rank of the group, in [0, {group.size()}), got {src!r}")
        self.group, self.src, self.device = group, src, torch.device(device)
        if type(group).__name__ == "ProcessGroupNCCL" and self.device.type != "cuda":
            raise ValueError(f"device must be a CUDA device for an NCCL group (NCCL moves GPU memory only), "
                             f"got {device!r}")
        self._broken: str | None = None

    def _collective(self, work_fn):
        if self._broken is not None:
            raise RuntimeError(f"this weight-sync group failed earlier ({self._broken}); build a new one")
        try:
            work_fn().wait()
        except RuntimeError as e:  # a peer died or timed out: the group's collectives are out of step for good
            self._broken = str(e).splitlines()[0][:300]
            raise RuntimeError(f"weight broadcast failed: {self._broken}; the group is unusable, "
                               f"build a new one") from e

    def _broadcast(self, tensor: torch.Tensor) -> None:
        options = dist.BroadcastOptions()
        options.rootRank = self.src
        self._collective(lambda: self.group.broadcast([tensor], options))

    def _allgather_status(self, record: Reply | Refused) -> list[Reply | Refused]:
        raw = _status_bytes(record)
        mine = torch.zeros(STATUS_BYTES, dtype=torch.uint8)
        mine[:4] = torch.tensor([len(raw)], dtype=torch.int32).view(torch.uint8)
        mine[4:4 + len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        everyone = [torch.empty(STATUS_BYTES, dtype=torch.uint8, device=self.device) for _ in range(self.group.size())]
        self._collective(lambda: self.group.allgather([everyone], [mine.to(self.device)]))
        records = []
        for t in everyone:
            t = t.cpu()
            n = int(t[:4].view(torch.int32))
            records.append(REPLIES.decode(t[4:4 + n].numpy().tobytes()))
        return records


def _status_bytes(record: Reply | Refused) -> bytes:
    """The encoded record; a refusal naming thousands of tensors is trimmed to fit (kind kept, so the
    source still raises `WeightUpdateError`, with the first names of each problem)."""
    raw = REPLIES.encode(record)
    if len(raw) <= STATUS_BYTES - 4:
        return raw
    message = record.message.encode()[:STATUS_BYTES // 4].decode(errors="ignore") + " [truncated]"
    problems = record.problems and {p[:300]: [n[:200] for n in names[:8]]
                                    for p, names in list(record.problems.items())[:16]}
    return REPLIES.encode(msgspec.structs.replace(record, message=message, problems=problems))


class DistributedSender(_GroupMember):
    """Source side: `send(named_tensors, version=None, require_all=False) -> int` to every other rank.

    `group` is a ProcessGroup whose rank `src` is this process (`weight_sync_group(...)`, with
    `device="cuda"` for NCCL, or a `dist.new_group`); `device` is where the buckets are packed. Raises the engine's
    `WeightUpdateError` if it refuses the update (its weights are then untouched; with several
    engines, the message says how many applied it), `RuntimeError` if a peer dies or times out
    (the group is then unusable). Returns the new version reported by the first engine.
    """

    def __init__(self, group, src: int = 0, device="cpu", bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        super().__init__(group, src, device)
        if group.rank() != src:
            raise ValueError(f"DistributedSender must run on rank src={src}; this process is rank {group.rank()}")
        check_positive("bucket_bytes", bucket_bytes)
        self.bucket_bytes = int(bucket_bytes)
        self._buffer = torch.empty(0, dtype=torch.uint8, device=self.device)

    def _post(self, header: GroupHeader, batch=(), used: int = 0) -> None:
        raw = GROUP_HEADERS.encode(header)
        base = align(len(raw))
        if self._buffer.numel() < base + used:
            self._buffer = torch.empty(max(base + used, base + self.bucket_bytes), dtype=torch.uint8, device=self.device)
        self._buffer[:len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(self.device)
        write_bucket(self._buffer, batch, base)
        self._broadcast(torch.tensor([len(raw), base + used], dtype=torch.int64, device=self.device))
        self._broadcast(self._buffer[:base + used])

    def send(self, named_tensors, version: int | None = None, require_all: bool = False) -> int:
        check_update_args(version, require_all)
        try:
            for batch, used in plan_buckets(named_tensors, self.bucket_bytes):
                self._post(GroupBucket(tensors=bucket_entries(batch)), batch, used)
            self._post(GroupCommit(version=version, require_all=require_all))
        except BaseException:
            if self._broken is None:  # the source failed (bad item, iterator raised): tell the engines to drop it
                self._post(GroupAbort())
            raise
        records = [r for rank, r in enumerate(self._allgather_status(Ack())) if rank != self.src]
        refused = [(rank, r) for rank, r in enumerate(records) if isinstance(r, Refused)]
        if refused:
            rank, first = refused[0]
            applied = len(records) - len(refused)
            where = f"engine at group rank {rank + (rank >= self.src)}" + (
                f" (while {applied} other engines applied the update)" if applied else "")
            raise remote_error(first, where)
        return records[0].version

    def close(self) -> None:
        """Tells the engines to leave `serve_forever` (the group itself belongs to the caller)."""
        if self._broken is None:
            self._post(GroupClose())
            self._broken = "closed by DistributedSender.close()"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class DistributedReceiver(_GroupMember):
    """Engine side: receives the source's broadcasts and applies each update with `target.update_weights`.

    `target` is an `LLM`. Its receive buffers (on `device`) grow to the size of the largest update and
    are kept for the next sync. `receive()` blocks in the group's collectives until the source sends.
    """

    def __init__(self, target, group, src: int = 0, device="cpu"):
        super().__init__(group, src, device)
        if not callable(getattr(target, "update_weights", None)):
            raise TypeError(f"target must have an update_weights method (an LLM), got {type(target).__name__}")
        if group.rank() == src:
            raise ValueError(f"DistributedReceiver must not run on the source rank {src}")
        self.target = target
        self._pool: list[torch.Tensor] = []

    def _next(self, index: int):
        sizes = torch.empty(2, dtype=torch.int64, device=self.device)
        self._broadcast(sizes)
        header_len, total = sizes.tolist()
        if index == len(self._pool) or self._pool[index].numel() < total:
            buffer = torch.empty(total, dtype=torch.uint8, device=self.device)
            self._pool[index:index + 1] = [buffer]
        buffer = self._pool[index][:total]
        self._broadcast(buffer)
        try:
            header = GROUP_HEADERS.decode(buffer[:header_len].cpu().numpy().tobytes())
        except ValueError as e:  # the ranks no longer agree on the protocol: every later sync would fail too
            self._broken = f"weight-sync protocol error: {e}"
            raise RuntimeError(self._broken) from None
        return header, buffer, align(header_len)

    def receive(self) -> int | None:
        """Takes part in one sync; returns the new version, or None when the source closed.

        A refused update is reported to the source and raised here too.
        """
        pending, index = [], 0
        while True:
            header, buffer, base = self._next(index)
            if isinstance(header, GroupBucket):
                pending += read_bucket(buffer, header.tensors, base)
                index += 1
            elif isinstance(header, GroupAbort):
                pending, index = [], 0
            elif isinstance(header, GroupClose):
                return None
            else:
                break
        try:
            version = self.target.update_weights(pending, version=header.version, require_all=header.require_all)
        except Exception as e:
            self._allgather_status(failure(e, Refused))
            raise
        self._allgather_status(Applied(version=version))
        return version

    def serve_forever(self) -> None:
        """Applies updates until the source closes; refused updates are reported to it and skipped."""
        while True:
            try:
                if self.receive() is None:
                    return
            except (ValueError, TypeError):
                continue
