"""Weight transports across real processes and sockets on loopback (no mocks).

The wire tests use a recording target in the engine process (it hashes every
tensor it is handed and refuses names starting with "refuse"), so they check
the transport alone: what `update_weights` receives is bit-equal to what was
sent. The end-to-end tests sync the real SmolLM2-135M-Instruct weights (fp32, each
tensor perturbed by seeded noise so the engine's weights change) into a real
`LLM` serving in another process.
"""

import hashlib
import multiprocessing
import os
import secrets
import socket
import threading
import time

import msgpack
import pytest
import torch
import zmq
from helpers import NAN_PROBLEMS, nan_update, tiny_model_dir  # noqa: F401 - tiny_model_dir is a fixture

from rollserve.weight_sync import WeightUpdateError, weights_fingerprint
from rollserve.weight_sync.transports import (DistributedReceiver, DistributedSender, InProcessSender,
                                              SharedMemoryReceiver, SharedMemorySender, weight_sync_group)

SHM = "/dev/shm"
SPAWN = multiprocessing.get_context("spawn")


def digest(tensor: torch.Tensor) -> tuple:
    t = tensor.detach().cpu().contiguous().reshape(-1)
    return str(tensor.dtype), list(tensor.shape), hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()


class Recorder:
    """An `update_weights` target that reports digests of what it was handed, refusing "refuse*" names."""

    def __init__(self, results):
        self.results, self.version = results, 0

    def update_weights(self, named_tensors, version=None, require_all=False):
        named = list(named_tensors)
        refused = [n for n, _ in named if n.startswith("refuse")]
        if refused:
            raise ValueError(f"unknown parameter names: {refused}")
        self.version = self.version + 1 if version is None else version
        self.results.put({"version": self.version, "tensors": [(n, digest(t)) for n, t in named]})
        return self.version


