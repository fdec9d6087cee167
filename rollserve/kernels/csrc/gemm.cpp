// fp32 linear layers on AVX2/FMA CPUs: y = x @ w^T (+ bias) on a weight packed once into panels of 16 output
// columns ([ceil(N/16)][K][16], zero padded). torch's threads take chunks of consecutive panels as they come
// free; within a panel every block of up to 6 rows is one register tile (6 x 16 fp32 accumulators) over the
// whole K, and the thread's next panel (the next of its chunk, or the first of the chunk it reserved) is
// prefetched into L2 while this one is computed, so the weights stream from DRAM under the arithmetic.
// Measured on the AVX2 EPYC (benchmarks/RESULTS.md): ~150 GFLOP/s at 32-64 rows on the model's shapes where
// oneDNN's prepacked GEMM, which does not overlap the weight stream, reaches ~100-120.
//
// Each output element is one fp32 FMA chain over k = 0..K-1 in order, so a row's result does not depend on
// the batch it is in, its position in it, or which panels are concatenated (fused q/k/v and gate/up equal the
// separate projections bit for bit). A bf16/fp16 layer (run in fp32 on CPUs without half-precision matrix
// units) gets its fp32 sums rounded to its dtype in the store, as `.to(dtype)` would round them.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <optional>

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define ROLLSERVE_PACKED_GEMM 1
#include <immintrin.h>
#endif

namespace {

constexpr int64_t NR = 16;  // output columns per panel: two AVX2 vectors
constexpr int64_t MR = 6;   // rows per register tile: 12 accumulators, 2 B loads and 6 broadcasts per k

#ifdef ROLLSERVE_PACKED_GEMM
// 8 fp32 results stored as out_t, rounded to nearest even as torch's casts round (c10::BFloat16, c10::Half).
inline void store8(float* dst, __m256 y) { _mm256_storeu_ps(dst, y); }
inline void store8(c10::Half* dst, __m256 y) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT));
}
inline void store8(c10::BFloat16* dst, __m256 y) {
  const __m256i bits = _mm256_castps_si256(y);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  const __m256 nan = _mm256_cmp_ps(y, y, _CMP_UNORD_Q);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC00000), _mm256_castps_si256(nan));  // c10's quiet NaN
  const __m256i half = _mm256_srli_epi32(r, 16);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(half, half), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(packed));
}

// c[r][0:ncols] = a[r] . b-panel (+ bias) for r < R, prefetching `pf_lines` k-rows of the next panel from `pf`;
// the sums are fp32 and rounded once to out_t.
template <int R, bool FULL, typename out_t>
inline void tile(const float* a, int64_t lda, const float* b, int64_t K, out_t* c, int64_t ldc, int64_t ncols,
                 const float* bias, const float* pf, int64_t pf_lines) {
  // every loop over r fully unrolled, so the accumulators stay in registers
  __m256 acc[R][2];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    if (k < pf_lines) _mm_prefetch(reinterpret_cast<const char*>(pf + k * NR), _MM_HINT_T1);
    const __m256 b0 = _mm256_loadu_ps(b + k * NR), b1 = _mm256_loadu_ps(b + k * NR + 8);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * lda + k);
      acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    __m256 y0 = acc[r][0], y1 = acc[r][1];
    if (FULL) {
      if (bias) {
        y0 = _mm256_add_ps(y0, _mm256_loadu_ps(bias));
        y1 = _mm256_add_ps(y1, _mm256_loadu_ps(bias + 8));
      }
      store8(c + r * ldc, y0);
      store8(c + r * ldc + 8, y1);
    } else {
      alignas(32) float t[NR];
      _mm256_store_ps(t, y0);
      _mm256_store_ps(t + 8, y1);
      for (int64_t j = 0; j < ncols; ++j) c[r * ldc + j] = static_cast<out_t>(bias ? t[j] + bias[j] : t[j]);
    }
  }
}

template <bool FULL, typename out_t>
inline void tile_rows(int64_t rows, const float* a, int64_t lda, const float* b, int64_t K, out_t* c, int64_t ldc,
                      int64_t ncols, const float* bias, const float* pf, int64_t pf_lines) {
  switch (rows) {
    case 6: return tile<6, FULL>(a, lda, b, K, c, ldc, ncols, bias, pf, pf_lines);
    case 5: return tile<5, FULL>(a, lda, b, K, c, ldc, ncols, bias, pf, pf_lines);
    case 4: return tile<4, FULL>(a, lda, b, K, c, ldc, ncols, bias, pf, pf_lines);
    case 3: return tile<3, FULL>(a, lda, b, K, c, ldc, ncols, bias, pf, pf_lines);
    case 2: return tile<2, FULL>(a, lda, b, K, c, ldc, ncols, bias, pf, pf_lines);
    default: return tile<1, FULL>(a, lda, b, K, c, ldc, ncols, bias, pf, pf_lines);
  }
}

