// LAMB (timm.optim.Lamb semantics), tensor by tensor in two phases. Phase 1 clips the gradient,
// updates and stores the moments, writes the update u to a reused workspace and sums the squares
// of the (decayed) weights and of u; phase 2 applies u with the trust ratio. Going tensor by tensor,
// phase 2 reads the weights and u back from cache. Without a trust ratio it is one pass.
// Slots: params (P), grads (G), exp_avgs, exp_avg_sqs (fp32).
#include "multi_tensor.h"

namespace fused_ft {

SumSq sum_squares_chunked(const at::Tensor& a, const at::Tensor& b, int64_t tensor) {
  SumSq s;
  dispatch_pg(a, b, [&](auto a_tag, auto b_tag) {
    const auto* ap = a.data_ptr<decltype(a_tag)>();
    const auto* bp = b.data_ptr<decltype(b_tag)>();
    s = sum_pairs(chunks_of(tensor, a.numel()), [&](int64_t i, auto w) { return std::make_pair(ld(ap + i, w), ld(bp + i, w)); });
  });
  return s;
}

double sum_squares(std::vector<at::Tensor> tensors) {
  double total = 0;
  for (int64_t t = 0; t < static_cast<int64_t>(tensors.size()); ++t)
    total += sum_squares_chunked(tensors[t], tensors[t], t).a;
  return total;
}

void lamb_(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> exp_avgs,
           std::vector<at::Tensor> exp_avg_sqs, double clip_divisor, double lr, double beta1, double beta2,
           double beta3, double bias_correction1, double bias_correction2, double eps, double weight_decay,
           double decay, bool adapt, bool trust_clip) {
  check_lists(params, grads, "grads");
  check_lists(params, exp_avgs, "exp_avgs");
  check_lists(params, exp_avg_sqs, "exp_avg_sqs");
  const bool averaging = beta3 == 1 - beta1;
  const float f_b1 = beta1, f_b2 = beta2, f_w2 = 1 - beta2, f_b3 = beta3, f_bc1 = bias_correction1;
  const float f_bc2 = std::sqrt(bias_correction2), f_eps = eps, f_wd = weight_decay, f_decay = decay;
  const float clip = clip_divisor, f_lr = lr;
  for (int64_t t = 0; t < static_cast<int64_t>(params.size()); ++t) {
    const auto& p = params[t];
    const auto& g = grads[t];
    float* mp = exp_avgs[t].data_ptr<float>();
    float* vp = exp_avg_sqs[t].data_ptr<float>();
    const auto& chunks = chunks_of(t, p.numel());
    dispatch_pg(p, g, [&](auto p_tag, auto g_tag) {
      using P = decltype(p_tag);
      using G = decltype(g_tag);
      P* pp = p.data_ptr<P>();
      const G* gp = g.data_ptr<G>();
      // moves the moments on and returns (decayed weight, update) at element i
      auto moments = [&](int64_t i, auto w) {
        using V = decltype(w);
        const V d = ld(gp + i, w) / splat<V>(clip);
        V m = ld(mp + i, w);
        m = averaging ? m + splat<V>(f_b3) * (d - m) : splat<V>(f_b1) * m + splat<V>(f_b3) * d;
        const V v = splat<V>(f_b2) * ld(vp + i, w) + splat<V>(f_w2) * d * d;
        st(mp + i, m);
        st(vp + i, v);
        const V x = ld(pp + i, w) * splat<V>(f_decay);
        const V u = (m / splat<V>(f_bc1)) / (vsqrt(v) / splat<V>(f_bc2) + splat<V>(f_eps)) + splat<V>(f_wd) * x;
        return std::make_pair(x, u);
      };
      if (!adapt) {
        parallel_chunks(chunks, [&](const Chunk& c, int64_t) {
          vector_loop(c.begin, c.end, [&](int64_t i, auto w) {
            const auto [x, u] = moments(i, w);
            st(pp + i, x - splat<decltype(w)>(f_lr) * u);
          });
        });
        return;
      }
      float* up = workspace(p.numel());
      const SumSq s = sum_pairs(chunks, [&](int64_t i, auto w) {
        const auto xu = moments(i, w);
        st(up + i, xu.second);
        return xu;
      });
      float ratio = 1.f;
      const double w_norm = std::sqrt(s.a), u_norm = std::sqrt(s.b);
      if (w_norm > 0 && u_norm > 0) ratio = w_norm / u_norm;
      if (trust_clip) ratio = std::min(ratio, 1.f);
      const float step = lr * ratio;
      parallel_chunks(chunks, [&](const Chunk& c, int64_t) {
        vector_loop(c.begin, c.end, [&](int64_t i, auto w) {
          using V = decltype(w);
          st(pp + i, ld(pp + i, w) * splat<V>(f_decay) - splat<V>(step) * ld(up + i, w));
        });
      });
    });
  }
}

}  // namespace fused_ft
