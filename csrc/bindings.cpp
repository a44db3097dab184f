// Python bindings of fused_ft's CPU kernels (module fused_ft._C). Each update function updates one
// param group's tensors in place; fused_ft/kernels/cpu.py adapts them to the backend signature.
// flat_addresses, params_with_grads and increment_steps are host-side helpers of a step
// (csrc/tensor_tables.cpp).
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
std::tuple<at::Tensor, at::Tensor, std::vector<int64_t>, bool> flat_addresses(
    const std::vector<std::vector<at::Tensor>>&, int64_t);
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, int64_t, bool, std::vector<at::ScalarType>>
params_with_grads(const std::vector<at::Tensor>&);
std::vector<double> increment_steps(const std::vector<at::Tensor>&);
}  // namespace fused_ft

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_ft fused CPU optimizer kernels (OpenMP + at::vec)";
  m.def("sgd_", &fused_ft::sgd_, "SGD over a tensor list (momentum optional)");
  m.def("adamw_", &fused_ft::adamw_, "AdamW over a tensor list");
  m.def("lars_", &fused_ft::lars_, "LARS over a tensor list (two phases, tensor by tensor)");
  m.def("lamb_", &fused_ft::lamb_, "LAMB over a tensor list (two phases, tensor by tensor)");
  m.def("sum_squares", &fused_ft::sum_squares, "sum of squares of all elements of a tensor list (fp64)");
  m.def("flat_addresses", &fused_ft::flat_addresses, py::arg("slots"), py::arg("align"),
        "address table [slots, tensors], element counts, columns that are not flat, one dtype per slot (Triton launchers)");
  m.def("params_with_grads", &fused_ft::params_with_grads, py::arg("params"),
        "params that have grads, their grads, first sparse grad's index or -1, one device?, dtypes (step planning)");
  m.def("increment_steps", &fused_ft::increment_steps, py::arg("steps"),
        "add 1 to one-element CPU step counts and return them; [] (nothing changed) if any is not one");
  m.def("vector_width", []() { return static_cast<int>(fused_ft::Vec::size()); }, "floats per SIMD vector");
}
