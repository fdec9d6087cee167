// Elementwise parts of a Llama-family decoder layer, one pass each where torch takes five to seven ops:
// residual add + RMSNorm, and the rotary embedding. The references are HF's modules (LlamaRMSNorm,
// apply_rotary_pos_emb), and the results are theirs bit for bit: every product and sum is rounded where
// theirs is (the extension is built with -ffp-contract=off, so none is fused into an FMA), and the RMSNorm's
// sum of squares is added up in the order of torch's own CPU sum (ATen's cascade_sum for a contiguous row,
// whose order depends on the vector width of its sum kernel: `lanes`, 8 on x86 with AVX2 and AVX512 dispatch
// alike). The engine checks the bit equality at the model's own width before it uses the kernel.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace {

// Rows per parallel task: about 8K elements each, so small decode batches are not split into tiny tasks.
inline int64_t grain_rows(int64_t row_elems) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(1, row_elems)); }

inline int64_t ceil_log2(int64_t x) {
  int64_t r = 1;
  while ((int64_t(1) << r) < x) ++r;
  return r;  // 1 for x <= 2, as ATen's CeilLog2
}

// sum(x[i] * x[i]) for i < n, each square rounded to float and the sum taken in the order of torch's
// `x.pow(2).sum(-1)` on a contiguous row: W-lane vectors (W = 1: the scalar loop torch takes for n < its
// vector width), four interleaved partial sums ("ilp"), each a cascade of up to four levels of 2^level_power
// vectors, then the rows' tail vectors, the partials, the tail elements and the lanes.
template <int W>
float torch_sum_of_squares(const float* x, int64_t n) {
  const int64_t nvec = n / W, size = nvec / 4;
  const int64_t level_power = std::max<int64_t>(4, ceil_log2(size) / 4);
  const int64_t step = int64_t(1) << level_power, mask = step - 1;
  float acc[4][4][W];  // [level][ilp partial][lane]
  std::fill_n(&acc[0][0][0], 4 * 4 * W, 0.0f);
  auto add_squares = [&](float* a, int64_t v) {
    const float* p = x + v * W;
    for (int l = 0; l < W; ++l) {
      const float sq = p[l] * p[l];
      a[l] += sq;
    }
  };
  int64_t i = 0;
  while (i + step <= size) {
    for (int64_t j = 0; j < step; ++j, ++i)
      for (int k = 0; k < 4; ++k) add_squares(acc[0][k], 4 * i + k);
    for (int64_t j = 1; j < 4; ++j) {
      for (int k = 0; k < 4; ++k)
        for (int l = 0; l < W; ++l) {
          acc[j][k][l] += acc[j - 1][k][l];
          acc[j - 1][k][l] = 0.0f;
        }
      if ((i & (mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < size; ++i)
    for (int k = 0; k < 4; ++k) add_squares(acc[0][k], 4 * i + k);
  for (int j = 1; j < 4; ++j)
    for (int k = 0; k < 4; ++k)
      for (int l = 0; l < W; ++l) acc[0][k][l] += acc[j][k][l];
  for (int64_t v = size * 4; v < nvec; ++v) add_squares(acc[0][0], v);
  for (int k = 1; k < 4; ++k)
    for (int l = 0; l < W; ++l) acc[0][0][l] += acc[0][k][l];
  float total = 0.0f;
  for (int64_t e = nvec * W; e < n; ++e) {
    const float sq = x[e] * x[e];
    total += sq;
  }
  for (int l = 0; l < W; ++l) total += acc[0][0][l];
  return total;
}

template <typename scalar_t>
void rms_norm_rows(const scalar_t* x, const scalar_t* residual, scalar_t* sum, scalar_t* out, const scalar_t* w,
                   int64_t begin, int64_t end, int64_t H, float eps, int64_t lanes) {
  std::vector<float> xf(H);
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t* xr = x + row * H;
    for (int64_t i = 0; i < H; ++i) {
      const scalar_t s = residual ? static_cast<scalar_t>(xr[i] + residual[row * H + i]) : xr[i];
      if (sum) sum[row * H + i] = s;
      xf[i] = static_cast<float>(s);  // hidden_states.to(torch.float32)
    }
    float total;
    if (H < lanes) total = torch_sum_of_squares<1>(xf.data(), H);
    else if (lanes == 16) total = torch_sum_of_squares<16>(xf.data(), H);
    else total = torch_sum_of_squares<8>(xf.data(), H);
    const float var = total / static_cast<float>(H);  // .mean(-1): the sum, then a true division
    const float r = 1.0f / std::sqrt(var + eps);      // torch.rsqrt: a rounded sqrt, then a rounded division
    scalar_t* o = out + row * H;
    for (int64_t k = 0; k < H; ++k) {
      const scalar_t y = static_cast<scalar_t>(xf[k] * r);  // (x * rsqrt(var + eps)).to(dtype)
      o[k] = static_cast<scalar_t>(w[k] * y);               // weight * that, in the dtype
    }
  }
}

template <typename scalar_t>
void rope_rows(const scalar_t* x, int64_t sx_t, int64_t sx_h, const scalar_t* cos, const scalar_t* sin,
               scalar_t* out, int64_t begin, int64_t end, int64_t H, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t t = begin; t < end; ++t) {
    const scalar_t* c = cos + t * D;
    const scalar_t* s = sin + t * D;
    for (int64_t h = 0; h < H; ++h) {
      const scalar_t* xr = x + t * sx_t + h * sx_h;
      scalar_t* o = out + (t * H + h) * D;
      for (int64_t d = 0; d < half; ++d) {  // rotate_half(x)[d] = -x[d + half]
        const scalar_t a = static_cast<scalar_t>(xr[d] * c[d]);
        const scalar_t b = static_cast<scalar_t>(static_cast<scalar_t>(-xr[d + half]) * s[d]);
        o[d] = static_cast<scalar_t>(a + b);
      }
      for (int64_t d = half; d < D; ++d) {  // rotate_half(x)[d] = x[d - half]
        const scalar_t a = static_cast<scalar_t>(xr[d] * c[d]);
        const scalar_t b = static_cast<scalar_t>(xr[d - half] * s[d]);
        o[d] = static_cast<scalar_t>(a + b);
      }
    }
  }
}

}  // namespace

// x, residual: [T, H]; weight: [H], all one dtype; lanes: the float vector width of torch's sum kernel.
// Returns (x + residual, norm(x + residual)), or (x, norm(x)) without residual: HF's
// `LlamaRMSNorm(x + residual)`, bit for bit.
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(torch::Tensor x, std::optional<torch::Tensor> residual,
                                                      torch::Tensor weight, double eps, int64_t lanes) {
  TORCH_CHECK(lanes == 8 || lanes == 16, "lanes must be 8 or 16");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 1 && weight.size(0) == x.size(1), "x: [T, H], weight: [H]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight and x must have one dtype");
  auto xc = x.contiguous();
  auto wc = weight.contiguous();
  torch::Tensor rc, sum;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type());
    rc = residual->contiguous();
    sum = torch::empty_like(xc);
  }
  auto out = torch::empty_like(xc);
  const int64_t T = xc.size(0), H = xc.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "add_rms_norm", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* rp = rc.defined() ? rc.data_ptr<scalar_t>() : nullptr;
    scalar_t* sp = sum.defined() ? sum.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t* wp = wc.data_ptr<scalar_t>();
    at::parallel_for(0, T, grain_rows(H), [&](int64_t begin, int64_t end) {
      rms_norm_rows<scalar_t>(xp, rp, sp, op, wp, begin, end, H, static_cast<float>(eps), lanes);
    });
  });
  return {sum.defined() ? sum : xc, out};
}

// x: [T, H, D] (any strides but a unit last one); cos, sin: [T, D] of x's dtype. Returns the contiguous
// `x * cos + rotate_half(x) * sin` (HF's apply_rotary_pos_emb for one tensor).
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.dim() == 3 && x.size(2) % 2 == 0, "x: [T, H, D] with D even");
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == x.size(0) && cos.size(1) == x.size(2) && sin.sizes() == cos.sizes(),
              "cos, sin: [T, D]");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type());
  auto xs = x.stride(2) == 1 ? x : x.contiguous();
  auto c = cos.contiguous();
  auto s = sin.contiguous();
  const int64_t T = xs.size(0), H = xs.size(1), D = xs.size(2);
  auto out = torch::empty({T, H, D}, xs.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xs.scalar_type(), "rope", [&] {
    const scalar_t* xp = xs.data_ptr<scalar_t>();
    const scalar_t* cp = c.data_ptr<scalar_t>();
    const scalar_t* sp = s.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t st = xs.stride(0), sh = xs.stride(1);
    at::parallel_for(0, T, grain_rows(H * D), [&](int64_t begin, int64_t end) {
      rope_rows<scalar_t>(xp, st, sh, cp, sp, op, begin, end, H, D);
    });
  });
  return out;
}
