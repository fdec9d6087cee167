"""The engine server in its own process: RemoteLLM, the OpenAI HTTP front, weight updates, failures.

Real server processes on loopback, a tiny random Llama with SmolLM2's vocabulary and tokenizer
(so text prompts, chat templates and logprob token strings are real, and steps take milliseconds).
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import NAN_PROBLEMS, nan_update, save_tiny_llama

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key"
KV_BYTES = 64 << 20
MAX_UPDATE_BYTES = 32 << 20  # the tiny model's full state (~25 MB) fits in one ZMQ update
SERVED_NAMES = ("tiny", "tiny-alias")

zmq = pytest.importorskip("zmq")
msgpack = pytest.importorskip("msgpack")


# -- fixtures ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, smollm2_path):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-smollm2-vocab")
    save_tiny_llama(folder, smollm2_path, max_position_embeddings=512, tie_word_embeddings=False,
                    bos_token_id=AutoTokenizer.from_pretrained(smollm2_path).bos_token_id)
    return str(folder)


class Server:
    def __init__(self, folder: str, *args: str):
        self.folder, self.args = folder, args
        self.start()

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "rollserve.serve.server", "--model", self.folder,
               "--kv-cache-memory", str(KV_BYTES), *self.args]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.log: list[str] = []
        deadline = time.monotonic() + 180
        for line in self.proc.stdout:
            self.log.append(line)
            if line.startswith("ROLLSERVE READY "):
                self.info = json.loads(line[len("ROLLSERVE READY "):])
                break
            assert time.monotonic() < deadline, "".join(self.log)
        else:
            raise AssertionError("server exited before READY:\n" + "".join(self.log))
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=60)
        self._drainer.join(timeout=10)  # its last lines are in the log
        return code


@pytest.fixture(scope="module")
def server(tiny_folder):
    # double-buffered: weight updates are staged while the engine generates (the in-process and
    # shared-memory transport tests cover the default, copy-in updates)
    s = Server(tiny_folder, "--api-key", API_KEY, "--max-request-bytes", str(1 << 20), "--max-num-seqs", "64",
               "--max-update-bytes", str(MAX_UPDATE_BYTES), "--double-buffer-weights",
               "--served-model-name", *SERVED_NAMES)
    yield s
    assert s.stop() == 0, "".join(s.log)  # SIGTERM: a clean exit
    assert any("server stopped" in line for line in s.log)


@pytest.fixture()
def remote(server):
    from rollserve.serve.client import RemoteLLM

    r = RemoteLLM(server.info["zmq"], timeout=30, api_key=API_KEY)
    yield r
    r.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _same(a, b) -> None:
    assert a.prompt_token_ids == b.prompt_token_ids
    assert len(a.outputs) == len(b.outputs)
    for x, y in zip(a.outputs, b.outputs):
        assert (x.index, x.token_ids, x.text, x.finish_reason) == (y.index, y.token_ids, y.text, y.finish_reason)
        assert x.logprobs == y.logprobs and x.top_logprobs == y.top_logprobs and x.token_ranks == y.token_ranks
        assert x.cumulative_logprob == y.cumulative_logprob


# -- tests ---------------------------------------------------------------------------
def test_remote_llm_equals_in_process_llm(server, remote, tiny_folder):
    from rollserve import LLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server (OMP_NUM_THREADS=1): same GEMM reduction order, bit-equal logprobs
    try:
        _compare_with_in_process(remote, LLM(tiny_folder, kv_cache_memory=KV_BYTES, seed=0))
    finally:
        torch.set_num_threads(threads)


def _compare_with_in_process(remote, llm) -> None:
    from rollserve import BeamSearchParams, SamplingParams

    remote.reset_prefix_cache()
    prompts = ["The capital of France is", [5, 17, 230, 4000, 12]]
    params = [SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=7, logprobs=2),
              SamplingParams(n=2, temperature=0.8, top_p=0.9, max_tokens=10, seed=11, logprobs=0, stop=["e"])]
    for a, b in zip(remote.generate(prompts, params), llm.generate(prompts, params, use_tqdm=False)):
        _same(a, b)
    conv = [{"role": "user", "content": "What is 2 + 2?"}]
    chat_params = SamplingParams(max_tokens=8, seed=3, logprobs=1)
    [a], [b] = remote.chat(conv, chat_params), llm.chat(conv, chat_params, use_tqdm=False)
    assert a.prompt == b.prompt
    _same(a, b)
    beam = BeamSearchParams(beam_width=2, max_tokens=5)
    [a], [b] = remote.beam_search([[1, 2, 3, 4]], beam), llm.beam_search([[1, 2, 3, 4]], beam, use_tqdm=False)
    assert a.sequences == b.sequences
    deltas = list(remote.stream(prompts[0], params[0]))
    streamed = {}
    for d in deltas:
        for c in d.outputs:
            streamed.setdefault(c.index, []).extend(c.token_ids)
    assert streamed == {c.index: c.token_ids for c in b_outputs(llm, prompts[0], params[0])}
    with pytest.raises(ValueError, match=r"prompts\[1\].*outside the vocabulary"):
        remote.generate(["fine", [10**6]], SamplingParams(max_tokens=2))
    assert remote.health()["status"] == "ok"


def b_outputs(llm, prompt, params):
    return llm.generate([prompt], params, use_tqdm=False)[0].outputs


def test_openai_client_completions_chat_streaming_logprobs(server, remote):
    openai = pytest.importorskip("openai")
    from rollserve import SamplingParams

    client = openai.OpenAI(base_url=server.info["http"] + "/v1", api_key=API_KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == list(SERVED_NAMES) and server.info["model"] == "tiny"
    out = client.completions.create(model="tiny", prompt="Hello there", max_tokens=6, n=2, seed=5, logprobs=2,
                                    temperature=1.0, top_p=1.0, extra_body={"return_token_ids": True})
    ref = remote.generate("Hello there", SamplingParams(n=2, max_tokens=6, seed=5, logprobs=2))[0]
    assert len(out.choices) == 2
    for choice, c in zip(out.choices, ref.outputs):
        assert choice.text == c.text and choice.token_ids == c.token_ids and choice.finish_reason == "length"
        assert choice.logprobs.token_logprobs == c.logprobs
        assert len(choice.logprobs.tokens) == 6 and all(len(t) >= 2 for t in choice.logprobs.top_logprobs)
    assert out.usage.completion_tokens == 12

    chunks = list(client.completions.create(model="tiny", prompt="Hello there", max_tokens=6, n=2, seed=5,
                                            stream=True, stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    for ch in chunks:
        for choice in ch.choices:
            texts[choice.index] += choice.text
    assert texts == {0: ref.outputs[0].text, 1: ref.outputs[1].text}
    assert chunks[-1].usage.completion_tokens == 12

    messages = [{"role": "user", "content": "Say hi"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, seed=9, logprobs=True,
                                          top_logprobs=2)
    [cref] = remote.chat(messages, SamplingParams(max_tokens=5, seed=9, logprobs=2))
    assert chat.choices[0].message.content == cref.outputs[0].text
    assert [t.logprob for t in chat.choices[0].logprobs.content] == cref.outputs[0].logprobs
    assert all(len(t.top_logprobs) == 2 for t in chat.choices[0].logprobs.content)
    stream = list(client.chat.completions.create(model="tiny-alias", messages=messages, max_tokens=5, seed=9,
                                                 stream=True, stream_options={"include_usage": True}))
    pieces = [ch.choices[0].delta.content or "" for ch in stream if ch.choices]
    assert "".join(pieces) == cref.outputs[0].text
    assert {ch.model for ch in stream} == {"tiny"}  # an alias is answered under the first name
    assert all(ch.usage is None for ch in stream[:-1]) and stream[-1].choices == []
    assert stream[-1].usage.completion_tokens == len(cref.outputs[0].token_ids)
    assert stream[-1].usage.prompt_tokens == len(cref.prompt_token_ids)

    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model="tiny", prompt="x", max_tokens=2, top_p=3.0)


def test_unknown_model_is_a_404_naming_the_served_models(server):
    import httpx2 as httpx

    headers = {"Authorization": f"Bearer {API_KEY}"}
    chat = {"messages": [{"role": "user", "content": "x"}]}
    for path, body in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", chat)):
        r = httpx.post(server.info["http"] + path, json={"model": "gpt-4", "max_tokens": 2, **body}, headers=headers)
        assert r.status_code == 404, r.text
        error = r.json()["error"]
        assert error["type"] == "NotFoundError" and error["param"] == "model" and error["code"] == 404
        assert "'gpt-4' does not exist" in error["message"] and "'tiny', 'tiny-alias'" in error["message"]
    no_model = httpx.post(server.info["http"] + "/v1/completions", json={"prompt": "x", "max_tokens": 2},
                          headers=headers)
    assert no_model.status_code == 200 and no_model.json()["model"] == "tiny"
    keyless = httpx.post(server.info["http"] + "/v1/completions", json={"model": "gpt-4", "prompt": "x"})
    assert keyless.status_code == 401 and "tiny" not in keyless.text  # the key first: no names told without it


def test_access_log_line_per_request(server):
    import httpx2 as httpx

    http = server.info["http"]
    r = httpx.post(http + "/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 3,
                                                   "ignore_eos": True}, headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200
    prompt_tokens = r.json()["usage"]["prompt_tokens"]
    with httpx.stream("POST", http + "/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "ignore_eos": True,
                            "stream": True}) as streamed:
        assert streamed.status_code == 200 and "[DONE]" in streamed.read().decode()
    httpx.get(http + "/health")
    line = re.compile(r'rollserve\.access: 127\.0\.0\.1:\d+ "POST /v1/completions" 200 '
                      rf"prompt_tokens={prompt_tokens} completion_tokens=3 \d+\.\d{{3}}s$")
    stream_line = re.compile(r'"POST /v1/chat/completions" 200 prompt_tokens=\d+ completion_tokens=4 ')
    _wait_for(lambda: any(line.search(entry.rstrip()) for entry in server.log), timeout=30)
    _wait_for(lambda: any(stream_line.search(entry) for entry in server.log), timeout=30)
    _wait_for(lambda: any('"GET /health" 200 ' in entry for entry in server.log), timeout=30)


def test_api_key_required(server):
    openai = pytest.importorskip("openai")
    import httpx2 as httpx
    from rollserve import SamplingParams
    from rollserve.serve.client import RemoteLLM

    http = server.info["http"]
    bad = openai.OpenAI(base_url=http + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny", prompt="x", max_tokens=2)
    assert httpx.post(http + "/control/pause", json={"mode": "keep"}).status_code == 401
    assert httpx.post(http + "/control/resume", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(http + "/health").status_code == 200
    r = httpx.post(http + "/control/reset_prefix_cache", headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200, r.text
    metrics = httpx.get(http + "/metrics").text
    assert "rollserve_weight_version" in metrics and "rollserve_kv_cache_usage_ratio" in metrics
    with RemoteLLM(server.info["zmq"], timeout=10, weight_transport="zmq") as keyless:
        with pytest.raises(PermissionError, match="API key"):
            keyless.generate("x", SamplingParams(max_tokens=2))
        with pytest.raises(PermissionError, match="API key"):
            keyless.update_weights([("model.norm.weight", torch.ones(64))])
        with pytest.raises(PermissionError, match="API key"):
            keyless.pause("keep")
        with pytest.raises(PermissionError, match="API key"):
            keyless.init_weight_group()
        assert keyless.health()["paused"] is False


def test_shared_memory_weight_port_requires_the_api_key(server, remote):
    from rollserve.serve.client import RemoteLLM

    version, fingerprint = remote.weight_version, remote.weights_fingerprint()
    with RemoteLLM(server.info["zmq"], timeout=10, weight_transport="shm") as keyless:
        with pytest.raises(PermissionError, match="API key"):
            keyless.update_weights([("model.norm.weight", torch.full((64,), 3.0))])
    # a hand-made commit of an empty update would advance the version if the port took it
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.info["weights"])
    try:
        for key in ({}, {"api_key": "wrong"}):
            sock.send(msgpack.packb({"op": "commit", "pid": os.getpid(), "sync": 0, "buckets": 0,
                                     "version": version + 100, "segments": [], **key}))
            assert sock.poll(10000)
            reply = msgpack.unpackb(sock.recv())
            assert not reply["ok"] and reply["kind"] == "PermissionError" and "API key" in reply["message"], reply
    finally:
        sock.close()
    assert remote.weight_version == version and remote.weights_fingerprint() == fingerprint


def test_oversized_zmq_weight_update_is_refused_and_the_server_keeps_serving(server, remote):
    from rollserve import SamplingParams
    from rollserve.serve.client import RemoteLLM

    assert server.info["max_update_bytes"] == MAX_UPDATE_BYTES
    version, fingerprint = remote.weight_version, remote.weights_fingerprint()
    numel = MAX_UPDATE_BYTES // 4 + 1
    header = {"type": "update_weights", "id": 1, "api_key": API_KEY, "tensors": [["big", "float32", [numel]]]}
    reply = _raw_call(server.info["zmq"], [msgpack.packb(header), bytes(numel * 4)])
    assert reply["type"] == "error" and reply["kind"] == "ValueError", reply
    assert f"more than max_update_bytes={MAX_UPDATE_BYTES}" in reply["message"], reply
    with RemoteLLM(server.info["zmq"], timeout=30, api_key=API_KEY, weight_transport="zmq") as zr:
        with pytest.raises(ValueError, match=f"max_update_bytes={MAX_UPDATE_BYTES}"):
            zr.update_weights([("lm_head.weight", torch.zeros(numel))])
    assert remote.weight_version == version and remote.weights_fingerprint() == fingerprint
    assert len(remote.generate([[1, 2, 3]], SamplingParams(max_tokens=3))[0].outputs[0].token_ids) == 3


def test_get_tokenizer_from_the_server_folder_or_its_files(server, remote, tiny_folder, monkeypatch):
    from transformers import AutoTokenizer

    from rollserve.serve.client import RemoteLLM

    ref = AutoTokenizer.from_pretrained(tiny_folder)
    conv = [{"role": "user", "content": "What is 2 + 2?"}]
    expected = (ref("Hello there, world").input_ids, ref.apply_chat_template(conv, tokenize=False))
    assert server.info["tokenizer"] == os.path.abspath(tiny_folder)
    tok = remote.get_tokenizer()
    assert tok is remote.get_tokenizer()
    assert (tok("Hello there, world").input_ids, tok.apply_chat_template(conv, tokenize=False)) == expected
    with RemoteLLM(server.info["zmq"], timeout=30, api_key=API_KEY) as other_host:  # the folder is not here
        monkeypatch.setattr(other_host, "info", lambda: {**server.info, "tokenizer": "/nonexistent/tokenizer"})
        fetched = other_host.get_tokenizer()
        assert fetched.name_or_path != tiny_folder
        assert (fetched("Hello there, world").input_ids, fetched.apply_chat_template(conv, tokenize=False)) == expected
    with RemoteLLM(server.info["zmq"], timeout=30, tokenizer=ref) as given:
        assert given.get_tokenizer() is ref
    with pytest.raises(TypeError, match="tokenizer must be"):
        RemoteLLM(server.info["zmq"], tokenizer=3)


def _raw_call(address: str, frames: list, timeout_ms: int = 10000) -> dict:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        sock.send_multipart(frames)
        assert sock.poll(timeout_ms), "no reply"
        return msgpack.unpackb(sock.recv(), strict_map_key=False)
    finally:
        sock.close()


def test_malformed_messages_get_errors_and_the_server_keeps_serving(server, remote):
    from rollserve import SamplingParams

    address = server.info["zmq"]
    cases = [
        ([b"\xc1 not msgpack"], "not msgpack"),
        ([msgpack.packb([1, 2, 3])], "must be a map"),
        ([msgpack.packb({"type": "launch_rockets", "id": 1})], "unknown message type 'launch_rockets'"),
        ([msgpack.packb({"type": "health", "id": 2}), b"extra"], "carries no tensor frames"),
        ([msgpack.packb({"type": "generate", "id": 3, "prompts": ["x" * (2 << 20)], "api_key": API_KEY})],
         "exceeds max_request_bytes"),
        ([msgpack.packb({"type": "generate", "id": 4, "prompts": [[1, 2]], "params": {"top_p": 2.0},
                         "api_key": API_KEY})], r"SamplingParams\.top_p=2\.0 is invalid"),
        ([msgpack.packb({"type": "generate", "id": 5, "prompts": [[1, 2]], "params": {"temprature": 1.0},
                         "api_key": API_KEY})], "unknown SamplingParams field"),
        ([msgpack.packb({"type": "update_weights", "id": 6, "tensors": [["lm_head.weight", "float32", [4]]],
                         "api_key": API_KEY})], "1 tensors but 0 tensor frames"),
    ]
    for frames, expected in cases:
        reply = _raw_call(address, frames)
        assert reply["type"] == "error", reply
        assert re.search(expected, reply["message"]), reply
    assert remote.generate([[1, 2, 3]], SamplingParams(max_tokens=3))[0].outputs[0].finish_reason == "length"


def test_sleep_holds_requests_until_wake_up(server, remote):
    from rollserve import SamplingParams

    stream = remote.stream([3, 4], SamplingParams(max_tokens=200, ignore_eos=True))
    next(stream)
    with pytest.raises(ValueError, match="sleep needs an idle engine"):
        remote.sleep(1)
    stream.close()  # aborts it
    while remote.stats()["num_running"]:
        time.sleep(0.02)
    remote.sleep(1)
    results = []
    held = threading.Thread(target=lambda: results.append(remote.generate([[5, 6]], SamplingParams(max_tokens=4))))
    held.start()
    time.sleep(0.5)
    assert held.is_alive() and remote.health()["asleep"] is True
    remote.wake_up()
    held.join(timeout=30)
    assert len(results[0][0].outputs[0].token_ids) == 4 and remote.health()["asleep"] is False


def test_update_weights_over_shm_while_16_threads_generate(server, tiny_folder):
    from transformers import AutoModelForCausalLM

    from rollserve import SamplingParams
    from rollserve.serve.client import RemoteLLM
    from rollserve.weight_sync import weights_fingerprint

    r = RemoteLLM(server.info["zmq"], timeout=60, api_key=API_KEY, weight_transport="shm")
    trainer = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32)
    original = {k: v.clone() for k, v in trainer.state_dict().items()}
    start = r.weight_version
    before = r.weights_fingerprint()
    assert before == weights_fingerprint(trainer.named_parameters())
    outputs, errors, stop = [], [], threading.Event()

    def worker(i: int) -> None:
        try:
            while not stop.is_set():
                outputs.extend(r.generate([[i + 1, 7, 9]], SamplingParams(n=2, max_tokens=24, seed=i)))
        except Exception as e:  # noqa: BLE001 - recorded and asserted on
            errors.append(e)

    # One long streamed request, under way before the update is sent, spans it whatever the timing: the short
    # ones alone can all finish while this process is stalled (seen once under a full suite's load).
    span, spanning = [], threading.Event()

    def span_worker() -> None:
        try:
            for out in r.stream([4, 7, 9], SamplingParams(max_tokens=400, ignore_eos=True, seed=99)):
                span.extend(out.outputs[0].weight_versions or [])
                spanning.set()
        except Exception as e:  # noqa: BLE001 - recorded and asserted on
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    threads.append(threading.Thread(target=span_worker))
    for t in threads:
        t.start()
    _wait_for(lambda: (len(outputs) >= 16 and spanning.is_set()) or errors)  # some finished on the old weights
    with torch.no_grad():
        for p in trainer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    version = r.update_weights(trainer.named_parameters(), version=start + 5)
    done_before = len(outputs)
    _wait_for(lambda: len(outputs) >= done_before + 32 or errors)  # in flight across the update, then after it
    stop.set()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert version == start + 5 == r.weight_version
    assert r.weights_fingerprint() == weights_fingerprint(trainer.named_parameters()) != before
    seen = [set(c.weight_versions) for o in outputs for c in o.outputs]
    assert {start} in seen and {start + 5} in seen
    assert len(span) == 400 and span == sorted(span) and set(span) == {start, start + 5}, \
        "the long request did not record the version change mid-way"

    with pytest.raises(ValueError, match="shape"):  # refused: nothing changes
        r.update_weights([("lm_head.weight", torch.zeros(3, 3))])
    assert r.weight_version == start + 5
    assert r.weights_fingerprint() == weights_fingerprint(trainer.named_parameters())
    zr = RemoteLLM(server.info["zmq"], timeout=60, api_key=API_KEY, weight_transport="zmq")
    assert zr.update_weights(original.items()) == start + 6  # back to the saved weights, over tensor frames
    assert zr.weights_fingerprint() == before
    prefix = server.info["shm_prefix"]
    r.close()
    zr.close()
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(prefix + "-")]


def test_update_weights_over_a_distributed_group(server, tiny_folder):
    from transformers import AutoModelForCausalLM

    from rollserve import SamplingParams
    from rollserve.serve.client import RemoteLLM
    from rollserve.weight_sync import weights_fingerprint

    r = RemoteLLM(server.info["zmq"], timeout=30, api_key=API_KEY, weight_transport="distributed")
    try:
        with pytest.raises(ValueError, match="init_weight_group"):
            r.update_weights([("model.norm.weight", torch.ones(64))])
        with pytest.raises(ValueError, match="init_method"):
            r.init_weight_group("localhost:1234")
        with pytest.raises(ValueError, match="timeout_s"):
            r.init_weight_group(timeout_s=0)
        with socket.socket() as busy, RemoteLLM(server.info["zmq"], timeout=5, api_key=API_KEY) as short:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            with pytest.raises(RuntimeError, match="could not build the weight group"):  # rank 0 cannot listen there
                short.init_weight_group(f"tcp://127.0.0.1:{busy.getsockname()[1]}")
        assert r.health()["weight_group"]["state"] == "closed"  # the failed group does not block the next one
        r.init_weight_group(timeout_s=60, bucket_bytes=4 << 20)  # the tiny model travels in several buckets
        _wait_for(lambda: r.health()["weight_group"]["state"] == "ready", 30)
        with pytest.raises(ValueError, match="already has a weight group"):
            r.init_weight_group()

        trainer = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32)
        original = {k: v.clone() for k, v in trainer.state_dict().items()}
        start, before = r.weight_version, r.weights_fingerprint()
        with torch.no_grad():
            for p in trainer.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        assert r.update_weights(trainer.named_parameters(), version=start + 3) == start + 3 == r.weight_version
        trained = weights_fingerprint(trainer.named_parameters())
        assert r.weights_fingerprint() == trained != before

        bad = {k: v.clone() for k, v in original.items()}  # differs from the engine's in every tensor ...
        bad["lm_head.weight"][3, 5] = float("nan")  # ... and the last bucket is bad: all or nothing
        with pytest.raises(ValueError, match=r"non-finite.*lm_head\.weight"):
            r.update_weights(bad.items())
        assert r.weight_version == start + 3 and r.weights_fingerprint() == trained
        assert r.generate([[1, 2, 3]], SamplingParams(max_tokens=3))[0].outputs[0].weight_versions == [start + 3] * 3

        assert r.update_weights(original.items()) == start + 4  # the group still works after a refusal
        assert r.weights_fingerprint() == before
        r.close_weight_group()
        _wait_for(lambda: r.health()["weight_group"]["state"] == "closed", 30)
        with pytest.raises(ValueError, match="init_weight_group"):
            r.update_weights(original.items())
    finally:
        r.close()


def test_nan_update_over_zmq_raises_weight_update_error(server, remote):
    from rollserve.serve.client import RemoteLLM
    from rollserve.weight_sync import WeightUpdateError

    version, fingerprint = remote.weight_version, remote.weights_fingerprint()
    with RemoteLLM(server.info["zmq"], timeout=30, api_key=API_KEY, weight_transport="zmq") as zr:
        with pytest.raises(WeightUpdateError) as refused:
            zr.update_weights(nan_update())
    assert refused.value.problems == NAN_PROBLEMS
    assert str(refused.value).startswith(f"rollserve server at {server.info['zmq']}: ")
    assert remote.weight_version == version and remote.weights_fingerprint() == fingerprint


def test_nan_update_over_the_servers_weight_group_raises_weight_update_error(server, remote):
    from rollserve.serve.client import RemoteLLM
    from rollserve.weight_sync import WeightUpdateError

    version, fingerprint = remote.weight_version, remote.weights_fingerprint()
    with RemoteLLM(server.info["zmq"], timeout=30, api_key=API_KEY, weight_transport="distributed") as r:
        r.init_weight_group(timeout_s=60)
        _wait_for(lambda: r.health()["weight_group"]["state"] == "ready", 30)
        with pytest.raises(WeightUpdateError) as refused:
            r.update_weights(nan_update())
        assert refused.value.problems == NAN_PROBLEMS
        assert str(refused.value).startswith("engine at group rank 1: ")
        assert r.health()["weight_group"]["state"] == "ready", "the group survives a refused update"
        r.close_weight_group()
        _wait_for(lambda: r.health()["weight_group"]["state"] == "closed", 30)
    assert remote.weight_version == version and remote.weights_fingerprint() == fingerprint


def test_every_request_kind_has_a_handler():
    from rollserve.serve import protocol
    from rollserve.serve.server import HANDLERS

    assert sorted(t.__struct_config__.tag for t in HANDLERS) == protocol.REQUESTS.kinds


def test_pause_modes_keep_wait_abort(server, remote):
    from rollserve import SamplingParams

    version = remote.weight_version
    stream = remote.stream([3, 4, 5], SamplingParams(max_tokens=60, seed=1))
    first = next(stream)
    remote.pause("keep")
    frozen = remote.stats()["generation_tokens"]
    time.sleep(0.5)
    assert remote.stats()["generation_tokens"] == frozen and remote.health()["paused"] is True
    assert remote.update_weights([("model.norm.weight", torch.full((64,), 1.5))]) == version + 1
    remote.resume()
    versions = list(first.outputs[0].weight_versions)
    for d in stream:
        versions += d.outputs[0].weight_versions
    assert len(versions) == 60 and versions[0] == version and versions[-1] == version + 1
    assert versions == sorted(versions)  # frozen sequences continued, on the new weights
    remote.update_weights([("model.norm.weight", torch.ones(64))])  # the saved model's norm weights

    results = []
    running = threading.Thread(target=lambda: results.append(
        remote.generate([[9, 9, 9]], SamplingParams(max_tokens=40, ignore_eos=True))[0]))
    running.start()
    while remote.stats()["num_running"] == 0 and running.is_alive():
        time.sleep(0.02)
    remote.pause("wait")  # returns once the request in flight is done
    running.join(timeout=5)
    assert len(results[0].outputs[0].token_ids) == 40 and results[0].outputs[0].finish_reason == "length"
    held = threading.Thread(target=lambda: results.append(
        remote.generate([[8, 8]], SamplingParams(max_tokens=5))[0]))
    held.start()
    time.sleep(0.5)
    assert held.is_alive() and remote.stats()["num_waiting"] == 1  # admitted on resume only
    remote.resume()
    held.join(timeout=30)
    assert len(results[1].outputs[0].token_ids) == 5

    stream = remote.stream([7, 7, 7], SamplingParams(max_tokens=400, ignore_eos=True))
    next(stream)
    remote.pause("abort")
    tail = list(stream)
    assert tail[-1].outputs[0].finish_reason == "abort"
    remote.resume()
    assert remote.health()["paused"] is False


def test_killed_server_fails_clients_within_timeout_and_restart_serves_them(tiny_folder):
    from rollserve import SamplingParams
    from rollserve.serve.client import RemoteLLM

    port = _free_port()
    srv = Server(tiny_folder, "--zmq-port", str(port), "--http-port", "-1")
    r = RemoteLLM(srv.info["zmq"], timeout=3)
    try:
        assert r.generate([[1, 2]], SamplingParams(max_tokens=2))[0].outputs[0].token_ids
        stream = r.stream([1, 2, 3], SamplingParams(max_tokens=400, ignore_eos=True))
        next(stream)
        errors = []

        def blocked() -> None:
            try:
                r.generate([[4, 5, 6]], SamplingParams(max_tokens=400, n=4, ignore_eos=True))
            except Exception as e:  # noqa: BLE001
                errors.append((time.monotonic(), e))

        t = threading.Thread(target=blocked)
        t.start()
        time.sleep(0.5)
        killed = time.monotonic()
        srv.stop(signal.SIGKILL)
        with pytest.raises((TimeoutError, ConnectionError)):
            for _ in stream:
                pass
        assert time.monotonic() - killed < 3 + 2
        t.join(timeout=10)
        assert len(errors) == 1 and isinstance(errors[0][1], (TimeoutError, ConnectionError))
        assert errors[0][0] - killed < 3 + 2
        with pytest.raises(TimeoutError):
            r.weight_version  # noqa: B018 - nobody is listening
        srv.start()
        out = r.generate([[1, 2]], SamplingParams(max_tokens=3))
        assert len(out[0].outputs[0].token_ids) == 3
    finally:
        r.close()
        srv.stop()


def test_streamed_deltas_report_the_weight_version_of_their_tokens(server, remote, tiny_folder):
    """RemoteLLM.stream and HTTP streaming: a request in flight across an update shows the change in its
    per-token versions, each delta's version is its first token's, and a request started after the update
    reports the new version in every delta."""
    import urllib.request

    from transformers import AutoModelForCausalLM

    from rollserve import SamplingParams

    weights = [(n, p.detach()) for n, p in AutoModelForCausalLM.from_pretrained(tiny_folder).named_parameters()]
    v0 = remote.weight_version
    stream = remote.stream([3, 4, 5], SamplingParams(max_tokens=400, ignore_eos=True, seed=3))
    deltas = [next(stream), next(stream)]
    v1 = remote.update_weights(weights, version=v0 + 1)
    deltas += list(stream)
    versions = [v for d in deltas for c in d.outputs for v in c.weight_versions]
    assert len(versions) == 400 and versions[0] == v0 and versions[-1] == v1 and versions == sorted(versions)
    for d in deltas:
        for c in d.outputs:
            if c.weight_versions:
                assert d.weight_version == c.weight_versions[0]

    after = list(remote.stream([3, 4, 5], SamplingParams(max_tokens=12, ignore_eos=True)))
    assert after and all(d.weight_version == v1 for d in after)
    assert [v for d in after for c in d.outputs for v in c.weight_versions] == [v1] * 12

    body = {"model": server.info["model"], "prompt": "Hello", "max_tokens": 8, "stream": True,
            "return_token_ids": True, "ignore_eos": True}
    request = urllib.request.Request(server.info["http"] + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {API_KEY}",
                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        chunks = [json.loads(line[len(b"data: "):]) for line in r if line.startswith(b"data: {")]
    per_token = [v for ch in chunks for choice in ch["choices"] for v in choice.get("weight_versions") or []]
    assert per_token == [v1] * 8
