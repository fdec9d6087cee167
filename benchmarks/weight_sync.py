"""Weight sync time for SmolLM2-135M-Instruct: each transport next to a plain torch copy of the same bytes.

    python benchmarks/weight_sync.py [--dtype fp32 bf16] [--repeats 5] [--bucket-mb 256]

For each dtype: the trainer's parameters (that dtype) are synced into an engine (`LLM`, same dtype)
in-process, through shared memory into an engine in another process, and by torch.distributed
(gloo, loopback) into an engine in another process; each with the engine's default update (checked,
then copied in) and with `double_buffer_weights=True` (copied into spare storage and checked in one
pass, then swapped in). The reference is `dst.copy_(src)` over the
same parameters into preallocated tensors, measured in the same run, alternating with each
transport's syncs so that load from other processes hits both alike. After one untimed warm-up
(which allocates the buckets), each figure is the best of `--repeats` timed runs (the least
disturbed one on a shared machine); the last column is the ratio of the medians, for comparison.
"""

import argparse
import multiprocessing
import socket
import statistics
import time

import torch

from rollserve import LLM, smollm2_135m_instruct
from rollserve.weight_sync.transports import (DistributedReceiver, DistributedSender, InProcessSender,
                                              SharedMemoryReceiver, SharedMemorySender, weight_sync_group)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
KV_CACHE = 64 << 20


def trainer_params(path, dtype) -> list[tuple[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.0001)  # the engine receives weights that differ from its own
    return [(n, p.detach()) for n, p in model.named_parameters()]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(fn, baseline, repeats: int) -> tuple[float, float, float]:
    """Best seconds of `fn` and of `baseline` (run alternately after one warm-up of each), and the ratio of
    their medians."""
    fn(), baseline()
    pairs = [(timed(fn), timed(baseline)) for _ in range(repeats)]
    ours, base = [p[0] for p in pairs], [p[1] for p in pairs]
    return min(ours), min(base), statistics.median(ours) / statistics.median(base)


def engine(path, dtype, double_buffer):
    return LLM(path, dtype=dtype, kv_cache_memory=KV_CACHE, double_buffer_weights=double_buffer)


def shm_engine(path, dtype, double_buffer, ready):
    with SharedMemoryReceiver(engine(path, dtype, double_buffer)) as receiver:
        ready.put(receiver.address)
        receiver.serve_forever()


def dist_engine(path, dtype, double_buffer, port):
    llm = engine(path, dtype, double_buffer)
    group = weight_sync_group(f"tcp://127.0.0.1:{port}", rank=1, world_size=2, timeout_s=600)
    DistributedReceiver(llm, group).serve_forever()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench(path, dtype: str, repeats: int, bucket_bytes: int) -> tuple[list[tuple[str, float, float, float]], int]:
    named = trainer_params(path, dtype)
    dst = [torch.empty_like(t) for _, t in named]

    def plain_copy():
        for d, (_, s) in zip(dst, named):
            d.copy_(s)

    rows = []
    for double_buffer in (False, True):
        mode = " +double buffer" if double_buffer else ""
        sender = InProcessSender(engine(path, dtype, double_buffer))
        rows.append((f"in-process{mode}", *compare(lambda: sender.send(named), plain_copy, repeats)))
        sender.close()

        spawn = multiprocessing.get_context("spawn")
        ready = spawn.Queue()
        proc = spawn.Process(target=shm_engine, args=(path, dtype, double_buffer, ready), daemon=True)
        proc.start()
        with SharedMemorySender(ready.get(timeout=300), bucket_bytes=bucket_bytes) as sender:
            rows.append((f"shared memory{mode}", *compare(lambda: sender.send(named), plain_copy, repeats)))
        proc.kill()

        port = free_port()
        proc = spawn.Process(target=dist_engine, args=(path, dtype, double_buffer, port), daemon=True)
        proc.start()
        group = weight_sync_group(f"tcp://127.0.0.1:{port}", rank=0, world_size=2, timeout_s=600)
        with DistributedSender(group, bucket_bytes=bucket_bytes) as sender:
            rows.append((f"torch.distributed{mode}", *compare(lambda: sender.send(named), plain_copy, repeats)))
        proc.join(30)
    return rows, sum(t.numel() * t.element_size() for _, t in named)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--bucket-mb", type=int, default=256)
    args = ap.parse_args()
    path = str(smollm2_135m_instruct())
    for dtype in args.dtype:
        rows, nbytes = bench(path, dtype, args.repeats, args.bucket_mb << 20)
        print(f"\nSmolLM2-135M {dtype}: {nbytes / 1e6:.0f} MB, {torch.get_num_threads()} torch threads, "
              f"best of {args.repeats}")
        print(f"{'method':<34} {'seconds':>8} {'GB/s':>6}   {'plain copy':>10} {'GB/s':>6}   {'ratio':>6}   "
              f"{'median ratio':>12}")
        for name, seconds, base, median_ratio in rows:
            print(f"{name:<34} {seconds:>8.3f} {nbytes / seconds / 1e9:>6.2f}   {base:>10.3f} "
                  f"{nbytes / base / 1e9:>6.2f}   {seconds / base:>5.2f}x   {median_ratio:>11.2f}x")


if __name__ == "__main__":
    main()
