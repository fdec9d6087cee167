"""What every cross-process path shares: the protocol version, buckets, the message codec, the one error codec.

A bucket is a 1-D uint8 tensor; each tensor sits at a 64-byte aligned offset
and is described by a `BucketEntry` (`[name, dtype, shape, offset]` on the
wire). The receiver rebuilds every tensor as a view over the bucket, so
nothing is copied on that side and nothing is pickled.

Messages are msgspec Structs of a tagged union, msgpack on the wire
(`MessageCodec`). A failure travels as a `Failure` (its fields inside each
transport's error reply) and is raised on the other side by `remote_error`
as the same kind of exception, a refused update as `WeightUpdateError` with
its `problems`.
"""

import re
from typing import Annotated, Union

import msgspec
import torch

from .updater import WeightUpdateError

PROTOCOL = 2  # of every message schema (serve/protocol.py, weight_sync/messages.py); hello and info carry it
DEFAULT_BUCKET_BYTES = 256 << 20
ALIGN = 64
_DTYPE_NAME = re.compile(r"[a-z0-9_]+")


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def check_item(i: int, item) -> tuple[str, torch.Tensor]:
    """One `(name, tensor)` pair of a user's iterable, checked enough to be packed."""
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise TypeError(f"named_tensors[{i}] must be a (name, tensor) pair, got {type(item).__name__}")
    name, tensor = item
    if not isinstance(name, str) or not name:
        raise TypeError(f"named_tensors[{i}]: the name must be a non-empty str, got {name!r}")
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"named_tensors[{i}] ({name!r}): expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided or tensor.device.type == "meta":
        raise ValueError(f"named_tensors[{i}] ({name!r}): a dense tensor with data is required, "
                         f"got layout {tensor.layout} on device {tensor.device}")
    return name, tensor


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def plan_buckets(named_tensors, bucket_bytes: int):
    """Groups `(name, tensor)` pairs into buckets of at most `bucket_bytes`.

    Yields `(batch, used)`: `batch` is a list of `(name, tensor, offset)` and
    `used` the bytes the bucket needs. A tensor larger than `bucket_bytes` gets
    a bucket of its own (then `used > bucket_bytes`).
    """
    batch, used = [], 0
    for i, item in enumerate(named_tensors):
        name, tensor = check_item(i, item)
        offset = align(used)
        if batch and offset + nbytes(tensor) > bucket_bytes:
            yield batch, used
            batch, offset = [], 0
        batch.append((name, tensor, offset))
        used = offset + nbytes(tensor)
    if batch:
        yield batch, used


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) and _DTYPE_NAME.fullmatch(name) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in a weight bucket header")
    return dtype


class BucketEntry(msgspec.Struct, array_like=True):
    """One tensor of a bucket: `[name, dtype, shape, offset]` on the wire."""

    name: str
    dtype: str
    shape: list[Annotated[int, msgspec.Meta(ge=0)]]
    offset: Annotated[int, msgspec.Meta(ge=0, multiple_of=ALIGN)]


def bucket_entries(batch) -> list[BucketEntry]:
    """The header entries of a planned bucket."""
    return [BucketEntry(name, dtype_name(tensor.dtype), list(tensor.shape), offset) for name, tensor, offset in batch]


def write_bucket(bucket: torch.Tensor, batch, base: int = 0) -> None:
    """Copies each tensor of `batch` into `bucket` (uint8) at `base + offset`."""
    for _, tensor, offset in batch:
        start = base + offset
        bucket[start:start + nbytes(tensor)].view(tensor.dtype).view(tensor.shape).copy_(tensor)


def read_bucket(bucket: torch.Tensor, entries: list[BucketEntry], base: int = 0) -> list[tuple[str, torch.Tensor]]:
    """Views over `bucket` for each header entry, checked against the bucket's bounds."""
    views = []
    for entry in entries:
        dtype, offset = parse_dtype(entry.dtype), base + entry.offset
        size = torch.Size(entry.shape).numel() * dtype.itemsize
        if offset + size > bucket.numel():
            raise ValueError(f"weight bucket entry {entry.name!r} ({size} bytes at {offset}) overruns its "
                             f"{bucket.numel()}-byte bucket")
        views.append((entry.name, bucket[offset:offset + size].view(dtype).view(entry.shape)))
    return views


