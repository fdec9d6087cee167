"""Fused projections: each layer's q/k/v and gate/up as one GEMM each, on the model's own modules.

The model keeps its separate weights, so weight names, in-place updates and a
trainer's module are untouched. Under `FusedProjections`, the first call of a
group (`q_proj`, `gate_proj`) runs one `F.linear` on a concatenated copy of
the group's weights and returns its own slice; the calls of the rest of the
group that follow on the same input tensor get their slices without a GEMM.
Any other call runs unchanged, so a model whose modules call them otherwise
only loses the fusion.

The fused copies are persistent tensors refreshed in place whenever a member
weight's version counter or storage changed (an in-place `copy_`, an
optimizer step on the trainer's own parameters, a double-buffered swap), checked
on entering the mode, i.e. before every forward; `invalidate()` forces it for
writers that bypass the version counter (`param.data.copy_`).
"""

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _Group:
    """Linear layers on one input, fused as [W_0; W_1; ...] (and their biases)."""

    def __init__(self, linears: list[torch.nn.Linear]):
        self.linears = linears
        self.splits = [m.out_features for m in linears]
        w = linears[0].weight
        with torch.inference_mode(False):  # a normal tensor: it has a version counter (see Fp32Gemm)
            self.weight = torch.empty(sum(self.splits), w.shape[1], dtype=w.dtype, device=w.device)
            self.bias = None if linears[0].bias is None else torch.empty(sum(self.splits), dtype=w.dtype,
                                                                         device=w.device)
        self._stamp = None

    def _members(self) -> list[torch.Tensor]:
        return [m.weight for m in self.linears] + ([m.bias for m in self.linears] if self.bias is not None else [])

    def refresh(self) -> None:
        stamp = [(t._version, t.data_ptr()) for t in self._members()]
        if stamp == self._stamp:
            return
        with torch.no_grad():
            torch.cat([m.weight.detach() for m in self.linears], out=self.weight)
            if self.bias is not None:
                torch.cat([m.bias.detach() for m in self.linears], out=self.bias)
        self._stamp = stamp

    def invalidate(self) -> None:
        self._stamp = None


def _fusable(linears) -> bool:
    if not all(isinstance(m, torch.nn.Linear) for m in linears):
        return False
    w = linears[0].weight
    same = all(m.in_features == w.shape[1] and m.weight.dtype == w.dtype and m.weight.device == w.device
               for m in linears)
    return same and len({m.bias is None for m in linears}) == 1


def find_groups(model: torch.nn.Module) -> list[_Group]:
    groups = []
    for module in model.modules():
        for names in GROUPS:
            linears = [getattr(module, n, None) for n in names]
            if all(m is not None for m in linears) and _fusable(linears):
                groups.append(_Group(linears))
    return groups


class FusedProjections(TorchFunctionMode):
    """A `TorchFunctionMode` (use as a context manager, around a forward) running each group as one GEMM."""

    def __init__(self, groups: list[_Group]):
        super().__init__()
        self.groups = groups
        self._heads = {id(g.linears[0].weight): g for g in groups}
        self._pending: tuple[torch.Tensor, dict] | None = None  # (input, {id(weight): its slice of the output})

    def invalidate(self) -> None:
        for g in self.groups:
            g.invalidate()

    def __enter__(self):
        for g in self.groups:
            g.refresh()
        return super().__enter__()

    def __exit__(self, *exc):
        self._pending = None
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            pending = self._pending
            if pending is not None and pending[0] is x and id(weight) in pending[1]:
                out = pending[1].pop(id(weight))
                if not pending[1]:
                    self._pending = None
                return out
            group = self._heads.get(id(weight))
            if group is not None and group.linears[0].weight is weight:
                parts = F.linear(x, group.weight, group.bias).split(group.splits, dim=-1)
                self._pending = (x, {id(m.weight): p for m, p in zip(group.linears[1:], parts[1:])})
                return parts[0]
        return func(*args, **kwargs)
