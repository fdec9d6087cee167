// The sampler's plain path (engine/sampler.py, `Sampler._plain`) in one pass per row: no filters, no
// penalties, the policy logprob. Per row: the max, then the weights exp((x - max) / T) summed in blocks of
// CDF_BLOCK tokens, the draw by inverting the CDF at u * total (first the block, then the token in it), and
// the sampled token's logprob (x_tok - max) / T - log(total). Greedy rows take the first maximal logit.
// Against the torch path: the same draw for the same uniform except where u * total falls within float
// rounding of a CDF step, the logprob within ~1e-6 (the weights come from a different exp).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

#include "simd_math.h"

namespace {

constexpr int64_t CDF_BLOCK = 128;  // engine/sampler.py's

}  // namespace

// logits: [rows, vocab] float32 (unit last stride); temperature: [rows] float32 > 0; greedy: [rows] bool;
// uniforms: [rows] float32 in [0, 1). Returns (tokens [rows] int64, logprobs [rows] float32).
std::tuple<torch::Tensor, torch::Tensor> sample_plain(torch::Tensor logits, torch::Tensor temperature,
                                                      torch::Tensor greedy, torch::Tensor uniforms) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.size(1) > 0,
              "sample_plain: logits must be float32 [rows, vocab] with vocab > 0, got ", logits.scalar_type(), " ",
              logits.sizes());
  const int64_t R = logits.size(0), V = logits.size(1);
  TORCH_CHECK(temperature.scalar_type() == at::kFloat && temperature.numel() == R,
              "sample_plain: temperature must be float32 [rows]");
  TORCH_CHECK(greedy.scalar_type() == at::kBool && greedy.numel() == R, "sample_plain: greedy must be bool [rows]");
  TORCH_CHECK(uniforms.scalar_type() == at::kFloat && uniforms.numel() == R,
              "sample_plain: uniforms must be float32 [rows]");
  auto x = logits.stride(1) == 1 ? logits : logits.contiguous();
  auto temp = temperature.contiguous();
  auto gr = greedy.contiguous();
  auto u = uniforms.contiguous();
  const float* tp = temp.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(tp[r] > 0 && std::isfinite(tp[r]), "sample_plain: temperature[", r, "] = ", tp[r],
                " (must be finite and > 0)");
  auto tokens = torch::empty({R}, torch::kLong);
  auto logprobs = torch::empty({R}, torch::kFloat);
  const float* xp = x.data_ptr<float>();
  const int64_t ld = x.stride(0);
  const bool* gp = gr.data_ptr<bool>();
  const float* up = u.data_ptr<float>();
  int64_t* tok = tokens.data_ptr<int64_t>();
  float* lp = logprobs.data_ptr<float>();
  const int64_t nblocks = (V + CDF_BLOCK - 1) / CDF_BLOCK;
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> w(V), sums(nblocks);
    for (int64_t r = begin; r < end; ++r) {
      const float* row = xp + r * ld;
      float mx = -std::numeric_limits<float>::infinity();
      int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
      __m256 vm = _mm256_set1_ps(mx);
      for (; i + 8 <= V; i += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(row + i));
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, vm);
      for (float v : lanes) mx = std::max(mx, v);
#endif
      for (; i < V; ++i) mx = std::max(mx, row[i]);
      const float t = tp[r];
      const float inv_t = t == 1.0f ? 1.0f : 1.0f / t;
      float total = 0.0f;
      for (int64_t b = 0; b < nblocks; ++b) {
        const int64_t b0 = b * CDF_BLOCK;
        sums[b] = exp_sum(row + b0, w.data() + b0, std::min(CDF_BLOCK, V - b0), mx, inv_t);
        total += sums[b];
      }
      int64_t pick = 0;
      if (gp[r]) {
        while (pick < V && !(row[pick] == mx)) ++pick;  // the first maximal logit, as argmax
        if (pick == V) pick = 0;  // NaN logits: no maximum
      } else {
        // the first block whose running sum exceeds the target, then the first token in it; never a token
        // of zero weight (past the last one with weight, rounding falls back to that one)
        const float target = up[r] * total;
        float before = 0.0f;
        int64_t b = 0, last_block = 0;
        for (int64_t c = 0; c < nblocks; ++c)
          if (sums[c] > 0) last_block = c;
        for (; b < last_block; ++b) {
          if (before + sums[b] > target) break;
          before += sums[b];
        }
        const int64_t b0 = b * CDF_BLOCK, b1 = std::min(V, b0 + CDF_BLOCK);
        float cs = 0.0f;
        int64_t last = b0;
        pick = -1;
        for (int64_t j = b0; j < b1; ++j) {
          if (w[j] > 0) last = j;
          cs += w[j];
          if (pick < 0 && w[j] > 0 && cs > target - before) pick = j;
        }
        if (pick < 0) pick = last;
      }
      tok[r] = pick;
      const float shifted = t == 1.0f ? row[pick] - mx : row[pick] / t - mx / t;
      lp[r] = shifted - std::log(total);
    }
  });
  return {tokens, logprobs};
}
