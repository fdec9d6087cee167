"""What both cross-process weight transports share: buckets, error records, argument checks.

A bucket is a 1-D uint8 tensor; each tensor sits at a 64-byte aligned offset
and is described by an entry `[name, dtype, shape, offset]` (msgpack-able:
str, str, list[int], int). The receiver rebuilds every tensor as a view over
the bucket, so nothing is copied on that side and nothing is pickled.
"""

import re

import torch

from .updater import WeightUpdateError

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


def bucket_entries(batch) -> list[list]:
    """The header entries `[name, dtype, shape, offset]` of a planned bucket."""
    return [[name, dtype_name(tensor.dtype), list(tensor.shape), offset] for name, tensor, offset in batch]


def write_bucket(bucket: torch.Tensor, batch, base: int = 0) -> None:
    """Copies each tensor of `batch` into `bucket` (uint8) at `base + offset`."""
    for _, tensor, offset in batch:
        start = base + offset
        bucket[start:start + nbytes(tensor)].view(tensor.dtype).view(tensor.shape).copy_(tensor)


def read_bucket(bucket: torch.Tensor, entries, base: int = 0) -> list[tuple[str, torch.Tensor]]:
    """Views over `bucket` for each header entry, checked against the bucket's bounds."""
    if not isinstance(entries, list):
        raise ValueError(f"a weight bucket header must list its tensors, got {type(entries).__name__}")
    views = []
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], str)
                and isinstance(entry[2], list) and all(isinstance(d, int) and d >= 0 for d in entry[2])
                and isinstance(entry[3], int) and entry[3] >= 0 and entry[3] % ALIGN == 0):
            raise ValueError(f"malformed weight bucket entry {entry!r:.200}")
        name, dtype, shape, offset = entry[0], parse_dtype(entry[1]), entry[2], base + entry[3]
        size = torch.Size(shape).numel() * dtype.itemsize
        if offset + size > bucket.numel():
            raise ValueError(f"weight bucket entry {name!r} ({size} bytes at {offset}) overruns its "
                             f"{bucket.numel()}-byte bucket")
        views.append((name, bucket[offset:offset + size].view(dtype).view(shape)))
    return views


def error_record(exc: Exception) -> dict:
    """An engine-side exception as a msgpack-able reply: type, nearest ValueError/TypeError/PermissionError, message."""
    kind = next((k.__name__ for k in type(exc).__mro__ if k in (ValueError, TypeError, PermissionError)),
                "RuntimeError")
    record = {"ok": False, "error": type(exc).__name__, "kind": kind, "message": str(exc) or repr(exc)}
    if isinstance(exc, WeightUpdateError):
        record["problems"] = exc.problems
    return record


def remote_error(record: dict, where: str) -> Exception:
    """The exception a sender raises for an engine's error record: a refused update raises the same
    `WeightUpdateError` (same `problems`, same message) as `LLM.update_weights` in process."""
    problems = record.get("problems")
    if record.get("error") == "WeightUpdateError" and isinstance(problems, dict):
        exc = WeightUpdateError(problems)
        if hasattr(exc, "add_note"):
            exc.add_note(f"raised by the {where}")
        return exc
    kind = {"ValueError": ValueError, "TypeError": TypeError, "PermissionError": PermissionError}.get(
        record.get("kind"), RuntimeError)
    return kind(f"{where}: {record.get('error')}: {record.get('message')}")


def check_positive(field: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{field} must be a positive number, got {value!r}")


def check_update_args(version, require_all) -> None:
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
        raise TypeError(f"version must be an int or None, got {type(version).__name__}")
    if not isinstance(require_all, bool):
        raise TypeError(f"require_all must be a bool, got {type(require_all).__name__}")
