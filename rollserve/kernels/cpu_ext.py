"""The optional C++/OpenMP CPU kernels in csrc/, beside the torch references they are tested against.

`make install` builds them (`python -m rollserve.kernels.cpu_ext`) with
`torch.utils.cpp_extension` into ~/.cache/rollserve/ext, one build per torch version and CPU (its
instruction sets: the build is `-march=native`); at run time they are
loaded only if that build is there (a stale build is rebuilt), and
`ROLLSERVE_CPU_KERNELS=0` turns them off. Without them the torch references run.

- `paged_decode_attention`: `decode_attention.paged_decode_attention` reading
  K/V in place through the block tables (no gathered copy), one online-softmax
  pass per sequence over its blocks, fp32 accumulation; float32, bfloat16 and
  float16 on the CPU. For head_dim a multiple of 32 (AVX2/FMA builds) a block's
  scores are computed eight tokens at a time and its values accumulated for up
  to three query heads per pass; the next block's K/V is prefetched into L2 one
  line per row slice the score and value loops read (a burst of prefetches stalls
  on the core's few outstanding-miss slots). At long contexts it reads K/V at
  ~70 % of a plain read of the same blocks (benchmarks/RESULTS.md).
- `write_kv`: `kv_write.write_kv` as one pass of row copies (the reference's two `index_copy_` calls cost
  ~45 us each at decode batch sizes, for a copy of a few microseconds).
- `sample`: the sampler's plain path (`engine.sampler.Sampler._plain`: no filters, penalties or top
  logprobs) in one pass per row, the `kernels.sampling.sample` contract with the filters off (csrc/sampling.cpp).
- `add_rms_norm`, `rope`: a decoder layer's residual add + RMSNorm and rotary embedding in one pass each,
  bit-equal to HF's modules (csrc/layer_ops.cpp); the lean forward (`engine/lean_forward.py`) uses them.
- `pack_gemm_weight`, `packed_linear`: the fp32 linear layers' GEMM on AVX2/FMA CPUs without AVX-512
  (csrc/gemm.cpp; `cpu_gemm.CpuGemm` uses it): weights in panels of 16 columns, streamed from DRAM under
  the arithmetic, 1.1-2x oneDNN's prepacked GEMM at 8-256 rows (the most at the smallest); chunks of panels
  go to whichever thread is free.
"""

import os
from functools import lru_cache
from pathlib import Path

import torch

NAME = "rollserve_cpu_kernels"
SOURCES = [Path(__file__).parent / "csrc" / name
           for name in ("module.cpp", "paged_decode.cpp", "kv_write.cpp", "layer_ops.cpp", "gemm.cpp", "sampling.cpp")]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _cpu_flags() -> str:
    """This CPU's feature flags as Linux lists them (x86 `flags`, arm `Features`), sorted; "" elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return ""


def cpu_tag() -> str:
    """A short fingerprint of this CPU's instruction sets: the build uses `-march=native`, so a build made on
    one CPU must not be loaded on another that lacks its instructions (a home directory shared by machines)."""
    import hashlib
    import platform

    return hashlib.sha1(f"{platform.machine()} {_cpu_flags()}".encode()).hexdigest()[:10]


def build_dir() -> Path:
    return Path(os.path.expanduser("~/.cache/rollserve/ext")) / f"torch-{torch.__version__}-native-{cpu_tag()}"


def build(verbose: bool = False):
    from torch.utils.cpp_extension import load

    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    # -ffp-contract=off: no product and sum fused into one FMA unless the source says so (layer_ops.cpp
    # rounds where HF's modules round)
    flags = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"]
    return load(NAME, [str(s) for s in SOURCES], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                build_directory=str(directory), verbose=verbose)


@lru_cache(maxsize=1)
def extension():
    """The built extension, or None (not built, turned off, or failed to load)."""
    if os.environ.get("ROLLSERVE_CPU_KERNELS", "1") == "0" or not (build_dir() / f"{NAME}.so").exists():
        return None
    try:
        return build()
    except Exception:  # a broken toolchain must not stop the engine: the references run
        return None


def paged_decode_attention_ext(query, k_cache, v_cache, block_tables, context_lens, scale, sliding_window=None,
                           softcap=None):
    """`decode_attention.paged_decode_attention` through the extension; see `supports_decode`."""
    return extension().paged_decode_attention(query, k_cache, v_cache, block_tables, context_lens, float(scale),
                                              int(sliding_window or 0), float(softcap or 0.0))


def supports_decode(query: torch.Tensor, k_cache: torch.Tensor) -> bool:
    return (query.device.type == "cpu" and query.dtype in DTYPES and k_cache.is_contiguous()
            and extension() is not None)


def decode_or_reference(query, k_cache, v_cache, block_tables, context_lens, scale, sliding_window=None,
                        softcap=None):
    """The extension's decode attention where it applies, the torch reference otherwise (float64, ...)."""
    from .decode_attention import paged_decode_attention

    decode = paged_decode_attention_ext if supports_decode(query, k_cache) else paged_decode_attention
    return decode(query, k_cache, v_cache, block_tables, context_lens, scale, sliding_window, softcap)


def sample(logits, temperature, greedy, top_k, top_p, min_p, uniforms):
    """`kernels.sampling.sample` for rows without filters (what `Sampler._fused_plain` passes): token ids and
    their policy logprobs. Raises ValueError for a row with a filter on."""
    if bool((top_k != 0).any()) or bool((top_p != 1).any()) or bool((min_p != 0).any()):
        raise ValueError("the CPU sampling kernel takes rows without top_k/top_p/min_p only")
    return extension().sample_plain(logits.float(), temperature.float(), greedy, uniforms.float())


def write_kv_or_reference(k_cache, v_cache, key, value, slot_mapping):
    """`kv_write.write_kv` through the extension where it applies (CPU tensors, contiguous caches), the torch
    reference otherwise. key/value are rounded to the cache's dtype first, as the reference does."""
    ext = extension()
    if (ext is None or key.device.type != "cpu" or k_cache.dtype not in DTYPES or not k_cache.is_contiguous()
            or not v_cache.is_contiguous() or slot_mapping.dtype != torch.long):
        from .kv_write import write_kv

        return write_kv(k_cache, v_cache, key, value, slot_mapping)
    ext.write_kv(k_cache, v_cache, key.to(k_cache.dtype), value.to(v_cache.dtype), slot_mapping)


if __name__ == "__main__":
    print(f"built {NAME} in {build_dir()}: {build(verbose=True)}")
