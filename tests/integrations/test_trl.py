"""TRL's own GRPOTrainer / RLOOTrainer generating with rollserve (real TRL, tiny Qwen2, fp32, CPU)."""

import os

import pytest
import torch

pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config  # noqa: E402
from trl import GRPOConfig, RLOOConfig  # noqa: E402

from rollserve.integrations import trl as rtrl  # noqa: E402
from rollserve.weight_sync import weights_fingerprint  # noqa: E402
from rollserve.weight_sync.sources import iter_named_weights  # noqa: E402

PROMPTS = ["The sky is", "One two three", "Hello there, friend", "Cats and dogs"]
LOGP_TOLERANCE = 1e-4  # fp32: the engine's logprobs are the trainer's own numbers


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return AutoTokenizer.from_pretrained(smollm2_path)


def tiny_qwen2(tokenizer, seed: int = 0, dropout: bool = False):
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                      tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # sharper than HF's std 0.02, so completions and logprobs vary
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(std=0.2)
    if dropout:  # a train-mode-only module in the path of every token
        model.model.norm = torch.nn.Sequential(model.model.norm, torch.nn.Dropout(0.5))
    return model


def reward_len(completions, **kwargs):
    return [float(len(c)) for c in completions]


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Every test in its own folder: the trainers' relative output_dir lands under tmp_path."""
    monkeypatch.chdir(tmp_path)


def train_args(cls, steps: int, lr: float = 1e-2, **kw):
    return cls(output_dir="trl-output", per_device_train_batch_size=4, num_generations=4,
               max_completion_length=6, max_steps=steps, learning_rate=lr, logging_steps=1, report_to=[],
               use_cpu=True, bf16=False, save_strategy="no", seed=0, disable_tqdm=True,
               activation_checkpointing=True, **kw)  # TRL's default, named as transformers 5 wants it


def dataset():
    return Dataset.from_dict({"prompt": PROMPTS * 4})


def record_syncs(trainer):
    """At each generation: (engine version, engine fingerprint, trainer fingerprint)."""
    backend, seen = trainer.vllm_generation, []
    generate = backend.generate

    def recording_generate(*args, **kwargs):
        trainer_fp = weights_fingerprint(iter_named_weights(trainer.model))
        seen.append((backend.weight_version, backend.llm.weights_fingerprint(), trainer_fp))
        return generate(*args, **kwargs)

    backend.generate = recording_generate
    return seen


def logp_max(trainer) -> list[float]:
    return [h["sampling/sampling_logp_difference/max"] for h in trainer.state.log_history
            if "sampling/sampling_logp_difference/max" in h]


def test_grpo_copy_mode_syncs_every_step(tokenizer):
    trainer = rtrl.GRPOTrainer(model=tiny_qwen2(tokenizer), reward_funcs=reward_len, args=train_args(GRPOConfig, 3),
                               train_dataset=dataset(), processing_class=tokenizer,
                               rollserve_config=rtrl.RollserveConfig(zero_copy=False, kv_cache_memory=1 << 24,
                                                                     sleep_mode=True, sleep_level=2))
    backend = trainer.vllm_generation
    assert not backend.zero_copy and backend.llm.model is not trainer.model
    seen = record_syncs(trainer)
    trainer.train()
    assert [v for v, _, _ in seen] == [1, 2, 3]
    assert all(engine == trained for _, engine, trained in seen)
    assert len({trained for _, _, trained in seen}) == 3  # the trainer's weights did change each step
    diffs = logp_max(trainer)
    assert len(diffs) == 3 and max(diffs) < LOGP_TOLERANCE, diffs
    assert backend.llm.is_sleeping  # sleep_mode: asleep while the trainer steps


def test_grpo_without_sync_shows_the_difference(tokenizer):
    trainer = rtrl.GRPOTrainer(model=tiny_qwen2(tokenizer), reward_funcs=reward_len,
                               args=train_args(GRPOConfig, 3, lr=5e-2), train_dataset=dataset(),
                               processing_class=tokenizer,
                               rollserve_config=rtrl.RollserveConfig(zero_copy=False, kv_cache_memory=1 << 24))
    backend = trainer.vllm_generation
    sync = backend.sync_weights
    backend.sync_weights = lambda: sync() if backend.weight_version == 0 else backend.weight_version  # first only
    trainer.train()
    diffs = logp_max(trainer)
    assert diffs[0] < LOGP_TOLERANCE
    assert min(diffs[1:]) > 100 * LOGP_TOLERANCE, diffs  # stale weights: the gauge must see it


