"""A lean CPU forward for Llama-family decoders, on the HF module's own submodules and parameters.

Beyond its GEMMs and attention, the HF forward of a 30-layer model cost ~25-45 ms per engine step on these
2-core CPUs: decorators and keyword plumbing, a causal mask the paged attention never reads, layout
transposes, seven GEMM calls per layer, and five to seven small torch ops for each norm and rotary
embedding, each a pass over activations that the other core's GEMM threads just wrote. This forward runs the
same arithmetic with less around it, and its logits are bit-equal to the HF forward's (tests/engine/
test_lean_forward.py):

- q/k/v and gate/up each as one GEMM on a concatenated packed copy (`CpuGemm.linear_cat`: refreshed from
  every weight's version counter like each packed copy, so in-place updates are seen by the next step;
  bit-equal to the separate GEMMs on oneDNN);
- residual add + RMSNorm and the rotary embedding in one C++ pass each (`kernels/csrc/layer_ops.cpp`,
  rounding where HF's ops round; the norm's sum of squares in torch's own summation order, checked once per
  width against torch's ops), where the extension is built; HF's modules and ops otherwise;
- the embedding, rotary embedding, activation and any linear that is not a plain `nn.Linear` (LoRA) are
  the model's own modules, called directly; attention is `attention.paged_attention` on [T, H, D] tensors.

It runs where it reproduces the model's own computation: an architecture of `families()` whose classes'
forwards are not patched since import, on the CPU, with no hook or instance forward on the modules whose
forward it stands in for (`LeanForward.applies`, checked at every step); anything else takes the HF forward.
On a GPU the HF forward runs (CUDA graphs take the per-step Python away there).
`ROLLSERVE_LEAN_FORWARD=0` turns it off (the HF forward every step, e.g. to compare the two).
"""

from dataclasses import dataclass
from functools import lru_cache
import importlib
import os
from typing import Callable

import torch
from torch import nn

from ..kernels import cpu_ext
from ..kernels.cpu_gemm import CpuGemm
from .attention import PagedAttentionMetadata, paged_attention


@dataclass(frozen=True)
class Family:
    """The classes of one architecture whose forwards `LeanForward` reproduces, as they were at import."""

    decoder: type
    attention: type
    mlp: type
    norm: type
    forwards: tuple  # (class, its forward) for the model, its base model, decoder layer, attention, MLP, norm
    sliding_window: Callable  # attention module -> its window or None, as its forward passes it


def _layer_window(attn):
    return attn.sliding_window


def _config_window(attn):
    return getattr(attn.config, "sliding_window", None)


def _no_window(attn):
    return None


# module name, class prefix, where its attention's forward reads the sliding window from
_ARCHS = (("llama", "Llama", _no_window), ("qwen2", "Qwen2", _layer_window), ("qwen3", "Qwen3", _layer_window),
          ("mistral", "Mistral", _config_window))


@lru_cache(maxsize=1)
def families() -> dict[type, Family]:
    """CausalLM class -> its `Family`, for the architectures of `_ARCHS` this transformers has."""
    out = {}
    for module, prefix, window in _ARCHS:
        try:
            m = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
        except ImportError:
            continue
        classes = [getattr(m, prefix + suffix, None)
                   for suffix in ("ForCausalLM", "Model", "DecoderLayer", "Attention", "MLP", "RMSNorm")]
        if None in classes:
            continue
        out[classes[0]] = Family(decoder=classes[2], attention=classes[3], mlp=classes[4], norm=classes[5],
                                 forwards=tuple((c, c.forward) for c in classes), sliding_window=window)
    return out


def _own_forward(m: nn.Module) -> bool:
    """Whether `m` runs its class's forward: no instance forward, or one that only binds the class's again
    (as TRL's trainer leaves on the model it trains)."""
    f = m.__dict__.get("forward")
    return f is None or getattr(f, "__func__", None) is type(m).forward and getattr(f, "__self__", None) is m


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _bare(m: nn.Module) -> bool:
    """Its class's forward and no hooks: what the lean forward may compute in its stead."""
    return _own_forward(m) and not _hooked(m)


