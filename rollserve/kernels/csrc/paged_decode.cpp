// Paged decode attention read in place from the block tables (no gather), online softmax, fp32 accumulation.
// The reference is rollserve/kernels/decode_attention.py; the shapes and semantics are its.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "simd_math.h"

namespace {

#if defined(__AVX2__) && defined(__FMA__)
// The sum of the 8 lanes of s.
inline float hsum8(__m256 s) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}
#endif

inline float dot(const float* a, const float* b, int64_t n) {
#if defined(__AVX2__) && defined(__FMA__)
  if (n % 16 == 0) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    for (int64_t d = 0; d < n; d += 16) {
      s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), s0);
      s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(b + d + 8), s1);
    }
    return hsum8(_mm256_add_ps(s0, s1));
  }
#endif
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < n; ++d) acc += a[d] * b[d];
  return acc;
}

// acc[0:n] += sum_t p[t] * rows[t][0:n]
inline void accumulate(float* acc, const float* p, const float* const* rows, int64_t count, int64_t n) {
#if defined(__AVX2__) && defined(__FMA__)
  if (n % 32 == 0) {
    // 32 floats of acc in 4 registers at a time, the block's rows streamed through them: four independent
    // FMA chains per row (one chain would wait out the FMA latency on every row).
    for (int64_t d = 0; d < n; d += 32) {
      __m256 a0 = _mm256_loadu_ps(acc + d), a1 = _mm256_loadu_ps(acc + d + 8);
      __m256 a2 = _mm256_loadu_ps(acc + d + 16), a3 = _mm256_loadu_ps(acc + d + 24);
      for (int64_t t = 0; t < count; ++t) {
        const __m256 w = _mm256_set1_ps(p[t]);
        const float* r = rows[t] + d;
        a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(r), a0);
        a1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(r + 8), a1);
        a2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(r + 16), a2);
        a3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(r + 24), a3);
      }
      _mm256_storeu_ps(acc + d, a0);
      _mm256_storeu_ps(acc + d + 8, a1);
      _mm256_storeu_ps(acc + d + 16, a2);
      _mm256_storeu_ps(acc + d + 24, a3);
    }
    return;
  }
#endif
  for (int64_t t = 0; t < count; ++t) {
    const float w = p[t];
    const float* r = rows[t];
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) acc[d] += w * r[d];
  }
}


// Before a sequence: its queries as float in qf [H, D] (times `scale`, except under a softcap, which takes the
// scale inside the cap), and the online softmax emptied: running max m = -inf, sum l = 0, acc [H, D] = 0.
template <typename scalar_t>
inline void start_sequence(const scalar_t* q, int64_t H, int64_t D, float scale, float softcap, float* qf, float* m,
                           float* l, float* acc) {
  const float qscale = softcap > 0 ? 1.0f : scale;
  for (int64_t i = 0; i < H * D; ++i) qf[i] = static_cast<float>(q[i]) * qscale;
  std::fill(m, m + H, -std::numeric_limits<float>::infinity());
  std::fill(l, l + H, 0.0f);
  std::fill(acc, acc + H * D, 0.0f);
}

// One block's scores sh[0:n] of one query head into its online softmax (m, l, acc[0:D]): soft-capped, then
// exponentiated in place against the new running max, acc rescaled to it.
inline void softmax_block(float* sh, int64_t n, float scale, float softcap, float& m, float& l, float* acc,
                          int64_t D) {
  if (softcap > 0)
    for (int64_t t = 0; t < n; ++t) sh[t] = std::tanh(sh[t] * scale / softcap) * softcap;
  float best = m;
  for (int64_t t = 0; t < n; ++t) best = std::max(best, sh[t]);
  const float corr = std::exp(m - best);  // exp(-inf) = 0 on the first block
  if (corr != 1.0f)
    for (int64_t d = 0; d < D; ++d) acc[d] *= corr;
  l = l * corr + exp_sum(sh, sh, n, best, 1.0f);
  m = best;
}

