"""TRL's own tool loop (`GRPOTrainer(tools=[...])`) generating with rollserve.

TRL parses tool calls with the chat template's response parser, so the tokenizer is SmolLM2's with TRL's
own Qwen2.5 template (shipped in `trl/chat_templates`, no download). A random model never writes a tool
call: the model is a GPT-2 whose learned position embeddings steer the positions of the first assistant
turn to one fixed call, `add(a=1, b=2)`; every other position is an ordinary random model, so the answer
after the tool result is sampled, its logprobs are far from 0 and the rewards differ (GRPO learns).
"""

import os
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from datasets import Dataset  # noqa: E402
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel  # noqa: E402
from trl import GRPOConfig  # noqa: E402

from rollserve.integrations import trl as rtrl  # noqa: E402

from test_trl import LOGP_TOLERANCE, in_tmp_path, logp_max  # noqa: E402, F401 (fixture)

PROMPT = [{"role": "user", "content": "What is 1 + 2? Use the add tool."}]
CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
MAX_COMPLETION = 64


def add(a: int, b: int) -> int:
    """Adds two integers.

    Args:
        a: the first
        b: the second
    """
    return a + b


class Calculator:
    """For TRL's `environment_factory`: its public methods are the tools, `get_reward` scores the rollout."""

    def reset(self, **row):
        self.calls = 0

    def add(self, a: int, b: int) -> int:
        """Adds two integers.

        Args:
            a: the first
            b: the second
        """
        self.calls += 1
        return a + b

    def get_reward(self) -> float:
        return float(self.calls)


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    tok.chat_template = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
    return tok


BASE = 64  # the residual dimensions of the ordinary model; those above carry the steering only


def random_gpt2(tokenizer, steered: int) -> GPT2LMHeadModel:
    cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=1024, n_embd=BASE + 2 * steered, n_layer=1, n_head=1,
                     tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                     bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        model.transformer.wpe.weight.zero_()  # positions matter only where `steer` says
        model.lm_head.weight.normal_(std=0.3)  # sharper than HF's init: varied completions and logprobs
        # Token embeddings of norm ~8, so that layer norm does not blow up an optimizer step's small changes to
        # the steering dimensions into large logits at the unsteered positions.
        model.transformer.wte.weight.normal_(std=1.0)
        for weight in (model.transformer.wte.weight, model.lm_head.weight):
            weight[:, BASE:] = 0
        for block in model.transformer.h:  # the blocks write only the ordinary dimensions (Conv1D: [in, out])
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight[:, BASE:] = 0
                proj.bias[BASE:] = 0
    return model


def steer(model, start: int, token_ids: list[int], scale: float = 40.0) -> None:
    """Position `start + j` predicts `token_ids[j]`: its position embedding is a direction of its own (+1, -1 on
    a pair of steering dimensions, so layer norm's mean shift cancels) that the LM head maps to that token.
    Elsewhere the steering dimensions are all equal after layer norm and add nothing to any logit."""
    with torch.no_grad():
        for j, token in enumerate(token_ids):
            direction = torch.zeros(model.config.n_embd)
            direction[BASE + 2 * j], direction[BASE + 2 * j + 1] = 1.0, -1.0
            model.transformer.wpe.weight[start + j] = scale * direction
            model.lm_head.weight[token] += scale * direction


def answer_length(completions, **kwargs):
    return [float(len(c[-1].get("content") or "")) for c in completions]


@pytest.mark.parametrize("tooling", [{"tools": [add]}, {"environment_factory": Calculator}],
                         ids=["tools", "environment_factory"])
def test_trl_tool_loop_runs_through_rollserve(tokenizer, tooling):
    """GRPO 2 steps with `tools=[add]` (or an environment whose method is the tool): every sample calls the tool,
    TRL masks the tool result's tokens out of the loss, the tool turn prefills only what the prefix cache does
    not hold, and the engine's logprobs of the model's tokens equal the trainer's own recomputation."""
    args = GRPOConfig(output_dir="trl-output", per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=MAX_COMPLETION, max_steps=2, learning_rate=1e-3, logging_steps=1,
                      report_to=[], use_cpu=True, bf16=False, save_strategy="no", seed=0, disable_tqdm=True,
                      max_tool_calling_iterations=2)
    call_ids = tokenizer.encode(CALL, add_special_tokens=False) + [tokenizer.eos_token_id]
    trainer = rtrl.GRPOTrainer(model=random_gpt2(tokenizer, len(call_ids)), reward_funcs=answer_length, args=args,
                               train_dataset=Dataset.from_dict({"prompt": [PROMPT] * 8}),
                               processing_class=tokenizer, **tooling,
                               rollserve_config=rtrl.RollserveConfig(kv_cache_memory=1 << 24))
    prompt_ids = tokenizer.apply_chat_template(  # as TRL renders it: its tools, its training template
        PROMPT, tools=trainer.tools, chat_template=trainer.chat_template, add_generation_prompt=True, tokenize=True,
        return_dict=False)
    steer(trainer.model, len(prompt_ids) - 1, call_ids)
    suffix = trainer._get_tool_suffix_ids([{"role": "tool", "name": "add", "content": "3"}])

    backend, prefills = trainer.vllm_generation, []
    generate = backend.generate

    def counting_generate(prompts, *args, **kwargs):
        before = backend.llm.metrics()["prefill_tokens"]
        out = generate(prompts, *args, **kwargs)
        prefills.append((len(prompts[0]), backend.llm.metrics()["prefill_tokens"] - before))
        return out

    backend.generate = counting_generate
    batches, original = [], trainer._generate_and_score_completions

    def scored(inputs):
        out = original(inputs)
        batches.append(out)
        return out

    trainer._generate_and_score_completions = scored
    trainer.train()

    assert trainer.state.global_step == 2 and trainer.vllm_generation.weight_version == 2
    logs = [h for h in trainer.state.log_history if "tools/call_frequency" in h]
    assert [h["tools/call_frequency"] for h in logs] == [1.0, 1.0]
    assert [h["tools/failure_frequency"] for h in logs] == [0.0, 0.0]
    assert any(h.get("grad_norm", 0) > 0 for h in trainer.state.log_history)
    for out in batches:
        for ids, mask, tool_mask in zip(out["completion_ids"].tolist(), out["completion_mask"].tolist(),
                                        out["tool_mask"].tolist()):
            n = sum(mask)
            ids, tool_mask = ids[:n], tool_mask[:n]
            k = len(call_ids)
            assert ids[:k] == call_ids and ids[k:k + len(suffix)] == suffix
            assert tool_mask == [1] * k + [0] * len(suffix) + [1] * (n - k - len(suffix))
            assert "<tool_response>\n3\n</tool_response>" in tokenizer.decode(ids[k:k + len(suffix)])
            assert n > k + len(suffix)  # the model answered after the tool result
    # Per step: the prompt once for its 4 samples, then the 4 tool turns, whose prompt + call blocks the prefix
    # cache holds: each prefills the tool result and at most the call's last, partial block.
    block = backend.llm.config.block_size
    print(f"prefill tokens per generate call (prompt length, prefilled): {prefills}")
    assert [n for _, n in prefills[0::2]] == [len(prompt_ids)] * 2
    assert all(n <= 4 * (len(suffix) + block) for _, n in prefills[1::2])
    differences = logp_max(trainer)
    print(f"sampling logp difference max {differences}")
    assert len(differences) == 2 and max(differences) < LOGP_TOLERANCE
