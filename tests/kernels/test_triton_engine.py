"""The engine end to end on the Triton kernels (`attention_backend="triton"`) vs on the torch references.

Under `TRITON_INTERPRET=1` on the CPU: tiny 2-layer models, a handful of tokens, greedy. Prompts of one
to two blocks, a chunked prefill (a small token budget) and decodes in the same steps; Mistral for the
sliding window.
"""

import pytest
import torch

from triton_setup import DEVICE

from rollserve import LLM, SamplingParams  # noqa: E402
from rollserve.kernels import triton_decode_attention, triton_kv_write, triton_prefill_attention  # noqa: E402

pytestmark = pytest.mark.triton

PROMPTS = [[5, 9, 2], list(range(40, 60)), list(range(100, 137))]


def _generate(model, backend: str):
    llm = LLM(model.to(DEVICE), kv_cache_memory="1MiB", block_size=16, max_num_batched_tokens=24,
              attention_backend=backend)
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=0)
    return llm.generate(PROMPTS, params, use_tqdm=False)


def _count_calls(monkeypatch) -> dict:
    calls = {}
    for module, name in ((triton_kv_write, "write_kv"), (triton_decode_attention, "paged_decode_attention"),
                         (triton_prefill_attention, "paged_prefill_attention")):
        def counted(*args, _op=getattr(module, name), _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _op(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_greedy_output_on_triton_equals_the_torch_backend(tiny_model, arch, monkeypatch):
    model = tiny_model(arch)
    want = _generate(model, "torch")
    calls = _count_calls(monkeypatch)
    got = _generate(model, "triton")
    assert set(calls) == {"write_kv", "paged_decode_attention", "paged_prefill_attention"}  # the kernels ran
    for w, g in zip(want, got):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        torch.testing.assert_close(torch.tensor(g.outputs[0].logprobs), torch.tensor(w.outputs[0].logprobs),
                                   atol=1e-4, rtol=0)  # fp32 attention ~1e-6 apart, through 2 layers
