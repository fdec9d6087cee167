"""The engine's sampler on the fused Triton kernel (`sampling_backend="triton"`) vs its torch path.

Under `TRITON_INTERPRET=1` on the CPU (on the GPU when there is one): plain batches (the RL rollout
case: no penalties, filters or top logprobs) of seeded and unseeded, greedy and sampled rows give the
same tokens on both, logprobs within float rounding; other batches keep the torch path.
"""

import pytest
import torch

from triton_setup import DEVICE

from rollserve import LLM, SamplingParams  # noqa: E402
from rollserve.kernels import backend, cpu_ext, triton_sampling  # noqa: E402
from rollserve.kernels.backend import choose_sampling_backend  # noqa: E402

pytestmark = pytest.mark.triton

PROMPTS = [[5, 9, 2], list(range(40, 60)), [7, 7, 7, 7]]
PLAIN = [SamplingParams(temperature=1.0, max_tokens=5, seed=3, n=2, logprobs=0),
         SamplingParams(temperature=0.7, max_tokens=5, logprobs=0),
         SamplingParams(temperature=0, max_tokens=5, logprobs=0)]


def _generate(model, sampling_backend: str, params):
    llm = LLM(model.to(DEVICE), kv_cache_memory="1MiB", block_size=16, seed=11, attention_backend="torch",
              sampling_backend=sampling_backend)
    out = llm.generate(PROMPTS, params, use_tqdm=False)
    return [[(c.token_ids, c.logprobs) for c in o.outputs] for o in out]


def _count_calls(monkeypatch) -> list:
    calls = []
    kernel = triton_sampling.sample

    def counted(logits, *args):
        calls.append(len(logits))
        return kernel(logits, *args)
    monkeypatch.setattr(triton_sampling, "sample", counted)  # taken when the engine is built
    return calls


def test_plain_batches_on_the_fused_kernel_draw_the_torch_paths_tokens(tiny_model, monkeypatch):
    model = tiny_model("llama")
    want = _generate(model, "torch", PLAIN)
    calls = _count_calls(monkeypatch)
    got = _generate(model, "triton", PLAIN)
    assert calls and sum(calls) == 4 * 5  # every step of the 4 samples sampled on the kernel
    for w, g in zip(want, got):
        for (w_ids, w_lps), (g_ids, g_lps) in zip(w, g):
            assert g_ids == w_ids
            torch.testing.assert_close(torch.tensor(g_lps), torch.tensor(w_lps), atol=1e-5, rtol=0)


def test_other_batches_keep_the_torch_path(tiny_model, monkeypatch):
    calls = _count_calls(monkeypatch)
    filtered = SamplingParams(temperature=1.0, top_k=5, max_tokens=3, seed=1, logprobs=2)
    model = tiny_model("llama")
    assert _generate(model, "triton", filtered) == _generate(model, "torch", filtered)
    assert calls == []


def test_the_sampling_backend_choice(monkeypatch):
    monkeypatch.setattr(backend, "triton_installed", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert choose_sampling_backend("auto", "cuda:0") == "triton"
    monkeypatch.setattr(cpu_ext, "extension", lambda: None)
    assert choose_sampling_backend("auto", "cpu") == "torch"
    with pytest.raises(ValueError, match="sampling_backend='cpu' needs the C\\+\\+ CPU extension"):
        choose_sampling_backend("cpu", "cpu")
    monkeypatch.setattr(cpu_ext, "extension", lambda: object())
    assert choose_sampling_backend("auto", "cpu") == "cpu"
    assert choose_sampling_backend("auto", "cuda:0") == "triton"
    with pytest.raises(ValueError, match="sampling_backend='cpu' needs the model on the CPU"):
        choose_sampling_backend("cpu", "cuda")
    assert choose_sampling_backend("torch", "cuda") == "torch"
    with pytest.raises(ValueError, match="sampling_backend='triton' needs the model on a CUDA device"):
        choose_sampling_backend("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose_sampling_backend("triton", "cpu") == "triton"
    monkeypatch.setattr(backend, "triton_installed", lambda: False)
    assert choose_sampling_backend("auto", "cuda") == "torch"
    with pytest.raises(ValueError, match=r"pip install 'rollserve\[triton\]'"):
        choose_sampling_backend("triton", "cuda")