// After a sequence: out [H, D] = acc / l.
template <typename scalar_t>
inline void finish_sequence(const float* acc, const float* l, int64_t H, int64_t D, scalar_t* out) {
  for (int64_t hq = 0; hq < H; ++hq) {
    const float inv = 1.0f / l[hq];
    for (int64_t d = 0; d < D; ++d) out[hq * D + d] = static_cast<scalar_t>(acc[hq * D + d] * inv);
  }
}

// The next block's K and V on their way into the cache while this one is computed: blocks are scattered,
// so the hardware prefetcher, which follows streams, starts cold on each.
template <typename scalar_t>
inline void prefetch_block(const scalar_t* kc, const scalar_t* vc, int64_t offset, int64_t count) {
  const char* k = reinterpret_cast<const char*>(kc + offset);
  const char* v = reinterpret_cast<const char*>(vc + offset);
  const int64_t bytes = count * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t i = 0; i < bytes; i += 64) {
    __builtin_prefetch(k + i);
    __builtin_prefetch(v + i);
  }
}

// Rows of one block as float: the cache itself for float, a converted copy otherwise.
template <typename scalar_t>
inline const float* as_float(const scalar_t* src, float* scratch, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else {
    for (int64_t d = 0; d < n; ++d) scratch[d] = static_cast<float>(src[d]);
    return scratch;
  }
}

// One work item is one sequence, all its heads: each block's K (and V) rows of every KV head are
// contiguous in the cache, so a block is streamed once instead of once per KV head.
template <typename scalar_t, typename cache_t>
void decode_rows(const scalar_t* q, const cache_t* kc, const cache_t* vc, const int64_t* tables,
                 const int64_t* ctx_lens, scalar_t* out, int64_t begin, int64_t end, int64_t num_heads,
                 int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t max_blocks, float scale,
                 int64_t window, float softcap) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t D = head_dim, H = num_heads;
  const int64_t row_elems = num_kv_heads * D;  // one token of one block: all KV heads
  std::vector<float> qf(H * D), acc(H * D), m(H), l(H), sc(H * block_size), kv(block_size * row_elems);
  std::vector<const float*> rows(block_size * num_kv_heads);
  for (int64_t s = begin; s < end; ++s) {
    const int64_t ctx = ctx_lens[s];
    const int64_t first = window > 0 ? std::max<int64_t>(0, ctx - window) : 0;
    start_sequence(q + s * H * D, H, D, scale, softcap, qf.data(), m.data(), l.data(), acc.data());
    for (int64_t b = first / block_size; b * block_size < ctx; ++b) {
      const int64_t block = tables[s * max_blocks + b];
      const int64_t t0 = std::max(first, b * block_size), t1 = std::min(ctx, (b + 1) * block_size);
      const int64_t n = t1 - t0;
      const int64_t base = (block * block_size + (t0 - b * block_size)) * row_elems;
      if ((b + 1) * block_size < ctx) prefetch_block(kc, vc, tables[s * max_blocks + b + 1] * block_size * row_elems,
                                                     block_size * row_elems);
      const float* kf = as_float(kc + base, kv.data(), n * row_elems);
      // scores of the block's tokens for every query head, then the online-softmax rescale
      for (int64_t hq = 0; hq < H; ++hq) {
        const float* qh = qf.data() + hq * D;
        const float* kh = kf + (hq / group) * D;
        float* sh = sc.data() + hq * block_size;
        for (int64_t t = 0; t < n; ++t) sh[t] = dot(qh, kh + t * row_elems, D);
        softmax_block(sh, n, scale, softcap, m[hq], l[hq], acc.data() + hq * D, D);
      }
      const float* vf = as_float(vc + base, kv.data(), n * row_elems);
      for (int64_t h = 0; h < num_kv_heads; ++h)
        for (int64_t t = 0; t < n; ++t) rows[h * block_size + t] = vf + t * row_elems + h * D;
      for (int64_t hq = 0; hq < H; ++hq)
        accumulate(acc.data() + hq * D, sc.data() + hq * block_size, rows.data() + (hq / group) * block_size, n, D);
    }
    finish_sequence(acc.data(), l.data(), H, D, out + s * H * D);
  }
}


