// SGD (torch.optim.SGD semantics), with and without momentum, in one pass over all tensors.
// Slots: params (P), grads (G), momentum_buffers (fp32; empty list without momentum).
#include "multi_tensor.h"

namespace fused_ft {

void sgd_(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> bufs,
          std::vector<bool> new_buffer, double lr, double momentum, double dampening, double weight_decay,
          bool nesterov, bool maximize) {
  check_lists(params, grads, "grads");
  const bool has_momentum = momentum != 0;
  if (has_momentum) check_lists(params, bufs, "momentum_buffers");
  const float f_lr = lr, f_mom = momentum, f_damp = 1 - dampening, f_wd = weight_decay;
  const float sign = maximize ? -1.f : 1.f;
  // Without momentum (3 streams), 512 KiB chunks: with 128 KiB ones it ran at 0.92x torch fused
  // (0.97-1.02x at 512 KiB); with momentum (4 streams) 512 KiB chunks were slower (0.87x): keep 128 KiB.
  parallel_chunks(make_chunks(params, has_momentum ? kChunk : 1 << 17), [&](const Chunk& c, int64_t) {
    const auto& p = params[c.tensor];
    const auto& g = grads[c.tensor];
    // a new buffer (zeros) takes the first gradient as it is, as torch.optim does
    const bool fresh = has_momentum && new_buffer[c.tensor];
    const float keep = fresh ? 0.f : f_mom, scale = fresh ? 1.f : f_damp;
    dispatch_pg(p, g, [&](auto p_tag, auto g_tag) {
      using P = decltype(p_tag);
      using G = decltype(g_tag);
      P* pp = p.data_ptr<P>();
      const G* gp = g.data_ptr<G>();
      float* bp = has_momentum ? bufs[c.tensor].data_ptr<float>() : nullptr;
      vector_loop(c.begin, c.end, [&](int64_t i, auto w) {
        using V = decltype(w);
        V x = ld(pp + i, w);
        V d = ld(gp + i, w) * splat<V>(sign) + splat<V>(f_wd) * x;
        if (has_momentum) d = momentum_direction(bp, i, d, keep, scale, f_mom, nesterov);
        st(pp + i, x - splat<V>(f_lr) * d);
      });
    });
  });
}

}  // namespace fused_ft
