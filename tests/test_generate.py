"""End-to-end generation against the plain `transformers` model: greedy equality (SmolLM2 and tiny
architectures, fp32), bf16 agreement, chat, finish reasons, output order and seeded sampling."""

import math

import pytest
import torch

from rollserve import LLM, SamplingParams

from conftest import TINY_ARCHS

SMOL_K = 24
TINY_K = 16
SMOL_KV = 128 * 1024**2  # ~180 blocks of 16 tokens: the whole batch fits
TINY_KV = 4 * 1024**2

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
]
EXTRA_QUESTIONS = [  # more prompts for the bf16 agreement rate only
    "Explain photosynthesis in one sentence.",
    "What is 12 times 7?",
    "Name a famous painting by Leonardo da Vinci.",
]
LONG_TEXT = (
    "The water cycle describes how water moves between the oceans, the atmosphere and the land. "
    "Heat from the sun evaporates water from seas, lakes and rivers, and plants release vapour through "
    "their leaves. As the moist air rises it cools, and the vapour condenses around tiny particles of dust "
    "to form clouds. When the droplets grow heavy enough they fall as rain, snow, sleet or hail. Some of "
    "this precipitation soaks into the ground and recharges aquifers, some is taken up by roots, and the "
    "rest runs off over the surface into streams that carry it back to the sea. Glaciers and ice caps store "
    "water for thousands of years before it melts. Farmers, cities and industries depend on this cycle for "
    "fresh water, and changes in temperature alter how much rain falls and where. Scientists measure "
    "rainfall with gauges, track clouds with satellites and model the flow of rivers with computers, so "
    "that floods and droughts can be predicted earlier. In mountainous regions, snow that accumulates in "
    "winter melts slowly through spring and summer, feeding rivers long after the last storm has passed. "
    "In deserts, by contrast, rain may come only once in several years, and the rare floods reshape the "
    "land within hours. Wetlands act as natural sponges: they absorb excess water during heavy rain and "
    "release it gradually, filtering sediment and pollutants along the way. Understanding these processes "
    "helps engineers design reservoirs, irrigation canals and drainage systems that work with nature "
    "instead of against it, and it reminds everyone that every glass of water has travelled a long way."
)


def _chat_ids(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


@pytest.fixture(scope="module")
def smol(smollm2_path):
    llm = LLM(smollm2_path, dtype="float32", kv_cache_memory=SMOL_KV)
    assert llm.model.dtype == torch.float32
    return llm


@pytest.fixture(scope="module")
def smol_prompts(smol):
    """A 1-token prompt, three chat prompts and a 300-token prompt."""
    tok = smol.get_tokenizer()
    long = tok(LONG_TEXT).input_ids
    assert len(long) >= 300
    return [[1]] + [_chat_ids(tok, q) for q in QUESTIONS] + [long[:300]]


def _first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# -- greedy == HF generate ------------------------------------------------------------------------------


def test_greedy_matches_hf_smollm2(smol, smol_prompts, hf_greedy, ref_logprobs):
    assert [len(p) for p in smol_prompts][0] == 1 and len(smol_prompts[-1]) == 300
    params = SamplingParams(temperature=0, max_tokens=SMOL_K, ignore_eos=True, logprobs=0)
    attn_before = smol.model.config._attn_implementation
    outs = smol.generate(smol_prompts, params, use_tqdm=False)  # ONE call, very different lengths
    # The engine routes attention through its paged function only during its own forwards.
    assert smol.model.config._attn_implementation == attn_before
    assert len(outs) == len(smol_prompts)
    max_diff = 0.0
    for prompt, out in zip(smol_prompts, outs):
        assert out.prompt_token_ids == prompt
        assert len(out.outputs) == 1
        got = out.outputs[0]
        ref = hf_greedy(smol.model, prompt, SMOL_K)
        assert got.token_ids == ref, f"prompt of {len(prompt)} tokens diverges at {_first_divergence(got.token_ids, ref)}"
        assert got.finish_reason == "length"
        # Logprobs of the packed paged forwards vs one ordinary forward over prompt + completion.
        diff = (torch.tensor(got.logprobs) - ref_logprobs(smol.model, prompt, got.token_ids)).abs().max().item()
        max_diff = max(max_diff, diff)
        assert got.cumulative_logprob == pytest.approx(sum(got.logprobs), abs=1e-4)
    print(f"SmolLM2 fp32: max |engine logprob - HF logprob| = {max_diff:.2e}")
    assert max_diff < 1e-4


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_greedy_matches_hf_tiny(arch, tiny_model, make_prompts, hf_greedy):
    model = tiny_model(arch)
    prompts = make_prompts([1, 5, 37, 120, 300], seed=3)  # seed 1 has a 4e-5 argmax near-tie in the HF reference
    llm = LLM(model, kv_cache_memory=TINY_KV)
    assert llm.model is model  # a live module is used in place
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=TINY_K, ignore_eos=True), use_tqdm=False)
    assert model.config._attn_implementation == "sdpa"
    for prompt, out in zip(prompts, outs):
        assert out.prompt_token_ids == prompt
        ref = hf_greedy(model, prompt, TINY_K)
        got = out.outputs[0].token_ids
        assert got == ref, f"{arch}: prompt of {len(prompt)} tokens diverges at {_first_divergence(got, ref)}"


