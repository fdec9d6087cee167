"""Which implementation of the attention ops (and of the plain sampling step) the engine runs.

Attention: the torch references, the CPU extension or Triton. Sampling: the torch sampler or, for plain
batches, a fused kernel: Triton on a GPU, the CPU extension's on the CPU (`choose_sampling_backend`).

`auto` takes Triton when the model is on a CUDA device, triton is installed and the block size suits the
kernels; on the CPU it takes "cpu" where the C++ extension is built (`cpu_ext`: its KV write and decode
attention, the references for the rest, and the reference decode for what the extension does not cover, e.g. float64);
otherwise the torch references. The Triton modules are imported only once chosen, so a CPU machine
imports nothing of them.
"""

from dataclasses import dataclass
import importlib.util
import os
from typing import Callable

import torch

BACKENDS = ("auto", "torch", "triton")


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """Whether Triton kernels run on the CPU under `TRITON_INTERPRET=1` (slow: for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_block_size_ok(block_size: int) -> bool:
    """The kernels walk one KV block per tile: a power of two, at least the 16 `tl.dot` needs on a GPU."""
    return block_size >= 16 and block_size & (block_size - 1) == 0


def choose_attention_backend(requested: str, device: torch.device | str, block_size: int) -> str:
    """"torch" or "triton" for `EngineConfig.attention_backend=requested` with the model on `device`.

    A forced "triton" that cannot run raises ValueError saying why.
    """
    device = torch.device(device)
    if requested == "auto":
        if device.type == "cuda" and triton_installed() and triton_block_size_ok(block_size):
            return "triton"
        from . import cpu_ext

        return "cpu" if device.type == "cpu" and cpu_ext.extension() is not None else "torch"
    if requested == "triton":
        _check_triton_runs("attention_backend", device)
        if not triton_block_size_ok(block_size):
            raise ValueError(f"attention_backend='triton' needs block_size to be a power of two >= 16, "
                             f"got {block_size}")
    return requested


@dataclass(frozen=True)
class AttentionOps:
    """The three ops the paged attention function calls, with the contracts of the torch references."""

    write_kv: Callable
    decode: Callable
    prefill: Callable


def attention_ops(backend: str) -> AttentionOps:
    """The ops of a chosen backend ("torch", "cpu" or "triton")."""
    if backend == "triton":
        from . import triton_decode_attention, triton_kv_write, triton_prefill_attention

        return AttentionOps(triton_kv_write.write_kv, triton_decode_attention.paged_decode_attention,
                            triton_prefill_attention.paged_prefill_attention)
    from . import cpu_ext, decode_attention, kv_write, prefill_attention

    if backend == "cpu":
        return AttentionOps(cpu_ext.write_kv_or_reference, cpu_ext.decode_or_reference,
                            prefill_attention.paged_prefill_attention)
    return AttentionOps(kv_write.write_kv, decode_attention.paged_decode_attention,
                        prefill_attention.paged_prefill_attention)


def choose_sampling_backend(requested: str, device: torch.device | str) -> str:
    """"torch", "triton" or "cpu" for `EngineConfig.sampling_backend=requested` with the logits on `device`.

    `auto` takes the fused Triton kernel on a CUDA device with triton installed, the C++ one (`cpu_ext.sample`)
    on the CPU where the extension is built, else torch. A forced "triton" or "cpu" that cannot run raises
    ValueError saying why (on the CPU Triton runs only under `TRITON_INTERPRET=1`).
    """
    device = torch.device(device)
    from . import cpu_ext

    if requested == "auto":
        if device.type == "cuda" and triton_installed():
            return "triton"
        return "cpu" if device.type == "cpu" and cpu_ext.extension() is not None else "torch"
    if requested == "triton":
        _check_triton_runs("sampling_backend", device)
    if requested == "cpu":
        if device.type != "cpu":
            raise ValueError(f"sampling_backend='cpu' needs the model on the CPU (it is on {device})")
        if cpu_ext.extension() is None:
            raise ValueError("sampling_backend='cpu' needs the C++ CPU extension: make install "
                             "(python -m rollserve.kernels.cpu_ext), and ROLLSERVE_CPU_KERNELS not 0")
    return requested


def _check_triton_runs(field: str, device: torch.device) -> None:
    """Raises ValueError, naming `field`, when a forced Triton kernel cannot run on `device`."""
    if not triton_installed():
        raise ValueError(f"{field}='triton' needs the triton package: pip install 'rollserve[triton]'")
    if device.type != "cuda" and not triton_interpreting():
        raise ValueError(f"{field}='triton' needs the model on a CUDA device (it is on {device}); "
                         f"on the CPU the Triton kernels run only under TRITON_INTERPRET=1, for tests")


def sampling_kernel(backend: str) -> Callable | None:
    """The fused `sample` of `kernels.sampling`'s contract for the "triton" and "cpu" backends; None for "torch"."""
    if backend == "triton":
        from . import triton_sampling

        return triton_sampling.sample
    if backend == "cpu":
        from . import cpu_ext

        return cpu_ext.sample
    return None
