"""The engine server: an `LLM` in its own process behind a ZMQ front and an OpenAI-compatible HTTP front.

    python -m rollserve.serve.server --model PATH [--host 127.0.0.1] [--zmq-port 0] [--http-port 0]
                                       [--weights-port 0] [--api-key KEY] [--shm-prefix NAME]
                                       [--max-update-bytes N] ...

One thread (the core loop, the main thread) owns the engine and the ZMQ ROUTER
socket: it reads messages between engine steps, steps while there is work,
and routes finished outputs and streaming deltas to whoever asked. Everything
that touches the engine runs there, so weight updates, pauses and aborts fall
between steps. The HTTP front (uvicorn, its own thread), the shared-memory
weight receiver (its own thread) and, once a client asked for one
(`init_weight_group`), the receiver of a `torch.distributed` weight group
(its own thread) hand work to the core loop with `call`.
Once ready, the process prints one line `ROLLSERVE READY {json addresses}`.
"""

import argparse
import concurrent.futures
import dataclasses
import hmac
import json
import logging
import os
import queue
import secrets
import signal
import socket
import sys
import threading
import time
import traceback

import zmq

from ..config import engine_args_from
from . import options, protocol
from .jobs import Job, RequestEncoder, unstarted_output
from ..weight_sync.wire import PROTOCOL, check_positive, failure, kind

CONTROL = {"update_weights", "pause", "resume", "sleep", "wake_up", "reset_prefix_cache", "init_weight_group",
           "close_weight_group"}
PAUSE_MODES = ("wait", "abort", "keep")
_GROUP_THREAD = "rollserve-weight-group"


class _CoreTarget:
    """What the shared-memory receiver updates: the engine, between two steps of the core loop."""

    def __init__(self, server):
        self.server = server

    def update_weights(self, named_tensors, version=None, require_all=False) -> int:
        named = list(named_tensors)
        return self.server.call(lambda: self.server.llm.update_weights(named, version, require_all)).result()


class _WeightGroup:
    """A `torch.distributed` weight group the server joined (as an engine rank) on a client's request.

    Its thread joins the group, then applies each update the trainer (rank 0) broadcasts, between two
    engine steps; a refused update is reported to the trainer and skipped. `state`: "joining", "ready",
    "closed" (the trainer or `close_weight_group` closed it) or "failed: why" (a peer died or timed out).
    """

    def __init__(self, server, init_method: str, rank: int, world_size: int, timeout_s: float,
                 connect_timeout_s: float):
        self.server, self.init_method, self.rank, self.world_size = server, init_method, rank, world_size
        self.timeout_s, self.connect_timeout_s = timeout_s, connect_timeout_s
        self.state, self.closed = "joining", False
        self.thread = threading.Thread(target=self._run, name=_GROUP_THREAD, daemon=True)

    @property
    def active(self) -> bool:
        return self.state in ("joining", "ready")

    def describe(self) -> dict:
        return {"state": self.state, "init_method": self.init_method, "rank": self.rank,
                "world_size": self.world_size}

    def close(self) -> None:
        """Updates that still arrive on this group are refused; its thread ends once the group does."""
        self.closed = True
        if self.active:
            self.state = "closed"

    def update_weights(self, named_tensors, version=None, require_all=False) -> int:
        named = list(named_tensors)

        def apply():  # on the core loop, so it cannot interleave with close_weight_group
            if self.closed:
                raise ValueError("this weight group was closed on the server (close_weight_group); "
                                 "nothing was applied: call init_weight_group again")
            return self.server.llm.update_weights(named, version, require_all)

        return self.server.call(apply).result()

    def _run(self) -> None:
        from ..weight_sync.distributed import DistributedReceiver, weight_sync_group

        try:
            group = weight_sync_group(self.init_method, self.rank, self.world_size, self.timeout_s,
                                      self.connect_timeout_s)
            receiver = DistributedReceiver(self, group, src=0)
            if self.closed:
                return
            self.state = "ready"
            while not self.closed:
                try:
                    if receiver.receive() is None:  # the trainer closed the group
                        break
                except (ValueError, TypeError):  # refused: the trainer got the same error, the weights are unchanged
                    continue
            if not self.closed:
                self.state = "closed"
        except BaseException as e:  # noqa: BLE001 - a dead peer, a timeout, the server shutting down
            if not self.closed:
                self.state = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                print(f"rollserve: weight group {self.init_method} {self.state}", flush=True)


