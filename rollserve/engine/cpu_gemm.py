"""Linear layers on the CPU, routed through faster GEMM shapes during engine forwards.

- On CPUs without half-precision matrix units, PyTorch's bf16 GEMM falls back
  to a generic kernel about 10x slower than its fp32 one. Half-precision
  `F.linear` then runs as an fp32 GEMM on exact fp32 copies of the weights,
  rounded back to the input dtype: fp32 accumulation of exact products, which
  is what a native bf16 GEMM does too. Copies are keyed by the weight's
  version counter, so in-place weight updates are picked up.
- Very wide outputs (the LM head) are computed a column slice at a time:
  each slice's weights and outputs stay in cache, measured ~1.5x faster for
  576 -> 49152 at 256 rows. Every output element is still one dot product.
"""

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

HALF = (torch.bfloat16, torch.float16)
WIDE_OUTPUT = 16384
COLUMN_SLICE = 1024


def needs_fp32_gemm(dtype: torch.dtype, device: torch.device) -> bool:
    if device.type != "cpu" or dtype not in HALF:
        return False
    if dtype == torch.bfloat16:
        return not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return not torch.ops.mkldnn._is_mkldnn_fp16_supported()


def _sliced_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    out = rows.new_empty(rows.shape[0], weight.shape[0])  # [rows, out_features]
    for s in range(0, weight.shape[0], COLUMN_SLICE):
        out[:, s:s + COLUMN_SLICE] = torch.mm(rows, weight[s:s + COLUMN_SLICE].t())
    return out.view(*x.shape[:-1], weight.shape[0])


class CpuGemm(TorchFunctionMode):
    def __init__(self, upcast_half: bool):
        super().__init__()
        self.upcast_half = upcast_half
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
        if func is not F.linear or args[0].device.type != "cpu":
            return func(*args, **kwargs)
        x, weight = args[0], args[1]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        dtype = x.dtype
        if self.upcast_half and dtype in HALF:
            x, weight = x.float(), self._fp32(weight)
            bias = None if bias is None else self._fp32(bias)
        if weight.shape[0] >= WIDE_OUTPUT and x.dtype == weight.dtype:
            out = _sliced_linear(x, weight)
            if bias is not None:
                out += bias
        else:
            out = F.linear(x, weight, bias)
        return out.to(dtype)
