"""Compiles every Triton kernel of `rollserve.kernels` for a Hopper GPU (sm_90: H100/H200), down to a cubin,
on a machine without one: the interpreter runs the kernels' Python, this checks what only a GPU build
sees (types across branches and loops, `tl.dot` shapes, lowering). Prints one line per kernel variant.

usage: python compile_for_gpu.py (TRITON_CACHE_DIR says where the builds go)
"""

import os

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from rollserve.kernels import (triton_decode_attention, triton_kv_write, triton_prefill_attention,  # noqa: E402
                               triton_sampling)

TARGET = GPUTarget("cuda", 90, 32)
ATTENTION = dict(scale="fp32", softcap="fp32", window="i32", max_blocks="i32")


def attention_constants(dtype: str, block_size: int, softcap: bool, window: bool) -> dict:
    return dict(NUM_KV_HEADS=2, HEAD_DIM=64, D_PAD=64, BLOCK_SIZE=block_size, USE_SOFTCAP=softcap,
                USE_WINDOW=window, PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST=False)


def variants():
    for dtype in ("fp32", "bf16"):
        t = f"*{dtype}"
        yield "kv write", triton_kv_write._write_kv_kernel, dict(
            key=t, value=t, k_cache=t, v_cache=t, slot_mapping="*i64"), dict(row=128, ROW_PAD=128)
        for block_size, softcap, window in ((16, False, False), (32, True, True)):
            consts = attention_constants(dtype, block_size, softcap, window)
            yield f"decode {dtype} bs{block_size} softcap={softcap} window={window}", \
                triton_decode_attention._decode_kernel, dict(
                    query=t, k_cache=t, v_cache=t, block_tables="*i64", context_lens="*i64", out=t, **ATTENTION), \
                dict(GROUP=3, GROUP_PAD=16, **consts)
            yield f"prefill {dtype} bs{block_size} softcap={softcap} window={window}", \
                triton_prefill_attention._prefill_kernel, dict(
                    query=t, k_cache=t, v_cache=t, block_tables="*i64", query_starts="*i32", query_lens="*i32",
                    context_lens="*i32", out=t, **ATTENTION), \
                dict(GROUP=3, NUM_HEADS=6, BLOCK_M=triton_prefill_attention.BLOCK_M, **consts)
    yield "sampling", triton_sampling._sample_kernel, dict(
        logits="*fp32", temperature="*fp32", greedy="*i32", top_k="*i32", top_p="*fp32", min_p="*fp32",
        uniforms="*fp32", tokens="*i64", logprobs="*fp32", vocab="i32"), \
        dict(BLOCK_V=triton_sampling.BLOCK_V, STEPS=triton_sampling.BISECTION_STEPS)


def main() -> None:
    for name, kernel, signature, constants in variants():
        signature = {**signature, **{k: "constexpr" for k in constants}}
        compiled = triton.compile(ASTSource(kernel, signature, constants), target=TARGET)
        assert compiled.asm.get("cubin"), name
        print(f"compiled for sm_90: {name}", flush=True)


if __name__ == "__main__":
    main()
