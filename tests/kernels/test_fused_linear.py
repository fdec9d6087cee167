"""Fused q/k/v and gate/up projections: same forward as the separate layers, copies refreshed on every kind of write."""

import pytest
import torch

from rollserve.kernels.cpu_gemm import Fp32Gemm
from rollserve.kernels.fused_linear import FusedProjections, find_groups

from conftest import TINY_ARCHS


def _logits(model, ids, *modes):
    with torch.inference_mode():
        for m in modes:
            m.__enter__()
        try:
            return model(input_ids=ids).logits
        finally:
            for m in reversed(modes):
                m.__exit__(None, None, None)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_fused_forward_equals_separate(arch, tiny_model):
    model = tiny_model(arch, seed=0).eval()
    groups = find_groups(model)
    assert len(groups) == 2 * model.config.num_hidden_layers  # q/k/v and gate/up in every layer
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(model, ids, FusedProjections(groups)), _logits(model, ids), atol=1e-5,
                               rtol=0)


def _perturb(t: torch.Tensor) -> torch.Tensor:
    return t + 0.05 * torch.randn(t.shape, generator=torch.Generator().manual_seed(t.numel()), dtype=t.dtype)


WRITES = {
    "copy_": lambda p, new: p.copy_(new),  # LLM.update_weights, an optimizer step on the trainer's parameters
    "swap": lambda p, new: (setattr(p, "data", new.clone()), torch.autograd.graph.increment_version(p)),
}


@pytest.mark.parametrize("write", sorted(WRITES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copies_follow_in_place_writes(write, dtype, tiny_model):
    model = tiny_model("llama", seed=0).to(dtype).eval()
    mode = FusedProjections(find_groups(model))
    gemm = Fp32Gemm() if dtype == torch.bfloat16 else None  # its fp32 copies of the fused weights must follow too
    extra = [gemm] if gemm else []
    ids = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(1))
    _logits(model, ids, *extra, mode)
    layer = model.model.layers[0]
    with torch.no_grad():
        for lin in (layer.self_attn.k_proj, layer.mlp.up_proj):
            WRITES[write](lin.weight, _perturb(lin.weight))
    expected = _logits(model, ids, *extra)
    torch.testing.assert_close(_logits(model, ids, *extra, mode), expected, atol=1e-5 if gemm is None else 1e-2,
                               rtol=0)


def test_invalidate_for_writers_that_bypass_the_version_counter(tiny_model):
    model = tiny_model("llama", seed=0).eval()
    mode = FusedProjections(find_groups(model))
    ids = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(2))
    before = _logits(model, ids, mode)
    v = model.model.layers[1].self_attn.v_proj.weight
    v.data.copy_(_perturb(v))  # `.data` has its own version counter: only invalidate() can tell
    expected = _logits(model, ids)
    assert (expected - before).abs().max() > 1e-3
    mode.invalidate()
    torch.testing.assert_close(_logits(model, ids, mode), expected, atol=1e-5, rtol=0)
