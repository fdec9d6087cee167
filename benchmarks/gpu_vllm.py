"""vLLM on the GRPO workload, for gpu_speed.py: `python benchmarks/gpu_vllm.py MODEL_DIR NUM_PROMPTS MAX_TOKENS`.

Prints one `VLLM {"tok_s": ...}` line: completion tokens/s of one timed `LLM.chat` after a warm-up.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from workload import NUM_GENERATIONS, TEMPERATURE, conversations  # noqa: E402


def main() -> None:
    from vllm import LLM, SamplingParams

    folder, num_prompts, max_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    llm = LLM(folder, dtype="bfloat16", gpu_memory_utilization=0.5, seed=0)
    llm.chat(conversations(2), SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    params = SamplingParams(n=NUM_GENERATIONS, temperature=TEMPERATURE, max_tokens=max_tokens, ignore_eos=True,
                            logprobs=0)
    start = time.perf_counter()
    outs = llm.chat(conversations(num_prompts), params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    print("VLLM " + json.dumps({"tok_s": tokens / seconds}), flush=True)


if __name__ == "__main__":
    main()
