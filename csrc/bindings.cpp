// Python bindings of fused_ft's CPU kernels (module fused_ft._C). Each function updates one
// param group's tensors in place; fused_ft/kernels/cpu.py adapts them to the backend signature.
#include <torch/extension.h>

#include "multi_tensor.h"

namespace fused_ft {
void sgd_(std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<bool>, double,
          double, double, double, bool, bool);
void adamw_(std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
            std::vector<at::Tensor>, std::vector<double>, std::vector<double>, double, double, double, double,
            double, bool, bool);
void lars_(std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<bool>, double,
           double, double, double, bool, double, double, bool, bool);
void lamb_(std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
           double, double, double, double, double, double, double, double, double, double, bool, bool);
double sum_squares(std::vector<at::Tensor>);
}  // namespace fused_ft

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_ft fused CPU optimizer kernels (OpenMP + at::vec)";
  m.def("sgd_", &fused_ft::sgd_, "SGD over a tensor list (momentum optional)");
  m.def("adamw_", &fused_ft::adamw_, "AdamW over a tensor list");
  m.def("lars_", &fused_ft::lars_, "LARS over a tensor list (two phases, tensor by tensor)");
  m.def("lamb_", &fused_ft::lamb_, "LAMB over a tensor list (two phases, tensor by tensor)");
  m.def("sum_squares", &fused_ft::sum_squares, "sum of squares of all elements of a tensor list (fp64)");
  m.def("vector_width", []() { return static_cast<int>(fused_ft::Vec::size()); }, "floats per SIMD vector");
}