class EngineServer:
    """Serves `llm` until `stop()`. `zmq_port=0` / `http_port=0` pick free ports; `http_port=None`: no HTTP.

    `served_model_name`: the HTTP front's model name, or a list of names (aliases; responses carry the first).
    `access_log`: one log line per HTTP request (logger `rollserve.access`, at INFO).
    """

    def __init__(self, llm, host: str = "127.0.0.1", zmq_port: int = 0, http_port: int | None = 0,
                 weights_port: int = 0, api_key: str | None = None, shm_prefix: str | None = None,
                 served_model_name: str | list[str] = "rollserve", max_request_bytes: int = 16 << 20,
                 max_update_bytes: int = 4 << 30, access_log: bool = True):
        for field, value in (("max_request_bytes", max_request_bytes), ("max_update_bytes", max_update_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{field} must be a positive int (bytes), got {value!r}")
        names = (served_model_name,) if isinstance(served_model_name, str) else tuple(served_model_name)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"served_model_name must be a non-empty name or list of names, "
                             f"got {served_model_name!r}")
        self.llm, self.host, self.api_key, self.model_names = llm, host, api_key, names
        self.max_request_bytes, self.max_update_bytes = max_request_bytes, max_update_bytes
        self._weight_group: _WeightGroup | None = None
        self.server_id = secrets.token_hex(8)
        self.encoder = RequestEncoder(llm)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._context = zmq.Context()
        self._router = self._context.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        try:
            self._router.bind(f"tcp://{host}:{zmq_port or '*'}")
        except zmq.ZMQError as e:
            self._context.destroy(linger=0)
            raise ValueError(f"cannot bind the ZMQ front to host={host!r} zmq_port={zmq_port}: {e}") from None
        self.zmq_address = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._jobs: dict[tuple, Job] = {}  # (client key, message id) -> job
        self._by_request: dict[str, Job] = {}  # engine request id -> its job
        self._held: list[tuple[Job, int]] = []  # (job, prompt index) waiting for resume
        self._pause_waiters: list = []
        self.paused, self.draining, self.asleep, self._running = False, False, False, True
        self._next_request = 0
        self.counters = {"requests_ok": 0, "requests_aborted": 0, "requests_rejected": 0, "prompt_tokens": 0}
        self.http_address, self._http = None, None
        try:
            if http_port is not None:
                from .http_api import start_http

                self._http, self.http_address = start_http(self, host, http_port, access_log)
            self.receiver = self._start_receiver(host, weights_port, shm_prefix)
        except Exception:  # a port in use: close what is open, start nothing
            if self._http is not None:
                self._http.should_exit = True
            self._context.destroy(linger=0)
            raise

    def _start_receiver(self, host, port, prefix):
        from ..weight_sync.transports import SharedMemoryReceiver

        receiver = SharedMemoryReceiver(_CoreTarget(self), f"tcp://{host}:{port or '*'}", prefix,
                                        api_key=self.api_key)

        def serve():
            try:
                receiver.serve_forever(0.2)
            finally:
                receiver.close()

        self._receiver_thread = threading.Thread(target=serve, name="rollserve-weights", daemon=True)
        self._receiver_thread.start()
        return receiver

    def info(self) -> dict:
        return {"server_id": self.server_id, "protocol": PROTOCOL, "zmq": self.zmq_address,
                "http": self.http_address, "weights": self.receiver.address, "shm_prefix": self.receiver.prefix,
                "hostname": socket.gethostname(), "model": self.model_names[0],
                "max_model_len": self.llm.max_model_len,
                "weight_version": self.llm.weight_version, "pid": os.getpid(), "tokenizer": self.tokenizer_path(),
                "max_request_bytes": self.max_request_bytes, "max_update_bytes": self.max_update_bytes,
                "weight_group": self.weight_group_state()}

    def tokenizer_path(self) -> str | None:
        """The folder the server loaded its tokenizer from (absolute when it is a local folder), or None."""
        path = getattr(self.llm.tokenizer, "name_or_path", None) if self.llm.tokenizer is not None else None
        if not isinstance(path, str) or not path:
            return None
        return os.path.abspath(path) if os.path.isdir(path) else path

    def weight_group_state(self) -> dict | None:
        group = self._weight_group
        return None if group is None else group.describe()

    # -- called from other threads --------------------------------------------
    def call(self, fn) -> concurrent.futures.Future:
        """Runs `fn()` on the core loop between two engine steps; the future holds its result."""
        future = concurrent.futures.Future()
        self._inbox.put((fn, future))
        self._wake()
        return future

    def stop(self) -> None:
        self._running = False
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    # -- the core loop -----------------------------------------------------------
    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            while self._running:
                work = self._can_step()
                events = dict(poller.poll(0 if work else 200))
                if self._wake_r in events:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                self._read_router()
                self._run_inbox()
                if self._can_step():
                    try:
                        self._step()
                    except Exception as e:  # an engine failure: end what was in flight, keep serving
                        self._engine_failed(e)
                elif self.draining and not self.llm.has_unfinished():
                    self._paused_now()
        finally:
            self._shutdown()

    def _can_step(self) -> bool:
        return not (self.paused or self.asleep) and self.llm.has_unfinished()

    def _run_inbox(self) -> None:
        while True:
            try:
                fn, future = self._inbox.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:
                    future.set_exception(e)

    def _step(self) -> None:
        for out in self.llm.step():
            job = self._by_request.pop(out.request_id, None) if out.finished else self._by_request.get(out.request_id)
            if job is not None:
                self._route(job, out)

    def _engine_failed(self, exc: Exception) -> None:
        traceback.print_exc()
        for rid in list(self._by_request):
            self.llm.abort(rid)
        failed = {id(job): job for job in self._by_request.values()}
        self._by_request.clear()
        for job in failed.values():
            job.fail(RuntimeError(f"the engine failed while this request ran: {type(exc).__name__}: {exc}"))
            self._jobs.pop(job.key, None)

    def _route(self, job: Job, out) -> None:
        if out.finished:
            aborted = any(getattr(c, "finish_reason", None) == "abort" for c in getattr(out.output, "outputs", ()))
            self.counters["requests_aborted" if aborted else "requests_ok"] += 1
        if job.on_step(out):
            self._jobs.pop(job.key, None)

    # -- ZMQ front -----------------------------------------------------------------
    def _read_router(self) -> None:
        for _ in range(256):  # bounded, so a flood of messages cannot starve the engine
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            identity, parts = frames[0].bytes, frames[1:]
            self._on_message(identity, parts)

    def _send(self, identity: bytes, reply: protocol.Reply | protocol.Error) -> None:
        try:
            self._router.send_multipart([identity, protocol.REPLIES.encode(reply)], zmq.NOBLOCK)
        except zmq.ZMQError:  # the client is gone or not reading: its replies are dropped
            pass

    def _on_message(self, identity: bytes, parts) -> None:
        request = None
        try:
            if not parts:
                raise ValueError("malformed message: no header frame")
            if len(parts[0]) > self.max_request_bytes:
                raise ValueError(f"message header of {len(parts[0])} bytes exceeds max_request_bytes="
                                 f"{self.max_request_bytes}")
            request = protocol.REQUESTS.decode(parts[0].buffer)
            if len(parts) > 1 and not isinstance(request, protocol.UpdateWeights):
                raise ValueError(f"a {kind(request)!r} message carries no tensor frames, got {len(parts) - 1}")
            self._check_key(request)
            reply = HANDLERS[type(request)](self, request, parts[1:], lambda m, i=identity: self._send(i, m),
                                            identity)
        except Exception as e:
            msg_id = request.id if request is not None else protocol.message_id(parts[0].buffer) if parts else None
            self._send(identity, failure(e, protocol.Error, id=msg_id))
            return
        if reply is not None:
            reply.id = request.id
            self._send(identity, reply)

    def _check_key(self, request: protocol.Request) -> None:
        if self.api_key is None or kind(request) not in CONTROL | {"generate"}:
            return
        given = request.api_key
        if not isinstance(given, str) or not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise PermissionError(f"{kind(request)!r} requires the server's API key (api_key missing or wrong)")

    # -- message handlers: return a reply, or None when the reply comes later (HANDLERS) -------------
    def _on_hello(self, request, frames, send, key):
        return protocol.Info(**self.info())

    def _on_ping(self, request, frames, send, key):
        return protocol.Pong(server_id=self.server_id)

    def _on_health(self, request, frames, send, key):
        return protocol.HealthReport(status="ok", server_id=self.server_id, paused=self.paused, asleep=self.asleep,
                                     weight_version=self.llm.weight_version, weight_group=self.weight_group_state())

    def _on_stats(self, request, frames, send, key):
        return protocol.StatsReport(stats=self.stats())

    def _on_generate(self, request: protocol.Generate, frames, send, key):
        self.start_job(request, send, key)
        send(protocol.Accepted(id=request.id, server_id=self.server_id))

    def _on_abort(self, request: protocol.Abort, frames, send, key):
        job = self._jobs.get((key, request.target))
        if job is not None:
            self.abort_job(job)
        return protocol.Aborted(aborted=job is not None)

    def _on_update_weights(self, request: protocol.UpdateWeights, frames, send, key):
        total = sum(len(f) for f in frames)
        if total > self.max_update_bytes:
            raise ValueError(f"update_weights: the tensor frames hold {total} bytes, more than max_update_bytes="
                             f"{self.max_update_bytes} (the server's --max-update-bytes); nothing was applied. "
                             f"Send it over shared memory (same host) or a weight group (init_weight_group), "
                             f"or raise the limit")
        named = protocol.frames_to_tensors(request.tensors, frames)
        return protocol.Version(version=self.llm.update_weights(named, request.version, request.require_all))

    def _on_init_weight_group(self, request: protocol.InitWeightGroup, frames, send, key):
        """Joins a gloo group as an engine rank (the trainer, rank 0, hosts its rendezvous at `init_method`)."""
        from ..weight_sync.distributed import check_group_args

        check_group_args(request.init_method, request.rank, request.world_size, request.timeout_s)
        check_positive("connect_timeout_s", request.connect_timeout_s)
        if request.rank == 0:
            raise ValueError("rank must not be 0: rank 0 of a weight group is the trainer that sends the weights")
        current = self._weight_group
        if current is not None and current.active:
            raise ValueError(f"this server is already in a weight group ({current.state}, init_method="
                             f"{current.init_method}); close_weight_group first")
        self._weight_group = _WeightGroup(self, request.init_method, request.rank, request.world_size,
                                          request.timeout_s, request.connect_timeout_s)
        self._weight_group.thread.start()
        return protocol.WeightGroupState(weight_group=self._weight_group.describe())

    def _on_close_weight_group(self, request, frames, send, key):
        """Leaves the weight group: updates still sent on it are refused (the trainer should close its side)."""
        group = self._weight_group
        if group is not None:
            group.close()
        return protocol.WeightGroupState(weight_group=self.weight_group_state())

    def _on_tokenizer_files(self, request, frames, send, key):
        """The tokenizer as files (`save_pretrained`), for clients on hosts without the server's folder."""
        import tempfile

        tokenizer = self.llm.tokenizer
        if tokenizer is None:
            raise ValueError("this server has no tokenizer (its model came without one)")
        with tempfile.TemporaryDirectory(prefix="rollserve-tokenizer-") as folder:
            tokenizer.save_pretrained(folder)
            files = {}
            for name in sorted(os.listdir(folder)):
                with open(os.path.join(folder, name), "rb") as f:
                    files[name] = f.read()
        return protocol.Files(files=files)

    def _on_weight_version(self, request, frames, send, key):
        return protocol.Version(version=self.llm.weight_version)

    def _on_weights_fingerprint(self, request, frames, send, key):
        return protocol.Fingerprint(fingerprint=self.llm.weights_fingerprint())

    def _on_reset_prefix_cache(self, request, frames, send, key):
        self.llm.reset_prefix_cache()
        return protocol.Ok()

    def _on_pause(self, request: protocol.Pause, frames, send, key):
        send(protocol.Accepted(id=request.id, server_id=self.server_id))
        self.pause(request.mode, lambda: send(protocol.Ok(id=request.id)))

    def _on_resume(self, request, frames, send, key):
        self.resume()
        return protocol.Ok()

    def _on_sleep(self, request: protocol.Sleep, frames, send, key):
        self.sleep(request.level)
        return protocol.Ok()

    def _on_wake_up(self, request, frames, send, key):
        self.wake_up()
        return protocol.Ok()

    def llm_method(self, name: str):
        fn = getattr(self.llm, name, None)
        if fn is None:
            raise NotImplementedError(f"{name} is not available: this engine's LLM has no {name}() method")
        return fn

    # -- jobs (ZMQ and HTTP) ----------------------------------------------------------
    def start_job(self, request: protocol.Generate, send, key) -> Job:
        """Checks every prompt of a generate message, then queues them all (or none: the error names the prompt)."""
        job_key = (key, request.id)
        if job_key in self._jobs:
            raise ValueError(f"message id {request.id!r} is already generating")
        try:
            requests = self.encoder.encode(request)
        except Exception:
            self.counters["requests_rejected"] += 1
            raise
        job = Job(job_key, request.id, send, requests, request.stream)
        self._jobs[job_key] = job
        for index in range(len(requests)):
            if self.paused or self.draining or self.asleep:
                self._held.append((job, index))
            else:
                self._admit(job, index)
        return job

    def _admit(self, job: Job, index: int) -> None:
        prompt, params = job.requests[index]
        rid = self.llm.add_request(prompt, params, request_id=str(self._next_request),
                                   stream=job.stream)
        self._next_request += 1
        job.request_ids[index] = rid
        self._by_request[rid] = job
        self.counters["prompt_tokens"] += len(prompt.token_ids)

    def abort_job(self, job: Job) -> None:
        """Ends every request of `job` (finish_reason "abort"), held ones included; the job is answered."""
        self._held = [(j, i) for j, i in self._held if j is not job]
        for index, rid in enumerate(job.request_ids):
            if rid is None:  # held while paused: never reached the engine
                rid = job.request_ids[index] = f"unstarted-{index}"
                out = unstarted_output(rid, *job.requests[index], self.llm.weight_version)
            else:
                out = self.llm.abort(rid)
                self._by_request.pop(rid, None)
            if out is not None:
                self._route(job, out)
        self._jobs.pop(job.key, None)

    # -- pause / resume -------------------------------------------------------
    def pause(self, mode: str, done) -> None:
        """Stops generation: `wait` lets requests in flight finish, `abort` ends them, `keep` freezes them."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"mode={mode!r} is invalid: must be one of {', '.join(map(repr, PAUSE_MODES))}")
        if mode == "abort":
            for job in list(self._jobs.values()):
                self.abort_job(job)
        self._pause_waiters.append(done)
        if mode == "wait" and self.llm.has_unfinished():
            self.draining = True
        else:
            self._paused_now()

    def _paused_now(self) -> None:
        self.paused, self.draining = True, False
        waiters, self._pause_waiters = self._pause_waiters, []
        for done in waiters:
            done()

    def resume(self) -> None:
        self.paused = self.draining = False
        self._admit_held()

    def _admit_held(self) -> None:
        if self.asleep:
            return
        held, self._held = self._held, []
        for job, index in held:
            self._admit(job, index)

    # -- sleep / wake up ----------------------------------------------------------
    def sleep(self, level: int = 1) -> None:
        """Frees the KV cache (level 2: also the weights, to host memory); requests that come meanwhile wait."""
        sleep = self.llm_method("sleep")
        if self.llm.has_unfinished():
            raise ValueError(f"sleep needs an idle engine, {self.llm.num_unfinished} requests are in flight: "
                             f"pause('wait') or pause('abort') first")
        sleep(level)
        self.asleep = True

    def wake_up(self) -> None:
        self.llm_method("wake_up")()
        self.asleep = False
        if not (self.paused or self.draining):
            self._admit_held()

    # -- metrics ----------------------------------------------------------------
    def stats(self) -> dict:
        metrics = self.llm.metrics()
        return {**self.counters, **metrics, "num_waiting": metrics["num_waiting"] + len(self._held),
                "paused": self.paused, "asleep": self.asleep}

    # -- shutdown -----------------------------------------------------------------
    def _shutdown(self) -> None:
        for job in list(self._jobs.values()):
            job.fail(RuntimeError("the server is shutting down"))
        self._jobs.clear()
        while True:
            try:
                _, future = self._inbox.get_nowait()
            except queue.Empty:
                break
            future.cancel()
        if self._http is not None:
            self._http.should_exit = True
        if self._weight_group is not None:
            self._weight_group.close()
        self.receiver.stop()
        self._receiver_thread.join(timeout=5)
        self._router.close(linger=500)  # let the shutdown errors reach the clients
        self._context.term()
        os.close(self._wake_r)
        os.close(self._wake_w)


HANDLERS = {
    protocol.Hello: EngineServer._on_hello,
    protocol.Ping: EngineServer._on_ping,
    protocol.Health: EngineServer._on_health,
    protocol.Stats: EngineServer._on_stats,
    protocol.Generate: EngineServer._on_generate,
    protocol.Abort: EngineServer._on_abort,
    protocol.UpdateWeights: EngineServer._on_update_weights,
    protocol.InitWeightGroup: EngineServer._on_init_weight_group,
    protocol.CloseWeightGroup: EngineServer._on_close_weight_group,
    protocol.TokenizerFiles: EngineServer._on_tokenizer_files,
    protocol.WeightVersion: EngineServer._on_weight_version,
    protocol.WeightsFingerprint: EngineServer._on_weights_fingerprint,
    protocol.ResetPrefixCache: EngineServer._on_reset_prefix_cache,
    protocol.Pause: EngineServer._on_pause,
    protocol.Resume: EngineServer._on_resume,
    protocol.Sleep: EngineServer._on_sleep,
    protocol.WakeUp: EngineServer._on_wake_up,
}


def build_parser() -> argparse.ArgumentParser:
    from ..cli import HelpFormatter

    ap = argparse.ArgumentParser(prog="rollserve serve", description="Serve an engine over ZMQ and HTTP.",
                                 formatter_class=HelpFormatter)
    options.add_arguments(ap)
    return ap


def main(argv=None) -> None:
    sys.exit(run(build_parser().parse_args(argv)))


def run(args: argparse.Namespace) -> int:
    """Loads the model, serves until SIGTERM/SIGINT, cleans up; returns the exit status.

    A start-up failure (a bad model path, a port in use) is one line on stderr and status 1;
    `--log-level debug` raises it instead, traceback and all.
    """
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        server = _start(args)
    except Exception as e:  # whatever stops the start-up is the user's to fix: say what, not where
        if args.log_level == "debug":
            raise
        print(f"rollserve serve: error: {_one_line(e)}", file=sys.stderr, flush=True)
        return 1
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.stop())
    print("ROLLSERVE READY " + json.dumps(server.info()), flush=True)
    start = time.monotonic()
    server.serve_forever()
    print(f"rollserve server stopped after {time.monotonic() - start:.1f} s", flush=True)
    if any(t.name == _GROUP_THREAD and t.is_alive() for t in threading.enumerate()):
        # a weight-group thread still blocked in gloo / TCPStore (until its timeout): finalizing the
        # interpreter under it can crash, so leave now (everything is closed and flushed)
        sys.stderr.flush()
        os._exit(0)
    return 0


def _start(args: argparse.Namespace) -> EngineServer:
    if not os.path.exists(args.model):  # at once, not after importing transformers
        raise ValueError(f"--model {args.model}: no such file or folder")
    from ..llm import LLM

    llm = LLM(args.model, tokenizer=args.tokenizer, **dataclasses.asdict(engine_args_from(args)))
    return EngineServer(llm, args.host, args.zmq_port, None if args.http_port < 0 else args.http_port,
                        args.weights_port, args.api_key, args.shm_prefix,
                        args.served_model_name or os.path.basename(os.path.normpath(args.model)),
                        args.max_request_bytes, args.max_update_bytes, args.access_log)


def _one_line(e: Exception) -> str:
    message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
    if isinstance(e, ValueError):  # ours: the message names the argument and what is wrong with it
        return message
    return f"{type(e).__name__}: {message} (--log-level debug shows the traceback)"


if __name__ == "__main__":
    main()
