"""bf16/fp16 linear layers on CPUs without half-precision matrix units.

There PyTorch's bf16 GEMM falls back to a generic kernel about 10x slower
than its fp32 one. This mode runs each half-precision `F.linear` as an fp32
GEMM on exact fp32 copies of the weights and rounds the result back to the
input dtype: fp32 accumulation of exact products, which is what a native bf16
GEMM does too. Copies are keyed by the weight's version counter, so in-place
weight updates are picked up.

Under the mode, `F.linear(x, weight, bias)` with x: [..., in_features] bf16/fp16, weight:
[out_features, in_features] and bias: [out_features] (x's dtype) returns [..., out_features] in x's
dtype, equal to `F.linear(x.float(), weight.float(), bias.float()).to(x.dtype)`; every other call
(and fp32 inputs) runs unchanged.
"""

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

HALF = (torch.bfloat16, torch.float16)


def needs_fp32_gemm(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `dtype` GEMMs on `device` lack native kernels (a CPU without bf16/fp16 matrix support)."""
    if device.type != "cpu" or dtype not in HALF:
        return False
    if dtype == torch.bfloat16:
        return not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return not torch.ops.mkldnn._is_mkldnn_fp16_supported()


class Fp32Gemm(TorchFunctionMode):
    """A `TorchFunctionMode` (use as a context manager) running half-precision `F.linear` in fp32."""

    def __init__(self):
        super().__init__()
        self._copies: dict[int, tuple[int, int, torch.Tensor]] = {}

    def _fp32(self, t: torch.Tensor) -> torch.Tensor:
        key = id(t)
        hit = self._copies.get(key)
        if hit is None or hit[0] != t._version or hit[1] != t.data_ptr():
            hit = (t._version, t.data_ptr(), t.detach().float())
            self._copies[key] = hit
        return hit[2]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and args[0].dtype in HALF:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            out = F.linear(x.float(), self._fp32(weight), None if bias is None else self._fp32(bias))
            return out.to(x.dtype)
        return func(*args, **kwargs)
