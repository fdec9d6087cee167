"""The C++ paged decode attention alone, at engine-like shapes, against the machine's read bandwidth.

    python benchmarks/decode_attention.py [--threads 2] [--seqs 64] [--context 600] [--block-size 16]
                                          [--dtype fp32] [--kv-dtype fp16] [--in-order]

SmolLM2-135M's heads (9 query, 3 KV, head_dim 64). The blocks are handed out in random order (`--in-order`:
consecutive). With --seqs 64 --context 600 one layer's K/V is 59 MB, more than the caches, so every call
reads it from DRAM, as the engine's 30 layers do. Prints the median of 7 repeats of 5 calls as ms per layer,
GFLOP/s and GB/s of K/V read, and `torch.sum`'s read bandwidth over 256 MB for comparison.
"""

import argparse
import time

import torch

from rollserve.kernels import cpu_ext


def median_seconds(fn, repeats: int = 7, calls: int = 5) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--context", type=int, default=600)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--kv-dtype", default=None, choices=["bf16", "fp16"],
                    help="a 16-bit cache under fp32 queries (EngineConfig.kv_cache_dtype); default: --dtype")
    ap.add_argument("--in-order", action="store_true")
    args = ap.parse_args()
    if cpu_ext.extension() is None:
        raise SystemExit("the CPU extension is not built: make install (python -m rollserve.kernels.cpu_ext)")
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    kv_dtype = {None: dtype, "bf16": torch.bfloat16, "fp16": torch.float16}[args.kv_dtype]
    heads, kv_heads, head_dim, bs = 9, 3, 64, args.block_size
    width = -(-args.context // bs)
    blocks = args.seqs * width
    k = torch.randn(blocks, bs, kv_heads, head_dim).to(kv_dtype)
    v = torch.randn(blocks, bs, kv_heads, head_dim).to(kv_dtype)
    order = torch.arange(blocks) if args.in_order else torch.randperm(blocks)
    tables = order.reshape(args.seqs, width)
    q = torch.randn(args.seqs, heads, head_dim).to(dtype)
    lens = torch.full((args.seqs,), args.context, dtype=torch.long)
    s = median_seconds(lambda: cpu_ext.paged_decode_attention_ext(q, k, v, tables, lens, head_dim ** -0.5))
    flops = args.seqs * heads * args.context * head_dim * 4
    kv_bytes = args.seqs * args.context * kv_heads * head_dim * k.element_size() * 2
    print(f"{args.seqs} seqs x {args.context} ctx, blocks of {bs}, {args.dtype} (K/V {kv_dtype}), "
          f"{args.threads} thread(s): "
          f"{s * 1e3:.2f} ms per layer ({30 * s * 1e3:.0f} ms for 30), {flops / s / 1e9:.1f} GFLOP/s, "
          f"{kv_bytes / s / 1e9:.1f} GB/s of K/V")
    x = torch.randn(64 * 1024 * 1024)
    s = median_seconds(x.sum)
    print(f"torch.sum over {x.numel() * 4 >> 20} MB: {x.numel() * 4 / s / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