#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define ROLLSERVE_VECTOR_DECODE 1

// The next block's K and V on their way into L2 while this one is computed, spread evenly over the `steps`
// calls of `step()` the block makes (`lines` prefetches in all): the score and value loops step once per row
// slice they read, so the prefetches fall one or two between FMAs. Issued in bursts (per call, or per
// block), they fill the core's few outstanding-miss slots, the prefetch instructions themselves stall, and the
// block's own loads wait behind them (measured on a 2-core AVX2 EPYC, 64 sequences x 1100 tokens of fp32
// K/V: 13.9-16.4 GB/s with one burst per score call, against 15.9-19.0 interleaved; a plain read of the same
// blocks: 23.0-26.4).
struct ReadAhead {
  const char* k = nullptr;
  const char* k_end = nullptr;
  const char* v = nullptr;
  const char* v_end = nullptr;
  int64_t lines = 0, steps = 1, credit = 0;
  inline void step() {
    credit += lines;
    while (credit >= steps) {
      credit -= steps;
      if (k < k_end) {
        __builtin_prefetch(k, 0, 2);
        k += 64;
      } else if (v < v_end) {
        __builtin_prefetch(v, 0, 2);
        v += 64;
      }
    }
  }
};

// 8 consecutive elements as 8 floats.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {  // bf16 is the top half of a float
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// The lane sums of p[0..7], as one vector: [sum(p0), ..., sum(p7)].
inline __m256 lane_sums8(const __m256* p) {
  const __m256 b0 = _mm256_hadd_ps(_mm256_hadd_ps(p[0], p[1]), _mm256_hadd_ps(p[2], p[3]));
  const __m256 b1 = _mm256_hadd_ps(_mm256_hadd_ps(p[4], p[5]), _mm256_hadd_ps(p[6], p[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20), _mm256_permute2f128_ps(b0, b1, 0x31));
}

// scores[t] = q . k_t for t < n, k_t = k + t * stride; q is float, D a multiple of 32. Eight tokens at a
// time, each in its own accumulator over 32-wide slices of q held in registers, reduced together at the end.
template <typename scalar_t>
inline void block_scores(const float* q, const scalar_t* k, int64_t stride, int64_t n, int64_t D, float* scores,
                         ReadAhead& ahead) {
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    __m256 p[8];
    for (int j = 0; j < 8; ++j) p[j] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 32) {
      const __m256 q0 = _mm256_loadu_ps(q + d), q1 = _mm256_loadu_ps(q + d + 8);
      const __m256 q2 = _mm256_loadu_ps(q + d + 16), q3 = _mm256_loadu_ps(q + d + 24);
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        const scalar_t* r = k + (t + j) * stride + d;
        ahead.step();
        __m256 a = _mm256_mul_ps(q0, load8(r));
        a = _mm256_fmadd_ps(q1, load8(r + 8), a);
        a = _mm256_fmadd_ps(q2, load8(r + 16), a);
        p[j] = _mm256_add_ps(p[j], _mm256_fmadd_ps(q3, load8(r + 24), a));
      }
    }
    _mm256_storeu_ps(scores + t, lane_sums8(p));
  }
  for (; t < n; ++t) {
    const scalar_t* r = k + t * stride;
    __m256 a = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(r + d), a);
    scores[t] = hsum8(a);
  }
}

