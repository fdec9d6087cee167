"""The typed messages of the two cross-process weight transports (msgspec Structs, msgpack on the wire).

Shared memory (`shm.py`): the sender's requests, tagged by `op`, each with its
pid and (when the receiver has one) its API key; the receiver answers each with
a reply tagged by `reply`. torch.distributed (`distributed.py`): the source's
broadcast headers, tagged by `op`; every rank's status record of a sync is one
of the same replies. Tensor data never travels in a message: entries describe
where each tensor sits in a bucket (`wire.BucketEntry`).
"""

import msgspec

from .wire import BucketEntry, Failure, MessageCodec


# -- shared memory: sender -> receiver ---------------------------------------------------------
class CudaIpcHandle(msgspec.Struct, kw_only=True):
    """A bucket in the sender's GPU memory (`cuda_ipc.py`): torch.multiprocessing's reduction of it."""

    device: int
    handle: bytes
    storage_size: int  # bytes of the allocation the handle opens
    storage_offset: int  # of the storage within it
    tensor_offset: int  # of the bucket within the storage
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes | None
    event_sync_required: bool


class ShmRequest(msgspec.Struct, tag_field="op", kw_only=True):
    pid: int  # the sender's: its segments are named after it, and reaped once it is gone
    api_key: str | None = None


class ShmHello(ShmRequest, tag="hello"):
    protocol: int


class ShmBucket(ShmRequest, tag="bucket"):
    sync: int
    index: int
    segment: str
    size: int
    tensors: list[BucketEntry]
    cuda: CudaIpcHandle | None = None  # the bucket is in the sender's GPU memory, not in /dev/shm `segment`


class ShmEvict(ShmRequest, tag="evict"):
    """Copy out what this sync still holds in `segment`: the sender is about to reuse it."""

    sync: int
    segment: str


class ShmAbort(ShmRequest, tag="abort"):
    sync: int


class ShmCommit(ShmRequest, tag="commit"):
    sync: int
    buckets: int
    version: int | None = None
    require_all: bool = False
    segments: list[str] = []  # the sender's pool: mappings of other segments of its are dropped


# -- torch.distributed: source -> every engine rank ----------------------------------------------
class GroupHeader(msgspec.Struct, tag_field="op", kw_only=True):
    pass


class GroupBucket(GroupHeader, tag="bucket"):
    tensors: list[BucketEntry]


class GroupCommit(GroupHeader, tag="commit"):
    version: int | None = None
    require_all: bool = False


class GroupAbort(GroupHeader, tag="abort"):
    """The source failed mid-update: drop what came so far."""


class GroupClose(GroupHeader, tag="close"):
    """The source is done: leave `serve_forever`."""


# -- replies (shared memory) and status records (torch.distributed) ---------------------------------
class Reply(msgspec.Struct, tag_field="reply", kw_only=True):
    ok: bool = True


class Welcome(Reply, tag="welcome"):
    prefix: str  # names the receiver's segments
    pid: int = 0  # the receiver's process, and whether it can open CUDA IPC handles (cuda_ipc.py)
    cuda: bool = False


class Ack(Reply, tag="ack"):
    pass


class Applied(Reply, tag="applied"):
    version: int


class Refused(Failure, tag_field="reply", tag="refused", kw_only=True):
    """The engine refused the message or the update; nothing was applied."""

    ok: bool = False


SHM_REQUESTS = MessageCodec("weight-sync message", ShmHello, ShmBucket, ShmEvict, ShmAbort, ShmCommit)
GROUP_HEADERS = MessageCodec("weight-sync broadcast", GroupBucket, GroupCommit, GroupAbort, GroupClose)
REPLIES = MessageCodec("weight-sync reply", Welcome, Ack, Applied, Refused)
