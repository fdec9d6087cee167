"""Rollout throughput on the GRPO workload: rollserve vs HF `model.generate`, same process, same prompts.

    python benchmarks/rollout_throughput.py [--dtype bf16 fp32] [--num-prompts 32] [--hf-batch 4] [--skip-hf]

Prints completion tokens/s for each and the ratio rollserve / generate.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from workload import MAX_NEW_TOKENS, NUM_GENERATIONS, TEMPERATURE, conversations  # noqa: E402

from rollserve import LLM, SamplingParams, smollm2_135m_instruct  # noqa: E402


def run_rollserve(path, dtype, convs) -> tuple[float, int, LLM]:
    llm = LLM(str(path), dtype=dtype, seed=0)
    params = SamplingParams(n=NUM_GENERATIONS, temperature=TEMPERATURE, max_tokens=MAX_NEW_TOKENS, logprobs=0)
    llm.chat(convs[:2], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    llm.reset_prefix_cache()
    start = time.perf_counter()
    outs = llm.chat(convs, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return tokens / elapsed, tokens, llm


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
    args = ap.parse_args()
    path = smollm2_135m_instruct()
    convs = conversations(args.num_prompts)
    print(f"workload: {len(convs)} prompts x n={NUM_GENERATIONS}, T={TEMPERATURE}, max_tokens={MAX_NEW_TOKENS}; "
          f"torch threads={torch.get_num_threads()}")
    for dtype in args.dtype:
        rs, rs_tokens, llm = run_rollserve(path, dtype, convs)
        line = f"[{dtype}] rollserve: {rs:8.1f} tok/s ({rs_tokens} tokens)"
        if not args.skip_hf:
            hf, hf_tokens = run_hf_generate(llm, convs, args.hf_batch)
            line += f" | generate: {hf:7.1f} tok/s ({hf_tokens} tokens) | ratio {rs / hf:5.2f}x"
        print(line, flush=True)
        del llm


if __name__ == "__main__":
    main()