// acc[g][0:D] += sum_t w[g][t] * v_t[0:D] for G <= 3 query heads sharing the rows v_t = v + t * stride.
// 32 floats of each head's acc in registers at a time, the rows streamed through them.
template <int G, typename scalar_t>
inline void block_values(float* const* acc, const float* const* w, const scalar_t* v, int64_t stride, int64_t n,
                         int64_t D, ReadAhead& ahead) {
  for (int64_t d = 0; d < D; d += 32) {
    __m256 a[G][4];
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < 4; ++i) a[g][i] = _mm256_loadu_ps(acc[g] + d + 8 * i);
    for (int64_t t = 0; t < n; ++t) {
      const scalar_t* r = v + t * stride + d;
      ahead.step();
      const __m256 r0 = load8(r), r1 = load8(r + 8), r2 = load8(r + 16), r3 = load8(r + 24);
      for (int g = 0; g < G; ++g) {
        const __m256 x = _mm256_set1_ps(w[g][t]);
        a[g][0] = _mm256_fmadd_ps(x, r0, a[g][0]);
        a[g][1] = _mm256_fmadd_ps(x, r1, a[g][1]);
        a[g][2] = _mm256_fmadd_ps(x, r2, a[g][2]);
        a[g][3] = _mm256_fmadd_ps(x, r3, a[g][3]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < 4; ++i) _mm256_storeu_ps(acc[g] + d + 8 * i, a[g][i]);
  }
}

#if defined(__AVX512F__)
#define ROLLSERVE_AVX512_DECODE 1

// 16 consecutive elements as 16 floats.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// The 16 lanes of p folded to 8 (lane i + lane i+8).
inline __m256 fold16(__m512 p) {
  return _mm256_add_ps(_mm512_castps512_ps256(p), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(p), 1)));
}

// `block_scores` 16 floats wide, for D a multiple of 64.
template <typename scalar_t>
inline void block_scores16(const float* q, const scalar_t* k, int64_t stride, int64_t n, int64_t D, float* scores,
                           ReadAhead& ahead) {
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    __m512 p[8];
    for (int j = 0; j < 8; ++j) p[j] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 64) {
      const __m512 q0 = _mm512_loadu_ps(q + d), q1 = _mm512_loadu_ps(q + d + 16);
      const __m512 q2 = _mm512_loadu_ps(q + d + 32), q3 = _mm512_loadu_ps(q + d + 48);
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        const scalar_t* r = k + (t + j) * stride + d;
        ahead.step();
        __m512 a = _mm512_mul_ps(q0, load16(r));
        a = _mm512_fmadd_ps(q1, load16(r + 16), a);
        a = _mm512_fmadd_ps(q2, load16(r + 32), a);
        p[j] = _mm512_add_ps(p[j], _mm512_fmadd_ps(q3, load16(r + 48), a));
      }
    }
    __m256 h[8];
    for (int j = 0; j < 8; ++j) h[j] = fold16(p[j]);
    _mm256_storeu_ps(scores + t, lane_sums8(h));
  }
  for (; t < n; ++t) {
    const scalar_t* r = k + t * stride;
    __m512 a = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), load16(r + d), a);
    scores[t] = hsum8(fold16(a));
  }
}

