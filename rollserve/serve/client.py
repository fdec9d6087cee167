"""`RemoteLLM`: the `LLM` API, served by an engine in another process (`rollserve serve`)."""

import ipaddress
import itertools
import os
import socket
import threading
import time
import weakref
from urllib.parse import urlparse

import msgspec
import zmq

from . import protocol
from ..inputs import as_prompt_list
from ..outputs import CompletionOutput, RequestOutput
from ..sampling_params import BeamSearchParams, SamplingParams
from ..weight_sync.wire import RemoteError, check_update_args, kind, remote_error

_PROGRESS = (protocol.Accepted, protocol.Delta)  # every other reply is the last one to its request
_TRANSPORTS = ("auto", "shm", "zmq", "distributed")


class _Conn:
    def __init__(self, context, address: str):
        self.sock = context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.msg_id = None  # of the message in flight


class RemoteLLM:
    """Talks to an engine server at `address` (`tcp://host:port`, its `zmq` address) with `LLM`'s methods.

    `timeout` (seconds) is how long the server may stay silent: while a call waits, the
    client pings the server, and raises `TimeoutError` once nothing came back for
    `timeout` seconds (a dead or hung server), or `ConnectionError` if another server
    instance answers (it restarted and lost the request). Later calls reconnect, so the
    same object works again once a server is back. Safe to share between threads: each
    call uses a socket of its own from a pool. `api_key`: the server's `--api-key`.
    `weight_transport`: how `update_weights` ships tensors — `"shm"` (shared-memory
    buckets, same host), `"zmq"` (tensor frames over this connection, at most the server's
    `--max-update-bytes` per update), `"distributed"` (the `torch.distributed` group of
    `init_weight_group()`, across hosts) or `"auto"` (that group once initialized, else shm
    when the server runs on this host, else zmq). `tokenizer`: what `get_tokenizer()`
    returns (a tokenizer or a folder; default: the server's, see `get_tokenizer`).
    """

    def __init__(self, address: str, timeout: float = 60.0, api_key: str | None = None,
                 weight_transport: str = "auto", tokenizer=None):
        if not isinstance(address, str) or "://" not in address:
            raise ValueError(f"address must be a ZMQ endpoint such as 'tcp://127.0.0.1:5555', got {address!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if weight_transport not in _TRANSPORTS:
            raise ValueError(f"weight_transport={weight_transport!r} is invalid: must be one of {_TRANSPORTS}")
        if api_key is not None and not isinstance(api_key, str):
            raise TypeError(f"api_key must be a str or None, got {type(api_key).__name__}")
        if not (tokenizer is None or isinstance(tokenizer, str) or callable(getattr(tokenizer, "encode", None))):
            raise TypeError(f"tokenizer must be a tokenizer, a folder path or None, got {type(tokenizer).__name__}")
        self.address, self.timeout, self.api_key, self.weight_transport = address, float(timeout), api_key, weight_transport
        self._context = zmq.Context()
        self._pool: list[_Conn] = []
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._sender_box = [None, None]  # the SharedMemorySender (made on first use), the DistributedSender
        self._sender_lock = threading.Lock()
        self._tokenizer, self._tokenizer_lock = tokenizer, threading.Lock()
        self._finalizer = weakref.finalize(self, _close, self._pool, self._context, self._sender_box)

    # -- connections ------------------------------------------------------------
    def _checkout(self) -> _Conn:
        with self._lock:
            if self._pool:
                return self._pool.pop()
        return _Conn(self._context, self.address)

    def _exchange(self, conn: _Conn, request: protocol.Request, frames=()):
        """Sends one request; yields every reply to it until the last one. Pings the server while it is silent.

        The server answers each client's messages in order, and a message whose answer comes later (generate,
        pause) is first acknowledged with the server's id; so a ping answered before the message is a lost
        message, and a ping answered by another server id is a restarted server.
        """
        msg_id = conn.msg_id = next(self._ids)
        request = msgspec.structs.replace(request, id=msg_id, api_key=self.api_key)
        conn.sock.send_multipart([protocol.REQUESTS.encode(request), *frames], copy=False)
        ping_every = min(1.0, self.timeout / 4)
        last_heard, pings, server_id = time.monotonic(), set(), None
        while True:
            if not conn.sock.poll(int(ping_every * 1000)):
                silent = time.monotonic() - last_heard
                if silent >= self.timeout:
                    raise TimeoutError(f"no answer from the rollserve server at {self.address} for {silent:.1f} s "
                                       f"(timeout={self.timeout} s) to {kind(request)!r}; is it running?")
                ping = next(self._ids)
                pings.add(ping)
                conn.sock.send(protocol.REQUESTS.encode(protocol.Ping(id=ping)))
                continue
            reply = protocol.REPLIES.decode(conn.sock.recv())
            last_heard = time.monotonic()
            if reply.id in pings:
                if server_id is None or not isinstance(reply, protocol.Pong) or reply.server_id != server_id:
                    raise ConnectionError(f"the rollserve server at {self.address} lost {kind(request)!r} "
                                          f"(it restarted, or the message never reached it); try again")
                continue
            if reply.id != msg_id:
                continue  # a late answer to an abandoned call
            if isinstance(reply, protocol.Accepted):
                server_id = reply.server_id
                continue
            yield reply
            if not isinstance(reply, _PROGRESS):
                return

    def _call(self, request: protocol.Request, frames=()):
        """Yields the replies to one request (raising the server's error as its exception); the socket goes back
        to the pool only after a clean exchange."""
        conn = self._checkout()
        clean = False
        try:
            for reply in self._exchange(conn, request, frames):
                clean = not isinstance(reply, _PROGRESS)  # the caller may stop reading after it
                if isinstance(reply, protocol.Error):
                    raise remote_error(reply, f"rollserve server at {self.address}")
                yield reply
        finally:
            if clean:
                with self._lock:
                    self._pool.append(conn)
            else:  # timed out, interrupted or abandoned: stop the request if it still runs, drop the socket
                if isinstance(request, protocol.Generate):
                    try:
                        conn.sock.send(protocol.REQUESTS.encode(protocol.Abort(target=conn.msg_id)), zmq.NOBLOCK)
                    except zmq.ZMQError:
                        pass
                conn.sock.close(linger=100 if isinstance(request, protocol.Generate) else 0)

    def _simple(self, request: protocol.Request, answer: type[protocol.Reply], frames=()):
        """The one reply to `request`, which must be an `answer`."""
        for reply in self._call(request, frames):
            if not isinstance(reply, _PROGRESS):
                if not isinstance(reply, answer):
                    raise RemoteError(f"the rollserve server at {self.address} answered {kind(request)!r} with "
                                      f"{kind(reply)!r}, expected {answer.__struct_config__.tag!r}")
                return reply
        raise RuntimeError("unreachable")

    # -- generation -----------------------------------------------------------------
    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """As `LLM.generate` (`use_tqdm` is accepted and ignored): one `RequestOutput` per prompt, in order."""
        prompts = _prompt_list(prompts)
        return self._generate(protocol.Generate(prompts=prompts,
                                                params=_params(sampling_params, len(prompts), SamplingParams)))

    def chat(self, conversations, sampling_params=None, use_tqdm: bool = True,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """As `LLM.chat`: the server applies its tokenizer's chat template to each conversation."""
        if isinstance(conversations, (list, tuple)) and conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        conversations = [list(c) if isinstance(c, tuple) else c for c in conversations]
        return self._generate(protocol.Generate(conversations=conversations,
                                                params=_params(sampling_params, len(conversations), SamplingParams),
                                                chat_template_kwargs=chat_template_kwargs))

    def beam_search(self, prompts, params: BeamSearchParams, use_tqdm: bool = True):
        """As `LLM.beam_search`: one `BeamSearchOutput` per prompt, in order."""
        if not isinstance(params, BeamSearchParams):
            raise TypeError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        prompts = _prompt_list(prompts)
        return self._generate(protocol.Generate(prompts=prompts, params=protocol.params_to_dict(params)))

    def _generate(self, request: protocol.Generate) -> list:
        return [protocol.output_from_dict(o) for o in self._simple(request, protocol.Result).outputs]

    def stream(self, prompt, sampling_params: SamplingParams | None = None):
        """Yields `RequestOutput`s holding only the tokens (and text) new since the previous one.

        The last one of each sample has its `finish_reason`. Closing the iterator early aborts the request.
        """
        params = _params(sampling_params, 1, SamplingParams)
        request = protocol.Generate(prompts=_prompt_list(prompt)[:1], params=params, stream=True)
        for reply in self._call(request):
            if isinstance(reply, protocol.Delta):
                yield _delta_output(reply)

    # -- weights ---------------------------------------------------------------------
    def update_weights(self, named_tensors, version: int | None = None, require_all: bool = False) -> int:
        """As `LLM.update_weights`, across the process boundary; returns the server's new weight version.

        A refused update raises the server's `WeightUpdateError` (whatever the transport) and leaves its weights
        and version untouched.
        """
        check_update_args(version, require_all)
        if hasattr(named_tensors, "items"):
            named_tensors = named_tensors.items()
        transport = self._transport()
        if transport == "distributed":
            with self._sender_lock:
                sender = self._sender_box[1]
                if sender is None:
                    raise ValueError("weight_transport='distributed' needs a weight group: call init_weight_group() "
                                     "first")
                return sender.send(named_tensors, version=version, require_all=require_all)
        if transport == "shm":
            with self._sender_lock:
                return self._shm_sender().send(named_tensors, version=version, require_all=require_all)
        entries, frames = protocol.tensors_to_frames(named_tensors)
        total, limit = sum(len(f) for f in frames), self.info()["max_update_bytes"]
        if total > limit:
            raise ValueError(f"update_weights: the tensors hold {total} bytes, more than the server's "
                             f"max_update_bytes={limit} for one update over ZMQ; nothing was sent. Use "
                             f"weight_transport='shm' (same host) or init_weight_group(), or raise the server's "
                             f"--max-update-bytes")
        request = protocol.UpdateWeights(tensors=entries, version=version, require_all=require_all)
        return self._simple(request, protocol.Version, frames).version

    def _transport(self) -> str:
        if self.weight_transport != "auto":
            return self.weight_transport
        if self._sender_box[1] is not None:
            return "distributed"
        return "shm" if self.info()["hostname"] == socket.gethostname() else "zmq"

    def _shm_sender(self):
        if self._sender_box[0] is None:
            from ..weight_sync.transports import SharedMemorySender

            address = self.info()["weights"].replace("0.0.0.0", "127.0.0.1")
            self._sender_box[0] = SharedMemorySender(address, timeout_s=max(self.timeout, 60.0), api_key=self.api_key)
        return self._sender_box[0]

    def init_weight_group(self, init_method: str | None = None, timeout_s: float = 1800.0,
                          bucket_bytes: int = 64 << 20) -> None:
        """Builds a `torch.distributed` (gloo) group with the server for `update_weights` across hosts.

        As TRL's `VLLMClient.init_communicator`: this process is rank 0 of a 2-rank group and hosts its
        rendezvous at `init_method` (`tcp://host:port`; default: a free port on this host's address
        towards the server, 127.0.0.1 for a server on loopback), which the server must reach; the
        server joins as rank 1. Afterwards `update_weights` broadcasts packed buckets of `bucket_bytes`
        over the group (with `weight_transport="auto"` or `"distributed"`); the server applies them
        atomically between engine steps, exactly as the other transports. `timeout_s` bounds every
        transfer, and also how long the group may stay idle between updates before the server drops
        it (then call this again). Raises `ValueError` naming a bad argument, `RuntimeError` if the
        server does not join within this client's `timeout`. `close_weight_group()` ends it.
        """
        from ..weight_sync.distributed import DistributedSender, check_group_args, weight_sync_group
        from ..weight_sync.wire import check_positive

        check_positive("timeout_s", timeout_s)
        check_positive("bucket_bytes", bucket_bytes)
        if init_method is not None:
            check_group_args(init_method, 0, 2, timeout_s)
        with self._sender_lock:
            current = self._sender_box[1]
            if current is not None and current._broken is None:
                raise ValueError("this RemoteLLM already has a weight group: call close_weight_group() first")
            self._sender_box[1] = None
            if init_method is None:
                init_method = f"tcp://{self._local_address()}:{_free_port()}"
            self._simple(protocol.InitWeightGroup(init_method=init_method, rank=1, world_size=2,
                                                  timeout_s=float(timeout_s), connect_timeout_s=self.timeout),
                         protocol.WeightGroupState)
            try:
                group = weight_sync_group(init_method, 0, 2, timeout_s, connect_timeout_s=self.timeout)
            except Exception as e:
                try:
                    self._simple(protocol.CloseWeightGroup(), protocol.WeightGroupState)
                except Exception:  # noqa: BLE001 - the join failure is the error to report
                    pass
                raise RuntimeError(f"could not build the weight group with the rollserve server at {self.address} "
                                   f"within {self.timeout} s: this process (rank 0) listens at init_method="
                                   f"{init_method!r} and the server must reach it (else pass init_method='tcp://"
                                   f"<an address of this host it can reach>:<a free port>'): "
                                   f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
            self._sender_box[1] = DistributedSender(group, src=0, bucket_bytes=bucket_bytes)

    def close_weight_group(self) -> None:
        """Ends the weight group of `init_weight_group` on both sides (no-op without one)."""
        with self._sender_lock:
            sender, self._sender_box[1] = self._sender_box[1], None
            if sender is None:
                return
            try:
                self._simple(protocol.CloseWeightGroup(), protocol.WeightGroupState)
            finally:
                _close_group(sender)

    def _local_address(self) -> str:
        """This host's address on the route to the server (127.0.0.1 for a server on loopback)."""
        host = urlparse(self.address).hostname or "127.0.0.1"
        try:
            if host == "localhost" or ipaddress.ip_address(host).is_loopback:
                return "127.0.0.1"
        except ValueError:  # a host name
            pass
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))  # no packet is sent: this only picks the route
            return s.getsockname()[0]

    @property
    def weight_version(self) -> int:
        return self._simple(protocol.WeightVersion(), protocol.Version).version

    def weights_fingerprint(self) -> str:
        """As `LLM.weights_fingerprint`: compare with the trainer's `weights_fingerprint(...)`."""
        return self._simple(protocol.WeightsFingerprint(), protocol.Fingerprint).fingerprint

    # -- tokenizer --------------------------------------------------------------------
    def get_tokenizer(self):
        """As `LLM.get_tokenizer`: the server's tokenizer, loaded here once (or the one given to the constructor).

        Loaded from the folder the server reports when this host has it (same host, shared file system);
        otherwise the server sends its tokenizer's files (`save_pretrained`), which are loaded from a
        temporary folder. Raises `ValueError` if the server has no tokenizer.
        """
        with self._tokenizer_lock:
            if self._tokenizer is None or isinstance(self._tokenizer, str):
                from transformers import AutoTokenizer

                if isinstance(self._tokenizer, str):  # the caller's choice: no fallback to the server's
                    self._tokenizer = AutoTokenizer.from_pretrained(self._tokenizer)
                    return self._tokenizer
                path = self.info().get("tokenizer")
                if path is None:
                    raise ValueError(f"the rollserve server at {self.address} has no tokenizer (its model came "
                                     f"without one); pass RemoteLLM(..., tokenizer=...)")
                if os.path.isdir(path):
                    self._tokenizer = AutoTokenizer.from_pretrained(path)
                else:
                    self._tokenizer = self._fetch_tokenizer(AutoTokenizer)
            return self._tokenizer

    def _fetch_tokenizer(self, auto_tokenizer):
        import tempfile

        files = self._simple(protocol.TokenizerFiles(), protocol.Files).files
        with tempfile.TemporaryDirectory(prefix="rollserve-tokenizer-") as folder:
            for name, data in files.items():
                if os.path.basename(name) != name or name in ("", ".", ".."):
                    raise ValueError(f"the server sent a tokenizer file with a bad name {name!r}")
                with open(os.path.join(folder, name), "wb") as f:
                    f.write(data)
            return auto_tokenizer.from_pretrained(folder)

    # -- control ----------------------------------------------------------------------
    def pause(self, mode: str = "wait") -> None:
        """Stops generation. `wait`: returns once requests in flight finished; `abort`: ends them (finish_reason
        "abort"); `keep`: freezes them, and they continue after `resume()` (with new weights if updated)."""
        self._simple(protocol.Pause(mode=mode), protocol.Ok)

    def resume(self) -> None:
        self._simple(protocol.Resume(), protocol.Ok)

    def sleep(self, level: int = 1) -> None:
        self._simple(protocol.Sleep(level=level), protocol.Ok)

    def wake_up(self) -> None:
        self._simple(protocol.WakeUp(), protocol.Ok)

    def reset_prefix_cache(self) -> None:
        self._simple(protocol.ResetPrefixCache(), protocol.Ok)

    def health(self) -> dict:
        return protocol.fields(self._simple(protocol.Health(), protocol.HealthReport))

    def stats(self) -> dict:
        return self._simple(protocol.Stats(), protocol.StatsReport).stats

    def info(self) -> dict:
        """The server's addresses, host name, model name and limits."""
        return protocol.fields(self._simple(protocol.Hello(), protocol.Info))

    def close(self) -> None:
        """Closes every socket; calls still in flight on other threads fail."""
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _close(pool: list, context, sender: list) -> None:
    if sender[0] is not None:
        sender[0].close()
    if sender[1] is not None:
        _close_group(sender[1])
        sender[1] = None
    pool.clear()
    context.destroy(linger=0)  # also closes sockets still checked out (an unfinished stream): term() would hang


def _close_group(sender) -> None:
    """Tells the server's group receiver to stop (best effort: the group may already be broken)."""
    try:
        sender.close()
    except RuntimeError:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _params(params, count: int, cls):
    if params is None:
        params = cls()
    if isinstance(params, (list, tuple)):
        if len(params) != count:
            raise ValueError(f"got {len(params)} sampling_params for {count} prompts")
        for i, p in enumerate(params):
            if not isinstance(p, cls):
                raise TypeError(f"sampling_params[{i}] must be a {cls.__name__}, got {type(p).__name__}")
        return [protocol.params_to_dict(p) for p in params]
    if not isinstance(params, cls):
        raise TypeError(f"sampling_params must be a {cls.__name__}, got {type(params).__name__}")
    return protocol.params_to_dict(params)


def _delta_output(reply: protocol.Delta) -> RequestOutput:
    outs = [CompletionOutput(index=d["index"], text=d.get("text", ""), token_ids=d["token_ids"],
                             logprobs=d.get("logprobs"), cumulative_logprob=None,
                             finish_reason=d.get("finish_reason"), stop_reason=d.get("stop_reason"),
                             top_logprobs=d.get("top_logprobs"), weight_versions=d.get("weight_versions"))
            for d in reply.outputs]
    return RequestOutput(str(reply.index), None, [], outs, reply.weight_version)


def _prompt_list(prompts) -> list:
    """As `LLM`: one prompt or a list of them (tuples become lists for the wire)."""
    return [list(p) if isinstance(p, tuple) else p for p in as_prompt_list(prompts)]