def mixed_tensors(seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return ([("embed", torch.randn(300, 16, generator=g)),  # 19200 bytes: larger than the 4096-byte buckets
             ("half.bf16", torch.randn(7, 5, generator=g).bfloat16()),
             ("half.fp16", torch.randn(33, generator=g).half()),
             ("transposed", torch.randn(12, 9, generator=g).t()),
             ("scalar", torch.tensor(2.5, dtype=torch.float64)),
             ("empty", torch.zeros(0, 4)),
             ("ints", torch.arange(10))]
            + [(f"layers.{i}.weight", torch.randn(200, generator=g)) for i in range(20)])


def expected(named) -> list:
    return [(n, digest(t)) for n, t in named]


def segments(prefix: str) -> list[str]:
    return sorted(n for n in os.listdir(SHM) if n.startswith(prefix + "-"))


def wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def new_prefix() -> str:
    return f"rstest{os.getpid()}{secrets.token_hex(3)}"


# -- engine processes ---------------------------------------------------------------------------
def run_shm_engine(prefix, address, ready, results, stop):
    with SharedMemoryReceiver(Recorder(results), address=address, prefix=prefix) as receiver:
        ready.put(receiver.address)
        while not stop.is_set():
            receiver.poll(0.05)
    results.put("closed")


def run_dist_engine(port, results):
    results.put("started")  # imports are done: the trainer's group timeout then measures only the join
    group = weight_sync_group(f"tcp://127.0.0.1:{port}", rank=1, world_size=2, timeout_s=30)
    DistributedReceiver(Recorder(results), group).serve_forever()
    results.put("closed")


def start_shm_engine(prefix, address="tcp://127.0.0.1:*"):
    ready, results, stop = SPAWN.Queue(), SPAWN.Queue(), SPAWN.Event()
    proc = SPAWN.Process(target=run_shm_engine, args=(prefix, address, ready, results, stop), daemon=True)
    proc.start()
    return proc, ready.get(timeout=60), results, stop


@pytest.fixture(scope="module")
def shm_engine():
    """One engine process (recording target) shared by the shared-memory wire tests: (prefix, address, results)."""
    prefix = new_prefix()
    proc, address, results, stop = start_shm_engine(prefix)
    yield prefix, address, results
    stop.set()
    proc.join(10)


@pytest.fixture
def thread_receiver():
    """A receiver served by a thread of this process (for argument and protocol checks)."""
    import queue

    results = queue.Queue()
    receiver = SharedMemoryReceiver(Recorder(results), prefix=new_prefix())
    thread = threading.Thread(target=receiver.serve_forever, kwargs={"poll_interval_s": 0.02})
    thread.start()
    yield receiver, results
    receiver.stop()
    thread.join()
    receiver.close()


# -- shared memory ------------------------------------------------------------------------------
@pytest.mark.parametrize("max_buffer_bytes", [None, 16384])
def test_shm_sync_is_bit_exact_reuses_segments_and_cleans_up(shm_engine, max_buffer_bytes):
    prefix, address, results = shm_engine
    sender = SharedMemorySender(address, bucket_bytes=4096, max_buffer_bytes=max_buffer_bytes, timeout_s=30)
    named = mixed_tensors()
    version = sender.send(named)
    assert results.get(timeout=10) == {"version": version, "tensors": expected(named)}
    first = segments(prefix)
    assert first and all(f"-{os.getpid()}-" in n for n in first)
    if max_buffer_bytes is not None:  # one 19200-byte segment for "embed", recycled for every later bucket
        assert len(first) == 1

    with pytest.raises(ValueError, match=r"unknown parameter names: \['refuse.me'\]"):
        sender.send(named[:3] + [("refuse.me", torch.ones(2))], version=50)
    assert results.empty()

    named = mixed_tensors(seed=1)
    assert sender.send(named) == version + 1
    assert results.get(timeout=10) == {"version": version + 1, "tensors": expected(named)}
    assert sender.send(named, version=70) == 70
    assert results.get(timeout=10)["version"] == 70
    assert segments(prefix) == first, "segments are allocated once and reused"
    sender.close()
    assert segments(prefix) == []


def test_shm_engine_death_times_out_and_a_restarted_engine_is_usable():
    prefix, port = new_prefix(), free_port()
    proc, address, results, _ = start_shm_engine(prefix, f"tcp://127.0.0.1:{port}")
    sender = SharedMemorySender(address, bucket_bytes=4096, timeout_s=2)
    assert sender.send(mixed_tensors()) == 1
    proc.kill()
    proc.join()
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="no answer from the engine"):
        sender.send(mixed_tensors())
    assert time.monotonic() - start < 2 * 2 + 1

    proc, _, results, stop = start_shm_engine(prefix, address)  # same address: the same sender reconnects
    named = mixed_tensors(seed=2)
    assert sender.send(named, version=3) == 3
    assert results.get(timeout=10)["tensors"] == expected(named)
    assert segments(prefix)
    stop.set()  # the engine closes first: it deletes the segments it mapped, the sender's close copes
    assert results.get(timeout=10) == "closed"
    proc.join(10)
    assert segments(prefix) == []
    sender.close()


def dying_sender(address, die_after_buckets):
    def tensors():
        for i, item in enumerate(mixed_tensors()):
            if i == die_after_buckets:
                os._exit(1)  # no close(), no atexit: the engine must clean up after us
            yield item

    SharedMemorySender(address, bucket_bytes=4096, timeout_s=30).send(tensors())


def test_shm_sender_death_mid_update_applies_nothing_and_engine_removes_its_segments(shm_engine):
    prefix, address, results = shm_engine
    dead = SPAWN.Process(target=dying_sender, args=(address, 10))  # dies after a few buckets, before commit
    dead.start()
    dead.join(60)
    assert dead.exitcode == 1
    assert wait_for(lambda: segments(prefix) == [], 5), segments(prefix)
    assert results.empty()

    with SharedMemorySender(address, bucket_bytes=4096, timeout_s=30) as sender:
        named = mixed_tensors(seed=3)[12:]
        assert sender.send(named, version=100) == 100
        assert results.get(timeout=10)["tensors"] == expected(named), "nothing of the dead sender's update"
    assert segments(prefix) == []


