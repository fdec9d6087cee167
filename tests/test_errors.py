"""Bad input raises ValueError/TypeError naming the problem, and leaves the engine as it was: nothing queued,
no blocks held, and the same LLM still generates correctly afterwards."""

import math

import pytest
import torch

from rollserve import LLM, SamplingParams
from rollserve.engine.model_runner import ModelRunner

from conftest import TINY_VOCAB

BLOCK = 16
MAX_MODEL_LEN = 64
PROBE_TOKENS = 8


def _blocks_bytes(model, num_blocks: int) -> int:
    return num_blocks * ModelRunner.bytes_per_block(model.config, BLOCK, model.dtype)


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def llm(model, smollm2_path):
    """A tiny model with SmolLM2's tokenizer (so string prompts are accepted), context capped at 64 tokens."""
    return LLM(model, tokenizer=smollm2_path, kv_cache_memory=_blocks_bytes(model, 32), block_size=BLOCK,
               max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def probe(model, make_prompts, hf_greedy):
    prompt = make_prompts([19], seed=30)[0]
    return prompt, hf_greedy(model, prompt, PROBE_TOKENS)


def assert_untouched_and_working(llm, probe):
    """Nothing of the failed call is left in the engine, and generation is still right."""
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert not engine.scheduler.waiting and not engine.scheduler.running
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    prompt, ref = probe
    prefill0 = llm.stats.num_prefill_tokens
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=PROBE_TOKENS, ignore_eos=True),
                       use_tqdm=False)
    assert len(out) == 1 and out[0].prompt_token_ids == prompt
    assert out[0].outputs[0].token_ids == ref
    assert llm.stats.num_prefill_tokens - prefill0 <= len(prompt)
    assert not engine.has_unfinished_requests()


GOOD = [5, 6, 7]

BAD_PROMPTS = [
    pytest.param("", ValueError, r"prompts\[0\]: the prompt is empty", id="empty-string"),
    pytest.param(["hello", ""], ValueError, r"prompts\[1\]: the prompt is empty", id="empty-string-in-batch"),
    pytest.param([[]], ValueError, r"prompts\[0\]: the prompt is empty", id="empty-token-list"),
    pytest.param([GOOD, []], ValueError, r"prompts\[1\]: the prompt is empty", id="empty-token-list-in-batch"),
    pytest.param([[3, -1, 4]], ValueError, r"vocabulary.*-1", id="negative-id"),
    pytest.param([GOOD, [3, TINY_VOCAB]], ValueError, rf"prompts\[1\].*vocabulary.*{TINY_VOCAB}", id="id-eq-vocab"),
    pytest.param([[10**6]], ValueError, "vocabulary", id="id-far-beyond-vocab"),
    pytest.param([[1] * MAX_MODEL_LEN], ValueError, rf"{MAX_MODEL_LEN} tokens.*context", id="prompt-fills-context"),
    pytest.param([GOOD, [1] * 200], ValueError, r"prompts\[1\]: the prompt has 200 tokens.*context", id="prompt-beyond-context"),
    pytest.param(123, TypeError, "prompts", id="int-prompts"),
    pytest.param([[1, "a"]], TypeError, r"prompts\[0\]", id="str-in-token-list"),
    pytest.param([GOOD, [1, 2.0]], TypeError, r"prompts\[1\]", id="float-in-token-list"),
    pytest.param([[1, None]], TypeError, r"prompts\[0\]", id="none-in-token-list"),
]


@pytest.mark.parametrize("prompts, exc, match", BAD_PROMPTS)
def test_bad_prompt_raises_and_leaves_engine_clean(llm, probe, prompts, exc, match):
    with pytest.raises(exc, match=match):
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert_untouched_and_working(llm, probe)


def test_bad_sampling_params_argument(llm, probe):
    with pytest.raises(TypeError, match="sampling_params"):
        llm.generate([GOOD], "greedy", use_tqdm=False)
    assert_untouched_and_working(llm, probe)
    with pytest.raises(TypeError, match=r"sampling_params\[1\]"):
        llm.generate([GOOD, GOOD], [SamplingParams(), {"temperature": 0}], use_tqdm=False)
    assert_untouched_and_working(llm, probe)
    with pytest.raises(ValueError, match="2 sampling_params for 3 prompts"):
        llm.generate([GOOD, GOOD, GOOD], [SamplingParams(), SamplingParams()], use_tqdm=False)
    assert_untouched_and_working(llm, probe)