template <typename out_t>
void gemm(const float* a, const float* b, const float* bs, out_t* c, int64_t M, int64_t K, int64_t n, int64_t P) {
  const int64_t blocks = (M + MR - 1) / MR;  // row tiles of near-equal size (32 rows: 6, 6, 5, 5, 5, 5)
  const int64_t lines_per_block = (K + blocks - 1) / blocks;
  // Chunks of panels go to whichever thread asks first, ~4 chunks per thread: a thread that woke up late, or
  // whose core a neighbour on the host is sharing, takes fewer. With one fixed range per thread
  // (at::parallel_for) a GEMM lasted as long as its slowest thread: on the 2-vCPU EPYC the main thread spent
  // ~7 % of a long-context decode step waiting at the end of parallel regions, and the model's GEMMs took
  // 141-148 ms per step against 119-131 with chunks (same runs). A thread reserves its next chunk as it starts
  // the last panel of this one, so that the next panel it computes is always the one it prefetches.
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), P);
  const int64_t chunk = std::max<int64_t>(1, P / (4 * std::max<int64_t>(1, threads)));
  std::atomic<int64_t> claimed{0};
  auto work = [&](int64_t, int64_t) {
    for (int64_t first_panel = claimed.fetch_add(chunk); first_panel < P;) {
      const int64_t chunk_end = std::min(P, first_panel + chunk);
      int64_t following = P;  // the chunk after this one, once reserved
      for (int64_t p = first_panel; p < chunk_end; ++p) {
        int64_t np = p + 1;
        if (np == chunk_end) np = following = claimed.fetch_add(chunk);
        const float* panel = b + p * K * NR;
        const float* next = np < P ? b + np * K * NR : nullptr;
        const int64_t ncols = std::min<int64_t>(NR, n - p * NR);
        const float* pbias = bs ? bs + p * NR : nullptr;
        int64_t r0 = 0;
        for (int64_t blk = 0; blk < blocks; ++blk) {
          const int64_t rows = (M - r0 + (blocks - blk) - 1) / (blocks - blk);
          // the next panel's K rows of 64 bytes are prefetched spread over this panel's row tiles
          const int64_t first = blk * lines_per_block;
          const int64_t lines = next ? std::max<int64_t>(0, std::min(lines_per_block, K - first)) : 0;
          const float* pf = next ? next + first * NR : nullptr;
          if (ncols == NR)
            tile_rows<true>(rows, a + r0 * K, K, panel, K, c + r0 * n + p * NR, n, ncols, pbias, pf, lines);
          else
            tile_rows<false>(rows, a + r0 * K, K, panel, K, c + r0 * n + p * NR, n, ncols, pbias, pf, lines);
          r0 += rows;
        }
      }
      first_panel = following;
    }
  };
  if (threads <= 1 || at::in_parallel_region())
    work(0, 1);
  else
    at::parallel_for(0, threads, 1, work);
}
#endif

}  // namespace

bool packed_gemm_available() {
#ifdef ROLLSERVE_PACKED_GEMM
  return true;
#else
  return false;
#endif
}

// w [N, K] float32 -> [ceil(N/16), K, 16], column j of panel p being w's row 16p + j (zeros past N).
torch::Tensor pack_gemm_weight(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat32 && w.device().is_cpu(),
              "pack_gemm_weight: weight must be a 2-D float32 CPU tensor, got ", w.sizes(), " ", w.scalar_type());
  const int64_t N = w.size(0), K = w.size(1), P = (N + NR - 1) / NR;
  auto wc = w.contiguous();
  auto out = torch::zeros({P, K, NR}, w.options());
  const float* src = wc.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t j = 0; j < NR && p * NR + j < N; ++j) {
        const float* row = src + (p * NR + j) * K;
        float* col = dst + p * K * NR + j;
        for (int64_t k = 0; k < K; ++k) col[k * NR] = row[k];
      }
  });
  return out;
}

// x [M, K] float32, wp from pack_gemm_weight of an [n, K] weight, bias [n] or none -> [M, n] of out_dtype
// (float32 by default; bfloat16/float16: the fp32 sums rounded once, as `.to(out_dtype)` of the fp32 result).
torch::Tensor packed_linear(torch::Tensor x, torch::Tensor wp, int64_t n, std::optional<torch::Tensor> bias,
                            std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(packed_gemm_available(), "packed_linear: this build has no packed GEMM (it needs AVX2 and FMA)");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.device().is_cpu(),
              "packed_linear: x must be a 2-D float32 CPU tensor, got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(wp.dim() == 3 && wp.size(2) == NR && wp.scalar_type() == torch::kFloat32 && wp.is_contiguous(),
              "packed_linear: wp must come from pack_gemm_weight, got ", wp.sizes());
  const int64_t M = x.size(0), K = x.size(1), P = wp.size(0);
  TORCH_CHECK(wp.size(1) == K, "packed_linear: x has ", K, " features, the packed weight ", wp.size(1));
  TORCH_CHECK(n > (P - 1) * NR && n <= P * NR, "packed_linear: n=", n, " does not fit ", P, " panels");
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == torch::kFloat32 &&
                bias->is_contiguous(), "packed_linear: bias must be a contiguous float32 [", n, "], got ",
                bias->sizes());
  }
  const auto dtype = out_dtype.value_or(torch::kFloat32);
  TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kBFloat16 || dtype == torch::kHalf,
              "packed_linear: out_dtype must be float32, bfloat16 or float16, got ", dtype);
  auto out = torch::empty({M, n}, x.options().dtype(dtype));
#ifdef ROLLSERVE_PACKED_GEMM
  if (M == 0 || n == 0) return out;
  auto xc = x.contiguous();
  const float* a = xc.data_ptr<float>();
  const float* b = wp.data_ptr<float>();
  const float* bs = bias ? bias->data_ptr<float>() : nullptr;
  if (dtype == torch::kBFloat16)
    gemm(a, b, bs, out.data_ptr<c10::BFloat16>(), M, K, n, P);
  else if (dtype == torch::kHalf)
    gemm(a, b, bs, out.data_ptr<c10::Half>(), M, K, n, P);
  else
    gemm(a, b, bs, out.data_ptr<float>(), M, K, n, P);
#endif
  return out;
}
