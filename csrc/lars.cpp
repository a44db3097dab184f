// LARS (timm.optim.Lars semantics), tensor by tensor in two phases: the sums of squares of the
// weights and gradients, then the trust-ratio-scaled SGD update. Going tensor by tensor keeps a
// tensor in cache between the two passes, so memory sees close to one pass.
// Slots: params (P), grads (G), momentum_buffers (fp32; empty list without momentum).
#include "multi_tensor.h"

namespace fused_ft {

SumSq sum_squares_chunked(const at::Tensor& a, const at::Tensor& b, int64_t tensor);

void lars_(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> bufs,
           std::vector<bool> new_buffer, double lr, double momentum, double dampening, double weight_decay,
           bool nesterov, double trust_coeff, double eps, bool trust_clip, bool adapt) {
  check_lists(params, grads, "grads");
  const bool has_momentum = momentum != 0;
  if (has_momentum) check_lists(params, bufs, "momentum_buffers");
  for (int64_t t = 0; t < static_cast<int64_t>(params.size()); ++t) {
    const auto& p = params[t];
    const auto& g = grads[t];
    float ratio = 1.f;
    if (adapt) {
      const SumSq s = sum_squares_chunked(p, g, t);
      const double w_norm = std::sqrt(s.a), g_norm = std::sqrt(s.b);
      if (w_norm > 0 && g_norm > 0) ratio = trust_coeff * w_norm / (g_norm + w_norm * weight_decay + eps);
      if (trust_clip) ratio = std::min<double>(ratio / lr, 1.0);
    }
    const bool fresh = has_momentum && new_buffer[t];
    const float keep = fresh ? 0.f : momentum, scale = fresh ? 1.f : 1 - dampening;
    const float f_lr = lr, f_mom = momentum, f_wd = adapt ? weight_decay : 0.f;
    parallel_chunks(chunks_of(t, p.numel()), [&](const Chunk& c, int64_t) {
      // chunk-local copies, kept in registers (see sgd.cpp)
      const float lr = f_lr, mom = f_mom, wd = f_wd, r = ratio, k = keep, sc = scale;
      dispatch_pg(p, g, [&](auto p_tag, auto g_tag) {
        using P = decltype(p_tag);
        using G = decltype(g_tag);
        P* pp = p.data_ptr<P>();
        const G* gp = g.data_ptr<G>();
        float* bp = has_momentum ? bufs[t].data_ptr<float>() : nullptr;
        vector_loop(c.begin, c.end, [&](int64_t i, auto w) {
          using V = decltype(w);
          const V x = ld(pp + i, w);
          V d = (ld(gp + i, w) + splat<V>(wd) * x) * splat<V>(r);
          if (has_momentum) d = momentum_direction(bp, i, d, k, sc, mom, nesterov);
          st(pp + i, x - splat<V>(lr) * d);
        });
      });
    });
  }
}

}  // namespace fused_ft
