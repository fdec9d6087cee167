"""GRPO workload throughput on one GPU, then one weight sync, on a ~1.1B Llama built from a config (random
weights, bf16) with SmolLM2's tokenizer.

    python benchmarks/gpu_speed.py [--device cuda] [--backends triton torch] [--vllm PYTHON] [--layers 22]
                                   [--num-prompts 32] [--max-tokens 128]

Prints completion tokens/s for rollserve on each attention backend (Triton with and without CUDA graphs)
and, with `--vllm PYTHON` (an interpreter that has vLLM; it runs gpu_vllm.py in its own process on the
same model, saved), for vLLM and the ratio.
The weight sync is `LLM.update_weights` of every parameter (the trainer's copy on the same GPU, scaled so
that it differs), timed, and checked by fingerprint: the exit status is 1 if the engine's weights are not
the trainer's.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from workload import MAX_NEW_TOKENS, NUM_GENERATIONS, TEMPERATURE, conversations  # noqa: E402

from rollserve import LLM, SamplingParams, smollm2_135m_instruct  # noqa: E402
from rollserve.weight_sync import weights_fingerprint  # noqa: E402

VLLM_TIMEOUT = 120


def build_model(tokenizer, layers: int, device):
    """TinyLlama-1.1B's shape (GQA 32:4, head_dim 64) on SmolLM2's vocabulary, random weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                      tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model.eval()


def params(max_tokens: int) -> SamplingParams:
    return SamplingParams(n=NUM_GENERATIONS, temperature=TEMPERATURE, max_tokens=max_tokens, ignore_eos=True,
                          logprobs=0)


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def rollserve_tok_s(llm, num_prompts: int, max_tokens: int, device) -> float:
    llm.chat(conversations(2), SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    outs = llm.chat(conversations(num_prompts), params(max_tokens), use_tqdm=False)
    synchronize(device)
    seconds = time.perf_counter() - start
    return sum(len(c.token_ids) for o in outs for c in o.outputs) / seconds


def weight_sync(llm, model, device) -> bool:
    trainer = [(name, p.detach().clone().mul_(1.0001)) for name, p in model.named_parameters()]
    gib = sum(t.numel() * t.element_size() for _, t in trainer) / 2**30
    llm.update_weights(trainer)  # warm-up (allocations)
    for _, t in trainer:
        t.mul_(1.0001)
    synchronize(device)
    start = time.perf_counter()
    llm.update_weights(trainer)
    synchronize(device)
    seconds = time.perf_counter() - start
    print(f"weight sync: {gib:.2f} GiB in {seconds * 1e3:.1f} ms ({gib / seconds:.1f} GiB/s), "
          f"in-process update_weights")
    same = llm.weights_fingerprint() == weights_fingerprint(trainer)
    print(f"{'PASS' if same else 'FAIL'} weight sync: engine fingerprint == trainer fingerprint", flush=True)
    return same


def vllm_tok_s(python: str, model, tokenizer, num_prompts: int, max_tokens: int) -> float | None:
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        script = os.path.join(os.path.dirname(__file__), "gpu_vllm.py")
        try:
            done = subprocess.run([python, script, folder, str(num_prompts), str(max_tokens)],
                                  capture_output=True, text=True, timeout=VLLM_TIMEOUT)
        except subprocess.TimeoutExpired:
            print(f"vLLM: no result within {VLLM_TIMEOUT} s")
            return None
    lines = [line for line in done.stdout.splitlines() if line.startswith("VLLM ")]
    if done.returncode or not lines:
        print(f"vLLM: failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        return None
    return json.loads(lines[-1][5:])["tok_s"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backends", nargs="+", default=["triton", "torch"], choices=["triton", "torch"])
    ap.add_argument("--vllm", metavar="PYTHON", help="an interpreter with vLLM installed: measure it too")
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=MAX_NEW_TOKENS)
    ns = ap.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_135m_instruct())
    model = build_model(tokenizer, ns.layers, ns.device)
    size = sum(p.numel() for p in model.parameters()) / 1e9
    print(f"model: Llama {size:.2f}B parameters, bf16, random weights; workload: {ns.num_prompts} prompts x "
          f"n={NUM_GENERATIONS} x {ns.max_tokens} tokens, T={TEMPERATURE}")
    ok, figures = True, {}
    # CUDA graphs replay decode steps with the Triton kernels only (engine/cuda_graphs.py): measured with and without
    on_cuda = torch.device(ns.device).type == "cuda"
    runs = [(b, g) for b in ns.backends for g in ((True, False) if b == "triton" and on_cuda else (False,))]
    for backend, graphs in runs:
        llm = LLM(model, tokenizer, attention_backend=backend, cuda_graphs=graphs, kv_cache_memory="8GiB",
                  max_num_seqs=256)
        label = f"{backend} attention{', CUDA graphs' if graphs else ''}"
        figures[label] = rollserve_tok_s(llm, ns.num_prompts, ns.max_tokens, ns.device)
        print(f"rollserve ({label}): {figures[label]:.0f} tok/s", flush=True)
        if (backend, graphs) == runs[0]:
            ok &= weight_sync(llm, model, ns.device)
        del llm
    if ns.vllm:
        theirs = vllm_tok_s(ns.vllm, model, tokenizer, ns.num_prompts, ns.max_tokens)
        if theirs is not None:
            best = max(figures.values())
            print(f"vLLM: {theirs:.0f} tok/s; rollserve / vLLM = {best / theirs:.2f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
