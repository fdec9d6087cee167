"""Where one decode step's time goes at 256 running sequences: GEMMs, decode attention, K/V writes, the rest.

Runs the GRPO workload's 256 samples (32 prompts x n=8) until all decode,
then times `--steps` decode steps with each part wrapped in a timer. CPU time
(`time.process_time`) with one torch thread by default, since wall time on a
shared machine measures the load; `--threads 2 --wall` for the real setting.

    python benchmarks/forward_breakdown.py [--steps 8] [--skip-steps 0] [--threads 1] [--wall] [--long]
                                           [--dtype fp32] [--kv-cache-dtype auto]

`--skip-steps K` decodes K steps untimed first (longer contexts: the attention's share grows with them).
"""

import argparse
import dataclasses
import os
import sys
import time
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(__file__))
from workload import GRPO, LONG, conversations  # noqa: E402

from rollserve import LLM, SamplingParams, smollm2_135m_instruct  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--skip-steps", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--wall", action="store_true")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--kv-cache-dtype", default="auto", help="EngineConfig.kv_cache_dtype (bf16/fp16 under fp32)")
    ap.add_argument("--long", action="store_true", help="the --long workload (16 prompts x n=4 x 1024)")
    args = ap.parse_args()
    w = LONG if args.long else GRPO
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.wall else time.process_time
    llm = LLM(str(smollm2_135m_instruct()), dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype, seed=0,
              max_num_seqs=w.num_seqs, kv_cache_memory="4GiB")
    params = SamplingParams(n=w.n, temperature=w.temperature, max_tokens=w.max_tokens, ignore_eos=True,
                            logprobs=0)
    for conv in conversations(w.num_prompts):
        llm.add_request(conv, params)
    while llm.metrics()["num_waiting"] or llm.metrics()["num_running"] < w.num_seqs:
        llm.step()
    llm.step()  # the last prefill chunk's step
    for _ in range(args.skip_steps):
        llm.step()

    seconds = Counter()

    def timed(name, fn):
        def call(*a, **k):
            start = clock()
            try:
                return fn(*a, **k)
            finally:
                seconds[name] += clock() - start
        return call

    runner = llm.engine.runner
    ops = runner.attention_ops
    runner.attention_ops = dataclasses.replace(ops, write_kv=timed("kv write", ops.write_kv),
                                               decode=timed("decode attention", ops.decode))
    gemm = runner._gemm
    if gemm is not None:
        gemm_fn = type(gemm).linear_cat  # every packed GEMM, the lean forward's and the HF modules' alike
        type(gemm).linear_cat = timed("GEMMs", gemm_fn)
    runner.forward = timed("forward", runner.forward)
    step = timed("step", llm.step)
    for _ in range(args.steps):
        step()
    if gemm is not None:
        type(gemm).linear_cat = gemm_fn
    parts = {"GEMMs": seconds["GEMMs"], "decode attention": seconds["decode attention"],
             "kv write": seconds["kv write"]}
    parts["rest of forward"] = seconds["forward"] - sum(parts.values())
    parts["rest of step"] = seconds["step"] - seconds["forward"]
    per = 1000 / args.steps
    print(f"{args.steps} decode steps at {llm.metrics()['num_running']} rows, {args.threads} thread(s), "
          f"{'wall' if args.wall else 'CPU'} time: {per * seconds['step']:.1f} ms per step; load average "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    for name, s in parts.items():
        print(f"  {name:<18} {per * s:8.1f} ms  {100 * s / seconds['step']:5.1f} %")


if __name__ == "__main__":
    main()
