"""The transports' GPU paths: CUDA IPC handles over shared memory, NCCL for torch.distributed.

On the CPU: which buckets go by IPC handle, which backend a group gets, the handle on the wire. The
tests marked `cuda` need GPUs (skipped without; `benchmarks/gpu_check.sh` runs them): CUDA tensors
reach another process's `update_weights` bit-exact by IPC handle with nothing in /dev/shm, and (two
GPUs) over NCCL.
"""

import os

import pytest
import torch
import torch.distributed as dist
from test_transports import (SPAWN, Recorder, expected, free_port, mixed_tensors, new_prefix, segments,
                             start_shm_engine)

from rollserve.weight_sync.cuda_ipc import cuda_ipc_device
from rollserve.weight_sync.distributed import DistributedReceiver, DistributedSender, group_backend, weight_sync_group
from rollserve.weight_sync.messages import REPLIES, SHM_REQUESTS, CudaIpcHandle, ShmBucket, Welcome
from rollserve.weight_sync.shm import SharedMemorySender
from rollserve.weight_sync.wire import BucketEntry

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two GPUs, one per rank")


def test_only_a_bucket_on_one_cuda_device_for_another_process_with_cuda_goes_by_ipc_handle():
    other = os.getpid() + 1
    assert cuda_ipc_device([torch.device("cuda:0")] * 3, other, True) == torch.device("cuda:0")
    assert cuda_ipc_device({"cuda:1"}, other, True) == torch.device("cuda:1")
    assert cuda_ipc_device({"cpu"}, other, True) is None
    assert cuda_ipc_device({"cuda:0", "cuda:1"}, other, True) is None
    assert cuda_ipc_device({"cuda:0", "cpu"}, other, True) is None
    assert cuda_ipc_device({"cuda:0"}, other, False) is None  # the receiver has no CUDA
    assert cuda_ipc_device({"cuda:0"}, os.getpid(), True) is None  # a process cannot open its own handles


def test_the_group_backend_follows_the_device():
    assert group_backend("cpu") == "gloo" and group_backend(torch.device("cpu")) == "gloo"
    assert group_backend("cuda") == "nccl" and group_backend("cuda:1") == "nccl"
    if not dist.is_nccl_available():
        with pytest.raises(ValueError, match="device='cuda' needs NCCL, which this torch build lacks"):
            weight_sync_group(f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=2, device="cuda")


def test_the_cuda_handle_and_the_receiver_facts_travel_in_the_messages():
    handle = CudaIpcHandle(device=0, handle=b"\x01\x02", storage_size=4096, storage_offset=512, tensor_offset=0,
                           ref_counter_handle=b"rc", ref_counter_offset=8, event_handle=None,
                           event_sync_required=True)
    bucket = ShmBucket(pid=7, sync=0, index=0, segment="p-7-ab-0", size=4096,
                       tensors=[BucketEntry("w", "float32", [2, 2], 0)], cuda=handle)
    assert SHM_REQUESTS.decode(SHM_REQUESTS.encode(bucket)) == bucket
    plain = ShmBucket(pid=7, sync=0, index=0, segment="p-7-ab-0", size=4096, tensors=[])
    assert SHM_REQUESTS.decode(SHM_REQUESTS.encode(plain)).cuda is None  # a /dev/shm bucket
    welcome = REPLIES.decode(REPLIES.encode(Welcome(prefix="p", pid=12, cuda=True)))
    assert (welcome.pid, welcome.cuda) == (12, True)


# -- on GPUs --------------------------------------------------------------------------------------------

@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("max_buffer_bytes", [None, 8192])
def test_cuda_tensors_go_by_ipc_handle_bit_exact(max_buffer_bytes):
    prefix = new_prefix()
    proc, address, results, stop = start_shm_engine(prefix)
    try:
        named = [(n, t.cuda()) for n, t in mixed_tensors()]
        with SharedMemorySender(address, bucket_bytes=4096, max_buffer_bytes=max_buffer_bytes) as sender:
            for version in (1, 2):  # the second sync reuses the GPU buckets
                assert sender.send(named) == version
                assert results.get(timeout=60) == {"version": version, "tensors": expected(named)}
            assert segments(prefix) == []  # nothing was staged in /dev/shm
            assert {s.device.type for s in sender._pool} == {"cuda"}
            host = [(n, t.cpu()) for n, t in named]
            assert sender.send(host) == 3  # host tensors still go through /dev/shm
            assert results.get(timeout=60) == {"version": 3, "tensors": expected(host)}
            assert segments(prefix)
    finally:
        stop.set()
        proc.join(10)


def run_nccl_engine(port, results):
    group = weight_sync_group(f"tcp://127.0.0.1:{port}", rank=1, world_size=2, timeout_s=60, device="cuda:1")
    DistributedReceiver(Recorder(results), group, device="cuda:1").serve_forever()
    results.put("closed")


@two_gpus
@pytest.mark.cuda
def test_cuda_tensors_go_over_nccl_bit_exact():
    port, results = free_port(), SPAWN.Queue()
    proc = SPAWN.Process(target=run_nccl_engine, args=(port, results), daemon=True)
    proc.start()
    try:
        group = weight_sync_group(f"tcp://127.0.0.1:{port}", rank=0, world_size=2, timeout_s=60, device="cuda:0")
        assert type(group).__name__ == "ProcessGroupNCCL"
        named = [(n, t.cuda()) for n, t in mixed_tensors()]
        sender = DistributedSender(group, device="cuda:0", bucket_bytes=4096)
        assert sender.send(named) == 1
        assert results.get(timeout=60) == {"version": 1, "tensors": expected(named)}
        sender.close()
        assert results.get(timeout=60) == "closed"
    finally:
        proc.join(10)