def test_shm_malformed_messages_get_error_replies_and_the_engine_keeps_serving(thread_receiver):
    receiver, results = thread_receiver
    context = zmq.Context()
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(receiver.address)
    bad = [b"\xc1 not msgpack", msgpack.packb({"op": "nope", "pid": os.getpid()}),
           msgpack.packb({"op": "hello", "pid": os.getpid(), "protocol": 99}),
           msgpack.packb({"op": "bucket", "pid": os.getpid(), "sync": 0, "index": 0, "segment": "../../etc/passwd",
                          "size": 10, "tensors": []}),
           msgpack.packb({"op": "bucket", "pid": os.getpid(), "sync": 0, "index": 3, "segment": "x",
                          "size": 10, "tensors": []}),
           msgpack.packb({"op": "commit", "pid": os.getpid(), "sync": 0, "buckets": 2})]
    for raw in bad:
        sock.send(raw)
        reply = msgpack.unpackb(sock.recv())
        assert reply["ok"] is False and reply["message"], reply
    sock.close(linger=0)
    context.destroy()
    with SharedMemorySender(receiver.address, bucket_bytes=4096, timeout_s=10) as sender:
        named = mixed_tensors()
        assert sender.send(named) == 1
        assert results.get(timeout=5)["tensors"] == expected(named)


def test_shm_argument_errors_name_the_field(thread_receiver):
    receiver, results = thread_receiver
    with pytest.raises(ValueError, match="address"):
        SharedMemorySender("localhost:5555")
    with pytest.raises(ValueError, match="bucket_bytes"):
        SharedMemorySender(receiver.address, bucket_bytes=0)
    with pytest.raises(ValueError, match="max_buffer_bytes"):
        SharedMemorySender(receiver.address, max_buffer_bytes=-1)
    with pytest.raises(TypeError, match="update_weights"):
        SharedMemoryReceiver(object())
    with pytest.raises(ValueError, match="prefix"):
        SharedMemoryReceiver(Recorder(results), prefix="../x")
    with SharedMemorySender(receiver.address, bucket_bytes=4096, timeout_s=10) as sender:
        with pytest.raises(TypeError, match="version"):
            sender.send(mixed_tensors(), version="3")
        with pytest.raises(TypeError, match=r"named_tensors\[1\] \('b'\): expected a torch.Tensor"):
            sender.send([("a", torch.ones(3)), ("b", [1.0, 2.0])])
        with pytest.raises(TypeError, match=r"named_tensors\[0\] must be a \(name, tensor\) pair"):
            sender.send([torch.ones(3)])
        assert results.empty()
        named = mixed_tensors()
        assert sender.send(named) == 1
        assert results.get(timeout=5)["tensors"] == expected(named)
    with pytest.raises(RuntimeError, match="closed"):
        sender.send(named)


# -- torch.distributed --------------------------------------------------------------------------
def test_distributed_sync_is_bit_exact_and_survives_refused_and_aborted_updates():
    port = free_port()
    results = SPAWN.Queue()
    proc = SPAWN.Process(target=run_dist_engine, args=(port, results), daemon=True)
    proc.start()
    assert results.get(timeout=120) == "started"
    group = weight_sync_group(f"tcp://127.0.0.1:{port}", rank=0, world_size=2, timeout_s=30)
    sender = DistributedSender(group, bucket_bytes=4096)
    named = mixed_tensors()
    assert sender.send(named) == 1
    assert results.get(timeout=10) == {"version": 1, "tensors": expected(named)}

    with pytest.raises(ValueError, match=r"group rank 1: ValueError: unknown parameter names: \['refuse.me'\]"):
        sender.send(named + [("refuse.me", torch.ones(2))])

    def raising():
        yield from named[:20]  # several buckets reach the engine before the failure
        raise KeyError("trainer iterator failed")

    with pytest.raises(KeyError, match="trainer iterator failed"):
        sender.send(raising())
    assert results.empty()

    named = mixed_tensors(seed=1)
    assert sender.send(named, version=9) == 9
    assert results.get(timeout=10) == {"version": 9, "tensors": expected(named)}
    sender.close()
    assert results.get(timeout=10) == "closed"
    proc.join(10)


def test_distributed_engine_death_raises_quickly_not_hangs():
    port = free_port()
    results = SPAWN.Queue()
    proc = SPAWN.Process(target=run_dist_engine, args=(port, results), daemon=True)
    proc.start()
    assert results.get(timeout=120) == "started"  # a loaded machine can take long to spawn it
    group = weight_sync_group(f"tcp://127.0.0.1:{port}", rank=0, world_size=2, timeout_s=10)
    sender = DistributedSender(group, bucket_bytes=4096)
    assert sender.send(mixed_tensors()) == 1
    proc.kill()
    proc.join()
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="weight broadcast failed"):
        sender.send(mixed_tensors())
    assert time.monotonic() - start < 10 + 1
    with pytest.raises(RuntimeError, match="build a new one"):
        sender.send(mixed_tensors())