# -- messages -------------------------------------------------------------------------------------
class MessageCodec:
    """Encodes the Structs of one tagged union; decodes a header into the right one of them.

    A header that is not msgpack, not a map with a string tag, of an unknown kind, or with a field
    missing or of the wrong type raises `ValueError` saying which (the known kinds, the field).
    """

    def __init__(self, what: str, *types: type[msgspec.Struct]):
        self.what, self.tag_field = what, types[0].__struct_config__.tag_field
        self.kinds = sorted(t.__struct_config__.tag for t in types)
        self._decoder = msgspec.msgpack.Decoder(Union[types])
        self._encoder = msgspec.msgpack.Encoder()

    def encode(self, message: msgspec.Struct) -> bytes:
        return self._encoder.encode(message)

    def decode(self, raw) -> msgspec.Struct:
        try:
            return self._decoder.decode(raw)
        except msgspec.DecodeError as e:
            raise ValueError(self._explain(raw, e)) from None

    def _explain(self, raw, error: msgspec.DecodeError) -> str:
        try:
            header = msgspec.msgpack.decode(raw)
        except msgspec.DecodeError:
            return f"malformed {self.what}: the header is not msgpack"
        tag = header.get(self.tag_field) if isinstance(header, dict) else None
        if not isinstance(tag, str):
            return f"malformed {self.what}: the header must be a map with a string {self.tag_field!r}"
        if tag not in self.kinds:
            return f"unknown {self.what} {self.tag_field} {tag!r}; known: {self.kinds}"
        return f"malformed {tag!r} {self.what}: {error}"


def kind(message: msgspec.Struct) -> str:
    """The tag of a message: what its header says it is."""
    return type(message).__struct_config__.tag


# -- the error codec --------------------------------------------------------------------------------
class RemoteError(RuntimeError):
    """The other side failed for a reason other than bad input; the message names its exception type."""


class Failure(msgspec.Struct, kw_only=True):
    """An exception on the wire: its type, the kind the other side raises, its message, a refusal's problems."""

    error: str
    kind: str
    message: str
    problems: dict[str, list[str]] | None = None


_KINDS = (WeightUpdateError, ValueError, TypeError, PermissionError, TimeoutError, NotImplementedError)
_BY_NAME = {k.__name__: k for k in _KINDS}


def failure(exc: BaseException, reply: type[Failure] = Failure, **fields) -> Failure:
    """`exc` as a `reply` (a `Failure` Struct): kind is the nearest of `_KINDS` in its MRO, else RuntimeError."""
    nearest = next((k for k in type(exc).__mro__ if k in _KINDS), RuntimeError)
    problems = exc.problems if isinstance(exc, WeightUpdateError) else None
    return reply(error=type(exc).__name__, kind=nearest.__name__, message=str(exc) or repr(exc), problems=problems,
                 **fields)


def remote_error(failed: Failure, where: str) -> Exception:
    """The exception to raise for a `Failure` that came from `where`: a refused update is the same
    `WeightUpdateError` (same `problems`) as `LLM.update_weights` in process; other kinds than `_KINDS`
    are a `RemoteError`. The message starts with `where`."""
    if failed.kind == WeightUpdateError.__name__ and failed.problems is not None:
        return WeightUpdateError(failed.problems, where=where)
    raised = _BY_NAME.get(failed.kind, RemoteError)
    return (ValueError if raised is WeightUpdateError else raised)(f"{where}: {failed.error}: {failed.message}")


def check_positive(field: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{field} must be a positive number, got {value!r}")


def check_update_args(version, require_all) -> None:
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
        raise TypeError(f"version must be an int or None, got {type(version).__name__}")
    if not isinstance(require_all, bool):
        raise TypeError(f"require_all must be a bool, got {type(require_all).__name__}")
