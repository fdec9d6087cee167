// The paged KV write: each new token's K/V rows copied into the cache at its slot. The reference is
// rollserve/kernels/kv_write.py (two index_copy_ calls); this is the same copy without its per-call
// overhead, which at decode batch sizes is most of the time (~45 us per call against ~3 for the copy).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstring>

// k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], contiguous; key, value:
// [num_tokens, num_kv_heads, head_dim] of the caches' dtype, any strides with a unit last one; slot_mapping:
// [num_tokens] int64, block * block_size + offset. Every slot is checked before anything is written.
void write_kv(torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor key, torch::Tensor value,
              torch::Tensor slot_mapping) {
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "write_kv: k_cache and v_cache must be [num_blocks, block_size, num_kv_heads, head_dim] alike");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "write_kv: the KV cache must be contiguous");
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes() && key.size(1) == k_cache.size(2) &&
                  key.size(2) == k_cache.size(3),
              "write_kv: key and value must be [num_tokens, num_kv_heads, head_dim] matching the cache, got ",
              key.sizes(), " and ", value.sizes(), " for a cache of ", k_cache.sizes());
  TORCH_CHECK(key.scalar_type() == k_cache.scalar_type() && value.scalar_type() == k_cache.scalar_type() &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "write_kv: key, value and both caches must have one dtype");
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kLong && slot_mapping.dim() == 1 &&
                  slot_mapping.size(0) == key.size(0),
              "write_kv: slot_mapping must be int64 [num_tokens]");
  auto k = key.stride(2) == 1 ? key : key.contiguous();
  auto v = value.stride(2) == 1 ? value : value.contiguous();
  auto slots = slot_mapping.contiguous();
  const int64_t T = k.size(0), H = k.size(1), D = k.size(2);
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < T; ++i)
    TORCH_CHECK(sp[i] >= 0 && sp[i] < num_slots, "write_kv: slot_mapping[", i, "] = ", sp[i],
                " is outside the cache's ", num_slots, " slots");
  const int64_t elem = k.element_size(), row = D * elem;
  char* kc = static_cast<char*>(k_cache.data_ptr());
  char* vc = static_cast<char*>(v_cache.data_ptr());
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  const int64_t ks0 = k.stride(0) * elem, ks1 = k.stride(1) * elem, vs0 = v.stride(0) * elem, vs1 = v.stride(1) * elem;
  at::parallel_for(0, T, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t dst = sp[i] * H * row;
      for (int64_t h = 0; h < H; ++h) {
        std::memcpy(kc + dst + h * row, kp + i * ks0 + h * ks1, row);
        std::memcpy(vc + dst + h * row, vp + i * vs0 + h * vs1, row);
      }
    }
  });
}
