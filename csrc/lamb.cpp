// LAMB (timm.optim.Lamb semantics), tensor by tensor in two phases. Phase 1 clips the gradient,
// updates and stores the moments, writes the update u to a reused workspace and sums the squares
// of the (decayed) weights and of u; phase 2 applies u with the trust ratio. Without a trust ratio
// it is one pass.
//
// Memory traffic per element (fp32): 4 B for the clip pass, 32 B for phase 1, 12 B for phase 2,
// against 28 B for one pass. Measured alternatives that were slower or no faster on the ViT-B/16
// list: recomputing u in phase 2 from the stored moments (reads 8 B instead of 4 B: 14% slower),
// walking phase 2 backwards so that it starts on what phase 1 left in cache (no change: a 9.4 MB
// tensor's 47 MB phase-1 footprint leaves nothing useful in a 2 MB L2).
// One division per element: division and square root share the divider, and timm's form
// (m / bc1) / (sqrt(v) / sqrt(bc2) + eps) spends three divisions and a root; the equivalent form
// below agrees within a few ulps.
// Slots: params (P), grads (G), exp_avgs, exp_avg_sqs (fp32).
#include "multi_tensor.h"

namespace fused_ft {

// All elements of the list in one parallel pass (LAMB's global gradient clipping). Fixed-size
// chunks, so that the sum does not depend on the thread count (per-thread slices measured 1-4%
// faster, but their rounding would change with OMP_NUM_THREADS).
double sum_squares(std::vector<at::Tensor> tensors) {
  const auto& chunks = make_chunks(tensors);
  auto& partial = partial_sums(static_cast<int64_t>(chunks.size()));
  parallel_chunks(chunks, [&](const Chunk& c, int64_t k) {
    const auto& t = tensors[c.tensor];
    dispatch_pg(t, t, [&](auto tag, auto) {
      const auto* tp = t.data_ptr<decltype(tag)>();
      partial[k] = range_sum_pairs(c.begin, c.end, [&](int64_t i, auto w) {
        const auto x = ld(tp + i, w);
        return std::make_pair(x, x);
      });
    });
  });
  return total(partial).a;
}

void lamb_(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> exp_avgs,
           std::vector<at::Tensor> exp_avg_sqs, double clip_divisor, double lr, double beta1, double beta2,
           double beta3, double bias_correction1, double bias_correction2, double eps, double weight_decay,
           double decay, bool adapt, bool trust_clip, int64_t rounding_mode, int64_t rounding_key, std::vector<at::Tensor> compensations) {
  check_lists(params, grads, "grads");
  check_lists(params, exp_avgs, "exp_avgs");
  check_lists(params, exp_avg_sqs, "exp_avg_sqs");
  const bool averaging = beta3 == 1 - beta1;
  const Rounding rounding = make_rounding(rounding_mode, rounding_key, compensations, params);
  const double bc2_sqrt = std::sqrt(bias_correction2);
  const float f_b1 = beta1, f_b2 = beta2, f_w2 = 1 - beta2, f_b3 = beta3, f_wd = weight_decay, f_decay = decay;
  const float inv_clip = 1.0 / clip_divisor, f_lr = lr;
  // u = m * step_scale / (sqrt(v) + eps_scaled) + wd * x  ==  (m / bc1) / (sqrt(v) / sqrt(bc2) + eps) + wd * x
  const float step_scale = bc2_sqrt / bias_correction1, eps_scaled = eps * bc2_sqrt;
  for (int64_t t = 0; t < static_cast<int64_t>(params.size()); ++t) {
    const auto& p = params[t];
    const auto& g = grads[t];
    float* mp = exp_avgs[t].data_ptr<float>();
    float* vp = exp_avg_sqs[t].data_ptr<float>();
    const auto& chunks = chunks_of(t, p.numel());
    dispatch_pg(p, g, [&](auto p_tag, auto g_tag) {
      using P = decltype(p_tag);
      using G = decltype(g_tag);
      const ParamIO<P> io(p.data_ptr<P>(), rounding, t);
      const G* gp = g.data_ptr<G>();
      auto update = [&](const auto& m, const auto& v, const auto& x) {
        using V = std::decay_t<decltype(m)>;
        return m * splat<V>(step_scale) / (vsqrt(v) + splat<V>(eps_scaled)) + splat<V>(f_wd) * x;
      };
      // moves the moments on, stores them and returns (decayed weight, update) at element i
      auto moments = [&](int64_t i, auto w) {
        using V = decltype(w);
        const V d = ld(gp + i, w) * splat<V>(inv_clip);
        V m = ld(mp + i, w);
        m = averaging ? m + splat<V>(f_b3) * (d - m) : splat<V>(f_b1) * m + splat<V>(f_b3) * d;
        const V v = splat<V>(f_b2) * ld(vp + i, w) + splat<V>(f_w2) * d * d;
        st(mp + i, m);
        st(vp + i, v);
        const V x = io.load(i, w) * splat<V>(f_decay);
        return std::make_pair(x, update(m, v, x));
      };
      if (!adapt) {
        parallel_chunks(chunks, [&](const Chunk& c, int64_t) {
          vector_loop(c.begin, c.end, [&](int64_t i, auto w) {
            const auto [x, u] = moments(i, w);
            io.store(i, x - splat<decltype(w)>(f_lr) * u);
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
          io.store(i, io.load(i, w) * splat<V>(f_decay) - splat<V>(step) * ld(up + i, w));
        });
      });
    });
  }
}

}  // namespace fused_ft
