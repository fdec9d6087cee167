"""The lean CPU forward (`engine/lean_forward.py`) against the HF module forward it replaces.

Same engine, same requests, once through each: the logits of every packed step must be bit-equal in fp32
(the lean forward runs HF's arithmetic in HF's order; its fused q/k/v and gate/up GEMMs and C++ norm/rope
kernels are bit-equal to the separate ones), with the C++ kernels and with the torch fallback ops.
It must actually run where it applies, and give way to the HF forward where it does not.
"""

import copy

import pytest
import torch

from rollserve import LLM, SamplingParams
from rollserve.engine import lean_forward
from rollserve.engine.lean_forward import LeanForward

from conftest import TINY_ARCHS

KV = 1 << 22


def _step_logits(llm, prompts, max_tokens=6) -> list[torch.Tensor]:
    """Greedy generation of `prompts` with chunked prefill and decodes packed together; the float32 logits
    every engine step computed, in order."""
    runner = llm.engine.runner
    seen = []
    call = runner.call_model

    def record(*args, **kwargs):
        out = call(*args, **kwargs)
        seen.append(out.clone())
        return out

    runner.call_model = record
    try:
        for i, p in enumerate(prompts):
            llm.add_request(p, SamplingParams(temperature=0, max_tokens=max_tokens + i, ignore_eos=True))
        while llm.has_unfinished():
            llm.step()
    finally:
        runner.call_model = call
    return seen


def _engine(model, dtype="fp32"):
    return LLM(model, dtype=dtype, kv_cache_memory=KV, enable_prefix_caching=False, max_num_batched_tokens=48)


def _count_calls(monkeypatch):
    calls = {"lean": 0, "hf": 0}
    lean_call = LeanForward.__call__

    def lean(self, *a, **k):
        calls["lean"] += 1
        return lean_call(self, *a, **k)

    monkeypatch.setattr(LeanForward, "__call__", lean)
    return calls


@pytest.mark.parametrize("kernels", ["c++", "torch ops"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_lean_forward_is_bit_equal_to_the_hf_forward(arch, kernels, tiny_model, make_prompts, monkeypatch):
    prompts = make_prompts([30, 5, 61, 12], seed=3)  # 61 > the 48-token budget: a chunk over cached context
    calls = _count_calls(monkeypatch)
    llm = _engine(tiny_model(arch))
    lean = llm.engine.runner._lean
    assert lean is not None and lean.applies()
    if kernels == "torch ops":
        monkeypatch.setattr(lean, "ext", None)
    else:
        if lean.ext is None:
            pytest.skip("the CPU extension is not built")
        assert lean_forward._norm_kernel_matches(lean.ext, lean.model.model.norm)  # bit-equal on this CPU
    got = _step_logits(llm, prompts)
    assert calls["lean"] == len(got) > 4
    llm.engine.runner._lean = None  # the HF module from here on
    expected = _step_logits(llm, prompts)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


def test_lean_forward_in_bf16_equals_the_hf_forward(tiny_model, make_prompts):
    prompts = make_prompts([30, 5, 61], seed=4)
    llm = _engine(tiny_model("llama"), dtype="bf16")
    assert llm.engine.runner._lean is not None
    got = _step_logits(llm, prompts)
    llm.engine.runner._lean = None
    for g, e in zip(got, _step_logits(llm, prompts)):
        assert torch.equal(g, e)


def test_hooks_on_what_it_reproduces_take_the_hf_forward(tiny_model, make_prompts, monkeypatch):
    """A hook or an instance forward on a module whose forward the lean one reproduces (a decoder layer, its
    attention or MLP; DeepSpeed ZeRO-3 gathers parameters in such hooks) sends those steps to the HF module;
    the lean forward comes back once it is gone."""
    calls = _count_calls(monkeypatch)
    model = tiny_model("llama")
    llm = _engine(model)
    prompts = make_prompts([9, 4], seed=5)
    first = _step_logits(llm, prompts)
    assert calls["lean"] == len(first)
    seen = []
    handle = model.model.layers[1].mlp.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    calls["lean"] = 0
    hooked = _step_logits(llm, prompts)
    assert calls["lean"] == 0 and len(seen) == len(hooked)  # every step ran the HF module, hook and all
    handle.remove()
    attn = model.model.layers[0].self_attn
    attn.forward = lambda *a, **k: type(attn).forward(attn, *a, **k)
    patched = _step_logits(llm, prompts)
    assert calls["lean"] == 0
    del attn.forward
    again = _step_logits(llm, prompts)
    assert calls["lean"] == len(again)
    for a, b, c, d in zip(first, hooked, patched, again):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)


def test_leaves_run_as_modules_and_the_top_level_wrapper_is_not_needed(tiny_model, make_prompts, monkeypatch):
    """What TRL's trainer leaves on the model it shares with the engine: a forward hook on the input embedding
    (`enable_input_require_grads`) and a wrapper of the top-level forward (its fused-LM-head patch). The lean
    forward still runs, the embedding's hook with it; so does a norm's or a linear's own forward."""
    calls = _count_calls(monkeypatch)
    model = tiny_model("llama")
    llm = _engine(model)
    prompts = make_prompts([9, 4], seed=7)
    expected = _step_logits(llm, prompts)
    seen = {"embed": 0, "norm": 0, "linear": 0, "top": 0}
    model.model.embed_tokens.register_forward_hook(lambda m, i, o: seen.__setitem__("embed", seen["embed"] + 1))
    forward = model.forward

    def wrapper(*a, **k):
        seen["top"] += 1
        return forward(*a, **k)

    model.forward = wrapper
    norm, linear = model.model.layers[1].post_attention_layernorm, model.model.layers[0].mlp.up_proj

    def norm_forward(x):
        seen["norm"] += 1
        return type(norm).forward(norm, x)

    def linear_forward(x):
        seen["linear"] += 1
        return type(linear).forward(linear, x)

    norm.forward, linear.forward = norm_forward, linear_forward
    calls["lean"] = 0
    got = _step_logits(llm, prompts)
    assert calls["lean"] == len(got) == seen["embed"] == seen["norm"] == seen["linear"] and seen["top"] == 0
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=0)  # up_proj alone: F.linear, not the fused packed GEMM


