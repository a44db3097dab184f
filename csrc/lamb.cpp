// LAMB (timm.optim.Lamb semantics), tensor by tensor in two phases. Phase 1 clips the gradient,
// updates and stores the moments and sums the squares of the (decayed) weights and of the update;
// phase 2 recomputes the update from the stored moments and applies it with the trust ratio.
// Tensor by tensor, phase 2 re-reads what phase 1 left in cache.
// Slots: params (P), grads (G), exp_avgs, exp_avg_sqs (fp32).
#include "multi_tensor.h"

namespace fused_ft {

SumSq sum_squares_chunked(const at::Tensor& a, const at::Tensor* b, int64_t tensor) {
  const auto chunks = chunks_of(tensor, a.numel());
  std::vector<SumSq> partial(chunks.size());
  parallel_chunks(chunks, [&](const Chunk& c, int64_t k) {
    dispatch_pg(a, b ? *b : a, [&](auto a_tag, auto b_tag) {
      using A = decltype(a_tag);
      using B = decltype(b_tag);
      const A* ap = a.data_ptr<A>();
      const B* bp = b ? b->data_ptr<B>() : nullptr;
      Vec va(0.f), vb(0.f);
      float sa = 0, sb = 0;
      vector_loop(c.begin, c.end, [&](int64_t i, auto w) {
        using V = decltype(w);
        V x = ld(ap + i, w);
        V y = bp ? ld(bp + i, w) : V(0.f);
        if constexpr (std::is_same_v<V, Vec>) {
          va = va + x * x;
          vb = vb + y * y;
        } else {
          sa += x * x;
          sb += y * y;
        }
      });
      partial[k] = {static_cast<double>(hsum(va)) + sa, static_cast<double>(hsum(vb)) + sb};
    });
  });
  SumSq total;
  for (const auto& s : partial) {
    total.a += s.a;
    total.b += s.b;
  }
  return total;
}

double sum_squares(std::vector<at::Tensor> tensors) {
  double total = 0;
  for (int64_t t = 0; t < static_cast<int64_t>(tensors.size()); ++t)
    total += sum_squares_chunked(tensors[t], nullptr, t).a;
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
  const float clip = clip_divisor;
  for (int64_t t = 0; t < static_cast<int64_t>(params.size()); ++t) {
    const auto& p = params[t];
    const auto& g = grads[t];
    float* mp = exp_avgs[t].data_ptr<float>();
    float* vp = exp_avg_sqs[t].data_ptr<float>();
    const auto chunks = chunks_of(t, p.numel());
    std::vector<SumSq> partial(chunks.size());
    dispatch_pg(p, g, [&](auto p_tag, auto g_tag) {
      using P = decltype(p_tag);
      using G = decltype(g_tag);
      P* pp = p.data_ptr<P>();
      const G* gp = g.data_ptr<G>();
      auto update = [&](auto m, auto v, auto x) {
        using V = decltype(m);
        return (m / splat<V>(f_bc1)) / (vsqrt(v) / splat<V>(f_bc2) + splat<V>(f_eps)) + splat<V>(f_wd) * x;
      };
      parallel_chunks(chunks, [&](const Chunk& c, int64_t k) {
        Vec sw(0.f), su(0.f);
        float tw = 0, tu = 0;
        vector_loop(c.begin, c.end, [&](int64_t i, auto w) {
          using V = decltype(w);
          V d = ld(gp + i, w) / splat<V>(clip);
          V m = ld(mp + i, w);
          m = averaging ? m + splat<V>(f_b3) * (d - m) : splat<V>(f_b1) * m + splat<V>(f_b3) * d;
          V v = splat<V>(f_b2) * ld(vp + i, w) + splat<V>(f_w2) * d * d;
          st(mp + i, m);
          st(vp + i, v);
          if (adapt) {
            V x = ld(pp + i, w) * splat<V>(f_decay);
            V u = update(m, v, x);
            if constexpr (std::is_same_v<V, Vec>) {
              sw = sw + x * x;
              su = su + u * u;
            } else {
              tw += x * x;
              tu += u * u;
            }
          }
        });
        partial[k] = {static_cast<double>(hsum(sw)) + tw, static_cast<double>(hsum(su)) + tu};
      });
      float ratio = 1.f;
      if (adapt) {
        SumSq s;
        for (const auto& q : partial) {
          s.a += q.a;
          s.b += q.b;
        }
        const double w_norm = std::sqrt(s.a), u_norm = std::sqrt(s.b);
        if (w_norm > 0 && u_norm > 0) ratio = w_norm / u_norm;
        if (trust_clip) ratio = std::min(ratio, 1.f);
      }
      const float step = lr * ratio;
      parallel_chunks(chunks, [&](const Chunk& c, int64_t) {
        vector_loop(c.begin, c.end, [&](int64_t i, auto w) {
          using V = decltype(w);
          V x = ld(pp + i, w) * splat<V>(f_decay);
          st(pp + i, x - splat<V>(step) * update(ld(mp + i, w), ld(vp + i, w), x));
        });
      });
    });
  }
}

}  // namespace fused_ft
