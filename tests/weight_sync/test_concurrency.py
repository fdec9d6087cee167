"""update_weights from another thread while generate runs: applied between steps, never starved."""

import threading
import time

import pytest

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