def test_grpo_zero_copy(tokenizer):
    model = tiny_qwen2(tokenizer)
    trainer = rtrl.GRPOTrainer(model=model, reward_funcs=reward_len, args=train_args(GRPOConfig, 3),
                               train_dataset=dataset(), processing_class=tokenizer,
                               rollserve_config=rtrl.RollserveConfig(kv_cache_memory=1 << 24))
    backend = trainer.vllm_generation
    assert backend.zero_copy and backend.llm.model is model
    storage = {n: p.data_ptr() for n, p in model.named_parameters()}
    seen = record_syncs(trainer)
    trainer.train()
    assert [v for v, _, _ in seen] == [1, 2, 3]
    assert len({fp for _, fp, _ in seen}) == 3 and all(engine == trained for _, engine, trained in seen)
    assert {n: p.data_ptr() for n, p in backend.llm.model.named_parameters()} == storage
    diffs = logp_max(trainer)
    assert len(diffs) == 3 and max(diffs) < LOGP_TOLERANCE, diffs


def test_zero_copy_generation_runs_in_eval_behaviour(tokenizer):
    model = tiny_qwen2(tokenizer, dropout=True)
    backend = rtrl.RollserveGeneration(model, _Accelerator(), tokenizer, rtrl.RollserveConfig(kv_cache_memory=1 << 22),
                                       temperature=0.0, max_completion_length=8, logprobs=0)
    assert backend.zero_copy
    prompt = tokenizer("The sky is").input_ids
    expected = backend.generate([prompt], None, 1)[1]
    model.train()
    assert backend.generate([prompt], None, 1)[1] == expected  # dropout stayed off
    assert model.training and all(m.training for m in model.modules())  # and the trainer's mode is back


def test_group_aware_generation_keeps_row_order(tokenizer):
    model = tiny_qwen2(tokenizer)
    backend = rtrl.RollserveGeneration(model, _Accelerator(), tokenizer, rtrl.RollserveConfig(
        kv_cache_memory=1 << 22, enable_prefix_caching=False), max_completion_length=4, logprobs=2)
    a, b = tokenizer("The sky is").input_ids, tokenizer("One two three four").input_ids
    rows = [a, a, a, b, b, b, a]  # TRL's groups, then a lone repeat
    prompt_ids, completion_ids, logprobs, logprob_ids = backend.generate(rows, None, 3)
    assert prompt_ids == rows
    assert backend.llm.stats.num_prefill_tokens == 2 * len(a) + len(b)  # each run prefilled once
    assert [len(c) for c in completion_ids] == [4] * 7
    for c, lps, ids in zip(completion_ids, logprobs, logprob_ids):
        assert [i[0] for i in ids] == c  # the sampled token first, as TRL reads lp[0]
        assert all(len(x) in (2, 3) and x[1] >= x[-1] for x in lps)


class _Accelerator:
    device = torch.device("cpu")
    process_index = 0


class _Plugin:
    zero_stage = 3
    fsdp_version = 2


@pytest.mark.parametrize("plugin,text", [("deepspeed_plugin", "DeepSpeed ZeRO-3"), ("fsdp_plugin", "FSDP2")])
def test_sharded_trainer_gets_a_copy(tokenizer, plugin, text):
    """The accelerator's plan decides, not the parameters: the trainer shards them only when training starts."""
    accelerator = _Accelerator()
    accelerator.state = type("State", (), {"deepspeed_plugin": None, "fsdp_plugin": None, plugin: _Plugin()})()
    model = tiny_qwen2(tokenizer)  # still whole here
    backend = rtrl.RollserveGeneration(model, accelerator, tokenizer, rtrl.RollserveConfig(kv_cache_memory=1 << 22))
    assert not backend.zero_copy and backend.llm.model is not model
    with pytest.raises(ValueError, match=f"zero_copy=True is not possible: the trainer runs under {text}"):
        rtrl.RollserveGeneration(model, accelerator, tokenizer, rtrl.RollserveConfig(zero_copy=True))


def test_grpo_peft_lora(tokenizer):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = rtrl.GRPOTrainer(model=tiny_qwen2(tokenizer), reward_funcs=reward_len,
                               args=train_args(GRPOConfig, 3, lr=5e-2), train_dataset=dataset(),
                               processing_class=tokenizer, peft_config=lora,
                               rollserve_config=rtrl.RollserveConfig(kv_cache_memory=1 << 24))
    backend = trainer.vllm_generation
    assert not backend.zero_copy  # PEFT: the engine runs the merged base model
    seen = record_syncs(trainer)
    trainer.train()
    assert [v for v, _, _ in seen] == [1, 2, 3]
    assert all(engine == merged for _, engine, merged in seen) and len({m for _, _, m in seen}) == 3
    diffs = logp_max(trainer)
    assert len(diffs) == 3 and max(diffs) < LOGP_TOLERANCE, diffs


