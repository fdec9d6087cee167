"""Multi-turn episodes: KV kept between turns (parked samples) vs re-submitting the whole conversation.

    python benchmarks/multi_turn.py [--episodes 32] [--turns 4] [--max-tokens 24] [--dtype fp32] [--repeats 1]

SmolLM2-135M-Instruct, a scripted environment (a fixed reply per turn, never done early), the same
seeds in every mode, runs interleaved. Modes: "kept" (rollserve: the sample is parked while its
environment runs, the next turn computes only the reply), "resubmit" (each turn's whole token ids as a
new request, what agent loops on vLLM do: the prefix cache finds the full blocks), "resubmit, no
prefix cache" (every turn prefills the whole conversation). Prints prefill tokens, engine steps, wall
time and this process's CPU time of each, and the ratios to "kept". On a shared machine compare CPU
times: wall time also counts the time other processes held the cores.
"""

import argparse
import time

import torch

from rollserve import LLM, SamplingParams, smollm2_135m_instruct
from rollserve.agents import run_episodes

REPLIES = ["That is not it. Try a smaller number.", "Still wrong. Try a larger one.", "No. Guess once more."]


class Scripted:
    def reset(self, prompt, **row):
        self.turn = 0
        return None

    def step(self, completion_text, completion_ids):
        self.turn += 1
        return {"role": "user", "content": REPLIES[self.turn % len(REPLIES)]}, 0.0, False


def prompts(num: int) -> list[str]:
    return [f"Game {i}: I picked a whole number between 1 and {100 + i}. Guess it, one number per answer."
            for i in range(num)]


def run(llm: LLM, args, keep_kv: bool) -> tuple[int, float, float, int, int]:
    """(prefill tokens, wall s, CPU s, engine steps, sampled tokens) of one run."""
    llm.reset_prefix_cache()
    before = llm.metrics()
    params = SamplingParams(max_tokens=args.max_tokens, seed=0)
    start, cpu_start = time.perf_counter(), time.process_time()
    episodes = run_episodes(llm, prompts(args.episodes), Scripted, params, max_turns=args.turns, keep_kv=keep_kv)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    assert all(e.num_turns == args.turns for e in episodes)
    after = llm.metrics()
    return (after["prefill_tokens"] - before["prefill_tokens"], elapsed, cpu,
            after["num_steps"] - before["num_steps"], sum(sum(e.mask) for e in episodes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    path = str(smollm2_135m_instruct())
    cached = LLM(path, dtype=args.dtype, kv_cache_memory="512MiB")
    uncached = LLM(path, dtype=args.dtype, kv_cache_memory="512MiB", enable_prefix_caching=False)
    modes = {"kept": (cached, True), "resubmit": (cached, False), "resubmit, no prefix cache": (uncached, False)}
    totals = {name: [0, 0.0, 0.0] for name in modes}
    run(cached, args, True)  # warm-up
    for _ in range(args.repeats):
        for name, (llm, keep_kv) in modes.items():
            prefill, elapsed, cpu, steps, sampled = run(llm, args, keep_kv)
            for k, value in enumerate((prefill, elapsed, cpu)):
                totals[name][k] += value
            print(f"{name:>26}: prefill {prefill:6d} tokens, {steps} steps, wall {elapsed:6.2f} s, "
                  f"CPU {cpu:6.2f} s, {sampled} sampled tokens", flush=True)
    kept_prefill, kept_time, kept_cpu = totals["kept"]
    print(f"{args.episodes} episodes x {args.turns} turns, {args.max_tokens} tokens a turn, {args.dtype}, "
          f"torch threads {torch.get_num_threads()}")
    for name, (prefill, elapsed, cpu) in totals.items():
        print(f"{name:>26}: prefill tokens {prefill / kept_prefill:5.2f}x kept, wall time {elapsed / kept_time:5.2f}x "
              f"kept, CPU time {cpu / kept_cpu:5.2f}x kept")


if __name__ == "__main__":
    main()
