// Shared engine of fused_ft's CPU kernels: work split over every tensor of a group, parallel
// loops, fp32 vector loads and stores from any storage dtype.
//
// A group's tensors are cut into chunks of at most kChunk elements that never cross a tensor;
// chunks run in parallel (at::parallel_for, torch's OpenMP pool). SGD instead gives each thread one
// slice of every tensor (parallel_slices). Inside a chunk the math runs on at::vec::Vectorized<float>
// with a scalar tail. All math is fp32: bf16/fp16 values are
// widened on load and rounded to nearest-even once on store (bit for bit c10's conversions, as torch's copy_;
// bf16 in integer SIMD code, fp16 through c10).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace fused_ft {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kChunk = 1 << 15;  // 128 KiB per fp32 stream: several streams stay in L2

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// Chunk lists live in per-thread buffers that keep their capacity from step to step: a fresh
// std::vector per step touched new heap pages after the caller's temporaries were trimmed (7 page
// faults per step measured on the ViT-B/16 list), which a steady-state step must not do. `slot` picks one of a few
// buffers so that a caller can hold two lists at once.
inline std::vector<Chunk>& chunk_buffer(int slot) {
  thread_local std::vector<Chunk> buffers[2];
  buffers[slot].clear();
  return buffers[slot];
}

// Appends the chunks of one tensor to `out`.
inline void append_chunks(std::vector<Chunk>& out, int64_t tensor, int64_t numel) {
  for (int64_t b = 0; b < numel; b += kChunk) out.push_back({tensor, b, std::min(numel, b + kChunk)});
}

// Chunks of all tensors. Proportional to the number of chunks, not of elements.
inline const std::vector<Chunk>& make_chunks(const std::vector<at::Tensor>& tensors) {
  auto& chunks = chunk_buffer(0);
  for (int64_t t = 0; t < static_cast<int64_t>(tensors.size()); ++t) append_chunks(chunks, t, tensors[t].numel());
  return chunks;
}

// Chunks of one tensor.
inline const std::vector<Chunk>& chunks_of(int64_t tensor, int64_t numel) {
  auto& chunks = chunk_buffer(0);
  append_chunks(chunks, tensor, numel);
  return chunks;
}

// A float scratch area of at least n elements, kept between calls (grown, never shrunk), so that a
// two-pass kernel can hand values from its first pass to its second without a per-step allocation.
inline float* workspace(int64_t n) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

template <typename F>
inline void parallel_chunks(const std::vector<Chunk>& chunks, const F& f) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) f(chunks[i], i);
  });
}

// Thread k of n walks the k-th of n equal, cache-line aligned slices of every tensor, tensor after
// tensor, in one parallel region: how torch's fused CPU kernels split each tensor.
template <typename F>
inline void parallel_slices(const std::vector<at::Tensor>& tensors, const F& f) {
  const int64_t n = static_cast<int64_t>(tensors.size());
  const int64_t threads = at::get_num_threads();
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      for (int64_t t = 0; t < n; ++t) {
        const int64_t numel = tensors[t].numel();
        const int64_t slice = ((numel + threads - 1) / threads + 15) / 16 * 16;
        const int64_t begin = std::min(numel, k * slice), end = std::min(numel, begin + slice);
        if (begin < end) f(Chunk{t, begin, end}, t);
      }
    }
  });
}

// bf16 bits on N lanes at once, in GCC/Clang vector types so that they compile to SIMD integer code
// (written as loops over c10::BFloat16, conversions stayed scalar: c10's round to nearest-even per
// element made a bf16 SGD step compute-bound). NaN stores c10's NaN (0x7FC0).
constexpr uint32_t kBf16NaN = 0x7FC0;
constexpr uint32_t kGolden = 0x9E3779B9u;  // the hash's odd multiplier of element and tensor numbers

template <int N>
struct U32Vector {  // (GCC ignores vector_size on an alias template, not on a member typedef)
  typedef uint32_t type __attribute__((vector_size(N * sizeof(uint32_t))));
};
template <int N>
using U32 = typename U32Vector<N>::type;

template <int N>
inline U32<N> nan_lanes(const U32<N>& u) {
  return reinterpret_cast<U32<N>>((u & 0x7FFFFFFFu) > 0x7F800000u);  // all ones where NaN
}

template <int N>
inline U32<N> golden_lanes() {  // k * kGolden for lane k: a constant the compiler folds
  U32<N> lanes{};
  for (int k = 0; k < N; ++k) lanes[k] = static_cast<uint32_t>(k) * kGolden;
  return lanes;
}