# -- bf16 ------------------------------------------------------------------------------------------------


def _bf16_ulp(x: float) -> float:
    """The spacing of bf16 numbers at |x| (8 significant bits)."""
    return 2.0 ** (math.floor(math.log2(abs(x))) - 7) if x else 2.0 ** -133


def test_bf16_agreement_smollm2(smollm2_path, hf_greedy):
    """bf16 greedy decoding follows HF `generate` on the same weights until a near-tie: where the two first
    differ, HF's own forward over the common prefix rates the engine's token within two bf16 ulps of its best.

    The engine and HF round differently (fp32 accumulation in other orders, fp32 GEMMs on CPUs without bf16
    units), so in bf16 they part at ties: measured, every first divergence on these prompts was within one
    ulp, often an exact tie broken by token index. How far they agree before is chaotic (0.50-0.78 of the
    24 tokens across machines, thread counts and attention builds), so it is printed, not asserted. An
    engine that reads wrong KV entries or mis-scales attention parts at a token HF rates far lower."""
    llm = LLM(smollm2_path, dtype="bf16", kv_cache_memory=SMOL_KV)
    assert llm.model.dtype == torch.bfloat16
    tok = llm.get_tokenizer()
    prompts = ([[1]] + [_chat_ids(tok, q) for q in QUESTIONS + EXTRA_QUESTIONS] + [tok(LONG_TEXT).input_ids[:300]])
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=SMOL_K, ignore_eos=True), use_tqdm=False)
    rates, gaps = [], []
    for prompt, out in zip(prompts, outs):
        got = out.outputs[0].token_ids
        assert len(got) == SMOL_K
        ref = hf_greedy(llm.model, prompt, SMOL_K)  # HF generate on the same bf16 weights
        p = _first_divergence(got, ref)
        rates.append(p / SMOL_K)
        if p == SMOL_K:
            continue
        with torch.no_grad():
            logits = llm.model(torch.tensor([prompt + ref[:p]])).logits[0, -1].float()
        best = logits.max().item()
        gap = best - logits[got[p]].item()
        gaps.append(round(gap / _bf16_ulp(best), 2))
        assert gap <= 2 * _bf16_ulp(best), (
            f"prompt {prompts.index(prompt)}: at token {p} the engine chose {got[p]} (HF logit "
            f"{logits[got[p]].item():.3f}), HF's best is {best:.3f} ({ref[p]}): not a near-tie")
    print(f"SmolLM2 bf16 greedy agreement with HF generate: {sum(rates) / len(rates):.3f} (per prompt: "
          f"{[round(r, 3) for r in rates]}); first divergences {gaps} bf16 ulps below HF's best")


# -- chat, finish reasons, order -------------------------------------------------------------------------


def test_chat_capital_of_france(smol):
    eos = smol.get_tokenizer().eos_token_id
    outs = smol.chat(
        [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "user", "content": "What is 2 + 2?"}]],
        SamplingParams(temperature=0, max_tokens=48), use_tqdm=False)
    assert len(outs) == 2
    assert "What is the capital of France?" in outs[0].prompt
    assert "What is 2 + 2?" in outs[1].prompt
    france = outs[0].outputs[0]
    assert "Paris" in france.text
    assert france.finish_reason == "stop"
    assert france.token_ids[-1] == eos and eos not in france.token_ids[:-1]
    assert len(france.token_ids) < 48
    assert "4" in outs[1].outputs[0].text

    # The same conversation cut short: "length" after exactly max_tokens tokens, a prefix of the full answer.
    short = smol.chat([{"role": "user", "content": "What is the capital of France?"}],
                      SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0].outputs[0]
    assert short.finish_reason == "length"
    assert short.token_ids == france.token_ids[:3]


