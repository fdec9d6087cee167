"""One peer engine on a benchmark workload, run in its own process by rollout_throughput.py.

    python benchmarks/peer.py ENGINE --model HF_FOLDER --dtype fp32 --workload JSON

ENGINE is `vllm` (vLLM's CPU build, in its own venv: see vllm_venv.py), `hf-cb`
(transformers' continuous batching, `model.generate_batch`, as TRL's
`use_transformers_continuous_batching` calls it) or `hf` (padded
`model.generate`, `--hf-batch` prompts per call). Prints one line
`RESULT {"tokens": ..., "seconds": ...}`: completion tokens and the seconds of
the timed call, after a warm-up call; loading is not timed. Imports nothing
from rollserve (the vLLM venv does not have it).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from workload import Workload, conversations  # noqa: E402

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def run_vllm(model: str, dtype: str, w: Workload, args) -> tuple[int, float]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype=DTYPES[dtype], seed=0, max_num_seqs=256)
    llm.chat(conversations(2), SamplingParams(max_tokens=8), use_tqdm=False)
    params = SamplingParams(n=w.n, temperature=w.temperature, max_tokens=w.max_tokens, ignore_eos=w.ignore_eos,
                            logprobs=0)
    start = time.perf_counter()
    outs = llm.chat(conversations(w.num_prompts), params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return sum(len(c.token_ids) for o in outs for c in o.outputs), seconds


def _hf_model(model: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    m = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, DTYPES[dtype])).eval()
    return tok, m


def _prompt_ids(tok, w: Workload) -> list[list[int]]:
    return [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False)
            for c in conversations(w.num_prompts)]


def run_hf_cb(model: str, dtype: str, w: Workload, args) -> tuple[int, float]:
    import torch
    from transformers import GenerationConfig
    from transformers.generation import ContinuousBatchingConfig

    tok, m = _hf_model(model, dtype)
    # KV cache: a fifth of the free memory (about vLLM's 4 GiB here); the default 0.9 is killed for memory on
    # a shared 24 GiB machine. TRL's default is 0.5.
    cb = ContinuousBatchingConfig(max_memory_percent=0.2)
    ids = _prompt_ids(tok, w)
    config = GenerationConfig(max_new_tokens=w.max_tokens, do_sample=True, temperature=w.temperature, top_k=0,
                              top_p=1.0, pad_token_id=tok.pad_token_id,
                              eos_token_id=-1 if w.ignore_eos else tok.eos_token_id)
    with torch.inference_mode():
        m.generate_batch(ids[:2], generation_config=GenerationConfig(max_new_tokens=8, do_sample=False,
                                                                     pad_token_id=tok.pad_token_id),
                         continuous_batching_config=cb)
        start = time.perf_counter()
        # n samples per prompt as TRL asks for them: each prompt repeated n times.
        outs = m.generate_batch([p for p in ids for _ in range(w.n)], generation_config=config,
                                continuous_batching_config=cb)
        seconds = time.perf_counter() - start
    return sum(len(o.generated_tokens) for o in outs.values()), seconds


def run_hf(model: str, dtype: str, w: Workload, args) -> tuple[int, float]:
    import torch

    tok, m = _hf_model(model, dtype)
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations(w.num_prompts)]
    eos = {tok.eos_token_id}
    tokens = 0
    stop = dict(min_new_tokens=w.max_tokens) if w.ignore_eos else {}
    with torch.inference_mode():
        enc = tok(texts[:1], return_tensors="pt", add_special_tokens=False)
        m.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=pad)
        start = time.perf_counter()
        for i in range(0, len(texts), args.hf_batch):
            enc = tok(texts[i:i + args.hf_batch], return_tensors="pt", padding=True, add_special_tokens=False)
            out = m.generate(**enc, do_sample=True, temperature=w.temperature, top_k=0, top_p=1.0,
                             max_new_tokens=w.max_tokens, num_return_sequences=w.n, pad_token_id=pad, **stop)
            for row in out[:, enc.input_ids.shape[1]:].tolist():
                n = len(row)
                if not w.ignore_eos:
                    n = next((j + 1 for j, t in enumerate(row) if t in eos), n)
                tokens += n
        seconds = time.perf_counter() - start
    return tokens, seconds


ENGINES = {"vllm": run_vllm, "hf-cb": run_hf_cb, "hf": run_hf}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("engine", choices=sorted(ENGINES))
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--workload", required=True, help="the Workload's fields as JSON")
    ap.add_argument("--hf-batch", type=int, default=4, help="prompts per model.generate call (hf)")
    args = ap.parse_args()
    w = Workload(**json.loads(args.workload))
    tokens, seconds = ENGINES[args.engine](args.model, args.dtype, w, args)
    print("RESULT " + json.dumps({"tokens": tokens, "seconds": seconds}), flush=True)


if __name__ == "__main__":
    main()