template <int N>
inline void narrow_store(c10::BFloat16* p, const U32<N>& bits) {
  uint16_t out[N];
  for (int k = 0; k < N; ++k) out[k] = static_cast<uint16_t>(bits[k]);
  std::memcpy(static_cast<void*>(p), out, sizeof out);
}

// bf16 -> fp32 is exact: the 16 bits become the high half.
template <int N>
inline void widen_bf16(const c10::BFloat16* p, float* x) {
  uint16_t high[N];
  std::memcpy(high, static_cast<const void*>(p), sizeof high);
  U32<N> u;
  for (int k = 0; k < N; ++k) u[k] = static_cast<uint32_t>(high[k]) << 16;
  std::memcpy(x, &u, sizeof u);
}

// fp32 -> bf16 to nearest-even, bit for bit c10::BFloat16(float): add 0x7FFF plus the lowest kept
// bit, truncate.
template <int N>
inline void store_nearest(c10::BFloat16* p, const float* x) {
  U32<N> u;
  std::memcpy(&u, x, sizeof u);
  const U32<N> nan = nan_lanes<N>(u);
  narrow_store<N>(p, (nan & kBf16NaN) | (~nan & ((u + ((u >> 16) & 1u) + 0x7FFFu) >> 16)));
}

// fp32 loads and stores of one vector (or one element) from any storage type.
template <typename T>
inline Vec load_vec(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    float tmp[Vec::size()];
    widen_bf16<Vec::size()>(p, tmp);
    return Vec::loadu(tmp);
  } else {
    float tmp[Vec::size()];
    for (int k = 0; k < Vec::size(); ++k) tmp[k] = static_cast<float>(p[k]);
    return Vec::loadu(tmp);
  }
}

template <typename T>
inline void store_vec(T* p, const Vec& v) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    float tmp[Vec::size()];
    v.store(tmp);
    store_nearest<Vec::size()>(p, tmp);
  } else {
    float tmp[Vec::size()];
    v.store(tmp);
    for (int k = 0; k < Vec::size(); ++k) p[k] = T(tmp[k]);
  }
}

template <typename T>
inline float load_one(const T* p) { return static_cast<float>(*p); }
template <typename T>
inline void store_one(T* p, float v) { *p = T(v); }

// Math written once for both widths: V is Vec or float.
template <typename V>
inline V splat(float x) { return V(x); }
inline Vec vsqrt(const Vec& v) { return v.sqrt(); }
inline float vsqrt(float v) { return std::sqrt(v); }
inline Vec vmax(const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }
inline float vmax(float a, float b) { return std::max(a, b); }
inline float hsum(const Vec& v) {
  float tmp[Vec::size()];
  v.store(tmp);
  float s = 0;
  for (int k = 0; k < Vec::size(); ++k) s += tmp[k];
  return s;
}

// Run body(i, tag) over [begin, end): tag is a Vec (vector step) or a float (scalar tail), so a
// generic lambda picks load/store overloads and math width from it.
template <typename Body>
inline void vector_loop(int64_t begin, int64_t end, const Body& body) {
  int64_t i = begin;
  for (; i + Vec::size() <= end; i += Vec::size()) body(i, Vec());
  for (; i < end; ++i) body(i, 0.0f);
}

template <typename T, typename V>
inline V ld(const T* p, V) {
  if constexpr (std::is_same_v<V, Vec>) return load_vec(p); else return load_one(p);
}
template <typename T, typename V>
inline void st(T* p, const V& v) {
  if constexpr (std::is_same_v<V, Vec>) store_vec(p, v); else store_one(p, v);
}

// -- how bf16 parameters are stored (fused_ft/_precision.py is the reference of every line here) --
// kNearest rounds to nearest-even (c10's conversion). kStochastic adds 16 random bits below bf16's
// last mantissa bit and truncates: unbiased. kKahan keeps the 16 bits that rounding dropped in an
// int16 compensation, so weight and compensation together are the exact fp32 value, which loads
// merge back. Random bits are a counter-based hash of (key, tensor, element): the same integers as
// the reference and the Triton kernels compute.
enum RoundingMode : int64_t { kNearest = 0, kStochastic = 1, kKahan = 2 };

struct Rounding {
  int64_t mode = kNearest;
  uint32_t key = 0;                                          // kStochastic: the update call's key
  const std::vector<at::Tensor>* compensations = nullptr;    // kKahan: int16, one per tensor
};

