"""GRPO on SmolLM2-135M-Instruct on the CPU with TRL, generating with rollserve.

    python examples/trl_grpo.py [--steps 20] [--copy] [--sleep-mode]

The reward prefers short answers that end with a period. Each step prints the
mean reward, TRL's `sampling/sampling_logp_difference/{mean,max}` (rollserve's
logprobs against the trainer's own recomputation: ~0 in fp32) and the step time.
The only change from a plain TRL script is the import of `GRPOTrainer` and the
`rollserve_config` argument.
"""

import argparse
import os
import time

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback  # noqa: E402
from trl import GRPOConfig  # noqa: E402

from rollserve import smollm2_135m_instruct  # noqa: E402
from rollserve.integrations.trl import GRPOTrainer, RollserveConfig  # noqa: E402

TOPICS = ["the sea", "a cat", "rain", "the moon", "coffee", "a forest", "winter", "a library"]


def short_sentence_reward(completions, **kwargs) -> list[float]:
    """1 for ending with a period, plus up to 1 for brevity (0 at 40 words or more)."""
    rewards = []
    for completion in completions:
        text = completion[0]["content"].strip()
        words = len(text.split())
        rewards.append(float(text.endswith(".")) + max(0.0, 1.0 - words / 40))
    return rewards


class PrintStep(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "reward" not in logs:
            return
        print(f"step {state.global_step:3d}  reward {logs['reward']:.3f}  "
              f"logp diff mean {logs.get('sampling/sampling_logp_difference/mean', float('nan')):.2e} "
              f"max {logs.get('sampling/sampling_logp_difference/max', float('nan')):.2e}  "
              f"{time.perf_counter() - self.start:.1f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--num-generations", type=int, default=4)
    ap.add_argument("--prompts-per-step", type=int, default=2)
    ap.add_argument("--max-completion-length", type=int, default=32)
    ap.add_argument("--learning-rate", type=float, default=1e-5)
    ap.add_argument("--copy", action="store_true", help="engine holds a copy synced each step (default: zero-copy)")
    ap.add_argument("--sleep-mode", action="store_true", help="free the KV cache while the trainer steps")
    ap.add_argument("--output-dir", default="/tmp/rollserve-trl-grpo")
    args = ap.parse_args()

    path = smollm2_135m_instruct()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompts = [[{"role": "user", "content": f"Describe {t} in one sentence."}] for t in TOPICS]
    dataset = Dataset.from_dict({"prompt": prompts * 8})
    config = GRPOConfig(
        output_dir=args.output_dir, max_steps=args.steps, learning_rate=args.learning_rate,
        per_device_train_batch_size=args.num_generations * args.prompts_per_step,
        num_generations=args.num_generations, max_completion_length=args.max_completion_length,
        temperature=1.0, beta=0.0, logging_steps=1, report_to=[], use_cpu=True, bf16=False,
        save_strategy="no", seed=0, disable_tqdm=True,
        activation_checkpointing=True,  # TRL's default (gradient_checkpointing=True) under its transformers 5 name
    )
    trainer = GRPOTrainer(
        model=model, reward_funcs=short_sentence_reward, args=config, train_dataset=dataset,
        processing_class=tokenizer, callbacks=[PrintStep()],
        rollserve_config=RollserveConfig(zero_copy=False if args.copy else None, sleep_mode=args.sleep_mode,
                                         kv_cache_memory=256 * 1024**2),
    )
    trainer.remove_callback(PrinterCallback)  # PrintStep prints the figures that matter here
    backend = trainer.vllm_generation
    print(f"rollserve engine: {'zero-copy (runs on the trainer parameters)' if backend.zero_copy else 'copy'}, "
          f"{args.steps} steps of {config.per_device_train_batch_size} completions", flush=True)
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    diffs = [h["sampling/sampling_logp_difference/max"] for h in trainer.state.log_history
             if "sampling/sampling_logp_difference/max" in h]
    half = max(1, len(rewards) // 2)
    print(f"mean reward: first {half} steps {sum(rewards[:half]) / half:.3f}, "
          f"last {half} steps {sum(rewards[-half:]) / half:.3f}; max logp difference {max(diffs):.2e}; "
          f"engine weight version {backend.weight_version}")


if __name__ == "__main__":
    main()
