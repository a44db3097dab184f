// The plan phase's state pass (fused_ft/optim/_state.py, gather): each parameter's state tensors,
// looked up in the optimizer's state dict and checked against the parameter, in one C++ pass. In
// Python the lookups alone were ~0.45 us a parameter and the checks as much again: with ViT-L/14's 297
// parameters, a fifth of an AdamW step's host work.
#include <torch/extension.h>

#include <string>
#include <tuple>
#include <vector>

namespace fused_ft {

// state: the optimizer's state (a dict keyed by parameter; a defaultdict is read without creating
// entries). keys[s], kinds[s] (0 a moment: the parameter's shape and device, fp32 for bf16/fp16
// parameters, else the parameter's dtype; 1 a kahan compensation: int16 like the parameter; 2 a step
// count: one floating element), together[s] (slots created together: a parameter has all or none).
// Returns one list per slot (the tensor, or None where there is none) and the first problem as
// (slot, index, code): code 0 none, 1 shape, 2 device, 3 dtype, 4 missing beside a `together`
// neighbour, 5 not a tensor.
std::tuple<std::vector<py::list>, std::tuple<int64_t, int64_t, int64_t>> gather_state(
    const py::dict& state, const py::list& params, const std::vector<std::string>& keys,
    const std::vector<int64_t>& kinds, const std::vector<bool>& together) {
  const size_t n_slots = keys.size();
  std::vector<py::list> columns(n_slots);
  std::vector<py::str> names;
  for (const auto& key : keys) names.emplace_back(key);
  std::tuple<int64_t, int64_t, int64_t> problem{-1, -1, 0};
  bool found = false;
  const int64_t n = static_cast<int64_t>(py::len(params));
  for (int64_t j = 0; j < n; ++j) {
    PyObject* param = PyList_GET_ITEM(params.ptr(), j);
    PyObject* entry = PyDict_GetItem(state.ptr(), param);  // borrowed; no __missing__
    const bool has_entry = entry != nullptr && PyDict_Check(entry);
    int64_t present = -1, absent = -1;
    for (size_t s = 0; s < n_slots; ++s) {
      PyObject* value = has_entry ? PyDict_GetItem(entry, names[s].ptr()) : nullptr;
      if (value == nullptr || value == Py_None) {
        columns[s].append(py::none());
        if (together[s] && absent < 0) absent = static_cast<int64_t>(s);
        continue;
      }
      columns[s].append(py::reinterpret_borrow<py::object>(value));
      if (together[s] && present < 0) present = static_cast<int64_t>(s);
      if (found) continue;
      const auto fail = [&](int64_t code) {
        problem = {static_cast<int64_t>(s), j, code};
        found = true;
      };
      if (!THPVariable_Check(value)) {
        fail(5);
        continue;
      }
      const at::Tensor& t = THPVariable_Unpack(value);
      if (kinds[s] == 2) {
        if (t.numel() != 1) fail(1);
        else if (!t.is_floating_point()) fail(3);
        continue;
      }
      const at::Tensor& p = THPVariable_Unpack(param);
      if (t.sizes() != p.sizes()) {
        fail(1);
      } else if (t.device() != p.device()) {
        fail(2);
      } else {
        at::ScalarType expected = at::kShort;
        if (kinds[s] == 0) {
          const auto dtype = p.scalar_type();
          expected = (dtype == at::kBFloat16 || dtype == at::kHalf) ? at::kFloat : dtype;
        }
        if (t.scalar_type() != expected) fail(3);
      }
    }
    if (!found && present >= 0 && absent >= 0) {
      problem = {absent, j, 4};
      found = true;
    }
  }
  return {columns, problem};
}

}  // namespace fused_ft
