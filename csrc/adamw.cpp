// AdamW (torch.optim.AdamW semantics) in one pass over all tensors.
// Slots: params (P), grads (G), exp_avgs, exp_avg_sqs, max_exp_avg_sqs (amsgrad), all state fp32.
// step_sizes[t] = lr / (1 - beta1^step_t) and bc2_sqrt[t] = sqrt(1 - beta2^step_t) per tensor.
#include "multi_tensor.h"

namespace fused_ft {

void adamw_(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> exp_avgs,
            std::vector<at::Tensor> exp_avg_sqs, std::vector<at::Tensor> max_exp_avg_sqs,
            std::vector<double> step_sizes, std::vector<double> bc2_sqrt, double lr, double beta1, double beta2,
            double eps, double weight_decay, bool amsgrad, bool maximize, int64_t rounding_mode, int64_t rounding_key, std::vector<at::Tensor> compensations) {
  check_lists(params, grads, "grads");
  check_lists(params, exp_avgs, "exp_avgs");
  check_lists(params, exp_avg_sqs, "exp_avg_sqs");
  if (amsgrad) check_lists(params, max_exp_avg_sqs, "max_exp_avg_sqs");
  const float decay = 1 - lr * weight_decay, w1 = 1 - beta1, b2 = beta2, w2 = 1 - beta2, f_eps = eps;
  const float sign = maximize ? -1.f : 1.f;
  const Rounding rounding = make_rounding(rounding_mode, rounding_key, compensations, params);
  parallel_chunks(make_chunks(params), [&](const Chunk& c, int64_t) {
    const float step_size = step_sizes[c.tensor], bc2 = bc2_sqrt[c.tensor];
    dispatch_pg(params[c.tensor], grads[c.tensor], [&](auto p_tag, auto g_tag) {
      using P = decltype(p_tag);
      using G = decltype(g_tag);
      const ParamIO<P> io(params[c.tensor].data_ptr<P>(), rounding, c.tensor);
      const G* gp = grads[c.tensor].data_ptr<G>();
      float* mp = exp_avgs[c.tensor].data_ptr<float>();
      float* vp = exp_avg_sqs[c.tensor].data_ptr<float>();
      float* vmaxp = amsgrad ? max_exp_avg_sqs[c.tensor].data_ptr<float>() : nullptr;
      vector_loop(c.begin, c.end, [&](int64_t i, auto w) {
        using V = decltype(w);
        V x = io.load(i, w) * splat<V>(decay);
        V d = ld(gp + i, w) * splat<V>(sign);
        V m = ld(mp + i, w);
        m = m + splat<V>(w1) * (d - m);  // torch's lerp
        V v = splat<V>(b2) * ld(vp + i, w) + splat<V>(w2) * d * d;
        st(mp + i, m);
        st(vp + i, v);
        if (amsgrad) {
          v = vmax(ld(vmaxp + i, w), v);
          st(vmaxp + i, v);
        }
        V denom = vsqrt(v) / splat<V>(bc2) + splat<V>(f_eps);
        io.store(i, x - splat<V>(step_size) * (m / denom));
      });
    });
  });
}

}  // namespace fused_ft
