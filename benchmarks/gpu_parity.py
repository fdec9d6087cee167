"""Parity on one GPU, SmolLM2-135M-Instruct in fp32: the engine on the Triton kernels, on the torch references,
and HF `generate`; and the engine's logprobs against the trainer's own recomputation.

    python benchmarks/gpu_parity.py [--device cuda] [--num-prompts 32] [--max-tokens 32] [--backends triton torch]

Checks (each prints one PASS/FAIL line; the exit status is 1 if any fails):
- greedy token ids of every backend equal HF `generate`'s, except where the two best logits of HF's own
  forward at the first differing position are within TIE (a near tie that any rounding may flip);
- greedy token ids equal across backends (same GEMMs, only attention differs);
- the policy logprobs of sampled completions (T=1) are within LOGPROB_TOL of `log_softmax(logits / T)` from
  one plain forward of the trainer's module over prompt + completion.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from workload import conversations  # noqa: E402

from rollserve import LLM, SamplingParams, smollm2_135m_instruct  # noqa: E402

TIE = 1e-3
LOGPROB_TOL = 1e-3


def check(name: str, ok: bool, detail: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    return ok


def hf_greedy(model, prompts, max_tokens: int) -> list[list[int]]:
    out = []
    for p in prompts:  # one prompt at a time: no padding, so HF's numbers are its plain forward's
        ids = torch.tensor([p], device=model.device)
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        out.append(gen[0, len(p):].tolist())
    return out


@torch.no_grad()
def logits_at(model, token_ids: list[int]) -> torch.Tensor:
    """fp32 logits [len, vocab] of one plain forward (the trainer's)."""
    return model(torch.tensor([token_ids], device=model.device)).logits[0].float()


def greedy_mismatches(model, prompts, want, got) -> tuple[list[str], int]:
    """Prompts whose completions differ beyond a near tie (described), and the number of near ties."""
    bad, ties = [], 0
    for i, (p, w, g) in enumerate(zip(prompts, want, got)):
        if w == g:
            continue
        j = next(k for k, (a, b) in enumerate(zip(w, g)) if a != b)
        top2 = torch.topk(logits_at(model, p + w[:j])[-1], 2).values
        gap = float(top2[0] - top2[1])
        if gap < TIE:
            ties += 1
        else:
            bad.append(f"prompt {i} differs at token {j} ({w[j]} vs {g[j]}, logit gap {gap:.2e})")
    return bad, ties


def policy_logprob_error(model, prompts, outputs) -> float:
    worst = 0.0
    for p, out in zip(prompts, outputs):
        for c in out.outputs:
            lp = torch.log_softmax(logits_at(model, p + c.token_ids)[len(p) - 1:-1] / 1.0, dim=-1)
            want = lp.gather(1, torch.tensor(c.token_ids, device=lp.device)[:, None]).squeeze(1)
            worst = max(worst, float((want.cpu() - torch.tensor(c.logprobs)).abs().max()))
    return worst


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--backends", nargs="+", default=["triton", "torch"], choices=["triton", "torch"])
    ns = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_135m_instruct()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(ns.device).eval()
    model.generation_config.eos_token_id = None
    prompts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False)
               for c in conversations(ns.num_prompts)]
    hf = hf_greedy(model, prompts, ns.max_tokens)
    ok, greedy = True, {}
    for backend in ns.backends:
        llm = LLM(model, tok, attention_backend=backend, kv_cache_memory="1GiB")
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=ns.max_tokens, ignore_eos=True),
                            use_tqdm=False)
        greedy[backend] = [o.outputs[0].token_ids for o in outs]
        bad, ties = greedy_mismatches(model, prompts, hf, greedy[backend])
        ok &= check(f"{backend}: greedy == HF generate", not bad,
                    f"{len(prompts) - len(bad) - ties}/{len(prompts)} equal, {ties} near ties" +
                    (f"; {bad[:3]}" if bad else ""))
        sampled = llm.generate(prompts[:8], SamplingParams(n=4, temperature=1.0, max_tokens=ns.max_tokens, seed=0,
                                                           logprobs=0, ignore_eos=True), use_tqdm=False)
        err = policy_logprob_error(model, prompts[:8], sampled)
        ok &= check(f"{backend}: policy logprobs vs the trainer's", err < LOGPROB_TOL, f"max |diff| {err:.2e}")
        del llm  # its KV cache, before the next backend's
    if len(greedy) == 2:
        same = sum(a == b for a, b in zip(*greedy.values()))
        ok &= check("triton == torch greedy", same == len(prompts), f"{same}/{len(prompts)} equal")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
