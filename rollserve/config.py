"""The engine arguments, defined once.

`EngineConfig` is what `LLM(...)` takes as keywords, what `RollserveConfig` (TRL) extends, and what
the `rollserve serve` / `rollserve generate` options are generated from (`add_engine_arguments`,
`engine_args_from`): same names, same units, same checks everywhere. Nothing here imports torch,
so the command line parses and refuses arguments before the engine loads.
"""

import argparse
from dataclasses import dataclass, field, fields
from fractions import Fraction
import re
import sys

_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"\s*(\d+\.?\d*|\.\d+)\s*([a-zA-Z]*)\s*")
_SIZE_FORMAT = ("bytes (an int) or a number and a unit, e.g. '2GiB', '512MiB', '1.5GB' "
                "(units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")


def parse_size(size: int | str) -> int:
    """Bytes from an int (bytes) or a string such as `"2GiB"`, `"512MiB"`, `"1.5GB"`, `"4096"`.

    KiB/MiB/GiB/TiB are powers of 1024, KB/MB/GB/TB powers of 1000; units are case-insensitive.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    match = _SIZE.fullmatch(size) if isinstance(size, str) else None
    unit = _SIZE_UNITS.get(match[2].upper() or "B") if match else None
    if unit is None:
        raise ValueError(f"{size!r} is not a size: give {_SIZE_FORMAT}")
    return int(Fraction(match[1]) * unit)


def _dtype(dtype):
    """`dtype` itself if it is `"auto"`, a dtype name (`"bf16"`, `"float32"`, ...) or a floating `torch.dtype`."""
    if isinstance(dtype, str) and (dtype == "auto" or dtype.lower() in _DTYPES):
        return dtype
    torch = sys.modules.get("torch")  # a torch.dtype exists only once torch is imported
    if torch is not None and isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    raise ValueError(f"must be 'auto', one of {sorted(_DTYPES)} or a floating torch.dtype")


def dtype_name(dtype: str) -> str | None:
    """The canonical name of a checked dtype string (`"bf16"` -> `"bfloat16"`); `"auto"` -> None."""
    return None if dtype == "auto" else _DTYPES[dtype.lower()]


def resolve_dtype(dtype):
    """A checked dtype (`EngineConfig.dtype`) as a `torch.dtype`; `"auto"` -> None (keep the model's)."""
    import torch

    if isinstance(dtype, str):
        return None if dtype == "auto" else getattr(torch, _DTYPES[dtype.lower()])
    return dtype


def _size(value):
    try:
        size = parse_size(value)
    except ValueError:
        raise ValueError(f"must be {_SIZE_FORMAT}") from None
    if size < 1:
        raise ValueError("must be at least 1 byte")
    return size


def _int(low: int, optional: bool = False):
    def check(value):
        if value is None and optional:
            return value
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"must be {'None or ' if optional else ''}an int >= {low}")
        return value
    return check


def _bool(value):
    if not isinstance(value, bool):
        raise ValueError("must be True or False")
    return value


def _bool_or_auto(value):
    if value is not None and not isinstance(value, bool):
        raise ValueError("must be None (auto), True or False")
    return value


def _choice(*allowed: str):
    def check(value):
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(repr(a) for a in allowed)}")
        return value
    return check


def _arg(default, help: str, check, **extra):
    return field(default=default, metadata={"help": help, "check": check, **extra})


