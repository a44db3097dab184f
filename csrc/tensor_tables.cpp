// Host-side helpers of a step: the planning pass over a group's parameters, and the Triton launchers'
// (fused_ft/kernels/triton_launch.py) address table and the columns that cannot be walked as flat
// memory, each in one C++ pass. The same checks in
// Python cost three calls per tensor (data_ptr, is_contiguous, numel: ~0.45 us each tensor), which
// made the host work of a ViT-L/14 step heavier than torch's whole fused step.
#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace fused_ft {

// slots[s][j]: tensor j of slot s (params, grads, state...). Column j is flat when every tensor in it
// has column 0's element count, starts at a multiple of `align` bytes, and either all are contiguous
// or all share the first one's strides and it is non-overlapping and dense.
// Returns the addresses (int64, [slots, tensors rounded up to even]), the element counts of slot 0, the columns that are
// not flat (fused_ft/kernels/_layout.py copies those, or refuses a count mismatch), and whether each
// slot holds one dtype only (then one launch serves the whole list).
std::tuple<at::Tensor, at::Tensor, std::vector<int64_t>, bool> flat_addresses(
    const std::vector<std::vector<at::Tensor>>& slots, int64_t align) {
  const int64_t n_slots = static_cast<int64_t>(slots.size());
  const int64_t n = n_slots ? static_cast<int64_t>(slots[0].size()) : 0;
  // rows padded to an even length: each row of the table starts 16-byte aligned on the device
  const int64_t row = n + n % 2;
  auto addresses = at::zeros({n_slots, row}, at::kLong);
  auto numels = at::empty({n}, at::kLong);
  auto* address = addresses.data_ptr<int64_t>();
  auto* numel = numels.data_ptr<int64_t>();
  std::vector<int64_t> not_flat;
  bool one_dtype_per_slot = true;
  for (int64_t j = 0; j < n; ++j) {
    const at::Tensor& first = slots[0][j];
    numel[j] = first.numel();
    bool contiguous = true, same_strides = true, flat = true;
    for (int64_t s = 0; s < n_slots; ++s) {
      const at::Tensor& t = slots[s][j];
      const auto ptr = reinterpret_cast<int64_t>(t.data_ptr());
      address[s * row + j] = ptr;
      flat = flat && t.numel() == numel[j] && ptr % align == 0;
      contiguous = contiguous && t.is_contiguous();
      same_strides = same_strides && t.strides() == first.strides();
      one_dtype_per_slot = one_dtype_per_slot && t.scalar_type() == slots[s][0].scalar_type();
    }
    if (!(flat && (contiguous || (same_strides && first.is_non_overlapping_and_dense())))) {
      not_flat.push_back(j);
    }
  }
  return {addresses, numels, not_flat, one_dtype_per_slot};
}

}  // namespace fused_ft

namespace fused_ft {

// The planning pass of a step (fused_ft/optim/_base.py, _by_device), in one C++ loop: the
// parameters that have gradients and those gradients, the index (into `params`) of the first sparse
// gradient or -1, whether all of them sit on one device, and their distinct dtypes. In Python each
// of these is a property read per tensor (~0.1-0.3 us each), half of a ViT-L/14 step's host work.
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, int64_t, bool, std::vector<at::ScalarType>>
params_with_grads(const std::vector<at::Tensor>& params) {
  std::vector<at::Tensor> kept, grads;
  kept.reserve(params.size());
  grads.reserve(params.size());
  int64_t first_sparse = -1;
  bool one_device = true;
  std::vector<at::ScalarType> dtypes;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& grad = params[i].grad();
    if (!grad.defined()) continue;
    if (first_sparse < 0 && grad.layout() != at::kStrided) first_sparse = static_cast<int64_t>(i);
    if (!kept.empty()) {
      one_device = one_device && params[i].device() == kept.front().device();
    }
    const auto dtype = params[i].scalar_type();
    if (std::find(dtypes.begin(), dtypes.end(), dtype) == dtypes.end()) dtypes.push_back(dtype);
    kept.push_back(params[i]);
    grads.push_back(grad);
  }
  return {kept, grads, first_sparse, one_device, dtypes};
}

}  // namespace fused_ft

namespace fused_ft {

// AdamW's per-parameter step counts (0-dim fp32 CPU tensors, as torch.optim keeps them) plus one,
// returned as numbers for the bias corrections. torch._foreach_add_ on CPU dispatches once per
// tensor (0.7 ms for ViT-L/14's 297 counts, more than torch's whole fused step); this is one pass.
// Returns an empty list, having changed nothing, when any count is not a one-element fp32/fp64
// CPU tensor; the caller then takes torch's path.
std::vector<double> increment_steps(const std::vector<at::Tensor>& steps) {
  for (const auto& s : steps) {
    if (!s.defined() || !s.device().is_cpu() || s.numel() != 1 ||
        (s.scalar_type() != at::kFloat && s.scalar_type() != at::kDouble)) {
      return {};
    }
  }
  std::vector<double> values;
  values.reserve(steps.size());
  for (const auto& s : steps) {
    if (s.scalar_type() == at::kFloat) {
      float* p = static_cast<float*>(s.data_ptr());
      *p += 1.0f;
      values.push_back(*p);
    } else {
      double* p = static_cast<double*>(s.data_ptr());
      *p += 1.0;
      values.push_back(*p);
    }
    s.unsafeGetTensorImpl()->bump_version();  // an in-place change, as add_ would record it
  }
  return values;
}

}  // namespace fused_ft
