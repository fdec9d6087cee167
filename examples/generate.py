"""SmolLM2-135M-Instruct answers a few chat prompts, 4 samples each, with per-token logprobs.

    python examples/generate.py [--dtype bf16] [--temperature 0.8] [--max-tokens 64]
"""

import argparse

from rollserve import LLM, SamplingParams, smollm2_135m_instruct

QUESTIONS = [
    "What is the capital of France?",
    "Give me one tip for writing clean Python code.",
    "What is 12 + 30?",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()

    llm = LLM(str(smollm2_135m_instruct()), dtype=args.dtype, seed=0)
    params = SamplingParams(n=4, temperature=args.temperature, max_tokens=args.max_tokens, logprobs=0, seed=1234)
    outputs = llm.chat([[{"role": "user", "content": q}] for q in QUESTIONS], params)
    tok = llm.get_tokenizer()
    for question, out in zip(QUESTIONS, outputs):
        print(f"\n=== {question}  (weight_version={out.weight_version}, {len(out.prompt_token_ids)} prompt tokens)")
        for c in out.outputs:
            print(f"--- sample {c.index}: finish_reason={c.finish_reason}, {len(c.token_ids)} tokens, "
                  f"cumulative_logprob={c.cumulative_logprob:.2f}")
            print(c.text.strip())
            first = [(tok.decode([t]), round(lp, 3)) for t, lp in zip(c.token_ids[:6], c.logprobs[:6])]
            print(f"    first tokens with logprobs: {first}")
    s = llm.stats
    print(f"\nprompt tokens prefilled: {s.num_prefill_tokens} (each prompt once for its 4 samples), "
          f"generated tokens: {s.num_generated_tokens}")


if __name__ == "__main__":
    main()