@pytest.mark.parametrize("kwargs, name", [
    ({"n": 0}, "n"),
    ({"n": -2}, "n"),
    ({"n": 2.0}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -5}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"logprobs": -1}, "logprobs"),
    ({"stop_token_ids": [-3]}, "stop_token_ids"),
    ({"seed": 1.5}, "seed"),
    ({"ignore_eos": 1}, "ignore_eos"),
])
def test_bad_sampling_params(kwargs, name):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{name}="):
        SamplingParams(**kwargs)


def test_prompt_too_long_for_kv_cache(model, probe):
    llm = LLM(model, kv_cache_memory=_blocks_bytes(model, 2), block_size=BLOCK)  # 32 token slots
    with pytest.raises(ValueError, match="kv_cache_memory"):
        llm.generate([[1] * 20], SamplingParams(max_tokens=16), use_tqdm=False)  # needs 36
    assert_untouched_and_working(llm, probe)  # 19 + 8 = 27 tokens fit


def test_model_context_limit(tiny_model, make_prompts, hf_greedy):
    model = tiny_model("qwen2", max_position_embeddings=48)
    llm = LLM(model, kv_cache_memory=_blocks_bytes(model, 16), block_size=BLOCK)
    assert llm.max_model_len == 48
    with pytest.raises(ValueError, match="48 tokens.*context is 48"):
        llm.generate([[1] * 48], SamplingParams(temperature=0), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    prompt = make_prompts([44], seed=31)[0]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length"
    assert out.token_ids == hf_greedy(model, prompt, 4)
    with pytest.raises(ValueError, match="max_model_len=100 exceeds the model's max_position_embeddings=48"):
        LLM(model, max_model_len=100)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"dtype": "float13"}, ValueError, "dtype='float13'"),
    ({"dtype": torch.int8}, ValueError, "dtype"),
    ({"kv_cache_memory": 0}, ValueError, "kv_cache_memory"),
    ({"kv_cache_memory": 1000}, ValueError, "kv_cache_memory=1000 bytes holds no KV block"),
    ({"block_size": 0}, ValueError, "block_size"),
    ({"kv_cache_dtype": "int8"}, ValueError, "kv_cache_dtype='int8' is invalid"),
    ({"dtype": "bf16", "kv_cache_dtype": "fp16"}, ValueError,
     r"kv_cache_dtype='fp16' is invalid: the KV cache holds the weights' dtype \(torch.bfloat16\), or "
     "bfloat16/float16 under float32 weights on the CPU"),
    ({"max_num_seqs": 0}, ValueError, "max_num_seqs"),
    ({"max_num_batched_tokens": 0}, ValueError, "max_num_batched_tokens"),
    ({"max_model_len": 1}, ValueError, "max_model_len"),
])
def test_bad_engine_arguments(model, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LLM(model, **kwargs)


def test_bad_model_argument(tmp_path):
    with pytest.raises(TypeError, match="model must be a path"):
        LLM(42)
    with pytest.raises(ValueError, match="config.json"):
        LLM(str(tmp_path))


def test_string_prompt_or_chat_without_tokenizer(model, probe):
    llm = LLM(model, kv_cache_memory=_blocks_bytes(model, 8), block_size=BLOCK)
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("hello", use_tqdm=False)
    with pytest.raises(ValueError, match="tokenizer"):
        llm.chat([{"role": "user", "content": "hi"}], use_tqdm=False)
    assert_untouched_and_working(llm, probe)


def test_error_during_a_step_aborts_everything(llm, probe, make_prompts, monkeypatch):
    """An exception in the middle of generate (here: the 3rd forward) frees every request and block."""
    runner = llm.engine.runner
    real_forward, calls = runner.forward, []

    def failing_forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(runner, "forward", failing_forward)
    with pytest.raises(RuntimeError, match="injected failure"):
        llm.generate(make_prompts([10, 30, 5], seed=32), SamplingParams(n=2, temperature=1.0, max_tokens=10),
                     use_tqdm=False)
    monkeypatch.undo()
    assert len(calls) == 3
    assert_untouched_and_working(llm, probe)