def test_output_order_equals_prompt_order(tiny_model, make_prompts, hf_greedy):
    model = tiny_model("qwen2")
    prompts = make_prompts([3, 60, 1, 25, 140], seed=2)
    max_tokens = [12, 9, 6, 4, 2]  # the later prompts finish first
    llm = LLM(model, kv_cache_memory=TINY_KV)
    outs = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=k) for k in max_tokens], use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == prompts
    assert len({o.request_id for o in outs}) == len(prompts)
    for prompt, k, out in zip(prompts, max_tokens, outs):
        assert out.finished
        assert out.outputs[0].finish_reason == "length"
        assert out.outputs[0].token_ids == hf_greedy(model, prompt, k)


def test_stop_token_and_eos(tiny_model, make_prompts, hf_greedy):
    model = tiny_model("llama")
    prompt = make_prompts([20], seed=3)[0]
    ref = hf_greedy(model, prompt, TINY_K)
    # The first position >= 3 whose token has not appeared before in the completion.
    p = next(i for i in range(3, TINY_K) if ref[i] not in ref[:i])
    stop = ref[p]

    llm = LLM(model, kv_cache_memory=TINY_KV)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=TINY_K, stop_token_ids=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref[:p + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop

    model.generation_config.eos_token_id = stop
    llm = LLM(model, kv_cache_memory=TINY_KV)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=TINY_K), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref[:p + 1]
    assert out.finish_reason == "stop" and out.stop_reason is None
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=TINY_K, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref
    assert out.finish_reason == "length"


def test_max_model_len_finishes_with_length(tiny_model, make_prompts, hf_greedy):
    model = tiny_model("mistral")
    llm = LLM(model, kv_cache_memory=TINY_KV, max_model_len=40)
    prompt = make_prompts([30], seed=4)[0]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=TINY_K, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length"
    assert out.token_ids == hf_greedy(model, prompt, 10)  # prompt + completion == max_model_len


# -- seeded sampling ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sampling_llm(tiny_model):
    return LLM(tiny_model("qwen3"), kv_cache_memory=TINY_KV)


def test_seeded_sampling_is_reproducible(sampling_llm, tiny_model, make_prompts):
    llm = sampling_llm
    prompt, *others = make_prompts([24, 3, 50, 11, 70, 1], seed=5)
    seeded = SamplingParams(temperature=1.0, max_tokens=12, seed=1234)

    def run_alone():
        return llm.generate([prompt], seeded, use_tqdm=False)[0].outputs[0].token_ids

    first = run_alone()
    assert len(first) == 12
    assert run_alone() == first  # the engine's own generator has moved on in between

    # Same request in a batch with 5 other prompts, unseeded and seeded with other seeds, placed before it.
    params = [SamplingParams(temperature=1.0, max_tokens=12),
              SamplingParams(temperature=0.7, max_tokens=5, seed=1),
              SamplingParams(temperature=1.0, max_tokens=20, n=2),
              SamplingParams(temperature=0, max_tokens=12),
              SamplingParams(temperature=1.3, max_tokens=12, seed=99)]
    outs = llm.generate(others[:2] + [prompt] + others[2:], params[:2] + [seeded] + params[2:], use_tqdm=False)
    assert outs[2].prompt_token_ids == prompt
    assert outs[2].outputs[0].token_ids == first

    # A fresh engine with another engine seed: the request's own seed decides.
    other_engine = LLM(tiny_model("qwen3"), kv_cache_memory=TINY_KV, seed=7)
    assert other_engine.generate([prompt], seeded, use_tqdm=False)[0].outputs[0].token_ids == first

    # Another seed gives another completion.
    reseeded = SamplingParams(temperature=1.0, max_tokens=12, seed=4321)
    assert llm.generate([prompt], reseeded, use_tqdm=False)[0].outputs[0].token_ids != first


def test_seeded_n_samples_differ_and_reproduce(sampling_llm, make_prompts):
    llm = sampling_llm
    prompt = make_prompts([33], seed=6)[0]
    params = SamplingParams(n=4, temperature=1.0, max_tokens=12, seed=2024)
    first = llm.generate([prompt], params, use_tqdm=False)[0]
    assert [o.index for o in first.outputs] == [0, 1, 2, 3]
    samples = [tuple(o.token_ids) for o in first.outputs]
    assert all(len(s) == 12 for s in samples)
    assert len(set(samples)) == 4, "the n samples of one seeded request must differ from each other"
    again = llm.generate([make_prompts([9], seed=7)[0], prompt], [SamplingParams(temperature=1.0), params],
                         use_tqdm=False)[1]
    assert [tuple(o.token_ids) for o in again.outputs] == samples