// Wellons' lowbias32: a bijective integer hash with good avalanche (uint32_t, or a vector of them).
template <typename T>
inline T mix32(T x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

// The other two stores and kahan's load, on the same vector lanes (the hash included: as loops over arrays
// it stayed scalar, and stochastic rounding cost 1.4x nearest). NaN stores c10's NaN and a zero
// compensation, as the reference does.
template <int N>
inline void store_stochastic(c10::BFloat16* p, const float* x, int64_t first, uint32_t key) {
  U32<N> u;
  std::memcpy(&u, x, sizeof u);
  // (first + k) * kGolden + key, with the lanes' products folded into a constant: one multiply less
  // per vector, and no lane inserts (building the index lane by lane cost 2x nearest)
  const U32<N> random = mix32((static_cast<uint32_t>(first) * kGolden + key) + golden_lanes<N>());
  const U32<N> nan = nan_lanes<N>(u);
  narrow_store<N>(p, (nan & kBf16NaN) | (~nan & ((u + (random & 0xFFFFu)) >> 16)));
}

// x rounded half away from zero, and the signed low 16 bits that rounding dropped
template <int N>
inline void store_split(c10::BFloat16* p, int16_t* comp, const float* x) {
  U32<N> u;
  std::memcpy(&u, x, sizeof u);
  const U32<N> nan = nan_lanes<N>(u);
  const U32<N> v = u + 0x8000u;
  narrow_store<N>(p, (nan & kBf16NaN) | (~nan & (v >> 16)));
  const U32<N> low = ~nan & ((v & 0xFFFFu) - 0x8000u);  // two's complement: the int16 in the low half
  int16_t out[N];
  for (int k = 0; k < N; ++k) out[k] = static_cast<int16_t>(static_cast<uint16_t>(low[k]));
  std::memcpy(comp, out, sizeof out);
}

template <int N>
inline void load_merged(const c10::BFloat16* p, const int16_t* comp, float* x) {
  uint16_t high[N];
  int16_t low[N];
  std::memcpy(high, static_cast<const void*>(p), sizeof high);
  std::memcpy(low, comp, sizeof low);
  U32<N> u;
  for (int k = 0; k < N; ++k) u[k] = (static_cast<uint32_t>(high[k]) << 16) + static_cast<uint32_t>(static_cast<int32_t>(low[k]));
  std::memcpy(x, &u, sizeof u);
}

// One tensor's parameter loads and stores under a Rounding (float and half parameters: plain).
template <typename P>
struct ParamIO {
  P* p;
  int64_t mode = kNearest;
  uint32_t key = 0;
  int16_t* comp = nullptr;

  ParamIO(P* p_, const Rounding& r, int64_t tensor) : p(p_) {
    if constexpr (std::is_same_v<P, c10::BFloat16>) {
      mode = r.mode;
      if (mode == kStochastic) key = mix32(static_cast<uint32_t>(r.key + static_cast<uint32_t>(tensor) * kGolden));
      if (mode == kKahan) comp = (*r.compensations)[tensor].template data_ptr<int16_t>();
    }
  }

  template <typename V>
  V load(int64_t i, V w) const {
    if constexpr (std::is_same_v<P, c10::BFloat16>) {
      if (mode == kKahan) {
        if constexpr (std::is_same_v<V, Vec>) {
          float tmp[Vec::size()];
          load_merged<Vec::size()>(p + i, comp + i, tmp);
          return Vec::loadu(tmp);
        } else {
          float x;
          load_merged<1>(p + i, comp + i, &x);
          return x;
        }
      }
    }
    return ld(p + i, w);
  }

  template <typename V>
  void store(int64_t i, const V& x) const {
    if constexpr (std::is_same_v<P, c10::BFloat16>) {
      if (mode != kNearest) {
        constexpr int n = std::is_same_v<V, Vec> ? Vec::size() : 1;
        float tmp[n];
        if constexpr (std::is_same_v<V, Vec>) {
          x.store(tmp);
        } else {
          tmp[0] = x;
        }
        if (mode == kStochastic) {
          store_stochastic<n>(p + i, tmp, i, key);
        } else {
          store_split<n>(p + i, comp + i, tmp);
        }
        return;
      }
    }
    st(p + i, x);
  }
};

inline Rounding make_rounding(int64_t mode, int64_t key, const std::vector<at::Tensor>& compensations,
                              const std::vector<at::Tensor>& params) {
  TORCH_CHECK(mode >= kNearest && mode <= kKahan, "fused_ft: unknown rounding mode ", mode);
  if (mode == kKahan) {
    TORCH_CHECK(compensations.size() == params.size(), "fused_ft: compensations list has ", compensations.size(),
                " tensors, expected ", params.size());
  }
  return Rounding{mode, static_cast<uint32_t>(key), &compensations};
}

// Dispatch one tensor's (param, grad) storage types: float, bfloat16, half.
template <typename F>
inline void dispatch_pg(const at::Tensor& p, const at::Tensor& g, const F& f) {
  auto with_grad = [&](auto p_tag) {
    using P = decltype(p_tag);
    switch (g.scalar_type()) {
      case at::kFloat: return f(P(), float());
      case at::kBFloat16: return f(P(), c10::BFloat16());
      case at::kHalf: return f(P(), c10::Half());
      default: TORCH_CHECK(false, "fused_ft cpu kernels: unsupported grad dtype ", g.scalar_type());
    }
  };
  switch (p.scalar_type()) {
    case at::kFloat: return with_grad(float());
    case at::kBFloat16: return with_grad(c10::BFloat16());
    case at::kHalf: return with_grad(c10::Half());
    default: TORCH_CHECK(false, "fused_ft cpu kernels: unsupported param dtype ", p.scalar_type());
  }
}

inline void check_lists(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b, const char* what) {
  TORCH_CHECK(a.size() == b.size(), "fused_ft: ", what, " list has ", b.size(), " tensors, expected ", a.size());
}

// Per-tensor sums of squares over chunks, reduced in chunk order (deterministic).
struct SumSq {
  double a = 0, b = 0;
};

inline std::vector<SumSq>& partial_sums(int64_t n) {
  thread_local std::vector<SumSq> buffer;
  buffer.assign(n, SumSq{});
  return buffer;
}

inline SumSq total(const std::vector<SumSq>& partial) {
  SumSq s;
  for (const auto& q : partial) {
    s.a += q.a;
    s.b += q.b;
  }
  return s;
}

// Sums of squares of two per-element values over [begin, end). body(i, tag) returns the pair (a, b)
// at element i as Vec or float, like vector_loop's body. (Two accumulators per sum, unrolled, made
// LARS's norm pass 2-5% slower: the pass is bound by memory, not by add latency.)
template <typename Body>
inline SumSq range_sum_pairs(int64_t begin, int64_t end, const Body& body) {
  Vec va(0.f), vb(0.f);
  float sa = 0, sb = 0;
  vector_loop(begin, end, [&](int64_t i, auto w) {
    const auto [x, y] = body(i, w);
    if constexpr (std::is_same_v<decltype(w), Vec>) {
      va = va + x * x;
      vb = vb + y * y;
    } else {
      sa += x * x;
      sb += y * y;
    }
  });
  return {static_cast<double>(hsum(va)) + sa, static_cast<double>(hsum(vb)) + sb};
}

// range_sum_pairs over chunks in parallel, reduced in chunk order (deterministic).
template <typename Body>
inline SumSq sum_pairs(const std::vector<Chunk>& chunks, const Body& body) {
  auto& partial = partial_sums(static_cast<int64_t>(chunks.size()));
  parallel_chunks(chunks, [&](const Chunk& c, int64_t k) { partial[k] = range_sum_pairs(c.begin, c.end, body); });
  return total(partial);
}

// torch.optim.SGD's momentum step, shared by SGD and LARS: b <- keep*b + scale*d (keep 0, scale 1
// for a new buffer); returns the direction to step along (Nesterov or the buffer).
template <typename V>
inline V momentum_direction(float* bp, int64_t i, const V& d, float keep, float scale, float momentum,
                            bool nesterov) {
  const V b = splat<V>(keep) * ld(bp + i, V()) + splat<V>(scale) * d;
  st(bp + i, b);
  return nesterov ? d + splat<V>(momentum) * b : b;
}

// One chunk of an SGD-style update, shared by SGD and LARS: d = (sign * g + wd * x) * ratio (LARS
// scales by its trust ratio, SGD passes 1), torch.optim.SGD's momentum when bp is set (keep 0, scale
// 1 for a new buffer), then p -= lr * direction. The scalars arrive by value on purpose: as locals
// whose address never escapes they stay in registers, where floats captured by reference from the
// caller must be reloaded after every store through a float pointer that might alias them.
inline void sgd_chunk(const at::Tensor& p, const at::Tensor& g, float* bp, const Chunk& c, const Rounding& r,
                      float sign, float wd, float ratio, float lr, float keep, float scale, float momentum,
                      bool nesterov) {
  dispatch_pg(p, g, [&](auto p_tag, auto g_tag) {
    using P = decltype(p_tag);
    using G = decltype(g_tag);
    const ParamIO<P> io(p.data_ptr<P>(), r, c.tensor);
    const G* gp = g.data_ptr<G>();
    vector_loop(c.begin, c.end, [&](int64_t i, auto w) {
      using V = decltype(w);
      const V x = io.load(i, w);
      V d = (ld(gp + i, w) * splat<V>(sign) + splat<V>(wd) * x) * splat<V>(ratio);
      if (bp) d = momentum_direction(bp, i, d, keep, scale, momentum, nesterov);
      io.store(i, x - splat<V>(lr) * d);
    });
  });
}

}  // namespace fused_ft
