"""LLM.update_weights / weights_fingerprint in one process: exact, atomic, versioned, tied weights."""

import copy

import pytest
import torch

from rollserve import LLM, SamplingParams
from rollserve.weight_sync import WeightUpdateError, normalize_name, weights_fingerprint

KV = 1 << 22
GREEDY = SamplingParams(temperature=0, max_tokens=8)


def greedy(llm, prompts):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def train_step(model, prompts, lr=0.05):
    """One real AdamW step of next-token loss on `prompts`."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    ids = torch.tensor(prompts)
    model(ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    return model.eval()


BUFFERING = pytest.mark.parametrize("double_buffer", [False, True], ids=["copy-in", "double-buffer"])


@pytest.fixture(params=[False, True], ids=["copy-in", "double-buffer"])
def pair(tiny_model, request):
    """An engine on llama seed 0 and a trainer module with other weights (seed 1)."""
    llm = LLM(tiny_model("llama", seed=0), kv_cache_memory=KV, double_buffer_weights=request.param)
    return llm, tiny_model("llama", seed=1)


def tied_model(tiny_model, seed):
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(tiny_model("llama").config)
    config.tie_word_embeddings = True
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                torch.nn.init.normal_(p, std=0.5)
    model.generation_config.eos_token_id = None
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model.eval()


# -- exact, versioned sync ---------------------------------------------------------------


def test_sync_is_bit_equal_and_fingerprints_match(pair, make_prompts):
    llm, trainer = pair
    before = llm.weights_fingerprint()
    assert before == llm.weights_fingerprint()  # deterministic
    assert before != weights_fingerprint(trainer.named_parameters())
    addresses = {n: p.data_ptr() for n, p in llm.model.named_parameters()}
    assert llm.update_weights(trainer.named_parameters(), require_all=True) == 1
    engine = dict(llm.model.named_parameters())
    for name, p in trainer.named_parameters():
        assert torch.equal(engine[name], p), name
        if llm._weight_buffers is None:
            assert engine[name].data_ptr() == addresses[name]  # copied in place, not swapped in
        else:
            assert engine[name].data_ptr() != addresses[name]  # written into the spare, then swapped in
    assert llm.weights_fingerprint() == weights_fingerprint(trainer.named_parameters())
    assert llm.weights_fingerprint() == weights_fingerprint(reversed(list(trainer.state_dict().items())))
    assert llm.weight_version == 1
    out = llm.generate(make_prompts([5]), GREEDY, use_tqdm=False)[0]
    assert out.weight_version == 1


def test_fingerprint_sees_a_single_bit():
    a = [("w", torch.arange(1000.0)), ("b", torch.zeros(3))]
    flipped = a[0][1].clone()
    flipped.view(torch.int32)[517] ^= 1
    assert weights_fingerprint(a) != weights_fingerprint([("w", flipped), a[1]])
    assert weights_fingerprint(a) != weights_fingerprint([("w", a[0][1].flip(0)), a[1]])  # same sums, other bytes
    assert weights_fingerprint(a) != weights_fingerprint([("w", a[0][1].reshape(10, 100)), a[1]])
    assert weights_fingerprint(a) != weights_fingerprint([("v", a[0][1]), a[1]])
    assert weights_fingerprint(a) == weights_fingerprint([("module.w", a[0][1].clone()), a[1]])


@BUFFERING
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_training_step_changes_greedy_and_matches_a_fresh_engine(tiny_model, make_prompts, dtype, double_buffer):
    prompts = make_prompts([6, 9, 4], seed=1)
    initial = tiny_model("llama", seed=0)
    llm = LLM(copy.deepcopy(initial), dtype=dtype, kv_cache_memory=KV, double_buffer_weights=double_buffer)
    old = greedy(llm, prompts)
    trainer = train_step(copy.deepcopy(initial), make_prompts([12, 12], seed=2))
    llm.update_weights(trainer.named_parameters(), require_all=True)
    new = greedy(llm, prompts)
    assert new != old
    fresh = LLM(copy.deepcopy(trainer), dtype=dtype, kv_cache_memory=KV)
    assert new == greedy(fresh, prompts)
    assert llm.weights_fingerprint() == fresh.weights_fingerprint()
    assert llm.weights_fingerprint() == weights_fingerprint(trainer.named_parameters(), dtype=llm.model.dtype)


def test_partial_update_and_given_versions(pair, make_prompts):
    llm, trainer = pair
    assert llm.update_weights([("model.norm.weight", trainer.model.norm.weight * 3)], version=10) == 10
    assert torch.equal(llm.model.model.norm.weight, trainer.model.norm.weight * 3)
    assert llm.update_weights({"lm_head.weight": trainer.lm_head.weight}) == 11
    assert llm.generate(make_prompts([3]), GREEDY, use_tqdm=False)[0].weight_version == 11
    with pytest.raises(ValueError, match="version=11 must be greater than the current weight version 11"):
        llm.update_weights({"lm_head.weight": trainer.lm_head.weight}, version=11)
    for bad in ("12", 12.0, True):
        with pytest.raises(TypeError, match="version must be an int"):
            llm.update_weights({"lm_head.weight": trainer.lm_head.weight}, version=bad)
    assert llm.weight_version == 11


def test_update_drops_the_prefix_cache(pair, make_prompts):
    llm, trainer = pair
    prompt = make_prompts([40], seed=5)
    stats = llm.engine.stats

    def prefilled():
        before = stats.num_prefill_tokens
        llm.generate(prompt, GREEDY, use_tqdm=False)
        return stats.num_prefill_tokens - before

    assert prefilled() == 40
    assert prefilled() == 40 - 32  # two full blocks of 16 come from the cache
    llm.update_weights([("model.norm.weight", trainer.model.norm.weight)])
    assert llm.engine.block_manager.cached == {}
    assert prefilled() == 40


def test_casts_and_moves_to_the_engine_dtype(pair):
    llm, trainer = pair
    half = {n: p.to(torch.bfloat16) for n, p in trainer.named_parameters()}
    llm.update_weights(half.items(), require_all=True)
    for name, p in llm.model.named_parameters():
        assert p.dtype == torch.float32
        assert torch.equal(p, half[name].float())


# -- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize("given,expected", [
    ("model.norm.weight", "model.norm.weight"),
    ("module.model.norm.weight", "model.norm.weight"),
    ("module.module.model.norm.weight", "model.norm.weight"),
    ("_fsdp_wrapped_module.model.layers.0._fsdp_wrapped_module.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"),
    ("model.layers.1._checkpoint_wrapped_module.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"),
    ("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight", "model.layers.0.self_attn.q_proj.weight"),
    ("module.base_model.model.lm_head.modules_to_save.default.weight", "lm_head.weight"),
    ("_orig_mod.model.norm.weight", "model.norm.weight"),
])
def test_normalize_name(given, expected):
    assert normalize_name(given) == expected


def test_wrapped_names_are_accepted(pair):
    llm, trainer = pair
    wrapped = [(("module." if i % 2 else "base_model.model.") + n, p) for i, (n, p) in enumerate(trainer.named_parameters())]
    wrapped[0] = ("_fsdp_wrapped_module." + wrapped[0][0], wrapped[0][1])
    llm.update_weights(wrapped, require_all=True)
    assert llm.weights_fingerprint() == weights_fingerprint(trainer.named_parameters())


# -- bad updates change nothing -------------------------------------------------------------


def _without(params, name):
    return [(n, p) for n, p in params if n != name]


def _raising(items):
    yield from items[: len(items) // 2]
    raise RuntimeError("trainer died mid-sync")


NORM = "model.norm.weight"
BAD_UPDATES = {  # label -> (build(trainer params) -> (named_tensors, kwargs), exception, text in message)
    "unknown name": (lambda ps: (ps + [("model.layers.7.mlp.up_proj.weight", torch.zeros(128, 64))], {}),
                     WeightUpdateError, "unknown names (not parameters of the engine's model): model.layers.7.mlp.up_proj.weight"),
    "wrong shape": (lambda ps: (_without(ps, NORM) + [(NORM, torch.ones(65))], {}),
                    WeightUpdateError, "wrong shapes (engine expects (64,), got (65,)): model.norm.weight"),
    "NaN": (lambda ps: (_without(ps, NORM) + [(NORM, torch.tensor([1.0] * 63 + [float("nan")]))], {}),
            WeightUpdateError, "non-finite values (NaN/inf): model.norm.weight"),
    "inf": (lambda ps: (_without(ps, NORM) + [(NORM, torch.tensor([float("-inf")] + [1.0] * 63))], {}),
            WeightUpdateError, "non-finite values (NaN/inf): model.norm.weight"),
    "overflow in the cast": (lambda ps: (_without(ps, NORM) + [(NORM, torch.full((64,), 1e300, dtype=torch.float64))], {}),
                             WeightUpdateError, "non-finite values (NaN/inf, after the cast to torch.float32): model.norm.weight"),
    "int dtype": (lambda ps: (_without(ps, NORM) + [(NORM, torch.ones(64, dtype=torch.int64))], {}),
                  WeightUpdateError, "non-floating dtypes (weights must be float): model.norm.weight"),
    "not a tensor": (lambda ps: (_without(ps, NORM) + [(NORM, [1.0] * 64)], {}),
                     WeightUpdateError, "values that are not tensors: model.norm.weight"),
    "not a pair": (lambda ps: (ps + [("model.norm.weight",)], {}), WeightUpdateError, "not (str name, tensor) pairs: item #"),
    "duplicate": (lambda ps: (ps + [ps[3]], {}), WeightUpdateError, "names given more than once: model.layers.0.self_attn.v_proj.weight"),
    "iterator raises midway": (lambda ps: (_raising(ps), {}), WeightUpdateError,
                               "named_tensors raised RuntimeError(trainer died mid-sync) after 10 items"),
    "require_all, one missing": (lambda ps: (_without(ps, NORM), {"require_all": True}),
                                 WeightUpdateError, "parameters missing (require_all=True): model.norm.weight"),
    "empty": (lambda ps: ([], {}), WeightUpdateError, "yielded nothing"),
    "stale version": (lambda ps: (ps, {"version": 0}), ValueError, "version=0 must be greater than the current weight version"),
    "a tensor, not pairs": (lambda ps: (ps[0][1], {}), TypeError, "named_tensors must be an iterable"),
    "not iterable": (lambda ps: (42, {}), TypeError, "named_tensors must be an iterable"),
}


@pytest.fixture(scope="module", params=[False, True], ids=["copy-in", "double-buffer"])
def shared_pair(tiny_model, request):
    llm = LLM(tiny_model("llama", seed=0), kv_cache_memory=KV, double_buffer_weights=request.param)
    return llm, tiny_model("llama", seed=1)


@pytest.mark.parametrize("label", list(BAD_UPDATES))
def test_bad_update_changes_nothing_and_engine_keeps_serving(shared_pair, make_prompts, label):
    llm, trainer = shared_pair
    prompts = make_prompts([5, 7], seed=4)
    fingerprint, version, outputs = llm.weights_fingerprint(), llm.weight_version, greedy(llm, prompts)
    build, error, text = BAD_UPDATES[label]
    # valid values around the bad item, different from the engine's whatever earlier cases left in it
    scale = 1.0 + 0.01 * (list(BAD_UPDATES).index(label) + 1)
    named, kwargs = build([(n, p.detach() * scale + 0.01) for n, p in trainer.named_parameters()])
    with pytest.raises(error) as info:
        llm.update_weights(named, **kwargs)
    assert text in str(info.value)
    assert llm.weights_fingerprint() == fingerprint
    assert llm.weight_version == version
    assert greedy(llm, prompts) == outputs
    assert llm.update_weights(trainer.named_parameters(), require_all=True) == version + 1  # and it still updates


def test_error_lists_every_offending_name(pair):
    llm, trainer = pair
    named = [(f"nope.{i}", torch.zeros(1)) for i in range(12)] + [(NORM, torch.ones(3))]
    with pytest.raises(WeightUpdateError) as info:
        llm.update_weights(list(trainer.named_parameters())[:3] + named)
    problems = info.value.problems
    assert problems["unknown names (not parameters of the engine's model)"] == [f"nope.{i}" for i in range(12)]
    assert problems["wrong shapes (engine expects (64,), got (3,))"] == [NORM]
    assert "and 4 more" in str(info.value)


# -- tied weights ----------------------------------------------------------------------------


def test_tied_weights_stay_tied_and_either_name_is_accepted(tiny_model, make_prompts):
    prompts = make_prompts([5, 8], seed=6)
    llm = LLM(tied_model(tiny_model, seed=0), kv_cache_memory=KV)
    trainer = tied_model(tiny_model, seed=1)
    embed, head = llm.model.model.embed_tokens.weight, llm.model.lm_head.weight
    assert head is embed
    # lm_head's name only (embed_tokens not given): both ends of the tie change
    named = [("lm_head.weight" if n == "model.embed_tokens.weight" else n, p) for n, p in trainer.named_parameters()]
    llm.update_weights(named, require_all=True)
    assert llm.model.lm_head.weight is llm.model.model.embed_tokens.weight is embed
    assert torch.equal(embed, trainer.model.embed_tokens.weight)
    assert greedy(llm, prompts) == greedy(LLM(copy.deepcopy(trainer), kv_cache_memory=KV), prompts)
    # a state_dict names the tied tensor twice: accepted, and its fingerprint counts it once
    assert len(trainer.state_dict()) == len(list(trainer.named_parameters())) + 1
    llm.update_weights(trainer.state_dict(), require_all=True)
    assert llm.weights_fingerprint() == weights_fingerprint(trainer.state_dict())
    # two different values for the two names of one tensor: refused
    fingerprint = llm.weights_fingerprint()
    with pytest.raises(WeightUpdateError, match="tied names given different values"):
        llm.update_weights([("model.embed_tokens.weight", embed * 2), ("lm_head.weight", embed * 3)])
    assert llm.weights_fingerprint() == fingerprint


def test_buffers_are_not_required(pair):
    llm, trainer = pair
    assert any(True for _ in llm.model.named_buffers())  # rotary inv_freq
    llm.update_weights(trainer.named_parameters(), require_all=True)


def test_smollm2_tied_update_and_fingerprint(smollm2_path):
    from transformers import AutoModelForCausalLM

    llm = LLM(smollm2_path, kv_cache_memory=1 << 26)
    trainer = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    assert trainer.lm_head.weight is trainer.model.embed_tokens.weight
    prompt = [llm.tokenizer("The capital of France is").input_ids]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    old = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    with torch.no_grad():
        trainer.model.embed_tokens.weight.mul_(-1.0)
    named = [("lm_head.weight" if n == "model.embed_tokens.weight" else n, p) for n, p in trainer.named_parameters()]
    llm.update_weights(named, require_all=True)
    assert llm.model.lm_head.weight is llm.model.model.embed_tokens.weight
    assert llm.weights_fingerprint() == weights_fingerprint(trainer.named_parameters())
    new = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    assert new != old
    assert new == LLM(trainer, kv_cache_memory=1 << 26).generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_finiteness_check_agrees_with_isfinite_on_every_bit_pattern(dtype):
    """The half-precision check uses min/max, not isfinite: each of the 65,536 patterns, alone in a
    tensor and at the end of a long one, must be judged as `torch.isfinite` judges it."""
    from rollserve.weight_sync.updater import _is_finite

    if dtype == torch.float32:
        patterns = torch.tensor([0.0, -0.0, 1e-45, -3.4e38, 3.4e38, float("inf"), float("-inf"), float("nan"),
                                 -float("nan")], dtype=dtype)
    else:
        patterns = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    finite = torch.isfinite(patterns)
    assert _is_finite(patterns[finite])  # all finite patterns together
    big = torch.ones((1 << 20) + 3, dtype=dtype)
    for value in patterns[~finite]:  # each non-finite one alone, and in a later chunk than the first
        assert not _is_finite(value.reshape(1)), value
        big[-1] = value
        assert not _is_finite(big), value
    filler = torch.ones(7, dtype=dtype)
    assert _is_finite(filler) and _is_finite(torch.empty(0, dtype=dtype))
    big = torch.full((1000,), 6e4 if dtype == torch.float16 else 3e38, dtype=dtype)  # the sum overflows
    assert _is_finite(big)


def test_double_buffered_swaps_back_and_forth_in_bf16(tiny_model, make_prompts):
    """Each swap alternates between two storages; the bf16-on-CPU engine keeps fp32 copies of its
    weights keyed on (version counter, address), which must refresh even when, after two updates
    with no step between them, an address comes back with other contents."""
    prompts = make_prompts([6, 9, 4], seed=1)
    models = {name: tiny_model("llama", seed=seed) for name, seed in (("a", 0), ("b", 1), ("c", 2))}
    expected = {name: greedy(LLM(copy.deepcopy(m), dtype="bf16", kv_cache_memory=KV), prompts)
                for name, m in models.items()}
    assert len({tuple(map(tuple, e)) for e in expected.values()}) == 3
    llm = LLM(copy.deepcopy(models["a"]), dtype="bf16", kv_cache_memory=KV, double_buffer_weights=True)
    assert greedy(llm, prompts) == expected["a"]
    for first, second in ("bc", "ab", "ca"):
        llm.update_weights(models[first].named_parameters(), require_all=True)
        llm.update_weights(models[second].named_parameters(), require_all=True)
        assert greedy(llm, prompts) == expected[second], (first, second)
        assert llm.weights_fingerprint() == weights_fingerprint(models[second].named_parameters(),
                                                                dtype=torch.bfloat16)
    assert llm.weight_version == 6
    llm.sleep()  # frees the spares too
    assert llm._weight_buffers._spares == {}
    llm.wake_up()
    llm.update_weights(models["b"].named_parameters())
    assert greedy(llm, prompts) == expected["b"]


def test_double_buffer_weights_must_be_a_bool(tiny_model):
    with pytest.raises(ValueError, match="double_buffer_weights='yes' is invalid"):
        LLM(tiny_model("llama", seed=0), kv_cache_memory=KV, double_buffer_weights="yes")
