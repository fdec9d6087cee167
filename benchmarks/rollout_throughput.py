"""Rollout throughput on the GRPO workload: rollserve vs HF `model.generate`, same process, same prompts.

    python benchmarks/rollout_throughput.py [--dtype bf16 fp32] [--num-prompts 32] [--hf-batch 4] [--skip-hf]
                                            [--sampling plain controls]

Prints completion tokens/s for each and the ratio rollserve / generate, and the
share of the run spent in sampling + logprobs (building the per-row parameter
tensors and the sampler call). "plain" is the GRPO setting (T=1, sampled-token
logprobs); "controls" adds top_p=0.95, top_k=50 and logprobs=5.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from workload import MAX_NEW_TOKENS, NUM_GENERATIONS, TEMPERATURE, conversations  # noqa: E402

import rollserve.engine.llm_engine as llm_engine  # noqa: E402
from rollserve import LLM, SamplingParams, smollm2_135m_instruct  # noqa: E402

SAMPLING = {
    "plain": dict(logprobs=0),
    "controls": dict(top_p=0.95, top_k=50, logprobs=5),
}


class _Timed:
    """Wraps a callable and adds up the seconds spent in it."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def run_rollserve(path, dtype, convs, sampling: str, llm: LLM | None = None) -> tuple[float, int, float, LLM]:
    """Returns (tokens/s, tokens, share of the time in sampling + logprobs, llm)."""
    llm = llm or LLM(str(path), dtype=dtype, seed=0)
    params = SamplingParams(n=NUM_GENERATIONS, temperature=TEMPERATURE, max_tokens=MAX_NEW_TOKENS,
                            **SAMPLING[sampling])
    llm.chat(convs[:2], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    llm.reset_prefix_cache()
    sampler, batch_cls = _Timed(llm.engine.sampler), _Timed(llm_engine.SamplingBatch)
    llm.engine.sampler, llm_engine.SamplingBatch = sampler, batch_cls
    try:
        start = time.perf_counter()
        outs = llm.chat(convs, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
    finally:
        llm.engine.sampler, llm_engine.SamplingBatch = sampler.fn, batch_cls.fn
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return tokens / elapsed, tokens, (sampler.seconds + batch_cls.seconds) / elapsed, llm


def run_hf_generate(llm: LLM, convs, batch: int) -> tuple[float, int]:
    tok, model = llm.tokenizer, llm.model
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
    eos = llm.engine.eos_token_ids
    tokens, start = 0, time.perf_counter()
    for i in range(0, len(texts), batch):
        enc = tok(texts[i:i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=True, temperature=TEMPERATURE, top_k=0, top_p=1.0,
                                 max_new_tokens=MAX_NEW_TOKENS, num_return_sequences=NUM_GENERATIONS,
                                 pad_token_id=pad)
        for row in out[:, enc.input_ids.shape[1]:].tolist():
            n = len(row)
            for j, t in enumerate(row):
                if t in eos:
                    n = j + 1
                    break
            tokens += n
    return tokens / (time.perf_counter() - start), tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp32"])
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--hf-batch", type=int, default=4, help="prompts per model.generate call")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--sampling", nargs="+", default=["plain", "controls"], choices=sorted(SAMPLING))
    args = ap.parse_args()
    path = smollm2_135m_instruct()
    convs = conversations(args.num_prompts)
    print(f"workload: {len(convs)} prompts x n={NUM_GENERATIONS}, T={TEMPERATURE}, max_tokens={MAX_NEW_TOKENS}; "
          f"torch threads={torch.get_num_threads()}")
    for dtype in args.dtype:
        llm = None
        for sampling in args.sampling:
            rs, rs_tokens, share, llm = run_rollserve(path, dtype, convs, sampling, llm)
            line = (f"[{dtype}, {sampling}] rollserve: {rs:8.1f} tok/s ({rs_tokens} tokens), "
                    f"sampling+logprobs {100 * share:4.1f}% of the time")
            if sampling == "plain" and not args.skip_hf:
                hf, hf_tokens = run_hf_generate(llm, convs, args.hf_batch)
                line += f" | generate: {hf:7.1f} tok/s ({hf_tokens} tokens) | ratio {rs / hf:5.2f}x"
            print(line, flush=True)
        del llm


if __name__ == "__main__":
    main()
