"""The GEMM-only ceiling: the model's own linear layers for one decode step, through the engine's GEMMs and `F.linear`.

Every `nn.Linear` of the model (per layer q/k/v/o and gate/up/down, then the
LM head) is run once on `rows` input rows, in model order; the best of
`repeats` such passes is the time of one decode step that does nothing but
its GEMMs. `rows / that time` is the throughput no engine running these
unfused shapes can pass on this machine at that batch size.

    python benchmarks/gemm_ceiling.py [--rows 256] [--dtype fp32]
"""

import argparse
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F


def linear_shapes(model) -> list[torch.nn.Linear]:
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


@torch.inference_mode()
def gemm_step_seconds(model, rows: int, repeats: int = 5, mode=None) -> float:
    """Best-of-`repeats` seconds of one pass over the model's linear layers at `rows` rows.

    `mode`: a context the engine runs its GEMMs under (its `CpuGemm`: packed
    oneDNN weights, fp32 for bf16 on CPUs without bf16 matrix units), so the
    ceiling is for the kernels the engine uses; None: plain `F.linear`.
    """
    layers = linear_shapes(model)
    dtype = layers[0].weight.dtype
    inputs = {m.in_features: torch.randn(rows, m.in_features, dtype=dtype) for m in layers}
    best = float("inf")
    with mode or nullcontext():
        for _ in range(repeats + 1):  # the first pass warms the caches (and the fp32 copies)
            start = time.perf_counter()
            for m in layers:
                F.linear(inputs[m.in_features], m.weight, m.bias)
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    from rollserve import LLM, smollm2_135m_instruct

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--dtype", default="fp32")
    args = ap.parse_args()
    llm = LLM(smollm2_135m_instruct(), dtype=args.dtype)
    for name, mode in (("the engine's GEMMs", llm.engine.runner._gemm), ("plain F.linear", None)):
        seconds = gemm_step_seconds(llm.model, args.rows, mode=mode)
        print(f"{len(linear_shapes(llm.model))} linear layers at {args.rows} rows, {name}: {1000 * seconds:.0f} ms "
              f"per step, ceiling {args.rows / seconds:.1f} tok/s; torch threads={torch.get_num_threads()}")


if __name__ == "__main__":
    main()