def _plain_linear(m) -> bool:
    return type(m) is nn.Linear and _bare(m)


# The float vector width of torch's CPU sum kernel, whose order of additions the C++ RMSNorm follows (8 on
# x86 under both AVX2 and AVX512 dispatch, measured); `_norm_kernel_matches` checks it on the model's width.
_SUM_LANES = 8


def _norm_sums_rows_whole(x: torch.Tensor) -> bool:
    """Whether torch sums each row of x in one piece (it splits the rows of a large reduction with fewer rows
    than threads across them, in another order)."""
    return x.shape[0] >= torch.get_num_threads() or x.numel() < 32768


@lru_cache(maxsize=None)
def _norm_check(ext, width: int, dtype: torch.dtype, eps: float) -> bool:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, width, generator=g) * torch.rand(64, 1, generator=g) * 8).to(dtype)
    r = torch.randn(64, width, generator=g).to(dtype)
    w = (torch.rand(width, generator=g) + 0.5).to(dtype)
    s = x + r
    s32 = s.to(torch.float32)
    ref = w * (s32 * torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)  # LlamaRMSNorm.forward
    got_s, got = ext.add_rms_norm(x, r, w, eps, _SUM_LANES)
    return torch.equal(got_s, s) and torch.equal(got, ref)


def _norm_kernel_matches(ext, norm: nn.Module) -> bool:
    """Whether the C++ RMSNorm is bit-equal to torch's ops here, on random rows of the model's width."""
    return _norm_check(ext, norm.weight.shape[0], norm.weight.dtype, float(norm.variance_epsilon))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LeanForward:
    """`self(input_ids, positions, meta, logits_to_keep)` -> logits, for a model `applies` accepts."""

    def __init__(self, model: nn.Module, gemm: CpuGemm | None):
        self.model = model
        self.gemm = gemm
        self.family = families()[type(model)]
        dtype = next(model.parameters()).dtype
        # the C++ residual-add + RMSNorm and rotary kernels (kernels/csrc/layer_ops.cpp), where built
        self.ext = cpu_ext.extension() if dtype in cpu_ext.DTYPES else None

    @classmethod
    def for_model(cls, model: nn.Module, gemm: CpuGemm | None) -> "LeanForward | None":
        """The lean forward for `model`, or None for an architecture or device it does not cover."""
        if (os.environ.get("ROLLSERVE_LEAN_FORWARD", "1") == "0" or type(model) not in families()
                or next(model.parameters()).device.type != "cpu"):
            return None
        return cls(model, gemm)

    def applies(self) -> bool:
        """Whether this step can take the lean forward: the classes it reproduces, unpatched and without hooks.

        The modules whose forward it reproduces are the model, its base model and each layer's decoder,
        attention and MLP; a hook on one of them (DeepSpeed ZeRO-3's parameter gathering, a user's) or their
        own instance forward sends the step to the HF module. The top-level model's instance forward is the
        exception: the engine never calls it (the HF path neither needs nor wants a trainer's wrapper of it:
        TRL's fused-LM-head forward, accelerate's output casting). The leaves it calls (embedding, rotary
        embedding, activation, norms and linears with hooks or their own forward) run as modules, hooks and all.
        """
        fam, model = self.family, self.model
        if any(c.forward is not f for c, f in fam.forwards):  # patched since import (e.g. a kernel library)
            return False
        if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return False
        base = getattr(model, "model", None)
        if type(base) is not fam.forwards[1][0] or not isinstance(getattr(model, "lm_head", None), nn.Module):
            return False
        layers = base.layers[: base.config.num_hidden_layers]
        if not len(layers) or not all(type(layer) is fam.decoder and type(layer.self_attn) is fam.attention
                                      and type(layer.mlp) is fam.mlp for layer in layers):
            return False
        reproduced = [base] + [m for layer in layers for m in (layer, layer.self_attn, layer.mlp)]
        return not _hooked(model) and all(_bare(m) for m in reproduced)

    def _linear(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.gemm is not None and _plain_linear(module):
            out = self.gemm.linear(x, module.weight, module.bias)
            if out is not None:
                return out
        return module(x)

    def _linears(self, modules: tuple, x: torch.Tensor) -> list[torch.Tensor]:
        """Each module applied to x, as one GEMM on their concatenated weights where they are plain linears."""
        if self.gemm is not None and all(_plain_linear(m) for m in modules):
            biases = [m.bias for m in modules]
            if all(b is None for b in biases) or all(b is not None for b in biases):
                out = self.gemm.linear_cat(x, tuple(m.weight for m in modules),
                                           None if biases[0] is None else tuple(biases))
                if out is not None:
                    return list(out.split([m.out_features for m in modules], dim=-1))
        return [self._linear(m, x) for m in modules]

    def _add_norm(self, norm: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None):
        """(x + residual, norm(x + residual)); (x, norm(x)) without a residual."""
        if (self.ext is not None and type(norm) is self.family.norm and _bare(norm) and norm.weight.dtype == x.dtype
                and _norm_sums_rows_whole(x) and _norm_kernel_matches(self.ext, norm)):
            return self.ext.add_rms_norm(x, residual, norm.weight, norm.variance_epsilon, _SUM_LANES)
        if residual is not None:
            x = x + residual
        return x, norm(x)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """HF's `apply_rotary_pos_emb` on one tensor: x [T, H, D], cos/sin [T, D]."""
        if self.ext is not None:
            return self.ext.rope(x, cos, sin)
        cos, sin = cos[:, None], sin[:, None]
        return (x * cos) + (_rotate_half(x) * sin)

    def _attention(self, attn, x: torch.Tensor, cos, sin, meta: PagedAttentionMetadata) -> torch.Tensor:
        T, D = x.shape[0], attn.head_dim
        q, k, v = (t.view(T, -1, D) for t in self._linears((attn.q_proj, attn.k_proj, attn.v_proj), x))
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        if q_norm is not None:  # Qwen3: per-head norms before the rotary embedding
            q, k = q_norm(q), k_norm(k)
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        o = paged_attention(meta, attn.layer_idx, q, k, v, attn.scaling, self.family.sliding_window(attn))
        return self._linear(attn.o_proj, o.reshape(T, -1))

    def _mlp(self, mlp, x: torch.Tensor) -> torch.Tensor:
        gate, up = self._linears((mlp.gate_proj, mlp.up_proj), x)
        return self._linear(mlp.down_proj, mlp.act_fn(gate) * up)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: PagedAttentionMetadata,
                 logits_to_keep) -> torch.Tensor:
        """Logits (the model's dtype) of the packed rows `logits_to_keep`: a tensor of rows, or an int k (the
        last k rows; 0: all), as HF's `logits_to_keep`. input_ids, positions: [T]."""
        base = self.model.model
        layers = base.layers[: base.config.num_hidden_layers]
        h = base.embed_tokens(input_ids)  # [T, hidden]
        cos, sin = base.rotary_emb(h[None], positions[None])  # [1, T, D] in h's dtype
        cos, sin = cos[0], sin[0]
        h, x = self._add_norm(layers[0].input_layernorm, h)
        # h: the residual stream; x: the next norm of it. Each layer adds its attention and MLP outputs.
        for i, layer in enumerate(layers):
            h, x = self._add_norm(layer.post_attention_layernorm, h, self._attention(layer.self_attn, x, cos, sin,
                                                                                    meta))
            out = self._mlp(layer.mlp, x)
            if i + 1 < len(layers):
                h, x = self._add_norm(layers[i + 1].input_layernorm, h, out)
        h = h + out
        if isinstance(logits_to_keep, torch.Tensor):
            h = h[logits_to_keep]
        elif logits_to_keep:
            h = h[-logits_to_keep:]
        _, x = self._add_norm(base.norm, h)  # row by row: the norm of the kept rows only
        return self._linear(self.model.lm_head, x)