def test_distributed_argument_errors_name_the_field():
    with pytest.raises(ValueError, match="init_method"):
        weight_sync_group("localhost:1234", rank=0, world_size=2)
    with pytest.raises(ValueError, match="world_size"):
        weight_sync_group("tcp://127.0.0.1:1234", rank=0, world_size=1)
    with pytest.raises(ValueError, match="rank"):
        weight_sync_group("tcp://127.0.0.1:1234", rank=2, world_size=2)
    with pytest.raises(TypeError, match="group"):
        DistributedSender(object())


def test_in_process_sender_hands_tensors_over():
    import queue

    results = queue.Queue()
    named = mixed_tensors()
    with InProcessSender(Recorder(results)) as sender:
        assert sender.send(named, version=4) == 4
    assert results.get_nowait() == {"version": 4, "tensors": expected(named)}
    with pytest.raises(TypeError, match="update_weights"):
        InProcessSender(object())


# -- a NaN update on every transport: WeightUpdateError naming the tensor, nothing applied -------------
def check_nan_refused(send, state, where: str) -> None:
    before = state()
    with pytest.raises(WeightUpdateError) as refused:
        send(nan_update())
    assert refused.value.problems == NAN_PROBLEMS
    assert str(refused.value).startswith(where), "the message says which engine refused it"
    assert state() == before, "weights fingerprint and weight_version unchanged"


def test_nan_update_in_process_raises_weight_update_error(tiny_model):
    from rollserve import LLM

    llm = LLM(tiny_model("llama"), kv_cache_memory=1 << 22)
    check_nan_refused(llm.update_weights, lambda: (llm.weight_version, llm.weights_fingerprint()),
                      "update_weights rejected the update")


def test_nan_update_over_shared_memory_raises_weight_update_error(tiny_model_dir):
    commands, replies = SPAWN.Queue(), SPAWN.Queue()
    proc = SPAWN.Process(target=run_llm_engine, args=("shm", str(tiny_model_dir), None, commands, replies),
                         daemon=True)
    proc.start()
    address = replies.get(timeout=120)

    def state():
        commands.put("state")
        return replies.get(timeout=120)

    with SharedMemorySender(address, timeout_s=60) as sender:
        check_nan_refused(sender.send, state, f"engine at {address}: ")
    commands.put("stop")
    proc.join(30)
    assert proc.exitcode == 0


def test_nan_update_over_a_distributed_group_raises_weight_update_error(tiny_model_dir):
    port = free_port()
    commands, replies = SPAWN.Queue(), SPAWN.Queue()
    proc = SPAWN.Process(target=run_llm_engine, args=("dist", str(tiny_model_dir), f"tcp://127.0.0.1:{port}",
                                                      commands, replies), daemon=True)
    proc.start()
    sender = DistributedSender(weight_sync_group(f"tcp://127.0.0.1:{port}", rank=0, world_size=2, timeout_s=120))
    assert replies.get(timeout=120) == "ready"

    def send(named):
        commands.put("receive")
        try:
            return sender.send(named)
        finally:
            assert str(replies.get(timeout=120)).startswith("refused: ")

    def state():
        commands.put("state")
        return replies.get(timeout=120)

    check_nan_refused(send, state, "engine at group rank 1: ")
    commands.put("stop")
    proc.join(30)
    assert proc.exitcode == 0


# -- end to end: SmolLM2-135M into an LLM in another process ------------------------------------
E2E_BUCKET = 64 << 20  # SmolLM2 fp32 (538 MB) then travels in 9 buckets