// `block_values` 16 floats wide, for D a multiple of 64.
template <int G, typename scalar_t>
inline void block_values16(float* const* acc, const float* const* w, const scalar_t* v, int64_t stride, int64_t n,
                           int64_t D, ReadAhead& ahead) {
  for (int64_t d = 0; d < D; d += 64) {
    __m512 a[G][4];
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < 4; ++i) a[g][i] = _mm512_loadu_ps(acc[g] + d + 16 * i);
    for (int64_t t = 0; t < n; ++t) {
      const scalar_t* r = v + t * stride + d;
      ahead.step();
      const __m512 r0 = load16(r), r1 = load16(r + 16), r2 = load16(r + 32), r3 = load16(r + 48);
      for (int g = 0; g < G; ++g) {
        const __m512 x = _mm512_set1_ps(w[g][t]);
        a[g][0] = _mm512_fmadd_ps(x, r0, a[g][0]);
        a[g][1] = _mm512_fmadd_ps(x, r1, a[g][1]);
        a[g][2] = _mm512_fmadd_ps(x, r2, a[g][2]);
        a[g][3] = _mm512_fmadd_ps(x, r3, a[g][3]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < 4; ++i) _mm512_storeu_ps(acc[g] + d + 16 * i, a[g][i]);
  }
}
#endif

// `decode_rows` for head_dim a multiple of 32, any of the three dtypes read in place (no float copy):
// per block, each KV head's scores for all its query heads, then its values for up to three heads at once.
template <typename scalar_t, typename cache_t>
void decode_rows_vec(const scalar_t* q, const cache_t* kc, const cache_t* vc, const int64_t* tables,
                     const int64_t* ctx_lens, scalar_t* out, int64_t begin, int64_t end, int64_t num_heads,
                     int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t max_blocks, float scale,
                     int64_t window, float softcap) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t D = head_dim, H = num_heads;
  const int64_t row_elems = num_kv_heads * D;
  const int64_t block_elems = block_size * row_elems;
  int64_t lanes = 32;  // floats of a row slice in the score and value loops
#ifdef ROLLSERVE_AVX512_DECODE
  const bool wide = D % 64 == 0;  // the 16-wide score and value loops
  if (wide) lanes = 64;
#endif
  std::vector<float> qf(H * D), acc(H * D), m(H), l(H), sc(H * block_size);
  for (int64_t s = begin; s < end; ++s) {
    const int64_t ctx = ctx_lens[s];
    const int64_t first = window > 0 ? std::max<int64_t>(0, ctx - window) : 0;
    start_sequence(q + s * H * D, H, D, scale, softcap, qf.data(), m.data(), l.data(), acc.data());
    const int64_t* table = tables + s * max_blocks;
    for (int64_t b = first / block_size; b * block_size < ctx; ++b) {
      const int64_t t0 = std::max(first, b * block_size), t1 = std::min(ctx, (b + 1) * block_size);
      const int64_t n = t1 - t0;
      const int64_t base = table[b] * block_elems + (t0 - b * block_size) * row_elems;
      ReadAhead ahead;
      if ((b + 1) * block_size < ctx) {
        const int64_t bytes = block_elems * static_cast<int64_t>(sizeof(cache_t));
        ahead.k = reinterpret_cast<const char*>(kc + table[b + 1] * block_elems);
        ahead.v = reinterpret_cast<const char*>(vc + table[b + 1] * block_elems);
        ahead.k_end = ahead.k + bytes;
        ahead.v_end = ahead.v + bytes;
        // the steps this block's loops take: one per row slice of `lanes` floats, per query head in the score
        // loops (full chunks of 8 tokens), per group of up to three query heads in the value loops
        const int64_t slices = D / lanes;
        ahead.steps = std::max<int64_t>(1, H * (n / 8 * 8) * slices + num_kv_heads * ((group + 2) / 3) * n * slices);
        ahead.lines = 2 * ((bytes + 63) / 64);
      }
      for (int64_t tc = 0; tc < n; tc += 8)
        for (int64_t hq = 0; hq < H; ++hq) {
          const cache_t* kh = kc + base + tc * row_elems + (hq / group) * D;
          const int64_t count = std::min<int64_t>(8, n - tc);
#ifdef ROLLSERVE_AVX512_DECODE
          if (wide) {
            block_scores16(qf.data() + hq * D, kh, row_elems, count, D, sc.data() + hq * block_size + tc, ahead);
            continue;
          }
#endif
          block_scores(qf.data() + hq * D, kh, row_elems, count, D, sc.data() + hq * block_size + tc, ahead);
        }
      for (int64_t hq = 0; hq < H; ++hq)
        softmax_block(sc.data() + hq * block_size, n, scale, softcap, m[hq], l[hq], acc.data() + hq * D, D);
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        const cache_t* vh = vc + base + h * D;
        for (int64_t g0 = 0; g0 < group; g0 += 3) {
          const int64_t hq = h * group + g0;
          float* a[3] = {acc.data() + hq * D, acc.data() + (hq + 1) * D, acc.data() + (hq + 2) * D};
          const float* w[3] = {sc.data() + hq * block_size, sc.data() + (hq + 1) * block_size,
                               sc.data() + (hq + 2) * block_size};
          const int64_t g = std::min<int64_t>(3, group - g0);
#ifdef ROLLSERVE_AVX512_DECODE
          if (wide) {
            switch (g) {
              case 3: block_values16<3>(a, w, vh, row_elems, n, D, ahead); break;
              case 2: block_values16<2>(a, w, vh, row_elems, n, D, ahead); break;
              default: block_values16<1>(a, w, vh, row_elems, n, D, ahead); break;
            }
            continue;
          }
#endif
          switch (g) {
            case 3: block_values<3>(a, w, vh, row_elems, n, D, ahead); break;
            case 2: block_values<2>(a, w, vh, row_elems, n, D, ahead); break;
            default: block_values<1>(a, w, vh, row_elems, n, D, ahead); break;
          }
        }
      }
    }
    finish_sequence(acc.data(), l.data(), H, D, out + s * H * D);
  }
}
#endif

}  // namespace

