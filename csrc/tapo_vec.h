// Vector helpers of the tapo CPU kernels: GCC vector extensions (32-byte vectors, lowered to
// SSE pairs without AVX; the kernels build an AVX2 variant picked at run time), loads, stores,
// min/max/clamp, and vectorised exponentials.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

// The 32-byte vector helpers are always inlined, so no vector crosses a call boundary in the
// build without AVX; GCC's note about that ABI is moot here.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace tapo {

#define TAPO_INLINE __attribute__((always_inline)) inline

template <typename scalar_t>
struct Vec;

template <>
struct Vec<float> {
  static constexpr int kWidth = 8;
  using V = float __attribute__((vector_size(32)));
  using I = int32_t __attribute__((vector_size(32)));  // comparison results: -1 / 0
  using D = double __attribute__((vector_size(64)));  // fp64 accumulators, one per lane
  using B = uint8_t __attribute__((vector_size(8)));  // bool mask lanes
  using M = int32_t __attribute__((vector_size(32)));  // call map lanes
};

template <>
struct Vec<double> {
  static constexpr int kWidth = 4;
  using V = double __attribute__((vector_size(32)));
  using I = int64_t __attribute__((vector_size(32)));
  using D = V;
  using B = uint8_t __attribute__((vector_size(4)));
  using M = int32_t __attribute__((vector_size(16)));
};

// Every lane = s (scalar minus a zero vector broadcasts s; exact, -0.0 included).
template <typename V, typename S>
TAPO_INLINE V splat(S s) {
  using Lane = std::remove_reference_t<decltype(std::declval<V>()[0])>;
  return static_cast<Lane>(s) - V{};
}

template <typename V, typename S>
TAPO_INLINE V vload(const S* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename S>
TAPO_INLINE void vstore(S* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

template <typename V>
TAPO_INLINE V vmin(V a, V b) {
  return a < b ? a : b;
}

template <typename V>
TAPO_INLINE V vmax(V a, V b) {
  return a > b ? a : b;
}

// torch.clamp(x, lo, hi) = min(max(x, lo), hi)
template <typename V>
TAPO_INLINE V vclamp(V x, V lo, V hi) {
  return vmin(vmax(x, lo), hi);
}

// exp on fp32 lanes: Cephes expf (n = round(x / ln 2), r = x - n ln 2 in two parts so
// |r| <= ln 2 / 2, its polynomial, 2^n built from bits), within 1 ulp like torch's exp.
// Inputs are clamped to [-87, 88], enough for every use here (|log-ratio| <= 20, k3's
// |d| <= 20; the sigmoid saturates long before).
TAPO_INLINE Vec<float>::V vexp(Vec<float>::V x) {
  using V = Vec<float>::V;
  using I = Vec<float>::I;
  x = vclamp(x, splat<V>(-87.0f), splat<V>(88.0f));
  // n = round(x / ln 2): adding 1.5 * 2^23 leaves n in the low mantissa bits
  const V magic = splat<V>(12582912.0f);
  const V t = x * splat<V>(1.44269504088896341f) + magic;
  const V nf = t - magic;
  V r = x - nf * splat<V>(0.693359375f);
  r = r - nf * splat<V>(-2.12194440e-4f);
  // exp(r) ~ 1 + r + r^2 q(r), q of degree 5 evaluated by Estrin's scheme (short dependency
  // chains, so consecutive tokens overlap in the pipeline)
  const V r2 = r * r;
  const V r4 = r2 * r2;
  const V q01 = splat<V>(5.0000001201e-1f) + splat<V>(1.6666665459e-1f) * r;
  const V q23 = splat<V>(4.1665795894e-2f) + splat<V>(8.3334519073e-3f) * r;
  const V q45 = splat<V>(1.3981999507e-3f) + splat<V>(1.9875691500e-4f) * r;
  const V q = q01 + r2 * q23 + r4 * q45;
  const V y = q * r2 + r + splat<V>(1.0f);
  // 2^n from the bits of t: its low bits are n + 0x400000 above the magic's exponent field
  I bits;
  std::memcpy(&bits, &t, sizeof(bits));
  bits = (bits - splat<I>(0x4B400000 - 127)) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// exp on fp64 lanes: the C library's exp (correctly rounded in practice, like Python's math.exp).
TAPO_INLINE Vec<double>::V vexp(Vec<double>::V x) {
  Vec<double>::V out;
  for (int k = 0; k < Vec<double>::kWidth; ++k) out[k] = std::exp(x[k]);
  return out;
}

}  // namespace tapo
