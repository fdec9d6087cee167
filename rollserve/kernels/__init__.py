"""Hot ops. Each file holds one op's torch reference implementation: the ground truth that faster
implementations (compiled CPU paths, Triton on GPU) are tested against, and the path the engine runs today.

- `kv_write.write_kv`: new tokens' K/V into the paged cache at their slots.
- `kv_gather.gather_kv`: the blocks of each sequence, read back as one contiguous K or V.
- `dense_attention.dense_attention`: scaled dot-product attention with optional soft-capping.
- `decode_attention.paged_decode_attention`: one query token per sequence over its block table.
- `prefill_attention.paged_prefill_attention`: varlen causal chunks over earlier context in the cache.
- `cpu_gemm.CpuGemm`: the CPU's linear layers as GEMMs on prepacked weights (the extension's own fp32 GEMM on
  AVX2 CPUs, oneDNN's elsewhere), and half-precision ones as fp32 GEMMs on CPUs without half matrix units.
- `cpu_ext`: the optional C++/OpenMP kernels of csrc/ (built by `make install`): paged decode attention
  read in place through the block tables, the KV write, the decoder layer's norm and rotary kernels, the
  packed GEMM, and the sampler's plain path.

Cache layout (one layer, K or V): `[num_blocks, block_size, num_kv_heads, head_dim]`; token `p` of a
sequence lives at slot `block_table[p // block_size] * block_size + p % block_size`.
"""
