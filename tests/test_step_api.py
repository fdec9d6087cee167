"""The step API (`LLM.add_request / step / abort / has_unfinished`): what generate, the server, streaming and
datasets are built on. Streamed deltas add up to the final output, cost O(new tokens), never show a stop
string, and carry the weight version of their own tokens."""

import subprocess
import sys

import pytest

from rollserve import LLM, SamplingParams
from rollserve.inputs import Prompt

from helpers import one_thread, tiny_model_dir  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir, kv_cache_memory=16 << 20)


def _drain(llm, request_ids) -> tuple[dict, dict]:
    """Steps until every request finished: (request id -> its StepOutputs, request id -> final output)."""
    steps, final = {rid: [] for rid in request_ids}, {}
    while len(final) < len(request_ids):
        for out in llm.step():
            steps[out.request_id].append(out)
            if out.finished:
                final[out.request_id] = out.output
    return steps, final


def test_stream_deltas_add_up_to_the_final_output(llm):
    params = SamplingParams(n=3, max_tokens=40, seed=4, logprobs=2, ignore_eos=True)
    rid = llm.add_request("Tell me about the sea.", params, stream=True)
    quiet = llm.add_request("Tell me about the sea.", params)
    steps, final = _drain(llm, [rid, quiet])
    assert [o.finished for o in steps[quiet]] == [True]  # not streamed: one report, when it finished
    assert len(steps[rid]) > 10 and [o.finished for o in steps[rid]].count(True) == 1 and steps[rid][-1].finished
    out = final[rid]
    assert [c.token_ids for c in out.outputs] == [c.token_ids for c in final[quiet].outputs]  # same seed
    for c in out.outputs:
        deltas = [d for o in steps[rid] for d in o.deltas if d.index == c.index]
        assert sum((d.token_ids for d in deltas), []) == c.token_ids
        assert "".join(d.text for d in deltas) == c.text
        assert sum((d.logprobs for d in deltas), []) == pytest.approx(c.logprobs, abs=0)
        assert sum((d.top_logprobs for d in deltas), []) == c.top_logprobs
        assert sum((d.weight_versions for d in deltas), []) == c.weight_versions
        assert deltas[-1].finish_reason == "length" and all(d.finish_reason is None for d in deltas[:-1])


def test_a_stop_string_is_never_streamed(llm):
    tokenizer = llm.get_tokenizer()
    probe = llm.generate("Count: one two three", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0]
    stop = probe.text[len(probe.text) // 2:len(probe.text) // 2 + 3]
    assert len(stop) == 3 and tokenizer is not None
    rid = llm.add_request("Count: one two three", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                                 stop=[stop]), stream=True)
    steps, final = _drain(llm, [rid])
    c = final[rid].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop and stop not in c.text
    streamed = ""
    for o in steps[rid]:
        for d in o.deltas:
            streamed += d.text
            assert stop not in streamed
    assert streamed == c.text


def test_streaming_decodes_a_bounded_number_of_tokens_per_delta(llm, monkeypatch):
    """The incremental detokenizer decodes a few tokens per new token, however long the completion is; only the
    finished output is decoded whole, once."""
    engine = llm.engine
    decoded: list[int] = []
    inner = engine.detokenize
    monkeypatch.setattr(engine, "detokenize", lambda ids, skip=True: decoded.append(len(ids)) or inner(ids, skip))
    rid = llm.add_request("Once upon a time", SamplingParams(max_tokens=240, ignore_eos=True, seed=2), stream=True)
    per_delta = []
    while True:
        decoded.clear()
        outs = llm.step()
        if any(o.finished for o in outs):
            break
        if outs:
            per_delta.append(sum(decoded))
    assert len(per_delta) > 200
    assert max(per_delta) <= 16, f"tokens decoded per delta: first {per_delta[:5]}, last {per_delta[-5:]}"
    assert max(per_delta[-50:]) <= max(per_delta[:50]) + 2  # does not grow with the completion's length
    assert not llm.has_unfinished()
    del rid


def test_deltas_carry_the_version_of_their_tokens_across_an_update(llm):
    rid = llm.add_request([5, 6, 7], SamplingParams(max_tokens=30, ignore_eos=True, seed=1), stream=True)
    outs = []
    while len(outs) < 5:
        outs += [o for o in llm.step() if o.request_id == rid]
    v0 = llm.weight_version
    v1 = llm.update_weights(llm.model.named_parameters())  # the same values: only the version moves
    while not outs[-1].finished:
        outs += [o for o in llm.step() if o.request_id == rid]
    for o in outs:
        for d in o.deltas:
            assert o.weight_version == d.weight_versions[0]
    versions = [v for o in outs for d in o.deltas for v in d.weight_versions]
    assert versions[:5] == [v0] * 5 and versions[-1] == v1 and versions == sorted(versions)
    assert outs[-1].output.weight_version == v0  # the version of the request's first token

    rid = llm.add_request([5, 6, 7], SamplingParams(max_tokens=8), stream=True)
    steps, final = _drain(llm, [rid])
    assert all(o.weight_version == v1 for o in steps[rid]) and final[rid].weight_version == v1
    assert all(v == v1 for o in steps[rid] for d in o.deltas for v in d.weight_versions)


def test_abort_returns_what_the_request_had(llm):
    rid = llm.add_request(Prompt([1, 2, 3]), SamplingParams(n=2, max_tokens=100, ignore_eos=True), stream=True)
    for _ in range(4):
        llm.step()
    out = llm.abort(rid)
    assert out.finished and out.request_id == rid and not llm.has_unfinished()
    assert [c.finish_reason for c in out.output.outputs] == ["abort", "abort"]
    assert all(d.finish_reason == "abort" for d in out.deltas)
    assert llm.abort(rid) is None
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"prompt": []}, ValueError, r"prompt: the prompt is empty"),
    ({"prompt": "hi", "params": "greedy"}, TypeError, "params must be a SamplingParams"),
    ({"prompt": "hi", "request_id": 3}, TypeError, "request_id must be a non-empty str"),
    ({"prompt": [1, 10**6]}, ValueError, "outside the vocabulary"),
    ({"prompt": "hi", "stream": "yes"}, TypeError, "stream must be True or False"),
    ({"prompt": [{"role": "user"}], "chat_template_kwargs": 3}, TypeError, "chat_template_kwargs must be a dict"),
])
def test_add_request_refuses_bad_input_and_queues_nothing(llm, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        llm.add_request(**kwargs)
    assert not llm.has_unfinished()


def test_generate_takes_strings_ids_and_conversations_alike(llm):
    tok = llm.get_tokenizer()
    conv = [{"role": "user", "content": "Hi there"}]
    text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    params = SamplingParams(max_tokens=5, temperature=0)
    by_conv, by_ids, by_str = llm.generate([conv, tok(text, add_special_tokens=False).input_ids, "Hi there"], params,
                                           use_tqdm=False)
    assert by_conv.prompt == text and by_conv.prompt_token_ids == by_ids.prompt_token_ids
    assert by_conv.outputs[0].token_ids == by_ids.outputs[0].token_ids
    assert by_str.prompt_token_ids == tok("Hi there").input_ids  # strings get the tokenizer's special tokens


def test_import_rollserve_stays_light():
    code = ("import sys, rollserve; heavy = ['rollserve.dataset', 'rollserve.serve', 'pyarrow', 'fastapi', 'trl', "
            "'deepspeed']; print([m for m in heavy if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