def test_a_module_patched_at_class_level_takes_the_hf_forward(tiny_model, monkeypatch):
    """e.g. a kernel library replacing LlamaMLP.forward: the lean forward would not run the replacement."""
    from transformers.models.llama import modeling_llama

    llm = _engine(tiny_model("llama"))
    assert llm.engine.runner._lean.applies()
    original = modeling_llama.LlamaMLP.forward
    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", lambda self, x: original(self, x))
    assert not llm.engine.runner._lean.applies()


def test_in_place_updates_reach_the_fused_copies(tiny_model, make_prompts):
    """q/k/v and gate/up run on concatenated packed copies: an in-place write to one of the weights (here one
    layer's v_proj and up_proj, as an optimizer step on shared parameters would) is seen by the next step."""
    model = tiny_model("llama")
    llm = _engine(model)
    prompts = make_prompts([9, 17], seed=6)
    before = _step_logits(llm, prompts)
    with torch.no_grad():
        layer = model.model.layers[0]
        for w in (layer.self_attn.v_proj.weight, layer.mlp.up_proj.weight):
            w.add_(0.1 * torch.randn(w.shape, generator=torch.Generator().manual_seed(w.numel())))
    after = _step_logits(llm, prompts)
    assert (after[0] - before[0]).abs().max() > 1e-3
    fresh = _step_logits(_engine(copy.deepcopy(model)), prompts)
    for a, f in zip(after, fresh):
        assert torch.equal(a, f)


def test_other_architectures_and_the_switch_take_the_hf_forward(tiny_model, monkeypatch):
    from transformers import AutoModelForCausalLM, GPT2Config

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    assert LeanForward.for_model(gpt2, None) is None
    monkeypatch.setenv("ROLLSERVE_LEAN_FORWARD", "0")
    assert _engine(tiny_model("llama")).engine.runner._lean is None


def test_norm_kernel_check_rejects_another_summation_order(monkeypatch):
    """The check (once per width, dtype and eps) is what keeps the C++ RMSNorm off where torch sums in another
    order."""
    from rollserve.kernels import cpu_ext

    ext = cpu_ext.extension()
    if ext is None:
        pytest.skip("the CPU extension is not built")
    norm = torch.nn.Module()
    norm.weight, norm.variance_epsilon = torch.nn.Parameter(torch.ones(576)), 1e-5
    assert lean_forward._norm_kernel_matches(ext, norm)
    monkeypatch.setattr(lean_forward, "_SUM_LANES", 16)
    lean_forward._norm_check.cache_clear()
    try:
        assert not lean_forward._norm_kernel_matches(ext, norm)
    finally:
        lean_forward._norm_check.cache_clear()