@dataclass
class EngineConfig:
    """The engine's arguments: `LLM(model, tokenizer, **fields)`; `rollserve serve/generate --field-name`.

    Every field is checked at construction; a bad value raises `ValueError` naming the field,
    the value and what is allowed. `kv_cache_memory` is held in bytes once constructed.
    """

    dtype: "str | torch.dtype" = _arg(
        "auto", "dtype of the weights (and of the KV cache, unless kv_cache_dtype says otherwise): 'auto' (the "
                "model's own), bf16, fp16 or fp32 (also bfloat16, float16, half, float32, float, or a floating "
                "torch.dtype)", _dtype)
    kv_cache_dtype: "str | torch.dtype" = _arg(
        "auto", "dtype of the KV cache: 'auto' (the weights' dtype), or bf16/fp16 under fp32 weights: half the "
                "cache's memory and the bytes decode attention reads, at the cost of rounding each token's K/V "
                "to 16 bits (logprobs then differ from an fp32 trainer's by that rounding; on the CPU, not with "
                "attention_backend='triton')", _dtype)
    block_size: int = _arg(16, "tokens per paged KV block", _int(1))
    kv_cache_memory: int | str = _arg("2GiB", "memory given to the paged KV cache: bytes, or a size such as "
                                              "2GiB, 512MiB, 1.5GB", _size)
    max_num_seqs: int = _arg(256, "sequences decoded together at most", _int(1))
    max_num_batched_tokens: int = _arg(2048, "tokens (decodes and prefill chunks) in one forward pass at most",
                                       _int(1))
    enable_prefix_caching: bool = _arg(True, "reuse the KV blocks of identical prompt prefixes across requests",
                                       _bool, flag="--no-prefix-caching")
    max_model_len: int | None = _arg(None, "longest prompt + completion in tokens (default: the model's "
                                           "max_position_embeddings)", _int(2, optional=True))
    seed: int = _arg(0, "seeds the sampling of requests that bring no seed of their own", _int(0))
    double_buffer_weights: bool = _arg(
        False, "update_weights writes and checks new weights in a second copy while generation goes on, then "
               "swaps it in between two steps (one more copy of the weights in memory; off: the update is "
               "checked, then copied in between two steps)", _bool)

    attention_backend: str = _arg(
        "auto", "attention kernels: 'auto' (Triton when the model is on a CUDA device, triton is installed and "
                "block_size is a power of two >= 16; on the CPU the C++ decode kernel where `make install` built it; "
                "else the torch references), 'torch' or 'triton'",
        _choice("auto", "torch", "triton"))
    sampling_backend: str = _arg(
        "auto", "sampling of plain batches (no penalties, filters or top logprobs: the RL rollout case): 'auto' "
                "(the fused Triton kernel when the model is on a CUDA device and triton is installed; on the CPU "
                "the C++ one where `make install` built it; else torch), 'torch', 'triton' or 'cpu'. The fused "
                "kernels' logprob is z[tok] - logsumexp(z) within ~1e-6 of the trainer's log_softmax, as the torch "
                "plain path is; other batches always take the torch path",
        _choice("auto", "torch", "triton", "cpu"))
    cuda_graphs: bool | None = _arg(
        None, "replay decode steps as CUDA graphs captured per padded batch size (fewer kernel launches; "
              "prefill steps run eagerly): None/auto = on when the model is on a CUDA device and the Triton "
              "attention kernels run, True to require it, False off (never on the CPU)",
        _bool_or_auto, flag="--cuda-graphs")

    def __post_init__(self) -> None:
        for f in fields(self):
            if "check" in f.metadata:  # the engine's fields; a subclass (RollserveConfig) checks its own
                setattr(self, f.name, _checked(f"{type(self).__name__}.{f.name}", f, getattr(self, f.name)))


def _checked(label: str, f, value):
    try:
        return f.metadata["check"](value)
    except ValueError as e:
        raise ValueError(f"{label}={value!r} is invalid: {e}") from None


def add_engine_arguments(parser) -> None:
    """One option per `EngineConfig` field on `parser` (or an argument group): `--kv-cache-memory 2GiB`, ...

    A bool field is a flag: `--field-name` when it is off by default, the field's `flag` (such as
    `--no-prefix-caching`) when on; a bool that defaults to None (auto) has both `--flag` and
    `--no-flag`. Values are checked as they are parsed, so a bad one is an argparse error naming
    the option.
    """
    for f in fields(EngineConfig):
        if f.default is True:
            parser.add_argument(f.metadata["flag"], dest=f.name, action="store_false",
                                help=f"sets {f.name}=False (on by default: {f.metadata['help']})")
        elif f.metadata["check"] is _bool_or_auto:
            parser.add_argument(f.metadata["flag"], dest=f.name, action=argparse.BooleanOptionalAction,
                                default=None, help=f"{f.metadata['help']} (default: auto)")
        elif f.default is False:
            parser.add_argument("--" + f.name.replace("_", "-"), action="store_true", help=f.metadata["help"])
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), type=_argument_type(f), default=f.default,
                                help=f.metadata["help"])


def _argument_type(f):
    def convert(text: str):
        try:
            value = int(text)
        except ValueError:
            value = text
        try:
            return _checked(f.name, f, value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return convert


def engine_args_from(namespace: argparse.Namespace) -> EngineConfig:
    """The `EngineConfig` of a namespace parsed by a parser that `add_engine_arguments` filled."""
    return EngineConfig(**{f.name: getattr(namespace, f.name) for f in fields(EngineConfig)})
