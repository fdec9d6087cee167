"""Weights from another process on the same host: shared-memory buckets, ZMQ control messages.

The sender (trainer side) packs tensors into fixed-size segments in
`/dev/shm`, allocated once and reused across syncs, and sends one message
per bucket (`ShmBucket`: where each tensor sits, never tensor data) over a
ZMQ REQ socket. The receiver (engine side, REP socket) maps each
segment once and keeps the tensors as views over it until the `commit`
message, then hands the whole update to `target.update_weights` at once: the
update is validated before anything is applied, and a refused update is sent
back to the sender as the same exception (`Refused`, the one error codec of `wire.py`).

CUDA tensors travel without host memory: a bucket whose tensors are all on one CUDA device is packed
in the sender's GPU memory and the message carries its CUDA IPC handle (`cuda_ipc.py`); the receiver
reads the tensors in place and `update_weights` copies them into the engine's parameters.

Atomicity costs memory: by default the pool grows to hold the whole update
(one copy of the model in /dev/shm, or in GPU memory for CUDA tensors, reused every sync). With
`max_buffer_bytes` the pool is capped; once it is full the sender reuses its
oldest segment and first asks the receiver to copy the tensors it still
holds there into its own memory (so the engine process holds that part of
the update twice until the commit).
"""

import hmac
import itertools
import os
import re
import secrets
import weakref

import torch
import zmq

from .cuda_ipc import cuda_ipc_device, open_handle, share
from .messages import (REPLIES, SHM_REQUESTS, Ack, Applied, Refused, ShmAbort, ShmBucket, ShmCommit, ShmEvict,
                       ShmHello, ShmRequest, Welcome)
from .wire import (DEFAULT_BUCKET_BYTES, PROTOCOL, bucket_entries, check_positive, check_update_args, failure,
                   kind, plan_buckets, read_bucket, remote_error, write_bucket)

SHM_DIR = "/dev/shm"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _owner_pid(name: str) -> int | None:
    """Segments are named `{prefix}-{pid}-{token}-{index}`."""
    parts = name.rsplit("-", 3)
    return int(parts[1]) if len(parts) == 4 and parts[1].isdigit() else None


def remove_stale_segments(prefix: str, shm_dir: str = SHM_DIR) -> list[str]:
    """Deletes segments named `{prefix}-{pid}-...` whose creating process is gone; returns their names."""
    removed = []
    for name in os.listdir(shm_dir):
        pid = _owner_pid(name) if name.startswith(prefix + "-") else None
        if pid is not None and name.rsplit("-", 3)[0] == prefix and not _pid_alive(pid):
            _unlink(os.path.join(shm_dir, name))
            removed.append(name)
    return removed


class _Segment:
    device = None  # a file in shared memory

    def __init__(self, path: str, size: int):
        self.path, self.name, self.size = path, os.path.basename(path), size
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)  # fail here with ENOSPC rather than SIGBUS on first write
        except OSError as e:
            os.close(fd)
            _unlink(path)
            raise OSError(e.errno, f"cannot reserve {size} bytes for weight bucket {path}: {e.strerror}; lower "
                                   f"bucket_bytes / max_buffer_bytes or enlarge {os.path.dirname(path)}") from None
        os.close(fd)
        self.buffer = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)  # [size]


class _CudaSegment:
    """A bucket buffer in GPU memory, shared by IPC handle; named like a file segment, with no file."""

    path = None

    def __init__(self, name: str, size: int, device: torch.device):
        self.name, self.size, self.device = name, size, device
        self.buffer = torch.empty(size, dtype=torch.uint8, device=device)  # [size]