def test_rloo(tokenizer):
    trainer = rtrl.RLOOTrainer(model=tiny_qwen2(tokenizer), reward_funcs=reward_len, args=train_args(RLOOConfig, 2, beta=0.0),
                               train_dataset=dataset(), processing_class=tokenizer,
                               rollserve_config=rtrl.RollserveConfig(zero_copy=False, kv_cache_memory=1 << 24))
    seen = record_syncs(trainer)
    trainer.train()
    assert [v for v, _, _ in seen] == [1, 2]
    assert all(engine == trained for _, engine, trained in seen)
    assert trainer.state.global_step == 2


def test_rollout_func(tokenizer):
    from trl import GRPOTrainer

    func = rtrl.rollout_func(rtrl.RollserveConfig(kv_cache_memory=1 << 24))
    trainer = GRPOTrainer(model=tiny_qwen2(tokenizer), reward_funcs=reward_len, args=train_args(GRPOConfig, 2),
                          train_dataset=dataset(), processing_class=tokenizer, rollout_func=func)
    trainer.train()
    assert func.backend.zero_copy and func.backend.weight_version == 2
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    assert len(lengths) == 2 and all(0 < x <= 6 for x in lengths)


def test_errors_name_the_field(tokenizer):
    with pytest.raises(ValueError, match="RollserveConfig.sleep_level"):
        rtrl.RollserveConfig(sleep_level=3)
    with pytest.raises(ValueError, match="RollserveConfig.zero_copy"):
        rtrl.RollserveConfig(zero_copy="yes")
    with pytest.raises(ValueError, match="dtype"):
        rtrl.RollserveConfig(dtype="int8")
    with pytest.raises(TypeError, match="trainer must be a trl.GRPOTrainer"):
        rtrl.attach(object())
    with pytest.raises(TypeError, match="rollserve_config must be a RollserveConfig"):
        rtrl.GRPOTrainer(model=tiny_qwen2(tokenizer), reward_funcs=reward_len, rollserve_config={"zero_copy": True})
    model = tiny_qwen2(tokenizer)
    with pytest.raises(ValueError, match="zero_copy=True is not possible: the engine dtype"):
        rtrl.RollserveGeneration(model, _Accelerator(), tokenizer, rtrl.RollserveConfig(zero_copy=True, dtype="bf16"))
    with pytest.raises(ValueError, match=r"generation_kwargs\['beam_width'\]"):
        rtrl.RollserveGeneration(model, _Accelerator(), tokenizer, rtrl.RollserveConfig(kv_cache_memory=1 << 22),
                                 generation_kwargs={"beam_width": 2})
    with pytest.raises(ValueError, match="SamplingParams.top_p"):
        rtrl.RollserveGeneration(model, _Accelerator(), tokenizer, rtrl.RollserveConfig(kv_cache_memory=1 << 22),
                                 top_p=2.0)
    backend = rtrl.RollserveGeneration(model, _Accelerator(), tokenizer, rtrl.RollserveConfig(kv_cache_memory=1 << 22))
    with pytest.raises(ValueError, match="images"):
        backend.generate([[1, 2]], [["an image"]], 1)


def test_example_runs_end_to_end(smollm2_path, tmp_path):
    """The example on the real SmolLM2 for 2 short steps: it trains and its logprobs match the trainer's.

    Two steps cannot show the reward improving; this checks that every step reports a
    reward and a logp difference below the fp32 tolerance, and that the weights were synced.
    """
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, str(root / "examples" / "trl_grpo.py"), "--steps", "2",
                          "--num-generations", "2", "--prompts-per-step", "1", "--max-completion-length", "8",
                          "--output-dir", str(tmp_path / "grpo")],
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    steps = re.findall(r"step +(\d+) +reward ([-\d.]+) +logp diff mean \S+ max (\S+)", out.stdout)
    assert [int(s) for s, _, _ in steps] == [1, 2], out.stdout
    assert all(float(d) < LOGP_TOLERANCE for _, _, d in steps), out.stdout
    assert "engine weight version 2" in out.stdout
