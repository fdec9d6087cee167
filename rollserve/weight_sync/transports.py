"""Transports that carry `(name, tensor)` pairs from a trainer into an engine's `update_weights`.

Every sender has `send(named_tensors, version=None, require_all=False) -> int` (the engine's new
weight version) and `close()`, so a trainer switches transport by changing one constructor:

- `InProcessSender(llm)`: same process, straight into `llm.update_weights`;
- `SharedMemorySender(address)` -> `SharedMemoryReceiver(llm)`: another process on the same host,
  tensors in reusable `/dev/shm` buckets, control messages over ZMQ (`shm.py`);
- `DistributedSender(group)` -> `DistributedReceiver(llm, group)`: other hosts, packed buckets
  broadcast in a dedicated `torch.distributed` group (`distributed.py`).

An update the engine refuses raises the engine's `WeightUpdateError` (a `ValueError`, same
`problems`) on the sender and changes nothing on the engine; both sides stay usable.
"""

from .distributed import DistributedReceiver, DistributedSender, weight_sync_group
from .shm import SharedMemoryReceiver, SharedMemorySender, remove_stale_segments

__all__ = ["InProcessSender", "SharedMemorySender", "SharedMemoryReceiver", "DistributedSender",
           "DistributedReceiver", "weight_sync_group", "remove_stale_segments"]


class InProcessSender:
    """Direct: the engine lives in this process, so the tensors are handed over as they are."""

    def __init__(self, llm):
        if not callable(getattr(llm, "update_weights", None)):
            raise TypeError(f"llm must have an update_weights method (an LLM), got {type(llm).__name__}")
        self.llm = llm

    def send(self, named_tensors, version: int | None = None, require_all: bool = False) -> int:
        return self.llm.update_weights(named_tensors, version=version, require_all=require_all)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