// query: [S, Hq, D]; k_cache, v_cache: [NB, BS, Hkv, D] (contiguous; query's dtype, or bfloat16/float16 under
// float32 queries: read and converted to float in registers); block_tables: [S, max_blocks] int64;
// context_lens: [S] int64; window <= 0: none; softcap <= 0: none. Returns [S, Hq, D].
torch::Tensor paged_decode_attention(torch::Tensor query, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor context_lens, double scale,
                                     int64_t window, double softcap) {
  TORCH_CHECK(query.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the KV cache must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type());
  TORCH_CHECK(query.scalar_type() == k_cache.scalar_type() ||
                  (query.scalar_type() == at::kFloat &&
                   (k_cache.scalar_type() == at::kBFloat16 || k_cache.scalar_type() == at::kHalf)),
              "the KV cache must have the query's dtype, or be bfloat16/float16 under float32 queries");
  TORCH_CHECK(block_tables.scalar_type() == torch::kLong && context_lens.scalar_type() == torch::kLong);
  auto q = query.contiguous();
  auto tables = block_tables.contiguous();
  auto lens = context_lens.contiguous();
  const int64_t S = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t BS = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && Hq % Hkv == 0);
  auto out = torch::empty_like(q);
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  const int64_t max_blocks = tables.size(1);
  // The rows [begin, end) with queries (and output) of scalar_t over a cache of cache_t.
  auto run = [&](auto q_tag, auto cache_tag) {
    using scalar_t = decltype(q_tag);
    using cache_t = decltype(cache_tag);
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const cache_t* kp = k_cache.data_ptr<cache_t>();
    const cache_t* vp = v_cache.data_ptr<cache_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
#ifdef ROLLSERVE_VECTOR_DECODE
      if constexpr (!std::is_same_v<scalar_t, double>) {
        if (D % 32 == 0) {
          decode_rows_vec<scalar_t, cache_t>(qp, kp, vp, tp, lp, op, begin, end, Hq, Hkv, D, BS, max_blocks,
                                             static_cast<float>(scale), window, static_cast<float>(softcap));
          return;
        }
      }
#endif
      decode_rows<scalar_t, cache_t>(qp, kp, vp, tp, lp, op, begin, end, Hq, Hkv, D, BS, max_blocks,
                                     static_cast<float>(scale), window, static_cast<float>(softcap));
    });
  };
  if (k_cache.scalar_type() != q.scalar_type()) {  // a 16-bit cache under float queries
    if (k_cache.scalar_type() == at::kBFloat16)
      run(float{}, c10::BFloat16{});
    else
      run(float{}, c10::Half{});
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention",
                                    [&] { run(scalar_t{}, scalar_t{}); });
  }
  return out;
}