class SharedMemorySender:
    """Trainer side: `send(named_tensors, version=None, require_all=False) -> int` into an engine's receiver.

    `address` is the receiver's ZMQ endpoint (`SharedMemoryReceiver.address`).
    `bucket_bytes` sizes each shared-memory segment (a larger tensor gets a
    segment of its own); `max_buffer_bytes` caps the pool (None: as large as
    the update). `timeout_s` bounds every wait for the engine, the final
    update included. Segments are deleted by `close()`, at interpreter exit,
    or by the receiver once this process is gone. `api_key`: the receiver's key, sent with every message.
    """

    def __init__(self, address: str, bucket_bytes: int = DEFAULT_BUCKET_BYTES, max_buffer_bytes: int | None = None,
                 timeout_s: float = 300.0, shm_dir: str = SHM_DIR, api_key: str | None = None):
        if not isinstance(address, str) or "://" not in address:
            raise ValueError(f"address must be a ZMQ endpoint such as 'tcp://127.0.0.1:5555', got {address!r}")
        check_positive("bucket_bytes", bucket_bytes)
        if max_buffer_bytes is not None:
            check_positive("max_buffer_bytes", max_buffer_bytes)
        check_positive("timeout_s", timeout_s)
        if not os.path.isdir(shm_dir):
            raise ValueError(f"shm_dir {shm_dir!r} is not a directory")
        if api_key is not None and not isinstance(api_key, str):
            raise TypeError(f"api_key must be a str or None, got {type(api_key).__name__}")
        self.api_key = api_key
        self.address, self.bucket_bytes, self.max_buffer_bytes = address, int(bucket_bytes), max_buffer_bytes
        self.timeout_s, self.shm_dir = timeout_s, shm_dir
        self._context = zmq.Context()
        self._socket = None
        self._prefix: str | None = None
        self._peer = (0, False)  # the receiver's pid and whether it opens CUDA IPC handles
        self._pool: list[_Segment] = []
        self._paths: list[str] = []  # shared with the finalizer: what to unlink at exit
        self._syncs, self._names, self._token = itertools.count(), itertools.count(), secrets.token_hex(4)
        self._finalizer = weakref.finalize(self, _cleanup, self._paths, self._context)

    # -- control channel ----------------------------------------------------
    def _connect(self):
        if self._socket is None:
            sock = self._context.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDTIMEO, int(self.timeout_s * 1000))
            sock.setsockopt(zmq.RCVTIMEO, int(self.timeout_s * 1000))
            sock.connect(self.address)
            self._socket = sock
            try:
                welcome = self._call(ShmHello, protocol=PROTOCOL)
                self._prefix, self._peer = welcome.prefix, (welcome.pid, welcome.cuda)
            except BaseException:
                self._drop_socket()
                raise
            for segment in self._pool:  # a new connection may be a restarted engine with another prefix
                self._drop_segment(segment)
            self._pool.clear()
            remove_stale_segments(self._prefix, self.shm_dir)
        return self._socket

    def _drop_socket(self):
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def _call(self, request: type[ShmRequest], **fields):
        sock = self._connect()
        message = request(pid=os.getpid(), api_key=self.api_key, **fields)
        try:
            sock.send(SHM_REQUESTS.encode(message))
            reply = REPLIES.decode(sock.recv())
        except zmq.Again:
            self._drop_socket()  # a REQ socket that missed its reply cannot send again
            raise TimeoutError(f"no answer from the engine at {self.address} to {kind(message)!r} within "
                               f"{self.timeout_s} s; is its receiver running?") from None
        if isinstance(reply, Refused):
            raise remote_error(reply, f"engine at {self.address}")
        return reply

    # -- segments -----------------------------------------------------------
    def _new_segment(self, size: int, device: torch.device | None) -> "_Segment | _CudaSegment":
        """A file segment in `shm_dir`, or with a CUDA `device` a GPU buffer shared by IPC handle."""
        name = f"{self._prefix}-{os.getpid()}-{self._token}-{next(self._names)}"
        if device is not None:
            return _CudaSegment(name, size, device)
        segment = _Segment(os.path.join(self.shm_dir, name), size)
        self._paths.append(segment.path)
        return segment

    def _drop_segment(self, segment) -> None:
        if segment.path is not None:
            _unlink(segment.path)
            self._paths.remove(segment.path)

    def _slot(self, k: int, size: int, sync: int, device: torch.device | None):
        """The segment for bucket `k` of a sync (on `device`, None: a file): reused, grown, added, or (pool
        full) recycled."""
        pooled = sum(s.size for s in self._pool)
        if k >= len(self._pool) and (self.max_buffer_bytes is None or pooled + size <= self.max_buffer_bytes
                                     or not self._pool):
            self._pool.append(self._new_segment(max(size, self.bucket_bytes), device))
            return self._pool[-1]
        i = k % len(self._pool)
        if k >= len(self._pool):  # still holds tensors of this sync: the receiver must copy them out first
            self._call(ShmEvict, sync=sync, segment=self._pool[i].name)
        if self._pool[i].size < size or self._pool[i].device != device:
            self._drop_segment(self._pool[i])
            self._pool[i] = self._new_segment(max(size, self.bucket_bytes), device)
        return self._pool[i]

    def _post_bucket(self, k: int, sync: int, batch, used: int) -> None:
        device = cuda_ipc_device({t.device for _, t, _ in batch}, *self._peer)
        segment = self._slot(k, used, sync, device)
        write_bucket(segment.buffer, batch)
        handle = None
        if device is not None:
            torch.cuda.current_stream(device).synchronize()  # the receiver reads the bucket on its own streams
            handle = share(segment.buffer)
        self._call(ShmBucket, sync=sync, index=k, segment=segment.name, size=segment.size,
                   tensors=bucket_entries(batch), cuda=handle)

    # -- public -------------------------------------------------------------
    def send(self, named_tensors, version: int | None = None, require_all: bool = False) -> int:
        """Sends `(name, tensor)` pairs; returns the engine's new weight version.

        Raises the engine's `WeightUpdateError` if it refuses the update (its weights and version are then
        unchanged), `TimeoutError` if it does not answer within `timeout_s` (during the final commit the
        outcome is then unknown: compare `weight_version`). Either way this sender stays usable.
        """
        check_update_args(version, require_all)
        if self._finalizer.alive is False:
            raise RuntimeError("this SharedMemorySender is closed")
        self._connect()
        sync, buckets = next(self._syncs), 0
        try:
            for k, (batch, used) in enumerate(plan_buckets(named_tensors, self.bucket_bytes)):
                self._post_bucket(k, sync, batch, used)
                buckets = k + 1
            reply = self._call(ShmCommit, sync=sync, buckets=buckets, version=version, require_all=require_all,
                               segments=[s.name for s in self._pool])
        except BaseException:
            if self._socket is not None:
                try:
                    self._call(ShmAbort, sync=sync)
                except Exception:  # best effort: the receiver also drops a sync it never sees committed
                    pass
            raise
        return reply.version

    def close(self) -> None:
        """Deletes this sender's segments and closes its socket (idempotent)."""
        self._drop_socket()
        self._pool.clear()
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()



