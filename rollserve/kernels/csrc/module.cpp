// The extension's Python module: the kernels of paged_decode.cpp, kv_write.cpp, layer_ops.cpp, gemm.cpp and
// sampling.cpp.
#include <torch/extension.h>

#include <optional>

torch::Tensor paged_decode_attention(torch::Tensor query, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor context_lens, double scale,
                                     int64_t window, double softcap);
void write_kv(torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor key, torch::Tensor value,
              torch::Tensor slot_mapping);
std::tuple<torch::Tensor, torch::Tensor> sample_plain(torch::Tensor logits, torch::Tensor temperature,
                                                      torch::Tensor greedy, torch::Tensor uniforms);
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(torch::Tensor x, std::optional<torch::Tensor> residual,
                                                      torch::Tensor weight, double eps, int64_t lanes);
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);
bool packed_gemm_available();
torch::Tensor pack_gemm_weight(torch::Tensor w);
torch::Tensor packed_linear(torch::Tensor x, torch::Tensor wp, int64_t n, std::optional<torch::Tensor> bias,
                            std::optional<at::ScalarType> out_dtype);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention, in place over block tables");
  m.def("write_kv", &write_kv, "new tokens' K/V rows into the paged cache at their slots");
  m.def("sample_plain", &sample_plain, "the sampler's plain path: one draw and its policy logprob per row");
  m.def("add_rms_norm", &add_rms_norm, "residual add + RMSNorm, bit-equal to HF's LlamaRMSNorm",
        py::arg("x"), py::arg("residual") = py::none(), py::arg("weight"), py::arg("eps"), py::arg("lanes"));
  m.def("rope", &rope, "rotary embedding of one [T, H, D] tensor (HF apply_rotary_pos_emb's roundings)");
  m.def("packed_gemm_available", &packed_gemm_available, "whether this build has the AVX2 packed fp32 GEMM");
  m.def("pack_gemm_weight", &pack_gemm_weight, "an [N, K] float32 weight as [ceil(N/16), K, 16] panels");
  m.def("packed_linear", &packed_linear, "x @ w^T (+ bias) on a weight from pack_gemm_weight",
        py::arg("x"), py::arg("wp"), py::arg("n"), py::arg("bias") = py::none(), py::arg("out_dtype") = py::none());
}
