// LARS (timm.optim.Lars semantics) in two phases: the sums of squares of each tensor's weights and
// gradients, then the trust-ratio-scaled SGD update.
//
// The phases are pipelined over batches of consecutive tensors: one parallel region updates batch b
// while it sums the squares of batch b + 1, each thread alternating between its share of the two.
// A pass that only reads runs at about two thirds of the speed of one that also writes on this
// machine's memory (21 against 31 GB/s), so the norm pass is cheaper mixed into the update pass
// than on its own. The sums are taken over the same fixed chunks and reduced in the same order as
// a tensor-by-tensor pass, so the results do not depend on the batching or the thread count.
// Slots: params (P), grads (G), momentum_buffers (fp32; empty list without momentum).
#include "multi_tensor.h"

namespace fused_ft {

namespace {
constexpr int64_t kBatch = 1 << 21;  // elements per pipeline batch (8 MB per fp32 stream)

// Chunks of the tensors from `next` on, until the batch holds at least kBatch elements.
void next_batch(const std::vector<at::Tensor>& tensors, int64_t& next, std::vector<Chunk>& out) {
  out.clear();
  int64_t elements = 0;
  for (; next < static_cast<int64_t>(tensors.size()) && elements < kBatch; ++next) {
    append_chunks(out, next, tensors[next].numel());
    elements += tensors[next].numel();
  }
}
}  // namespace

void lars_(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> bufs,
           std::vector<bool> new_buffer, double lr, double momentum, double dampening, double weight_decay,
           bool nesterov, double trust_coeff, double eps, bool trust_clip, bool adapt, int64_t rounding_mode, int64_t rounding_key, std::vector<at::Tensor> compensations) {
  check_lists(params, grads, "grads");
  const bool has_momentum = momentum != 0;
  if (has_momentum) check_lists(params, bufs, "momentum_buffers");
  const int64_t n = static_cast<int64_t>(params.size());
  const Rounding rounding = make_rounding(rounding_mode, rounding_key, compensations, params);
  const float f_lr = lr, f_mom = momentum, f_wd = adapt ? weight_decay : 0.f;
  float* ratios = workspace(n);
  std::fill(ratios, ratios + n, 1.f);

  auto update_chunk = [&](const Chunk& c) {
    const bool fresh = has_momentum && new_buffer[c.tensor];
    sgd_chunk(params[c.tensor], grads[c.tensor], has_momentum ? bufs[c.tensor].data_ptr<float>() : nullptr, c, rounding,
              1.f, f_wd, ratios[c.tensor], f_lr, fresh ? 0.f : f_mom, fresh ? 1.f : 1 - dampening, f_mom, nesterov);
  };
  if (!adapt) {
    parallel_chunks(make_chunks(params), [&](const Chunk& c, int64_t) { update_chunk(c); });
    return;
  }
  auto norm_chunk = [&](const Chunk& c) {
    SumSq s;
    dispatch_pg(params[c.tensor], grads[c.tensor], [&](auto p_tag, auto g_tag) {
      using P = decltype(p_tag);
      const ParamIO<P> io(params[c.tensor].data_ptr<P>(), rounding, c.tensor);
      const auto* gp = grads[c.tensor].data_ptr<decltype(g_tag)>();
      s = range_sum_pairs(c.begin, c.end, [&](int64_t i, auto w) { return std::make_pair(io.load(i, w), ld(gp + i, w)); });
    });
    return s;
  };
  auto set_ratio = [&](int64_t t, const SumSq& s) {
    double ratio = 1.0;
    const double w_norm = std::sqrt(s.a), g_norm = std::sqrt(s.b);
    if (w_norm > 0 && g_norm > 0) ratio = trust_coeff * w_norm / (g_norm + w_norm * weight_decay + eps);
    if (trust_clip) ratio = std::min(ratio / lr, 1.0);
    ratios[t] = static_cast<float>(ratio);
  };

  std::vector<Chunk>* updating = &chunk_buffer(0);
  std::vector<Chunk>* summing = &chunk_buffer(1);
  int64_t next = 0;
  next_batch(params, next, *summing);
  const int64_t threads = at::get_num_threads();
  while (!updating->empty() || !summing->empty()) {
    auto& partial = partial_sums(static_cast<int64_t>(summing->size()));
    const int64_t u_count = updating->size(), s_count = summing->size();
    at::parallel_for(0, threads, 1, [&](int64_t kb, int64_t ke) {
      for (int64_t k = kb; k < ke; ++k) {
        const int64_t u0 = k * u_count / threads, nu = (k + 1) * u_count / threads - u0;
        const int64_t s0 = k * s_count / threads, ns = (k + 1) * s_count / threads - s0;
        // interleave in proportion: take whichever share is further behind
        for (int64_t du = 0, ds = 0; du < nu || ds < ns;) {
          if (ds >= ns || (du < nu && du * ns <= ds * nu)) {
            update_chunk((*updating)[u0 + du++]);
          } else {
            partial[s0 + ds] = norm_chunk((*summing)[s0 + ds]);
            ++ds;
          }
        }
      }
    });
    // per-tensor sums in chunk order (a tensor's chunks are consecutive)
    SumSq s;
    for (int64_t i = 0; i < s_count; ++i) {
      const auto& c = (*summing)[i];
      s.a += partial[i].a;
      s.b += partial[i].b;
      if (i + 1 == s_count || (*summing)[i + 1].tensor != c.tensor) {
        set_ratio(c.tensor, s);
        s = SumSq{};
      }
    }
    std::swap(updating, summing);
    next_batch(params, next, *summing);
  }
}

}  // namespace fused_ft
