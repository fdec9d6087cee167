"""The engine's CPU linear layers: GEMMs on prepacked weights; half precision in fp32 where it is slow.

On AVX2 CPUs without AVX-512 (where the C++ extension is built), fp32 GEMMs run
the extension's own packed GEMM (`csrc/gemm.cpp`): weights packed once into
panels of 16 output columns, one 6x16 register tile over the whole K, the next
panel prefetched while this one computes, so the weights stream from DRAM
under the arithmetic. On the AVX2 EPYC it does a 64-row decode step's linear
layers in ~110-120 ms where oneDNN's prepacked GEMM takes ~140-150 (1.1-2x at
8-256 rows, the most at the smallest; figures in benchmarks/RESULTS.md). Each
output is one FMA chain over k in order, so a row's result does not depend on
its batch. (Not used on AVX-512 CPUs, where oneDNN runs 16-wide FMAs.)
`ROLLSERVE_CPU_GEMM=onednn` selects oneDNN instead.

Elsewhere, oneDNN's GEMM on a weight reordered once into its blocked layout
(`mkldnn._reorder_linear_weight`, what inductor's weight prepacking uses)
beats `F.linear` (MKL sgemm) at every shape of the engine on the machines
measured, AVX-512 and AVX2 alike, by 1.1-1.7x (the LM head most). One packed
copy serves every batch size. Either's fp32 results differ from MKL's by the
order of the fp32 accumulation (~1e-5).

On a CPU without bf16/fp16 matrix support PyTorch's half-precision GEMM is
about 10x slower than fp32. There half-precision layers run as fp32 GEMMs on
exact fp32 copies of the weights and the result is rounded back to the input
dtype: fp32 accumulation of exact products, which is what a native bf16 GEMM
does too. Where bf16 is native, bf16 layers are packed as bf16.

Every derived copy (packed, fp32 or both) is keyed by its weight and stamped
with the weight's version counter and storage, so in-place updates (`copy_`,
an optimizer step on a trainer's own parameters, a double-buffered swap) are
seen by the next call; `invalidate()` drops them for writers that bypass the
version counter (`param.data.copy_`).

Under the mode, `F.linear(x, weight, bias)` with x: [..., in_features] and weight: [out_features,
in_features] of x's dtype on the CPU returns [..., out_features] in x's dtype; every other call
(other devices, mixed dtypes, calls that autograd records) runs unchanged.
"""

from contextlib import contextmanager
from functools import partial
import os
import weakref

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

HALF = (torch.bfloat16, torch.float16)


def needs_fp32_gemm(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `dtype` GEMMs on `device` lack fast native kernels (a CPU without bf16/fp16 matrix support).

    oneDNN also runs bf16 on AVX-512 CPUs without avx512_bf16, by conversion: measured there (emulated
    with ONEDNN_MAX_CPU_ISA=AVX512_CORE) 2.3-2.7x slower than the fp32 GEMM, so only avx512_bf16 or AMX
    count as native.
    """
    if device.type != "cpu" or dtype not in HALF:
        return False
    if dtype == torch.bfloat16:
        fast = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return not (fast and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return not torch.ops.mkldnn._is_mkldnn_fp16_supported()


def _packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN's packed GEMM runs `dtype` fast here (fp32 everywhere it is built; bf16 where native)."""
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and not needs_fp32_gemm(dtype, torch.device("cpu")))


def _extension_gemm():
    """The C++ extension when it has the packed fp32 GEMM and it is not turned off, else None."""
    if os.environ.get("ROLLSERVE_CPU_GEMM", "") == "onednn":
        return None
    from .cpu_ext import extension

    ext = extension()
    return ext if ext is not None and ext.packed_gemm_available() else None


def gemm_kernel(dtype: torch.dtype) -> str | None:
    """The packed GEMM `dtype` runs on here: "rollserve" (the extension's, fp32), "onednn", or None (`F.linear`)."""
    if dtype == torch.float32 and _extension_gemm() is not None:
        return "rollserve"
    return "onednn" if _packs(dtype) else None


