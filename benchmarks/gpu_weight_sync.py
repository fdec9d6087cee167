"""One timed weight sync per cross-process GPU transport, checked by fingerprint.

    python benchmarks/gpu_weight_sync.py [--layers 22]

The trainer (this process) holds a ~1.1B Llama (bf16, random weights, TinyLlama's shape) on cuda:0; an
engine process serves an `LLM` on the same model shape and receives every parameter:
- shared memory with CUDA IPC handles (engine on cuda:0, the colocated case), buckets never in /dev/shm;
- torch.distributed over NCCL (engine on cuda:1), only with two GPUs: NCCL refuses two ranks on one GPU.
Each transport syncs twice (the first sync allocates the buckets and opens the handles) and the second is
timed. Exit status 1 if an engine's fingerprint differs from the trainer's, or the shared-memory sync
staged anything in /dev/shm.
"""

import argparse
import multiprocessing
import os
import socket
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from rollserve import LLM  # noqa: E402
from rollserve.weight_sync import weights_fingerprint  # noqa: E402
from rollserve.weight_sync.transports import (DistributedReceiver, DistributedSender, SharedMemoryReceiver,  # noqa: E402
                                              SharedMemorySender, weight_sync_group)

SPAWN = multiprocessing.get_context("spawn")


def build_model(layers: int, device):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()


def engine(kind: str, layers: int, device: str, port: int, ready, commands, replies) -> None:
    llm = LLM(build_model(layers, device), kv_cache_memory="256MiB")
    if kind == "shm":
        receiver = SharedMemoryReceiver(llm, prefix=f"rsbench{os.getpid()}")
        ready.put(receiver.address)
        while commands.empty():
            receiver.poll(0.05)
        receiver.close()
    else:
        ready.put("joining")
        group = weight_sync_group(f"tcp://127.0.0.1:{port}", rank=1, world_size=2, timeout_s=120, device=device)
        DistributedReceiver(llm, group, device=device).serve_forever()
    replies.put(llm.weights_fingerprint())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(send, trainer) -> float:
    for _, t in trainer:
        t.mul_(1.0001)  # new weights each sync
    torch.cuda.synchronize()
    start = time.perf_counter()
    send(trainer)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def sync(kind: str, layers: int, device: str, trainer) -> bool:
    ready, commands, replies = SPAWN.Queue(), SPAWN.Queue(), SPAWN.Queue()
    port = free_port()
    proc = SPAWN.Process(target=engine, args=(kind, layers, device, port, ready, commands, replies), daemon=True)
    proc.start()
    address = ready.get(timeout=180)
    staged = []
    if kind == "shm":
        sender = SharedMemorySender(address)
        prefix = f"rsbench{proc.pid}"
    else:
        sender = DistributedSender(weight_sync_group(f"tcp://127.0.0.1:{port}", rank=0, world_size=2, timeout_s=120,
                                                     device="cuda:0"), device="cuda:0")
    timed(sender.send, trainer)  # allocations, handles, communicators
    seconds = timed(sender.send, trainer)
    if kind == "shm":
        staged = [n for n in os.listdir("/dev/shm") if n.startswith(prefix + "-")]
        commands.put("stop")
    sender.close()
    theirs = replies.get(timeout=120)
    proc.join(30)
    gib = sum(t.numel() * t.element_size() for _, t in trainer) / 2**30
    label = "shared memory, CUDA IPC handles" if kind == "shm" else "torch.distributed, NCCL"
    print(f"weight sync ({label}, engine on {device}): {gib:.2f} GiB in {seconds * 1e3:.1f} ms "
          f"({gib / seconds:.1f} GiB/s)")
    same = theirs == weights_fingerprint(trainer)
    print(f"{'PASS' if same else 'FAIL'} weight sync ({label}): engine fingerprint == trainer fingerprint")
    if staged:
        print(f"FAIL weight sync ({label}): {len(staged)} buckets were staged in /dev/shm")
    return same and not staged


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=22)
    ns = ap.parse_args()
    model = build_model(ns.layers, "cuda:0")
    trainer = [(name, p.detach().clone()) for name, p in model.named_parameters()]
    del model
    ok = sync("shm", ns.layers, "cuda:0", trainer)
    if torch.cuda.device_count() >= 2:
        ok &= sync("nccl", ns.layers, "cuda:1", trainer)
    else:
        print("weight sync (torch.distributed, NCCL): not measured, one GPU (NCCL needs one GPU per rank)")
    sys.stdout.flush()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
