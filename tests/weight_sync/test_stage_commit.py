"""LLM.stage_weights / commit_weights / discard_weights: an update checked and held, then applied or dropped."""

import pytest
import torch

from rollserve import LLM, SamplingParams
from rollserve.weight_sync import WeightUpdateError, weights_fingerprint

KV = 1 << 22
GREEDY = SamplingParams(temperature=0, max_tokens=6)
PROMPT = [1, 2, 3, 4, 5]


@pytest.fixture(params=[False, True], ids=["copy-in", "double-buffer"])
def pair(tiny_model, request):
    llm = LLM(tiny_model("llama", seed=0), kv_cache_memory=KV, double_buffer_weights=request.param)
    return llm, tiny_model("llama", seed=1)


def greedy(llm):
    return llm.generate([PROMPT], GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_staged_update_changes_nothing_until_committed(pair):
    llm, trainer = pair
    before, old_tokens = llm.weights_fingerprint(), greedy(llm)
    token = llm.stage_weights(trainer.named_parameters(), version=5)
    assert (llm.weights_fingerprint(), llm.weight_version, greedy(llm)) == (before, 0, old_tokens)
    assert llm.commit_weights(token) == 5
    assert llm.weight_version == 5
    assert llm.weights_fingerprint() == weights_fingerprint(trainer.named_parameters())
    assert greedy(llm) == LLM(trainer, kv_cache_memory=KV).generate([PROMPT], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="names no staged update"):
        llm.commit_weights(token)  # a token is used once


def test_discard_keeps_the_old_weights_and_frees_the_slot(pair):
    llm, trainer = pair
    before = llm.weights_fingerprint()
    llm.discard_weights(llm.stage_weights(trainer.named_parameters()))
    assert (llm.weights_fingerprint(), llm.weight_version) == (before, 0)
    assert llm.update_weights(trainer.named_parameters()) == 1  # double buffering: the spares were released
    assert llm.weights_fingerprint() == weights_fingerprint(trainer.named_parameters())


def test_a_refused_stage_holds_nothing(pair):
    llm, trainer = pair
    bad = [(n, torch.full_like(p, float("nan")) if n == "model.norm.weight" else p.detach())
           for n, p in trainer.named_parameters()]
    with pytest.raises(WeightUpdateError) as info:
        llm.stage_weights(bad)
    assert info.value.problems == {"non-finite values (NaN/inf)": ["model.norm.weight"]}
    assert llm.update_weights(trainer.named_parameters()) == 1  # nothing left holding the spares


def test_commit_refuses_a_version_overtaken_meanwhile(pair):
    llm, trainer = pair
    token = llm.stage_weights(trainer.named_parameters(), version=2)
    llm.advance_weight_version(3)
    before = llm.weights_fingerprint()
    with pytest.raises(ValueError, match="version=2 must be greater"):
        llm.commit_weights(token)
    assert (llm.weights_fingerprint(), llm.weight_version) == (before, 3)
    with pytest.raises(ValueError, match="names no staged update"):
        llm.discard_weights(token)
