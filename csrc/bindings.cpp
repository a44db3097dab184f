// Python bindings of fused_ft's CPU kernels (module fused_ft._C). Each update function updates one
// param group's tensors in place; fused_ft/kernels/cpu.py adapts them to the backend signature.
// flat_addresses, params_with_grads, increment_steps (csrc/tensor_tables.cpp) and gather_state
// (csrc/state_tables.cpp) are host-side helpers of a step.
#include <torch/extension.h>

#include "multi_tensor.h"

namespace fused_ft {
using Tensors = std::vector<at::Tensor>;
void sgd_(Tensors, Tensors, Tensors, std::vector<bool>, double, double, double, double, bool, bool, int64_t, int64_t,
          Tensors);
void adamw_(Tensors, Tensors, Tensors, Tensors, Tensors, std::vector<double>, std::vector<double>, double, double,
            double, double, double, bool, bool, int64_t, int64_t, Tensors);
void lars_(Tensors, Tensors, Tensors, std::vector<bool>, double, double, double, double, bool, double, double, bool,
           bool, int64_t, int64_t, Tensors);
void lamb_(Tensors, Tensors, Tensors, Tensors, double, double, double, double, double, double, double, double, double,
           double, bool, bool, int64_t, int64_t, Tensors);
double sum_squares(Tensors);
std::tuple<at::Tensor, at::Tensor, std::vector<int64_t>, bool> flat_addresses(
    const std::vector<std::vector<at::Tensor>>&, int64_t);
std::tuple<Tensors, Tensors, int64_t, bool, std::vector<at::ScalarType>> params_with_grads(const Tensors&);
std::vector<double> increment_steps(const Tensors&);
std::tuple<std::vector<py::list>, std::tuple<int64_t, int64_t, int64_t>> gather_state(
    const py::dict&, const py::list&, const std::vector<std::string>&, const std::vector<int64_t>&,
    const std::vector<bool>&);
}  // namespace fused_ft

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_ft fused CPU optimizer kernels (OpenMP + at::vec)";
#ifdef TORCH_VERSION_MAJOR  // torch/version.h, through torch/extension.h: the torch these headers belong to
  m.attr("torch_version") = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                            std::to_string(TORCH_VERSION_PATCH);
#endif
  // the rounding of bf16 parameters (multi_tensor.h's Rounding): mode 0 nearest, 1 stochastic, 2 kahan
  m.def("sgd_", &fused_ft::sgd_, py::arg("params"), py::arg("grads"), py::arg("momentum_buffers"),
        py::arg("new_buffer"), py::arg("lr"), py::arg("momentum"), py::arg("dampening"), py::arg("weight_decay"),
        py::arg("nesterov"), py::arg("maximize"), py::arg("rounding_mode"), py::arg("rounding_key"), py::arg("compensations"),
        "SGD over a tensor list (momentum optional)");
  m.def("adamw_", &fused_ft::adamw_, py::arg("params"), py::arg("grads"), py::arg("exp_avgs"),
        py::arg("exp_avg_sqs"), py::arg("max_exp_avg_sqs"), py::arg("step_sizes"), py::arg("bias_correction2_sqrts"),
        py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("amsgrad"), py::arg("maximize"), py::arg("rounding_mode"), py::arg("rounding_key"), py::arg("compensations"),
        "AdamW over a tensor list");
  m.def("lars_", &fused_ft::lars_, py::arg("params"), py::arg("grads"), py::arg("momentum_buffers"),
        py::arg("new_buffer"), py::arg("lr"), py::arg("momentum"), py::arg("dampening"), py::arg("weight_decay"),
        py::arg("nesterov"), py::arg("trust_coeff"), py::arg("eps"), py::arg("trust_clip"), py::arg("adapt"),
        py::arg("rounding_mode"), py::arg("rounding_key"), py::arg("compensations"),
        "LARS over a tensor list (two phases, tensor by tensor)");
  m.def("lamb_", &fused_ft::lamb_, py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
        py::arg("clip_divisor"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("beta3"),
        py::arg("bias_correction1"), py::arg("bias_correction2"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("decay"), py::arg("adapt"), py::arg("trust_clip"), py::arg("rounding_mode"), py::arg("rounding_key"), py::arg("compensations"),
        "LAMB over a tensor list (two phases, tensor by tensor)");
  m.def("sum_squares", &fused_ft::sum_squares, py::arg("tensors"), "sum of squares of all elements of a tensor list (fp64)");
  m.def("flat_addresses", &fused_ft::flat_addresses, py::arg("slots"), py::arg("align"),
        "address table [slots, tensors], element counts, columns that are not flat, one dtype per slot (Triton launchers)");
  m.def("params_with_grads", &fused_ft::params_with_grads, py::arg("params"),
        "params that have grads, their grads, first sparse grad's index or -1, one device?, dtypes (step planning)");
  m.def("increment_steps", &fused_ft::increment_steps, py::arg("steps"),
        "add 1 to one-element CPU step counts and return them; [] (nothing changed) if any is not one");
  m.def("gather_state", &fused_ft::gather_state, py::arg("state"), py::arg("params"), py::arg("keys"),
        py::arg("kinds"), py::arg("together"),
        "each parameter's state tensors by slot (None where absent), and the first (slot, index, problem)");
  m.def("vector_width", []() { return static_cast<int>(fused_ft::Vec::size()); }, "floats per SIMD vector");
}