class CpuGemm(TorchFunctionMode):
    """A `TorchFunctionMode` (use as a context manager) running the CPU's `F.linear` calls as described above."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.compute = torch.float32 if needs_fp32_gemm(dtype, torch.device("cpu")) else dtype
        self.kernel = gemm_kernel(self.compute)
        self._ext = _extension_gemm() if self.kernel == "rollserve" else None
        self.packed = self.kernel is not None
        # ((id(weight), ...), packed?) -> (weakrefs to them, their (version, data_ptr)s, derived copy): the
        # weakrefs tell a reused id apart
        self._copies: dict[tuple[tuple[int, ...], bool],
                           tuple[tuple[weakref.ref, ...], tuple[tuple[int, int], ...], torch.Tensor]] = {}

    @classmethod
    def for_model(cls, dtype: torch.dtype, device: torch.device) -> "CpuGemm | None":
        """The mode for a model of `dtype` on `device`, or None where it would run every call unchanged."""
        if device.type != "cpu":
            return None
        mode = cls(dtype)
        return mode if mode.packed or mode.compute != dtype else None

    def invalidate(self) -> None:
        self._copies.clear()

    def _derived(self, ts: tuple[torch.Tensor, ...], pack: bool) -> torch.Tensor:
        """The compute-dtype copy of `ts` concatenated along dim 0 (packed if `pack`), rebuilt when any changed."""
        key, stamp = (tuple(id(t) for t in ts), pack), tuple((t._version, t.data_ptr()) for t in ts)
        hit = self._copies.get(key)
        if hit is None or hit[1] != stamp or any(ref() is not t for ref, t in zip(hit[0], ts)):
            copy = (ts[0] if len(ts) == 1 else torch.cat(ts)).detach().to(self.compute)
            if pack and self._ext is not None:
                copy = self._ext.pack_gemm_weight(copy)
            elif pack:
                copy = torch.ops.mkldnn._reorder_linear_weight(copy, None)
            hit = (tuple(weakref.ref(t) for t in ts), stamp, copy)
            self._copies[key] = hit
        return hit[2]

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """`F.linear(x, weight, bias)` as described above, or None for a call that runs unchanged."""
        return self.linear_cat(x, (weight,), None if bias is None else (bias,))

    def linear_cat(self, x: torch.Tensor, weights: tuple[torch.Tensor, ...],
                   biases: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor | None:
        """`F.linear(x, cat(weights), cat(biases))`: several projections of one input as one GEMM.

        The concatenated (packed) copy is derived and refreshed like a single weight's. Returns None for a
        call that `linear` would run unchanged; the caller then runs the projections one by one.
        """
        weight = weights[0]
        if not (x.dtype == self.dtype and weight.device.type == "cpu"
                and all(w.dtype == self.dtype and w.dim() == 2 and w.device == weight.device for w in weights)):
            return None
        if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
            return None  # autograd records it: the derived copies are detached and the packed op has no gradient
        pack = self.packed
        if not (pack or self.compute != self.dtype):
            return None
        w = self._derived(tuple(weights), pack)
        b = None
        if biases is not None:
            b = biases[0] if len(biases) == 1 and biases[0].dtype == self.compute else self._derived(tuple(biases),
                                                                                                      False)
        xc = x.to(self.compute)
        if pack and self._ext is not None:
            n = sum(t.shape[0] for t in weights)
            if b is not None and not b.is_contiguous():
                b = b.contiguous()
            # a half-precision layer's fp32 sums are rounded to its dtype in the kernel's store (what
            # `.to(x.dtype)` does, without the extra pass over the output)
            out = self._ext.packed_linear(xc.reshape(-1, xc.shape[-1]), w, n, b, x.dtype)
            return out.view(*xc.shape[:-1], n)
        elif pack:
            out = torch.ops.mkldnn._linear_pointwise(xc, w, b, "none", [], "")
        else:
            out = F.linear(xc, w, b)
        return out.to(x.dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            out = self.linear(args[0], args[1], args[2] if len(args) > 2 else kwargs.get("bias"))
            if out is not None:
                return out
        return func(*args, **kwargs)

    @contextmanager
    def on_linear_modules(self, model: torch.nn.Module):
        """Within the context, `model`'s `nn.Linear` modules run through `linear`: what the engine uses.

        The mode itself costs a Python call on every torch call of the forward (thousands per step); bound
        to the modules it costs that only on theirs. Measured interleaved in one process, 64-row decode steps:
        177-193 ms bound to the modules, 180-219 ms under the mode. Modules with their own forward
        (subclasses, quantized layers) are left alone.
        """
        linears = [m for m in model.modules() if type(m).forward is torch.nn.Linear.forward]
        for m in linears:
            m.forward = partial(self._module_forward, m)
        try:
            yield
        finally:
            for m in linears:
                m.__dict__.pop("forward", None)

    def _module_forward(self, module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x, module.weight, module.bias)
        return F.linear(x, module.weight, module.bias) if out is None else out
