"""The engine server's wire format: msgpack headers, tensors as separate frames, never pickle.

A message is a list of ZMQ frames: one msgpack header (a dict with `type` and,
from clients, `id`), then raw tensor bytes for `update_weights` (one frame per
tensor, described in the header as `[name, dtype, shape]`). Replies carry the
`id` of the message they answer.
"""

import dataclasses

import msgpack
import torch

from ..outputs import BeamSearchOutput, BeamSearchSequence, CompletionOutput, RequestOutput
from ..sampling_params import BeamSearchParams, SamplingParams
from ..weight_sync.wire import dtype_name, parse_dtype

PROTOCOL = 1


def pack(header: dict) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def unpack(raw) -> dict:
    """Decodes a header; `ValueError` when it is not a msgpack map with a string `type`."""
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as e:
        raise ValueError(f"malformed message: the header is not msgpack ({type(e).__name__})") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise ValueError("malformed message: the header must be a map with a string 'type'")
    return header


_KINDS = {k.__name__: k for k in (ValueError, TypeError, TimeoutError, PermissionError, NotImplementedError)}


def error_reply(msg_id, exc: BaseException) -> dict:
    """An error as a reply: its type, the nearest of the kinds a client re-raises, its message."""
    kind = next((k.__name__ for k in type(exc).__mro__ if k.__name__ in _KINDS), "RuntimeError")
    return {"type": "error", "id": msg_id, "kind": kind, "error": type(exc).__name__, "message": str(exc) or repr(exc)}


class RemoteError(RuntimeError):
    """The server failed a request for a reason other than bad input."""


def raise_error(reply: dict, where: str):
    kind = _KINDS.get(reply.get("kind"), RemoteError)
    raise kind(f"{where}: {reply.get('error')}: {reply.get('message')}")


# -- parameters -------------------------------------------------------------
def params_to_dict(params) -> dict:
    kind = "beam" if isinstance(params, BeamSearchParams) else "sampling"
    return {"kind": kind, **dataclasses.asdict(params)}


def params_from_dict(d, where: str):
    """`SamplingParams`/`BeamSearchParams` from a dict; unknown or invalid fields raise naming the field."""
    if not isinstance(d, dict):
        raise TypeError(f"{where} must be a map of sampling parameters, got {type(d).__name__}")
    d = dict(d)
    cls = BeamSearchParams if d.pop("kind", "sampling") == "beam" else SamplingParams
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{where}: unknown {cls.__name__} field(s) {unknown}")
    try:
        return cls(**d)
    except TypeError as e:  # a required field is missing
        raise ValueError(f"{where}: {e}") from None


# -- outputs ----------------------------------------------------------------
def output_to_dict(out) -> dict:
    d = dataclasses.asdict(out)
    d["kind"] = "beam" if isinstance(out, BeamSearchOutput) else "sampling"
    return d


def output_from_dict(d: dict):
    d = dict(d)
    if d.pop("kind") == "beam":
        d["sequences"] = [BeamSearchSequence(**s) for s in d["sequences"]]
        return BeamSearchOutput(**d)
    d["outputs"] = [CompletionOutput(**c) for c in d["outputs"]]
    return RequestOutput(**d)


# -- tensors ----------------------------------------------------------------
def tensors_to_frames(named_tensors) -> tuple[list[list], list]:
    """`(entries, frames)`: `[name, dtype, shape]` per tensor and its bytes as a zero-copy buffer."""
    entries, frames = [], []
    for i, item in enumerate(named_tensors):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"named_tensors[{i}] must be a (name, tensor) pair, got {type(item).__name__}")
        name, tensor = item
        if not isinstance(name, str) or not name:
            raise TypeError(f"named_tensors[{i}]: the name must be a non-empty str, got {name!r}")
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided or tensor.device.type == "meta":
            raise TypeError(f"named_tensors[{i}] ({name!r}): expected a dense torch.Tensor, got {type(tensor).__name__}")
        t = tensor.detach().to("cpu").contiguous()
        entries.append([name, dtype_name(t.dtype), list(t.shape)])
        frames.append(memoryview(t.view(torch.uint8).reshape(-1).numpy()) if t.numel() else b"")
    return entries, frames


def frames_to_tensors(entries, frames) -> list[tuple[str, torch.Tensor]]:
    """Tensors viewing the received frames (no copy); `ValueError` when header and frames disagree."""
    if not isinstance(entries, list) or len(entries) != len(frames):
        raise ValueError(f"update_weights: the header lists {len(entries) if isinstance(entries, list) else '?'} "
                         f"tensors but {len(frames)} tensor frames came with it")
    out = []
    for entry, frame in zip(entries, frames):
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                and isinstance(entry[2], list) and all(isinstance(n, int) and n >= 0 for n in entry[2])):
            raise ValueError(f"update_weights: malformed tensor entry {entry!r:.200}")
        name, dtype, shape = entry[0], parse_dtype(entry[1]), entry[2]
        buf = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
        size = torch.Size(shape).numel() * dtype.itemsize
        if len(buf) != size:
            raise ValueError(f"update_weights: tensor {name!r} {dtype_name(dtype)}{shape} needs {size} bytes, "
                             f"its frame has {len(buf)}")
        flat = torch.frombuffer(buf, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
        out.append((name, flat.view(dtype).view(shape)))
    return out
