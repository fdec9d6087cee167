"""update_weights from another thread while generate runs: applied between steps, never starved."""

import threading
import time

import pytest
import torch

from rollserve import LLM, SamplingParams


@pytest.mark.parametrize("double_buffer", [False, True], ids=["copy-in", "double-buffer"])
def test_update_from_another_thread_lands_between_steps(tiny_model, make_prompts, double_buffer):
    llm = LLM(tiny_model("llama", seed=0), kv_cache_memory=1 << 22, double_buffer_weights=double_buffer)
    trainer = tiny_model("llama", seed=1)
    prompts = make_prompts([5, 6, 7, 8], seed=7)
    params = SamplingParams(temperature=0, max_tokens=40)
    old = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    # Real forward hooks: the parameters' version counters must not move during a forward. The
    # update is started from inside the 6th forward, which then lingers: without the step lock
    # the copy would land in it.
    model, counters, torn, inside = llm.model, [], [], threading.Event()
    version_sum = lambda: sum(p._version for p in model.parameters())  # noqa: E731

    def before(module, args, kwargs):
        counters.append(version_sum())
        if len(counters) == 6:
            inside.set()
            time.sleep(0.2)

    def after(module, args, kwargs, output):
        if version_sum() != counters[-1]:
            torn.append(len(counters))

    hooks = [model.register_forward_pre_hook(before, with_kwargs=True),
             model.register_forward_hook(after, with_kwargs=True)]
    stats, start_steps, result = llm.engine.stats, llm.engine.stats.num_steps, {}

    def update():
        inside.wait(timeout=60)
        result["version"] = llm.update_weights(trainer.named_parameters(), require_all=True)
        result["steps"] = stats.num_steps - start_steps

    thread = threading.Thread(target=update)
    thread.start()
    try:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        thread.join(timeout=60)
        for h in hooks:
            h.remove()
    total_steps = stats.num_steps - start_steps
    assert result["version"] == 1 and llm.weight_version == 1
    assert torn == []
    assert 5 <= result["steps"] < total_steps - 5  # applied while generate ran, not after it
    new = [o.outputs[0].token_ids for o in outputs]
    assert all(len(t) == 40 for t in new)
    # tokens sampled before the update are the old weights'; in-flight sequences then continue on the new ones
    assert all(n[:4] == o[:4] for n, o in zip(new, old))
    assert all(n != o for n, o in zip(new, old))
    assert all(o.weight_version == 0 for o in outputs)  # admitted under version 0


# The last layer's weights that never reach the K/V of earlier tokens (its q/o/MLP and the final norm): with
# only these changed, a sequence's next token after the update must equal a fresh engine's on the new weights.
# Every one of them runs on a packed copy (kernels/cpu_gemm.py), so a stale copy would show.
_LAST_LAYER = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _next_layer_weights(model, trainer) -> dict:
    last = f"model.layers.{model.config.num_hidden_layers - 1}."
    names = [last + n + ".weight" for n in _LAST_LAYER] + ["model.norm.weight"]
    params = dict(trainer.named_parameters())
    return {n: params[n].detach().clone() for n in names}


def _next_token(model, prompt: list[int]):
    """(token, top-5 raw logprobs) of a fresh engine's first greedy step."""
    out = LLM(model, kv_cache_memory=1 << 22).generate([prompt], SamplingParams(
        temperature=0, max_tokens=1, logprobs=5, logprobs_mode="raw"), use_tqdm=False)[0].outputs[0]
    return out.token_ids[0], out.top_logprobs[0]


@pytest.mark.parametrize("mode", ["copy-in", "double-buffer", "zero-copy"])
def test_update_between_two_steps_reaches_the_next_token(tiny_model, make_prompts, mode):
    """Weights changed between two steps of a running generate: the next token's logprobs are the new weights'.

    copy-in / double-buffer: `update_weights` from another thread, started inside the 4th forward; the first
    token labelled with the new version is checked. zero-copy: the engine runs the trainer's own module and
    the trainer's optimizer steps on it right after the 4th forward (no engine call at all: the packed copies
    must notice the version counters), so the 5th token is checked.
    """
    model = tiny_model("llama", seed=0)
    llm = LLM(model, kv_cache_memory=1 << 22, double_buffer_weights=mode == "double-buffer")
    assert llm.engine.runner._gemm is not None  # the packed-weight path under test
    new = _next_layer_weights(model, tiny_model("llama", seed=1))
    prompts = make_prompts([6, 9], seed=3)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=5, logprobs_mode="raw")
    forwards, inside = [], threading.Event()
    named = dict(model.named_parameters())
    optimizer = torch.optim.SGD([named[n] for n in new], lr=1.0)

    def before(module, args, kwargs):
        forwards.append(1)
        if len(forwards) == 4 and mode != "zero-copy":
            inside.set()
            time.sleep(0.2)

    def after(module, args, kwargs, output):
        if len(forwards) == 4 and mode == "zero-copy":
            for n, value in new.items():  # one SGD step lands exactly on the new values
                named[n].grad = named[n].detach() - value
            optimizer.step()

    hooks = [model.register_forward_pre_hook(before, with_kwargs=True),
             model.register_forward_hook(after, with_kwargs=True)]
    thread = threading.Thread(target=lambda: inside.wait(timeout=60) and llm.update_weights(new))
    thread.start()
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        inside.set()
        thread.join(timeout=60)
        for h in hooks:
            h.remove()
    reference = tiny_model("llama", seed=0)
    old = tiny_model("llama", seed=0)
    with torch.no_grad():
        for n, p in reference.named_parameters():
            if n in new:
                p.copy_(new[n])
    for prompt, out in zip(prompts, outs):
        comp = out.outputs[0]
        j = 4 if mode == "zero-copy" else comp.weight_versions.index(1)
        assert 0 < j < len(comp.token_ids) - 1
        token, top = _next_token(reference, prompt + comp.token_ids[:j])
        assert comp.token_ids[j] == token
        assert set(comp.top_logprobs[j]) == set(top)
        assert all(abs(comp.top_logprobs[j][t] - v) < 1e-4 for t, v in top.items())
        _, old_top = _next_token(old, prompt + comp.token_ids[:j])
        assert max(abs(old_top.get(t, -100.0) - v) for t, v in top.items()) > 1e-2  # the update mattered
