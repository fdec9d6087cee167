"""The engine server's messages: msgspec Structs of two tagged unions (`type`), tensors as separate frames.

A message is a list of ZMQ frames: one msgpack header (a `Request` from a
client, a reply from the server), then, for `UpdateWeights` only, the raw
bytes of each tensor (one frame per tensor, described in the header by a
`TensorEntry`). Every reply carries the `id` of the request it answers; a
request whose answer comes later (`Generate`, `Pause`) is first acknowledged
with `Accepted`. A failure is an `Error` (the one error codec of
`weight_sync/wire.py`). Never pickle.
"""

import dataclasses
from typing import Annotated, Any

import msgspec
import torch

from ..outputs import BeamSearchOutput, BeamSearchSequence, CompletionOutput, RequestOutput
from ..sampling_params import BeamSearchParams, SamplingParams
from ..weight_sync.wire import Failure, MessageCodec, dtype_name, parse_dtype

MessageId = int | str | None


# -- requests (client -> server) ------------------------------------------------------------------
class Request(msgspec.Struct, tag_field="type", kw_only=True):
    id: MessageId = None
    api_key: str | None = None


class Hello(Request, tag="hello"):
    pass


class Ping(Request, tag="ping"):
    pass


class Health(Request, tag="health"):
    pass


class Stats(Request, tag="stats"):
    pass


class Generate(Request, tag="generate"):
    """`prompts` (strings, token id lists) or `conversations` (lists of chat messages), checked by the server."""

    prompts: list[Any] | None = None
    conversations: list[Any] | None = None
    params: dict[str, Any] | list[dict[str, Any]] | None = None  # per prompt, or one for all
    stream: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class Abort(Request, tag="abort"):
    target: MessageId = None  # the id of the Generate to stop


class TensorEntry(msgspec.Struct, array_like=True):
    """One tensor frame: `[name, dtype, shape]` on the wire."""

    name: str
    dtype: str
    shape: list[Annotated[int, msgspec.Meta(ge=0)]]


class UpdateWeights(Request, tag="update_weights"):
    tensors: list[TensorEntry] = []
    version: int | None = None
    require_all: bool = False


class InitWeightGroup(Request, tag="init_weight_group"):
    init_method: str | None = None
    rank: int = 1
    world_size: int = 2
    timeout_s: float = 1800.0
    connect_timeout_s: float = 60.0


class CloseWeightGroup(Request, tag="close_weight_group"):
    pass


class TokenizerFiles(Request, tag="tokenizer_files"):
    pass


class WeightVersion(Request, tag="weight_version"):
    pass


class WeightsFingerprint(Request, tag="weights_fingerprint"):
    pass


class ResetPrefixCache(Request, tag="reset_prefix_cache"):
    pass


class Pause(Request, tag="pause"):
    mode: str = "wait"


class Resume(Request, tag="resume"):
    pass


class Sleep(Request, tag="sleep"):
    level: int = 1


class WakeUp(Request, tag="wake_up"):
    pass


# -- replies (server -> client) -------------------------------------------------------------------
class Reply(msgspec.Struct, tag_field="type", kw_only=True):
    id: MessageId = None


class Accepted(Reply, tag="accepted"):
    server_id: str


class Delta(Reply, tag="delta"):
    """What is new for prompt `index`: one `CompletionOutput`-shaped map per sample (see `jobs.py`)."""

    index: int
    outputs: list[dict[str, Any]]
    finished: bool = False
    output: dict[str, Any] | None = None  # the whole output, on the last one (`output_to_dict`)
    weight_version: int = 0  # the version of this delta's first token


class Done(Reply, tag="done"):
    """Every prompt of a streamed Generate finished."""


class Result(Reply, tag="result"):
    outputs: list[dict[str, Any]]  # one `output_to_dict` per prompt, in order


class Error(Failure, tag_field="type", tag="error", kw_only=True):
    id: MessageId = None


class Info(Reply, tag="info"):
    server_id: str
    protocol: int
    zmq: str
    http: str | None
    weights: str
    shm_prefix: str
    hostname: str
    model: str
    max_model_len: int
    weight_version: int
    pid: int
    tokenizer: str | None
    max_request_bytes: int
    max_update_bytes: int
    weight_group: dict[str, Any] | None


class Pong(Reply, tag="pong"):
    server_id: str


class HealthReport(Reply, tag="health"):
    status: str
    server_id: str
    paused: bool
    asleep: bool
    weight_version: int
    weight_group: dict[str, Any] | None


class StatsReport(Reply, tag="stats"):
    stats: dict[str, Any]


class Aborted(Reply, tag="aborted"):
    aborted: bool


class Version(Reply, tag="version"):
    version: int


class WeightGroupState(Reply, tag="weight_group"):
    weight_group: dict[str, Any] | None


class Files(Reply, tag="files"):
    files: dict[str, bytes]


class Fingerprint(Reply, tag="fingerprint"):
    fingerprint: str


class Ok(Reply, tag="ok"):
    pass


REQUESTS = MessageCodec("message", Hello, Ping, Health, Stats, Generate, Abort, UpdateWeights, InitWeightGroup,
                        CloseWeightGroup, TokenizerFiles, WeightVersion, WeightsFingerprint, ResetPrefixCache, Pause,
                        Resume, Sleep, WakeUp)
REPLIES = MessageCodec("reply", Accepted, Delta, Done, Result, Error, Info, Pong, HealthReport, StatsReport, Aborted,
                       Version, WeightGroupState, Files, Fingerprint, Ok)


class _Envelope(msgspec.Struct):
    id: MessageId = None


def message_id(raw) -> MessageId:
    """The `id` of a header that did not decode, so that its error reply still reaches the caller."""
    try:
        return msgspec.msgpack.decode(raw, type=_Envelope).id
    except msgspec.DecodeError:
        return None


def fields(reply: Reply) -> dict:
    """A reply's fields as a map, without its `id` (what `RemoteLLM.info()` / `health()` return)."""
    out = msgspec.structs.asdict(reply)
    del out["id"]
    return out


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
def tensors_to_frames(named_tensors) -> tuple[list[TensorEntry], list]:
    """`(entries, frames)`: a `TensorEntry` per tensor and its bytes as a zero-copy buffer."""
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
        entries.append(TensorEntry(name, dtype_name(t.dtype), list(t.shape)))
        frames.append(memoryview(t.view(torch.uint8).reshape(-1).numpy()) if t.numel() else b"")
    return entries, frames


def frames_to_tensors(entries: list[TensorEntry], frames) -> list[tuple[str, torch.Tensor]]:
    """Tensors viewing the received frames (no copy); `ValueError` when header and frames disagree."""
    if len(entries) != len(frames):
        raise ValueError(f"update_weights: the header lists {len(entries)} tensors but {len(frames)} tensor "
                         f"frames came with it")
    out = []
    for entry, frame in zip(entries, frames):
        dtype = parse_dtype(entry.dtype)
        buf = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
        size = torch.Size(entry.shape).numel() * dtype.itemsize
        if len(buf) != size:
            raise ValueError(f"update_weights: tensor {entry.name!r} {entry.dtype}{entry.shape} needs {size} bytes, "
                             f"its frame has {len(buf)}")
        flat = torch.frombuffer(buf, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
        out.append((entry.name, flat.view(dtype).view(entry.shape)))
    return out
