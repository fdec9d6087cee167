// The extension's Python module: the kernels of paged_decode.cpp and layer_ops.cpp.
#include <torch/extension.h>

#include <optional>

torch::Tensor paged_decode_attention(torch::Tensor query, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor context_lens, double scale,
                                     int64_t window, double softcap);
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(torch::Tensor x, std::optional<torch::Tensor> residual,
                                                      torch::Tensor weight, double eps, int64_t lanes);
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention, in place over block tables");
  m.def("add_rms_norm", &add_rms_norm, "residual add + RMSNorm, bit-equal to HF's LlamaRMSNorm",
        py::arg("x"), py::arg("residual") = py::none(), py::arg("weight"), py::arg("eps"), py::arg("lanes"));
  m.def("rope", &rope, "rotary embedding of one [T, H, D] tensor (HF apply_rotary_pos_emb's roundings)");
}