class SharedMemoryReceiver:
    """Engine side: applies the updates of `SharedMemorySender`s with `target.update_weights`.

    `target` is an `LLM` (anything with `update_weights(named_tensors, version=, require_all=) -> int`).
    `address` is the ZMQ endpoint to bind (default: a free loopback TCP port; `.address` says which).
    `prefix` names this engine's segments; senders learn it when they connect, so several engines share a
    host. Serve with `serve_forever()` (returns after `stop()`) or call `poll(timeout_s)` from your own loop.
    One sender at a time: a bucket from another sync drops the update in progress.
    With `api_key`, every message must carry it (`SharedMemorySender(api_key=...)`): others are refused
    with a `PermissionError` and change nothing.
    """

    def __init__(self, target, address: str = "tcp://127.0.0.1:*", prefix: str | None = None,
                 shm_dir: str = SHM_DIR, api_key: str | None = None):
        if not callable(getattr(target, "update_weights", None)):
            raise TypeError(f"target must have an update_weights method (an LLM), got {type(target).__name__}")
        prefix = prefix if prefix is not None else f"rollserve-{os.getpid()}x{secrets.token_hex(2)}"
        if not isinstance(prefix, str) or not _SAFE_NAME.fullmatch(prefix) or len(prefix) > 100:
            raise ValueError(f"prefix must be 1-100 characters of [A-Za-z0-9_.-] starting with a letter or digit, "
                             f"got {prefix!r}")
        if not os.path.isdir(shm_dir):
            raise ValueError(f"shm_dir {shm_dir!r} is not a directory")
        if api_key is not None and (not isinstance(api_key, str) or not api_key):
            raise ValueError(f"api_key must be a non-empty str or None, got {api_key!r}")
        self.target, self.prefix, self.shm_dir, self._api_key = target, prefix, shm_dir, api_key
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.REP)
        self._socket.setsockopt(zmq.LINGER, 0)
        try:
            self._socket.bind(address)
        except zmq.ZMQError as e:
            self._context.destroy(linger=0)
            raise ValueError(f"cannot bind the weight receiver to address {address!r}: {e}") from None
        self.address = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._segments: dict[str, tuple[torch.Tensor, int]] = {}  # name -> (mapped buffer, owner pid)
        self._pending: list[list] = []  # [name, tensor, segment name or None once copied out]
        self._sync: tuple[int, int] | None = None  # (sender pid, sync id) of the update in progress
        self._received = 0
        self._running = False
        self._paths: list[str] = []
        self._finalizer = weakref.finalize(self, _cleanup, self._paths, self._context)
        remove_stale_segments(prefix, shm_dir)

    # -- serving ------------------------------------------------------------
    def poll(self, timeout_s: float = 0.0) -> bool:
        """Answers at most one message, waiting up to `timeout_s`; returns whether one was answered."""
        if not self._socket.poll(int(timeout_s * 1000)):
            self._reap()
            return False
        raw = self._socket.recv()
        try:
            reply = self._handle(SHM_REQUESTS.decode(raw))
        except Exception as e:  # a refused update or a malformed message: tell the sender, keep serving
            reply = failure(e, Refused)
        self._socket.send(REPLIES.encode(reply))
        return True

    def serve_forever(self, poll_interval_s: float = 0.2) -> None:
        """Serves until `stop()` is called (from any thread)."""
        self._running = True
        while self._running:
            self.poll(poll_interval_s)

    def stop(self) -> None:
        self._running = False

    def close(self) -> None:
        """Closes the socket and deletes every segment mapped here (call it from the serving thread)."""
        self._running = False
        self._pending.clear()
        self._segments.clear()
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- messages -----------------------------------------------------------
    def _handle(self, message: ShmRequest):
        if self._api_key is not None and not (isinstance(message.api_key, str) and hmac.compare_digest(
                message.api_key.encode(), self._api_key.encode())):
            raise PermissionError(f"weight-sync message {kind(message)!r} requires the engine's API key "
                                  f"(api_key missing or wrong); nothing was changed")
        return self._HANDLERS[type(message)](self, message)

    def _on_hello(self, message: ShmHello) -> Welcome:
        if message.protocol != PROTOCOL:
            raise ValueError(f"sender speaks weight-sync protocol {message.protocol!r}, this engine {PROTOCOL}")
        return Welcome(prefix=self.prefix, pid=os.getpid(), cuda=torch.cuda.is_available())

    def _on_bucket(self, message: ShmBucket) -> Ack:
        key = (message.pid, message.sync)
        if key != self._sync or message.index != self._received:
            self._drop_pending()
            if message.index != 0:
                raise ValueError(f"bucket {message.index!r} of an update whose start this engine did not see")
            self._sync = key
        if message.cuda is not None:
            self._check_name(message.segment, message.pid)
            buffer = open_handle(message.cuda, message.size)  # not kept: the sender's memory, until the commit
        else:
            buffer = self._map(message.segment, message.size, message.pid)
        self._pending += [[name, view, message.segment] for name, view in read_bucket(buffer, message.tensors)]
        self._received += 1
        return Ack()

    def _on_evict(self, message: ShmEvict) -> Ack:
        if self._sync == (message.pid, message.sync):
            copied = [entry for entry in self._pending if entry[2] == message.segment]
            for entry in copied:
                entry[1], entry[2] = entry[1].clone(), None
            _settle([entry[1] for entry in copied])
        return Ack()

    def _on_abort(self, message: ShmAbort) -> Ack:
        if self._sync == (message.pid, message.sync):
            self._drop_pending()
        return Ack()

    def _on_commit(self, message: ShmCommit) -> Applied:
        key = (message.pid, message.sync)
        received = self._received if key == self._sync else 0
        if message.buckets != received:
            self._drop_pending()
            raise ValueError(f"update incomplete: {message.buckets!r} buckets sent, {received} received "
                             f"(another sender interleaved, or the engine restarted); nothing was applied")
        named = [(name, tensor) for name, tensor, _ in self._pending]
        try:
            version = self.target.update_weights(named, version=message.version, require_all=message.require_all)
        finally:
            _settle([tensor for _, tensor in named])
            del named
            self._drop_pending()
            self._forget(lambda name, pid: pid == message.pid and name not in message.segments)
        return Applied(version=version)

    _HANDLERS = {ShmHello: _on_hello, ShmBucket: _on_bucket, ShmEvict: _on_evict, ShmAbort: _on_abort,
                 ShmCommit: _on_commit}

    # -- segments -----------------------------------------------------------
    def _check_name(self, name: str, pid: int) -> None:
        if not (_SAFE_NAME.fullmatch(name) and name.startswith(self.prefix + "-") and _owner_pid(name) == pid):
            raise ValueError(f"segment name {name!r:.120} is not one of this engine's ({self.prefix}-{pid}-...)")

    def _map(self, name: str, size: int, pid: int) -> torch.Tensor:
        self._check_name(name, pid)
        if size <= 0:
            raise ValueError(f"segment size must be a positive int, got {size!r}")
        cached = self._segments.get(name)
        if cached is not None and cached[0].numel() >= size:
            return cached[0]
        path = os.path.join(self.shm_dir, name)
        try:
            actual = os.stat(path).st_size
        except FileNotFoundError:
            raise ValueError(f"segment {path} does not exist") from None
        if actual < size:
            raise ValueError(f"segment {path} holds {actual} bytes, the sender claims {size}")
        buffer = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)  # [size]
        self._segments[name] = (buffer, pid)
        if path not in self._paths:
            self._paths.append(path)
        return buffer

    def _drop_pending(self) -> None:
        self._pending.clear()
        self._sync, self._received = None, 0

    def _forget(self, predicate) -> None:
        for name, (_, pid) in list(self._segments.items()):
            if predicate(name, pid):
                del self._segments[name]
                path = os.path.join(self.shm_dir, name)
                if not _pid_alive(pid):
                    _unlink(path)
                self._paths.remove(path)

    def _reap(self) -> None:
        """Forgets what a dead or closed sender left: its update in progress, its mappings, its segments."""
        if self._sync is not None and not _pid_alive(self._sync[0]):
            self._drop_pending()
        in_use = {entry[2] for entry in self._pending}
        self._forget(lambda name, pid: name not in in_use and (
            not _pid_alive(pid) or not os.path.exists(os.path.join(self.shm_dir, name))))


def _settle(tensors) -> None:
    """Waits for the GPU work reading these tensors (copies out of CUDA IPC buckets, queued asynchronously,
    maybe on another thread's stream): once the reply is sent the sender overwrites the buckets."""
    for device in {t.device for t in tensors if t.is_cuda}:
        torch.cuda.synchronize(device)


def _cleanup(paths: list[str], context) -> None:
    for path in paths:
        _unlink(path)
    paths.clear()
    context.destroy(linger=0)
