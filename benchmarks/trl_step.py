"""Seconds per GRPO step: TRL's own generation (`use_vllm=False`), TRL with transformers' continuous
batching (`use_transformers_continuous_batching=True`) and rollserve, same config, same process.

    python benchmarks/trl_step.py [--steps 3] [--num-generations 8] [--prompts-per-step 2]
                                  [--max-completion-length 64] [--copy] [--no-is-correction]
                                  [--arms trl,trl-cb,rollserve]

The generation-heavy shape of the engine-speed issue is
`--prompts-per-step 4 --num-generations 8 --max-completion-length 256`.

SmolLM2-135M-Instruct, fp32, CPU. Each run trains `--steps` steps after one warm-up
step (not counted). Prints seconds per step for each, the ratio TRL / rollserve, and
the share of the step spent generating (TRL's `_generate_single_turn`: for rollserve
this includes the weight sync). Completion lengths vary with the sampled text, so the
mean completion length of each run is printed too.
"""

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback  # noqa: E402
import trl  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from workload import conversations  # noqa: E402

from rollserve import smollm2_135m_instruct  # noqa: E402
from rollserve.integrations.trl import GRPOTrainer, RollserveConfig  # noqa: E402


ARMS = ("trl", "trl-cb", "rollserve")


def reward_short(completions, **kwargs) -> list[float]:
    return [-len(c[0]["content"]) / 100 for c in completions]


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)


def timed_generation(trainer) -> list[float]:
    seconds: list[float] = []
    generate = trainer._generate_single_turn

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return generate(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    trainer._generate_single_turn = wrapper
    return seconds


def run(name: str, ns, path, tokenizer) -> dict:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompts = conversations(ns.prompts_per_step * (ns.steps + 1))
    config = trl.GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="rollserve-trl-step-"), max_steps=ns.steps + 1, learning_rate=1e-6,
        per_device_train_batch_size=ns.num_generations * ns.prompts_per_step, num_generations=ns.num_generations,
        max_completion_length=ns.max_completion_length, temperature=1.0, beta=0.0, logging_steps=1, report_to=[],
        use_cpu=True, bf16=False, save_strategy="no", seed=0, disable_tqdm=True, shuffle_dataset=False,
        vllm_importance_sampling_correction=not (name == "rollserve" and ns.no_is_correction),
        use_transformers_continuous_batching=name == "trl-cb",
    )
    timer = StepTimer()
    common = dict(model=model, reward_funcs=reward_short, args=config, processing_class=tokenizer,
                  train_dataset=Dataset.from_dict({"prompt": prompts}), callbacks=[timer])
    if name in ("trl", "trl-cb"):
        trainer = trl.GRPOTrainer(**common)
    else:
        trainer = GRPOTrainer(**common, rollserve_config=RollserveConfig(
            zero_copy=False if ns.copy else None, kv_cache_memory=512 * 1024**2))
    gen = timed_generation(trainer)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    step, generation = timer.times[1:], gen[1:]
    return {"step": sum(step) / len(step), "gen": sum(generation) / len(generation),
            "length": sum(lengths[1:]) / len(lengths[1:])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--prompts-per-step", type=int, default=2)
    ap.add_argument("--max-completion-length", type=int, default=64)
    ap.add_argument("--copy", action="store_true", help="rollserve keeps a synced copy instead of zero-copy")
    ap.add_argument("--no-is-correction", action="store_true",
                    help="rollserve arm with vllm_importance_sampling_correction=False: TRL then skips the extra "
                         "forward pass that recomputes the old logprobs (its own-generation arm never does it)")
    ap.add_argument("--arms", default="trl,trl-cb,rollserve",
                    help="comma-separated arms among trl (HF generate), trl-cb (transformers' continuous "
                         "batching) and rollserve")
    ns = ap.parse_args()
    arms = [a.strip() for a in ns.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown or not arms:
        ap.error(f"--arms {ns.arms!r}: unknown arm(s) {unknown}; choose among {', '.join(ARMS)}")
    path = smollm2_135m_instruct()
    tokenizer = AutoTokenizer.from_pretrained(path)
    results = {name: run(name, ns, path, tokenizer) for name in arms}
    for name, r in results.items():
        print(f"{name:10s} {r['step']:7.2f} s/step  generation {r['gen']:6.2f} s ({100 * r['gen'] / r['step']:4.1f} % "
              f"of the step)  mean completion length {r['length']:.1f}")
    if "rollserve" in results:
        ours = results["rollserve"]
        for name in (a for a in arms if a != "rollserve"):
            print(f"{name} / rollserve: step time {results[name]['step'] / ours['step']:.2f}x, "
                  f"generation {results[name]['gen'] / ours['gen']:.2f}x")


if __name__ == "__main__":
    main()
