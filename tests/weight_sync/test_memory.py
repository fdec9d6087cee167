"""200 update + generate cycles do not grow the process's memory."""

import gc

import psutil
import pytest
import torch

from rollserve import LLM, SamplingParams

CYCLES, WARMUP = 200, 20
RSS_BOUND = 8 * 1024**2  # bytes; measured growth after warm-up: see the README


@pytest.mark.parametrize("double_buffer", [False, True], ids=["copy-in", "double-buffer"])
def test_repeated_updates_do_not_grow_rss(tiny_model, double_buffer):
    llm = LLM(tiny_model("llama", seed=0), kv_cache_memory=1 << 22, double_buffer_weights=double_buffer)
    sources = [tiny_model("llama", seed=s) for s in (1, 2)]
    params = SamplingParams(temperature=0, max_tokens=1)
    process = psutil.Process()
    rss = []
    for i in range(CYCLES):
        named = [(n, p * 1.0) for n, p in sources[i % 2].named_parameters()]  # fresh tensors every time
        assert llm.update_weights(named, require_all=True) == i + 1
        out = llm.generate([[1, 2, 3, 4, 5]], params, use_tqdm=False)[0]
        assert out.weight_version == i + 1
        if i + 1 in (WARMUP, CYCLES):
            del named, out
            gc.collect()
            rss.append(process.memory_info().rss)
    growth = rss[1] - rss[0]
    print(f"RSS after {WARMUP} cycles: {rss[0] / 2**20:.1f} MiB, after {CYCLES}: {rss[1] / 2**20:.1f} MiB, "
          f"growth {growth / 2**20:+.2f} MiB")
    assert growth < RSS_BOUND
    assert not torch.equal(llm.model.lm_head.weight, sources[0].lm_head.weight)  # the last update won