def run_llm_engine(kind, path, group_address, commands, replies):
    """An engine process: `LLM(SmolLM2)` behind a receiver; answers "state" with its version, fingerprint
    and a greedy completion (so it is seen serving), "receive" (distributed) by taking part in one sync."""
    from rollserve import LLM, SamplingParams

    llm = LLM(path, kv_cache_memory=1 << 24)

    def state():
        out = llm.generate([[1, 2, 3, 4, 5]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
        return {"version": llm.weight_version, "fingerprint": llm.weights_fingerprint(),
                "greedy": out.outputs[0].token_ids, "output_version": out.weight_version}

    if kind == "shm":
        with SharedMemoryReceiver(llm) as receiver:
            replies.put(receiver.address)
            while True:
                receiver.poll(0.05)
                if not commands.empty():
                    if commands.get() == "stop":
                        return
                    replies.put(state())
    receiver = DistributedReceiver(llm, weight_sync_group(group_address, rank=1, world_size=2, timeout_s=120))
    replies.put("ready")
    while (command := commands.get()) != "stop":
        if command == "state":
            replies.put(state())
            continue
        try:
            replies.put(receiver.receive())
        except ValueError as e:
            replies.put(f"refused: {e}")


@pytest.fixture(scope="module")
def smollm2_updates(smollm2_path):
    """Two good full updates of SmolLM2 (every weight scaled, so every tensor changes) with their fingerprints,
    and two bad ones: a NaN in the last tensor, an unknown name at the end."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    good, good2 = ([(n, p.detach() * scale) for n, p in model.named_parameters()] for scale in (1.001, 0.999))
    # The bad updates carry good2's values, so an engine that applied any part of them would show it.
    nan_last = good2[:-1] + [(good2[-1][0], torch.full_like(good2[-1][1], float("nan")))]
    unknown = good2 + [("model.layers.99.mlp.up_proj.weight", torch.ones(4, 4))]
    return {"good": good, "good2": good2, "fingerprints": (weights_fingerprint(good), weights_fingerprint(good2)),
            "bad": [(nan_last, "non-finite values"), (unknown, "unknown names")]}


def check_end_to_end(send, state, updates, bad):
    assert send(updates["good"], version=3, require_all=True) == 3
    after = state()
    assert after["fingerprint"] == updates["fingerprints"][0], "bit-equal to the trainer's weights"
    assert after["version"] == after["output_version"] == 3 and len(after["greedy"]) == 4
    for update, problem in bad:
        with pytest.raises(WeightUpdateError, match=problem) as refused:
            send(update, version=4)
        assert refused.value.problems
        assert state() == after, "a refused update changes nothing and the engine keeps serving"
    assert send(updates["good2"]) == 4
    final = state()
    assert final["fingerprint"] == updates["fingerprints"][1] and final["version"] == final["output_version"] == 4


def test_shm_end_to_end_smollm2(smollm2_path, smollm2_updates):
    commands, replies = SPAWN.Queue(), SPAWN.Queue()
    proc = SPAWN.Process(target=run_llm_engine, args=("shm", smollm2_path, None, commands, replies), daemon=True)
    proc.start()
    address = replies.get(timeout=120)

    def state():
        commands.put("state")
        return replies.get(timeout=120)

    with SharedMemorySender(address, bucket_bytes=E2E_BUCKET, timeout_s=120) as sender:
        check_end_to_end(sender.send, state, smollm2_updates, smollm2_updates["bad"])
        prefix = sender._prefix
    assert segments(prefix) == []
    commands.put("stop")
    proc.join(30)
    assert proc.exitcode == 0 and segments(prefix) == []


def test_distributed_end_to_end_smollm2(smollm2_path, smollm2_updates):
    port = free_port()
    commands, replies = SPAWN.Queue(), SPAWN.Queue()
    proc = SPAWN.Process(target=run_llm_engine, args=("dist", smollm2_path, f"tcp://127.0.0.1:{port}", commands,
                                                      replies), daemon=True)
    proc.start()
    group = weight_sync_group(f"tcp://127.0.0.1:{port}", rank=0, world_size=2, timeout_s=120)
    assert replies.get(timeout=120) == "ready"
    sender = DistributedSender(group, bucket_bytes=E2E_BUCKET)

    def send(named, **kwargs):
        commands.put("receive")
        try:
            return sender.send(named, **kwargs)
        finally:
            reply = replies.get(timeout=120)
            assert reply == kwargs.get("version", reply) or str(reply).startswith("refused")

    def state():
        commands.put("state")
        return replies.get(timeout=120)

    check_end_to_end(send, state, smollm2_updates, smollm2_updates["bad"][:1])
    commands.put("stop")
    proc.join(30)
    assert proc.exitcode == 0
