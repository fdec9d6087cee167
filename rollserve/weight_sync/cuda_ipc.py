"""CUDA IPC handles for shared-memory weight buckets that live in GPU memory.

When every tensor of a bucket is on one CUDA device and the receiver is another process that has
CUDA, the sender packs the bucket in GPU memory (device-to-device copies) and sends its IPC handle
instead of staging it through `/dev/shm`. The handle is torch.multiprocessing's own reduction of a
CUDA tensor (the memory handle, the storage's offset in its allocation, the producer's reference
counter, an event), carried as a msgspec Struct, not pickled. The receiver opens it with
`rebuild_cuda_tensor` (which caches open handles and releases the producer's counter) and gets a
uint8 CUDA tensor over the sender's memory; `update_weights` copies out of it into the engine's
parameters before the sender's commit returns, so only then may the sender reuse or free it.
"""

import os

import torch

from .messages import CudaIpcHandle


def cuda_ipc_device(devices, peer_pid: int, peer_has_cuda: bool) -> torch.device | None:
    """The CUDA device a bucket of tensors on `devices` is shared from by IPC handle; None: stage on the host.

    Only a bucket all on one CUDA device, for a receiver in another process (a process cannot open its
    own IPC handles) that has CUDA.
    """
    devices = {torch.device(d) for d in devices}
    if len(devices) != 1 or peer_pid == os.getpid() or not peer_has_cuda:
        return None
    (device,) = devices
    return device if device.type == "cuda" else None


def share(buffer: torch.Tensor) -> CudaIpcHandle:
    """The IPC handle of a 1-D uint8 CUDA tensor whose writes have completed; each call counts one reader."""
    from torch.multiprocessing.reductions import reduce_tensor

    _, (_, _, _, tensor_offset, _, _, device, handle, storage_size, storage_offset, _, ref_counter_handle,
        ref_counter_offset, event_handle, event_sync_required) = reduce_tensor(buffer)
    return CudaIpcHandle(device=device, handle=handle, storage_size=storage_size, storage_offset=storage_offset,
                         tensor_offset=tensor_offset, ref_counter_handle=ref_counter_handle,
                         ref_counter_offset=ref_counter_offset, event_handle=event_handle,
                         event_sync_required=event_sync_required)


def open_handle(handle: CudaIpcHandle, size: int) -> torch.Tensor:
    """[size] uint8 CUDA tensor over the sender's memory (ValueError when the handle cannot hold `size` bytes)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    if size <= 0 or handle.tensor_offset < 0 or handle.tensor_offset + size > handle.storage_size:
        raise ValueError(f"CUDA bucket of {size} bytes at {handle.tensor_offset} does not fit its "
                         f"{handle.storage_size}-byte allocation")
    return rebuild_cuda_tensor(torch.Tensor, (size,), (1,), handle.tensor_offset, torch.storage.TypedStorage,
                               torch.uint8, handle.device, handle.handle, handle.storage_size,
                               handle.storage_offset, False, handle.ref_counter_handle, handle.ref_counter_offset,
                               handle.event_handle, handle.event_sync_required)
