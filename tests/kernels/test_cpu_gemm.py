"""`CpuGemm`: each kernel (the extension's packed GEMM, oneDNN packed, fp32 upcast, both) against a float64 linear, copies that follow every
kind of weight write, whole models unchanged within fp32 noise, and autograd-recorded calls left alone.

The kernel choice depends on the CPU, so every test forces each choice through `needs_fp32_gemm` / `gemm_kernel`.
"""

import pytest
import torch
import torch.nn.functional as F

from rollserve.kernels import cpu_gemm
from rollserve.kernels.cpu_gemm import CpuGemm

from conftest import TINY_ARCHS

KERNELS = ["rollserve", "onednn", "upcast", "upcast+rollserve", "upcast+onednn", "plain"]


def _mode(kernel: str, dtype: torch.dtype, monkeypatch) -> CpuGemm:
    """The mode with `kernel` forced: "rollserve" (the extension's packed fp32 GEMM), "onednn" (oneDNN packed),
    "upcast" (half precision as fp32 on exact copies), "upcast+<packed kernel>", or "plain" (`F.linear`)."""
    upcast = "upcast" in kernel
    packed = "rollserve" if "rollserve" in kernel else "onednn" if "onednn" in kernel else None
    if packed == "onednn" and not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without oneDNN")
    if packed == "rollserve" and cpu_gemm._extension_gemm() is None:
        pytest.skip("the C++ extension's packed GEMM is not built here (it needs AVX2/FMA without AVX-512)")
    if packed and dtype != torch.float32 and not upcast and (
            packed == "rollserve" or not torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        pytest.skip("no native half-precision GEMM for this kernel here")
    if dtype == torch.float32 and upcast:
        pytest.skip("fp32 is never upcast")
    monkeypatch.setattr(cpu_gemm, "needs_fp32_gemm", lambda d, dev: upcast and d == dtype)
    monkeypatch.setattr(cpu_gemm, "gemm_kernel", lambda d: packed)
    mode = CpuGemm(dtype)
    assert mode.kernel == packed
    return mode


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_matches_float64(kernel, dtype, monkeypatch):
    if dtype == torch.float16 and kernel == "onednn":
        pytest.skip("fp16 is not packed natively")
    mode = _mode(kernel, dtype, monkeypatch)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 16, generator=gen).to(dtype)  # [..., in_features]
    weight = torch.randn(21, 16, generator=gen).to(dtype)  # [out_features, in_features]: a partial panel of 16
    bias = torch.randn(21, generator=gen).to(dtype)
    with torch.inference_mode(), mode:
        out = F.linear(x, weight, bias)
        other = F.linear(x.double(), weight.double())  # another dtype passes through
    assert out.dtype == dtype and out.shape == (3, 5, 21)
    exact = x.double() @ weight.double().T + bias.double()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(out.double(), exact, **tol)
    assert torch.equal(other, F.linear(x.double(), weight.double()))
    if kernel == "upcast":  # fp32 accumulation of exact products, rounded once: what a native half GEMM does
        assert torch.equal(out, F.linear(x.float(), weight.float(), bias.float()).to(dtype))


def _perturb(t: torch.Tensor) -> torch.Tensor:
    return t + 0.05 * torch.randn(t.shape, generator=torch.Generator().manual_seed(t.numel()), dtype=t.dtype)


WRITES = {
    "copy_": lambda p, new: p.copy_(new),  # LLM.update_weights, an optimizer step on the trainer's parameters
    "swap": lambda p, new: (setattr(p, "data", new.clone()), torch.autograd.graph.increment_version(p)),
}


HOWS = ["mode", "modules"]  # as a TorchFunctionMode, or bound to the model's linear modules (what the engine uses)


def _logits(model, ids, mode=None, how="mode"):
    with torch.inference_mode():
        if mode is None:
            return model(input_ids=ids).logits
        with mode if how == "mode" else mode.on_linear_modules(model):
            return model(input_ids=ids).logits


