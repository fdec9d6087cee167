"""iter_named_weights on plain modules and PEFT LoRA models (distributed sources: test_distributed.py)."""

import copy

import pytest
import torch

from rollserve import LLM, SamplingParams
from rollserve.weight_sync import weights_fingerprint
from rollserve.weight_sync.sources import iter_named_weights

KV = 1 << 22
GREEDY = SamplingParams(temperature=0, max_tokens=8)


def greedy(llm, prompts):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def test_plain_module_any_bucket_size_dtype(tiny_model):
    model = tiny_model("qwen3", seed=3)
    expected = dict(model.named_parameters())
    for bucket in (1, 10_000, 1 << 30):
        got = list(iter_named_weights(model, bucket_bytes=bucket))
        assert [n for n, _ in got] == list(expected)
        assert all(t.data_ptr() == expected[n].data_ptr() for n, t in got)  # no copies when none are needed
    half = dict(iter_named_weights(model.to(torch.bfloat16), dtype=torch.float32))
    assert all(t.dtype == torch.float32 and torch.equal(t, expected[n].float()) for n, t in half.items())


@pytest.mark.parametrize("kwargs,error,text", [
    ({"model": "not a module"}, TypeError, "model must be a torch.nn.Module"),
    ({"bucket_bytes": 0}, ValueError, "bucket_bytes=0 must be an int >= 1"),
    ({"dtype": torch.int8}, ValueError, "must be None or a floating torch.dtype"),
    ({"only_adapted": True}, ValueError, "only_adapted=True needs a PEFT model"),
])
def test_source_arguments_are_checked(tiny_model, kwargs, error, text):
    kwargs = {"model": tiny_model("llama"), **kwargs}
    with pytest.raises(error, match=text):
        iter_named_weights(**kwargs)


# -- PEFT / LoRA -----------------------------------------------------------------------------


def lora_model(base, **overrides):
    from peft import LoraConfig, get_peft_model

    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
                  modules_to_save=["lm_head"], lora_dropout=0.0)
    return get_peft_model(base, LoraConfig(**{**config, **overrides}))


def train_lora(peft_model, prompts, steps=2):
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=0.05)
    ids = torch.tensor(prompts)
    for _ in range(steps):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return peft_model.eval()


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_lora_merged_sync_is_exact_and_leaves_the_trainer_untouched(tiny_model, make_prompts):
    prompts = make_prompts([5, 9], seed=8)
    base = tiny_model("llama", seed=0)
    llm = LLM(copy.deepcopy(base), kv_cache_memory=KV)
    old = greedy(llm, prompts)
    trainer = train_lora(lora_model(copy.deepcopy(base)), make_prompts([10, 10], seed=9))
    before = snapshot(trainer)
    merged = copy.deepcopy(trainer).merge_and_unload()  # PEFT's own merge, on a copy
    llm.update_weights(iter_named_weights(trainer, bucket_bytes=20_000), require_all=True)
    assert snapshot(trainer).keys() == before.keys()
    assert all(torch.equal(p, before[n]) for n, p in trainer.named_parameters())
    assert not any(getattr(m, "merged", False) for m in trainer.modules())
    engine = dict(llm.model.named_parameters())
    for name, p in merged.named_parameters():
        assert torch.equal(engine[name], p), name
    assert llm.weights_fingerprint() == weights_fingerprint(merged.named_parameters())
    new = greedy(llm, prompts)
    assert new != old
    assert new == greedy(LLM(merged, kv_cache_memory=KV), prompts)


def test_lora_only_adapted_updates_an_engine_holding_the_base(tiny_model):
    base = tiny_model("llama", seed=0)
    llm = LLM(copy.deepcopy(base), kv_cache_memory=KV)
    trainer = train_lora(lora_model(copy.deepcopy(base)), [[1, 2, 3, 4, 5, 6]])
    names = [n for n, _ in iter_named_weights(trainer, only_adapted=True)]
    assert sorted(names) == sorted(["model.embed_tokens.weight", "lm_head.weight"] + [
        f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qv"])
    llm.update_weights(iter_named_weights(trainer, only_adapted=True))
    merged = copy.deepcopy(trainer).merge_and_unload()
    assert llm.weights_fingerprint() == weights_fingerprint(merged.named_parameters())


def test_lora_with_peft_names_through_update_weights(tiny_model):
    """Raw PEFT names of the base weights are accepted too (prefixes and .base_layer stripped)."""
    base = tiny_model("llama", seed=0)
    llm = LLM(tiny_model("llama", seed=5), kv_cache_memory=KV)
    trainer = lora_model(copy.deepcopy(base), modules_to_save=None)
    raw = [(n, p) for n, p in trainer.named_parameters() if "lora_" not in n]
    assert any(".base_layer." in n for n, _ in raw) and all(n.startswith("base_model.model.") for n, _ in raw)
    llm.update_weights(raw, require_all=True)
    assert llm.weights_fingerprint() == weights_fingerprint(base.named_parameters())


def test_unsupported_peft_setups_are_refused(tiny_model):
    trainer = lora_model(tiny_model("llama"), use_dora=True, target_modules=["q_proj"], modules_to_save=None)
    with pytest.raises(ValueError, match="uses DoRA or lora_bias"):
        list(iter_named_weights(trainer))
