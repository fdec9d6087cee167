"""Dataset generation vs `llm.generate` on the GRPO workload, same process, same engine, runs interleaved.

    python benchmarks/rollout_dataset.py [--dtype fp32] [--num-prompts 32] [--repeats 2] [--format parquet]
                                         [--batch-size 64] [--reward]

`generate_dataset` is timed from the call to its return (prompt encoding, shard writes, rewards and
manifest included); `llm.chat` from the call to its return. Prints completion tokens/s of each run and
the ratio of the totals (dataset / generate); the target is >= 0.90.
"""

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from workload import MAX_NEW_TOKENS, NUM_GENERATIONS, TEMPERATURE, conversations  # noqa: E402

from rollserve import LLM, SamplingParams, smollm2_135m_instruct  # noqa: E402
from rollserve.dataset import generate_dataset  # noqa: E402


def _length_reward(prompt, completion) -> float:
    return float(len(completion))


def run_generate(llm: LLM, convs, params) -> tuple[int, float]:
    start = time.perf_counter()
    outs = llm.chat(convs, params, use_tqdm=False)
    return sum(len(c.token_ids) for o in outs for c in o.outputs), time.perf_counter() - start


def run_dataset(llm: LLM, convs, params, args) -> tuple[int, float]:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        summary = generate_dataset(llm, convs, params, out, _length_reward if args.reward else None,
                                   batch_size=args.batch_size, output_format=args.format, use_tqdm=False)
        elapsed = time.perf_counter() - start
    assert summary.complete
    return summary.num_completion_tokens, elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each, interleaved")
    ap.add_argument("--format", default="parquet", choices=("parquet", "jsonl"))
    ap.add_argument("--batch-size", type=int, default=64, help="prompts per shard")
    ap.add_argument("--reward", action="store_true", help="also score every completion (a trivial reward)")
    args = ap.parse_args()
    convs = conversations(args.num_prompts)
    llm = LLM(str(smollm2_135m_instruct()), dtype=args.dtype, seed=0)
    llm.chat(convs[:2], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    print(f"workload: {len(convs)} prompts x n={NUM_GENERATIONS}, T={TEMPERATURE}, max_tokens={MAX_NEW_TOKENS}, "
          f"{args.dtype}, torch threads={torch.get_num_threads()}; dataset: {args.format}, "
          f"{args.batch_size} prompts/shard{', reward' if args.reward else ''}", flush=True)
    totals = {"generate": [0, 0.0], "dataset": [0, 0.0]}
    for r in range(args.repeats):
        params = SamplingParams(n=NUM_GENERATIONS, temperature=TEMPERATURE, max_tokens=MAX_NEW_TOKENS, logprobs=0,
                                seed=r)
        for name in ("generate", "dataset") if r % 2 == 0 else ("dataset", "generate"):
            llm.reset_prefix_cache()
            tokens, elapsed = run_generate(llm, convs, params) if name == "generate" else run_dataset(llm, convs, params, args)
            totals[name][0] += tokens
            totals[name][1] += elapsed
            print(f"  run {r} {name:8s}: {tokens / elapsed:7.1f} tok/s ({tokens} tokens, {elapsed:.1f} s)", flush=True)
    rate = {name: tokens / elapsed for name, (tokens, elapsed) in totals.items()}
    print(f"generate_dataset {rate['dataset']:.1f} tok/s | llm.generate {rate['generate']:.1f} tok/s | "
          f"ratio {rate['dataset'] / rate['generate']:.3f}")


if __name__ == "__main__":
    main()