@pytest.mark.parametrize("kernel", ["rollserve", "onednn"])
@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_model_forward_equals_plain(arch, how, kernel, tiny_model, monkeypatch):
    model = tiny_model(arch, seed=0).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    mode = _mode(kernel, torch.float32, monkeypatch)
    torch.testing.assert_close(_logits(model, ids, mode, how), _logits(model, ids), atol=1e-5, rtol=0)
    # every linear layer ran on a packed copy (tied weights share one)
    weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert {i for ids, _ in mode._copies for i in ids} == weights
    assert not any("forward" in m.__dict__ for m in model.modules())  # the modules are given back unchanged


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("write", sorted(WRITES))
@pytest.mark.parametrize("kernel, dtype", [("rollserve", torch.float32), ("onednn", torch.float32),
                                           ("onednn", torch.bfloat16), ("upcast", torch.bfloat16),
                                           ("upcast+rollserve", torch.bfloat16), ("upcast+onednn", torch.bfloat16)])
def test_copies_follow_in_place_writes(write, kernel, dtype, how, tiny_model, monkeypatch):
    model = tiny_model("llama", seed=0).to(dtype).eval()
    mode = _mode(kernel, dtype, monkeypatch)
    ids = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(1))
    before = _logits(model, ids, mode, how)
    layer = model.model.layers[0]
    with torch.no_grad():
        for lin in (layer.self_attn.k_proj, layer.mlp.up_proj, model.lm_head):
            WRITES[write](lin.weight, _perturb(lin.weight))
    expected = _logits(model, ids, mode, how)
    assert (expected.float() - before.float()).abs().max() > 1e-2
    fresh = _mode(kernel, dtype, monkeypatch)  # no copies yet
    torch.testing.assert_close(expected, _logits(model, ids, fresh, how), atol=0, rtol=0)


@pytest.mark.parametrize("kernel", ["rollserve", "onednn"])
def test_invalidate_for_writers_that_bypass_the_version_counter(kernel, tiny_model, monkeypatch):
    model = tiny_model("llama", seed=0).eval()
    mode = _mode(kernel, torch.float32, monkeypatch)
    ids = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(2))
    before = _logits(model, ids, mode)
    v = model.model.layers[1].self_attn.v_proj.weight
    v.data.copy_(_perturb(v))  # `.data` has its own version counter: only invalidate() can tell
    expected = _logits(model, ids)
    assert (expected - before).abs().max() > 1e-3
    mode.invalidate()
    torch.testing.assert_close(_logits(model, ids, mode), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernel, dtype", [("rollserve", torch.float32), ("onednn", torch.float32),
                                           ("upcast", torch.bfloat16), ("upcast+rollserve", torch.bfloat16),
                                           ("upcast+onednn", torch.bfloat16)])
def test_calls_autograd_records_run_unchanged(kernel, dtype, monkeypatch):
    """Gradients reach the weight (the derived copies are detached) and nothing is derived for such a call."""
    mode = _mode(kernel, dtype, monkeypatch)
    weight = torch.randn(8, 16, dtype=dtype, requires_grad=True)
    x = torch.randn(4, 16, dtype=dtype)
    with mode:
        F.linear(x, weight).sum().backward()
    torch.testing.assert_close(weight.grad, x.sum(0).expand(8, 16))
    assert not mode._copies


@pytest.mark.parametrize("avx512_bf16, amx, native", [(False, False, False), (True, False, True), (False, True, True)])
def test_bf16_counts_as_native_only_with_bf16_units(avx512_bf16, amx, native, monkeypatch):
    """oneDNN's bf16 GEMM by conversion (AVX-512 without avx512_bf16) is slower than fp32: upcast there."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert cpu_gemm.needs_fp32_gemm(torch.bfloat16, torch.device("cpu")) is not native
    assert CpuGemm(torch.bfloat16).compute == (torch.bfloat16 if native else torch.float32)
    assert not cpu_gemm.needs_fp32_gemm(torch.float32, torch.device("cpu"))
    assert not cpu_gemm.needs_fp32_gemm(torch.bfloat16, torch.device("cuda"))
