// CPU kernels of the log-probability front ends (docs/math.md, section 5): selective log-softmax
// of tapo::policy_loss_from_logits / tapo::policy_loss_from_hidden and their backward, as
// internal ops that tapo_kernels/logprob.py calls after validating the inputs:
//
//   tapo::_logprob_rows                  logits (B, T, V) -> fp32 logp (B, T) [, entropy (B, T)]
//   tapo::_dlogits_rows                  writes d loss / d logits into out (may be the logits)
//   tapo::_logprob_from_hidden           the same from hidden (B, T, H) and the LM head (V, H),
//   tapo::_logprob_from_hidden_backward  chunked over tokens: the (B*T, V) logits never exist
//
// Math (fp32, as the reference: x = logits.float() / temperature):
//   forward : m = max x, s = sum exp(x - m), lse = m + log s, logp = x[label] - lse,
//             entropy = log s - sum(exp(x - m) (x - m)) / s; a negative label gives 0 and 0.
//   backward: lse = x[label] - logp (recovered from the forward's output, so nothing (B, T, V)-
//             sized is saved), d = (-g exp(x - lse) + g onehot(label)) / temperature; rows with
//             g = 0 (masked, ignored) get exact zeros without reading the logits. With an
//             entropy gradient h (optional grad_entropy / entropy arguments):
//             d = (g onehot(label) - p (g + h (log p + H))) / temperature, in the same pass.
// Design: one row at a time (at::parallel_for over rows); the forward reads a row once, in
// blocks of 1,024 logits (the block's maximum, then its exponentials from L1, an online
// log-sum-exp across blocks), the backward once; 8 x fp32 lanes (GCC vector extensions, an
// AVX2 build picked at run time, bitwise equal to the baseline build), bf16 read by a shift,
// fp16 converted lane by lane. Sums are accumulated in fp32 lanes within a block and in fp64
// across blocks (torch's log_softmax uses fp32 throughout, so the result is at least as
// accurate). Measured on a shared 2-core AMD EPYC VM at 4k x 32k fp32: forward 45 ms (71 ms
// with the entropy), dlogits 46 ms; the chunked torch passes 552 and 291 ms. exp() underflows
// to exactly 0 below -87 (torch returns subnormals down to -103: an absolute difference
// below 1.2e-38 per logit). A row with a NaN, +inf, or no finite maximum gives NaN, which
// the Python caller reports as an error when the row is in the mask.
// The hidden-state path multiplies one chunk of tokens with the LM head (at::addmm into a
// reused buffer, the same product at::linear computes), reduces it with the row kernel and
// reuses the buffer; the backward recomputes the chunk's logits, turns them into dlogits (in
// place for fp32, else into an fp32 buffer), and accumulates dhidden = dlogits @ W,
// dW += dlogits^T @ h and db += sum dlogits in fp32.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "tapo_common.h"
#include "tapo_vec.h"

namespace tapo {
namespace {

using VF = Vec<float>::V;
using VI = Vec<float>::I;
constexpr int W = Vec<float>::kWidth;
constexpr int64_t kBlock = 1024;  // logits summed in fp32 lanes before the fp64 accumulator
constexpr float kExpFloor = -87.0f;  // exp(x) for x below this is taken as exactly 0

// ------------------------------------------------------------------------------------------
// loads and stores of 8 lanes in fp32
// ------------------------------------------------------------------------------------------

template <typename scalar_t>
TAPO_INLINE VF load8(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return vload<VF>(p);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    using U16 = uint16_t __attribute__((vector_size(16)));
    U16 h;
    std::memcpy(&h, p, sizeof(h));
    VI bits = __builtin_convertvector(h, VI) << 16;
    VF v;
    std::memcpy(&v, &bits, sizeof(v));
    return v;
  } else {
    VF v;
    for (int k = 0; k < W; ++k) v[k] = static_cast<float>(p[k]);
    return v;
  }
}

template <typename scalar_t>
TAPO_INLINE void store8(scalar_t* p, VF v) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    vstore(p, v);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    // round to nearest even, NaN kept quiet: c10::BFloat16's rule on 8 lanes
    using U32 = uint32_t __attribute__((vector_size(32)));
    using U16 = uint16_t __attribute__((vector_size(16)));
    U32 u;
    std::memcpy(&u, &v, sizeof(u));
    const U32 rounded = (u + (((u >> 16) & 1u) + 0x7fffu)) >> 16;
    const U32 is_nan = (U32)((u & 0x7fffffffu) > 0x7f800000u);  // lanes of all ones where NaN
    const U32 out = (rounded & ~is_nan) | (0x7fc0u & is_nan);
    const U16 h = __builtin_convertvector(out, U16);
    std::memcpy(p, &h, sizeof(h));
  } else {
    for (int k = 0; k < W; ++k) p[k] = static_cast<scalar_t>(v[k]);
  }
}

template <typename scalar_t>
TAPO_INLINE float load1(const scalar_t* p) {
  return static_cast<float>(*p);
}

// exp(xs) with xs <= ~0; exactly 0 below kExpFloor (also for xs = -inf).
TAPO_INLINE VF exp_floor(VF xs) { return xs >= splat<VF>(kExpFloor) ? vexp(xs) : VF{}; }

TAPO_INLINE float exp_floor1(float xs) { return exp_floor(splat<VF>(xs))[0]; }

TAPO_INLINE double lane_sum(VF v) {
  double s = 0.0;
  for (int k = 0; k < W; ++k) s += v[k];
  return s;
}

// ------------------------------------------------------------------------------------------
// one row: forward
// ------------------------------------------------------------------------------------------

struct RowArgs {
  int64_t V;
  float temperature;
  bool scaled;  // temperature != 1
};

template <typename scalar_t, bool kEntropy>
TAPO_INLINE void forward_row_body(const scalar_t* x, int64_t label, const RowArgs& a, float* logp,
                                  float* entropy) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t V = a.V;
  const VF vt = splat<VF>(a.temperature);
  const VF floor = splat<VF>(kExpFloor - 1.0f);
  // One pass over the row in blocks of kBlock logits (online log-sum-exp): a block's maximum,
  // then its exponentials while the block is in L1. m is the running maximum of x / t, s and
  // sx the sums sum exp(x - m) and sum exp(x - m) (x - m) relative to it (fp64), rescaled by
  // exp(m_old - m_new) when the maximum grows. The maximum is taken on the raw logits
  // (dividing by t > 0 keeps the order, and max(x) / t == max(x / t) exactly); NaN is tracked
  // separately as the comparison drops it.
  float m = kNegInf;
  double s = 0.0, sx = 0.0;
  bool bad = false;  // a NaN or +inf: the result is NaN
  for (int64_t b0 = 0; b0 < V && !bad; b0 += kBlock) {
    const int64_t b1 = std::min(b0 + kBlock, V);
    const int64_t bv = b1 - (b1 - b0) % W;  // end of the block's full vectors
    VF vmx = splat<VF>(kNegInf);
    VI vnan = VI{};
    for (int64_t j = b0; j < bv; j += W) {
      const VF v = load8(x + j);
      vmx = vmax(vmx, v);
      vnan |= v != v;
    }
    float bmx = kNegInf;
    bool nan = false;
    for (int k = 0; k < W; ++k) {
      bmx = std::max(bmx, vmx[k]);
      nan |= vnan[k] != 0;
    }
    for (int64_t j = bv; j < b1; ++j) {
      const float v = load1(x + j);
      bmx = std::max(bmx, v);
      nan |= v != v;
    }
    const float bm = a.scaled ? bmx / a.temperature : bmx;
    if (nan || bm == std::numeric_limits<float>::infinity()) {
      bad = true;
      break;
    }
    if (bm == kNegInf) continue;  // every logit of the block is -inf: nothing to add
    if (bm > m) {
      if (m != kNegInf) {
        const double d = static_cast<double>(m) - static_cast<double>(bm);
        const double r = std::exp(d);
        if constexpr (kEntropy) sx = r * (sx + d * s);
        s *= r;
      }
      m = bm;
    }
    const VF vm = splat<VF>(m);
    VF acc = VF{}, accx = VF{};
    for (int64_t j = b0; j < bv; j += W) {
      VF v = load8(x + j);
      if (a.scaled) v = v / vt;
      const VF xs = v - vm;
      const VF e = exp_floor(xs);
      acc += e;
      if constexpr (kEntropy) accx += e * vmax(xs, floor);  // 0 * finite where e underflows
    }
    s += lane_sum(acc);
    if constexpr (kEntropy) sx += lane_sum(accx);
    for (int64_t j = bv; j < b1; ++j) {
      float v = load1(x + j);
      if (a.scaled) v = v / a.temperature;
      const float xs = v - m;
      const float e = exp_floor1(xs);
      s += e;
      if constexpr (kEntropy) sx += static_cast<double>(e) * std::max(xs, kExpFloor - 1.0f);
    }
  }
  if (bad || m == kNegInf) {  // NaN, +inf, or no finite logit
    *logp = std::numeric_limits<float>::quiet_NaN();
    if constexpr (kEntropy) *entropy = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  float picked = load1(x + label);
  if (a.scaled) picked = picked / a.temperature;
  const double log_s = std::log(s);
  *logp = static_cast<float>(static_cast<double>(picked) - (static_cast<double>(m) + log_s));
  if constexpr (kEntropy) *entropy = static_cast<float>(log_s - sx / s);
}

template <typename scalar_t>
void forward_row_generic(const scalar_t* x, int64_t label, const RowArgs& a, float* logp,
                         float* entropy) {
  if (entropy != nullptr) {
    forward_row_body<scalar_t, true>(x, label, a, logp, entropy);
  } else {
    forward_row_body<scalar_t, false>(x, label, a, logp, entropy);
  }
}

template <typename scalar_t>
__attribute__((target("avx2"))) void forward_row_avx2(const scalar_t* x, int64_t label,
                                                      const RowArgs& a, float* logp,
                                                      float* entropy) {
  if (entropy != nullptr) {
    forward_row_body<scalar_t, true>(x, label, a, logp, entropy);
  } else {
    forward_row_body<scalar_t, false>(x, label, a, logp, entropy);
  }
}

// ------------------------------------------------------------------------------------------
// one row: backward (out may be x itself)
// ------------------------------------------------------------------------------------------

// With an entropy gradient h (and the forward's entropy H) the row's gradient is that of
// g logp + h H: d = (g onehot(label) - p (g + h (log p + H))) / temperature, p = exp(x - lse).
template <typename scalar_t, typename out_t>
TAPO_INLINE void entropy_backward_row_body(const scalar_t* x, out_t* out, int64_t label, float g,
                                           float logp, float h, float H, const RowArgs& a) {
  const int64_t V = a.V;
  const int64_t Vv = V - V % W;
  float xl = load1(x + label);
  if (a.scaled) xl = xl / a.temperature;
  const float lse = xl - logp;
  const VF vl = splat<VF>(lse), vt = splat<VF>(a.temperature), zero = VF{};
  const VF vg = splat<VF>(g), vh = splat<VF>(h), vH = splat<VF>(H);
  for (int64_t j = 0; j < Vv; j += W) {
    VF v = load8(x + j);
    if (a.scaled) v = v / vt;
    const VF log_p = v - vl;
    const VF p = exp_floor(log_p);
    // p = 0 (a -inf logit, or below the exp floor) contributes exactly 0
    VF d = p > zero ? -(p * (vg + vh * (log_p + vH))) : zero;
    if (a.scaled) d = d / vt;
    store8(out + j, d);
  }
  for (int64_t j = Vv; j < V; ++j) {
    float v = load1(x + j);
    if (a.scaled) v = v / a.temperature;
    const float p = exp_floor1(v - lse);
    float d = p > 0.0f ? -(p * (g + h * ((v - lse) + H))) : 0.0f;
    if (a.scaled) d = d / a.temperature;
    out[j] = static_cast<out_t>(d);
  }
  // the label's logit was read before the loop overwrote it (in place)
  const float pl = exp_floor1(xl - lse);
  float dl = (pl > 0.0f ? -(pl * (g + h * ((xl - lse) + H))) : 0.0f) + g;
  if (a.scaled) dl = dl / a.temperature;
  out[label] = static_cast<out_t>(dl);
}

template <typename scalar_t, typename out_t>
TAPO_INLINE void backward_row_body(const scalar_t* x, out_t* out, int64_t label, float g,
                                   float logp, float h, float H, const RowArgs& a) {
  const int64_t V = a.V;
  const int64_t Vv = V - V % W;
  if (label >= 0 && h != 0.0f) {
    entropy_backward_row_body(x, out, label, g, logp, h, H, a);
    return;
  }
  if (label < 0 || g == 0.0f) {  // nothing flows back through this token
    const VF zero = VF{};
    for (int64_t j = 0; j < Vv; j += W) store8(out + j, zero);
    for (int64_t j = Vv; j < V; ++j) out[j] = static_cast<out_t>(0.0f);
    return;
  }
  float xl = load1(x + label);
  if (a.scaled) xl = xl / a.temperature;
  const float lse = xl - logp;
  const VF vl = splat<VF>(lse);
  const VF vt = splat<VF>(a.temperature);
  const VF vng = splat<VF>(-g);
  for (int64_t j = 0; j < Vv; j += W) {
    VF v = load8(x + j);
    if (a.scaled) v = v / vt;
    VF d = exp_floor(v - vl) * vng;
    if (a.scaled) d = d / vt;
    store8(out + j, d);
  }
  for (int64_t j = Vv; j < V; ++j) {
    float v = load1(x + j);
    if (a.scaled) v = v / a.temperature;
    float d = exp_floor1(v - lse) * -g;
    if (a.scaled) d = d / a.temperature;
    out[j] = static_cast<out_t>(d);
  }
  // the label's logit was read before the loop overwrote it (in place)
  float dl = exp_floor1(xl - lse) * -g + g;
  if (a.scaled) dl = dl / a.temperature;
  out[label] = static_cast<out_t>(dl);
}

template <typename scalar_t, typename out_t>
void backward_row_generic(const scalar_t* x, out_t* out, int64_t label, float g, float logp,
                          float h, float H, const RowArgs& a) {
  backward_row_body(x, out, label, g, logp, h, H, a);
}

template <typename scalar_t, typename out_t>
__attribute__((target("avx2"))) void backward_row_avx2(const scalar_t* x, out_t* out, int64_t label,
                                                       float g, float logp, float h, float H,
                                                       const RowArgs& a) {
  backward_row_body(x, out, label, g, logp, h, H, a);
}

// ------------------------------------------------------------------------------------------
// row loops over (B, T, V) tensors with any strides but a unit last stride
// ------------------------------------------------------------------------------------------

void check_rows(const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 3, name, " must be 3-D (B, T, V), got shape ",
                    shape_repr(t.sizes()));
  TORCH_CHECK_VALUE(t.size(2) <= 1 || t.stride(2) == 1, name,
                    " must have a unit stride along the vocabulary");
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor");
}

// f(scalar_t{}) for the logits dtypes the kernels take (fp32, bf16, fp16).
template <typename F>
void dispatch_logits(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default:
      TORCH_CHECK_TYPE(false, "logits must have dtype float32/bfloat16/float16, got ",
                       dtype_name(dtype));
  }
}

// Rows per parallel task: about 64k logits of work.
int64_t row_grain(int64_t V) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(V, 1));
}

void check_labels(const at::Tensor& labels, int64_t B, int64_t T, int64_t V) {
  check_dtype("labels", labels, {at::kLong});
  check_shape("labels", labels, {B, T});
  if (labels.numel() == 0) return;
  const int64_t hi = labels.max().item<int64_t>();
  TORCH_CHECK_VALUE(hi < V, "labels must be < V = ", V, ", got ", hi);
}

// logp (and entropy, when ent_p) of every (B, T) row of logits; labels, logp_p and ent_p are
// flat over the rows. Unchecked: the callers validate.
void forward_rows(const at::Tensor& logits, const int64_t* lab_p, float temperature, float* logp_p,
                  float* ent_p) {
  const int64_t T = logits.size(1), V = logits.size(2), rows = logits.size(0) * T;
  const RowArgs a{V, temperature, temperature != 1.0f};
  const int64_t s0 = logits.stride(0), s1 = logits.stride(1);
  dispatch_logits(logits.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* base = logits.const_data_ptr<scalar_t>();
    const auto row_fn =
        cpu_has_avx2() ? &forward_row_avx2<scalar_t> : &forward_row_generic<scalar_t>;
    at::parallel_for(0, rows, row_grain(V), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t label = lab_p[r];
        if (label < 0) {
          logp_p[r] = 0.0f;
          if (ent_p != nullptr) ent_p[r] = 0.0f;
          continue;
        }
        const scalar_t* x = base + (r / T) * s0 + (r % T) * s1;
        row_fn(x, label, a, logp_p + r, ent_p != nullptr ? ent_p + r : nullptr);
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> logprob_rows(const at::Tensor& logits, const at::Tensor& labels,
                                                double temperature, bool with_entropy) {
  check_rows("logits", logits);
  check_dtype("logits", logits, {at::kFloat, at::kBFloat16, at::kHalf});
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0,
                    "temperature must be finite and > 0, got ", temperature);
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2);
  check_labels(labels, B, T, V);
  TORCH_CHECK_VALUE(V > 0 || B * T == 0, "logits must have V > 0");
  const at::Tensor lab = labels.contiguous();
  const auto opts = logits.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({B, T}, opts);
  at::Tensor entropy = with_entropy ? at::empty({B, T}, opts) : at::empty({0}, opts);
  forward_rows(logits, lab.data_ptr<int64_t>(), static_cast<float>(temperature),
               logp.data_ptr<float>(), with_entropy ? entropy.data_ptr<float>() : nullptr);
  return {logp, entropy};
}

// The entropy gradient of the backward passes: d / d entropy (h) and the forward's entropy (H),
// flat over the rows; null pointers without one.
struct EntropyGrad {
  const float* h = nullptr;
  const float* H = nullptr;
  EntropyGrad offset(int64_t start) const {
    return h == nullptr ? EntropyGrad{} : EntropyGrad{h + start, H + start};
  }
};

// d loss / d logits of every (B, T) row of logits into out (same shape, any row strides).
template <typename scalar_t, typename out_t>
void backward_rows_typed(const at::Tensor& logits, const at::Tensor& out, const int64_t* lab_p,
                         const float* g_p, const float* logp_p, float temperature, EntropyGrad e) {
  const int64_t T = logits.size(1), V = logits.size(2), rows = logits.size(0) * T;
  const RowArgs a{V, temperature, temperature != 1.0f};
  const int64_t s0 = logits.stride(0), s1 = logits.stride(1);
  const int64_t o0 = out.stride(0), o1 = out.stride(1);
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  out_t* obase = out.mutable_data_ptr<out_t>();
  const auto row_fn =
      cpu_has_avx2() ? &backward_row_avx2<scalar_t, out_t> : &backward_row_generic<scalar_t, out_t>;
  at::parallel_for(0, rows, row_grain(V), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t b = r / T, t = r % T;
      const float h = e.h != nullptr ? e.h[r] : 0.0f, H = e.H != nullptr ? e.H[r] : 0.0f;
      row_fn(base + b * s0 + t * s1, obase + b * o0 + t * o1, lab_p[r], g_p[r], logp_p[r], h, H, a);
    }
  });
}

// The same with labels, d loss / d logp and logp flat over the rows; out has the dtype of
// logits or float32. Unchecked: the callers validate.
void backward_rows(const at::Tensor& logits, const at::Tensor& out, const int64_t* lab_p,
                   const float* g_p, const float* logp_p, float temperature, EntropyGrad e) {
  dispatch_logits(logits.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    if (out.scalar_type() == logits.scalar_type()) {
      backward_rows_typed<scalar_t, scalar_t>(logits, out, lab_p, g_p, logp_p, temperature, e);
    } else {
      backward_rows_typed<scalar_t, float>(logits, out, lab_p, g_p, logp_p, temperature, e);
    }
  });
}

// grad_entropy and entropy, both (B, T) float32 or both absent; contiguous copies in `keep`.
EntropyGrad entropy_grad(const std::optional<at::Tensor>& grad_entropy,
                         const std::optional<at::Tensor>& entropy, int64_t B, int64_t T,
                         std::pair<at::Tensor, at::Tensor>& keep) {
  TORCH_CHECK_VALUE(grad_entropy.has_value() == entropy.has_value(),
                    "grad_entropy and entropy must be given together");
  if (!grad_entropy.has_value()) return {};
  check_dtype("grad_entropy", *grad_entropy, {at::kFloat});
  check_shape("grad_entropy", *grad_entropy, {B, T});
  check_dtype("entropy", *entropy, {at::kFloat});
  check_shape("entropy", *entropy, {B, T});
  keep = {grad_entropy->contiguous(), entropy->contiguous()};
  return {keep.first.data_ptr<float>(), keep.second.data_ptr<float>()};
}

void dlogits_rows(const at::Tensor& grad_logp, const at::Tensor& logits, const at::Tensor& labels,
                  const at::Tensor& logp, double temperature, const at::Tensor& out,
                  const std::optional<at::Tensor>& grad_entropy,
                  const std::optional<at::Tensor>& entropy) {
  check_rows("logits", logits);
  check_rows("out", out);
  check_dtype("logits", logits, {at::kFloat, at::kBFloat16, at::kHalf});
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0,
                    "temperature must be finite and > 0, got ", temperature);
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2);
  check_shape("out", out, logits.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == logits.scalar_type() || out.scalar_type() == at::kFloat,
                   "out must have the dtype of logits or float32, got ",
                   dtype_name(out.scalar_type()));
  check_labels(labels, B, T, V);
  check_dtype("grad_logp", grad_logp, {at::kFloat});
  check_shape("grad_logp", grad_logp, {B, T});
  check_dtype("logp", logp, {at::kFloat});
  check_shape("logp", logp, {B, T});
  std::pair<at::Tensor, at::Tensor> keep;
  const EntropyGrad e = entropy_grad(grad_entropy, entropy, B, T, keep);
  const at::Tensor lab = labels.contiguous(), g = grad_logp.contiguous(), lp = logp.contiguous();
  backward_rows(logits, out, lab.data_ptr<int64_t>(), g.data_ptr<float>(), lp.data_ptr<float>(),
                static_cast<float>(temperature), e);
}

// ------------------------------------------------------------------------------------------
// the LM head, one chunk of tokens at a time
// ------------------------------------------------------------------------------------------

struct HiddenArgs {
  at::Tensor h;  // (M, H) contiguous rows
  at::Tensor lab;  // (M,) int64
  at::Tensor wt;  // (H, V) = weight.t()
  std::optional<at::Tensor> bias;
  int64_t M, V, chunk;
};

HiddenArgs hidden_args(const at::Tensor& hidden, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& labels,
                       int64_t chunk) {
  TORCH_CHECK_VALUE(hidden.dim() == 3, "hidden must be 3-D (B, T, H), got shape ",
                    shape_repr(hidden.sizes()));
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == hidden.size(2),
                    "weight must have shape (V, ", hidden.size(2), "), got ",
                    shape_repr(weight.sizes()));
  check_dtype("hidden", hidden, {at::kFloat, at::kBFloat16, at::kHalf});
  TORCH_CHECK_TYPE(weight.scalar_type() == hidden.scalar_type(),
                   "weight must have the dtype of hidden (", dtype_name(hidden.scalar_type()),
                   "), got ", dtype_name(weight.scalar_type()));
  TORCH_CHECK_VALUE(chunk > 0, "chunk_size must be > 0, got ", chunk);
  const int64_t B = hidden.size(0), T = hidden.size(1), H = hidden.size(2), V = weight.size(0);
  if (bias.has_value()) {
    check_shape("bias", *bias, {V});
    TORCH_CHECK_TYPE(bias->scalar_type() == hidden.scalar_type(),
                     "bias must have the dtype of hidden");
  }
  check_labels(labels, B, T, V);
  return {hidden.reshape({B * T, H}).contiguous(),
          labels.reshape({B * T}).contiguous(),
          weight.t(),
          bias,
          B * T,
          V,
          chunk};
}

// logits of rows [start, start + n) into buf[:n] (addmm, as at::linear computes them)
at::Tensor chunk_logits(const HiddenArgs& a, at::Tensor& buf, int64_t start, int64_t n) {
  at::Tensor out = buf.narrow(0, 0, n);
  const at::Tensor h = a.h.narrow(0, start, n);
  if (a.bias.has_value()) {
    at::addmm_out(out, *a.bias, h, a.wt);
  } else {
    at::mm_out(out, h, a.wt);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> logprob_from_hidden(const at::Tensor& hidden,
                                                       const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias,
                                                       const at::Tensor& labels, double temperature,
                                                       bool with_entropy, int64_t chunk) {
  const HiddenArgs a = hidden_args(hidden, weight, bias, labels, chunk);
  const int64_t B = hidden.size(0), T = hidden.size(1);
  const auto opts = hidden.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({a.M}, opts);
  at::Tensor entropy = with_entropy ? at::empty({a.M}, opts) : at::empty({0}, opts);
  if (a.M == 0) return {logp.view({B, T}), with_entropy ? entropy.view({B, T}) : entropy};
  at::Tensor buf = at::empty({std::min(a.chunk, a.M), a.V}, hidden.options());
  const int64_t* lab_p = a.lab.data_ptr<int64_t>();
  float* logp_p = logp.data_ptr<float>();
  float* ent_p = with_entropy ? entropy.data_ptr<float>() : nullptr;
  for (int64_t start = 0; start < a.M; start += a.chunk) {
    const int64_t n = std::min(a.chunk, a.M - start);
    forward_rows(chunk_logits(a, buf, start, n).unsqueeze(0), lab_p + start,
                 static_cast<float>(temperature), logp_p + start,
                 ent_p != nullptr ? ent_p + start : nullptr);
  }
  return {logp.view({B, T}), with_entropy ? entropy.view({B, T}) : entropy};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprob_from_hidden_backward(
    const at::Tensor& grad_logp, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& labels, const at::Tensor& logp,
    double temperature, int64_t chunk, bool weight_grad, bool bias_grad,
    const std::optional<at::Tensor>& grad_entropy, const std::optional<at::Tensor>& entropy) {
  const HiddenArgs a = hidden_args(hidden, weight, bias, labels, chunk);
  std::pair<at::Tensor, at::Tensor> keep;
  const EntropyGrad e = entropy_grad(grad_entropy, entropy, hidden.size(0), hidden.size(1), keep);
  const int64_t H = hidden.size(2);
  check_dtype("grad_logp", grad_logp, {at::kFloat});
  check_shape("grad_logp", grad_logp, {hidden.size(0), hidden.size(1)});
  check_dtype("logp", logp, {at::kFloat});
  check_shape("logp", logp, {hidden.size(0), hidden.size(1)});
  const at::Tensor g = grad_logp.reshape({a.M}).contiguous();
  const at::Tensor lp = logp.reshape({a.M}).contiguous();
  const bool fp32 = hidden.scalar_type() == at::kFloat;
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor dhidden = at::empty({a.M, H}, hidden.options());
  at::Tensor dweight32 = weight_grad ? at::zeros({a.V, H}, f32) : at::Tensor();
  const bool want_bias = bias.has_value() && bias_grad;
  at::Tensor dbias32 = want_bias ? at::zeros({a.V}, f32) : at::Tensor();
  const at::Tensor w32 = fp32 ? weight : weight.to(at::kFloat);  // dlogits are fp32
  if (a.M > 0) {
    const int64_t rows = std::min(a.chunk, a.M);
    at::Tensor buf = at::empty({rows, a.V}, hidden.options());
    at::Tensor dbuf = fp32 ? buf : at::empty({rows, a.V}, f32);
    for (int64_t start = 0; start < a.M; start += a.chunk) {
      const int64_t n = std::min(a.chunk, a.M - start);
      const at::Tensor x = chunk_logits(a, buf, start, n);
      at::Tensor d = dbuf.narrow(0, 0, n);
      backward_rows(x.unsqueeze(0), d.unsqueeze(0), a.lab.data_ptr<int64_t>() + start,
                    g.data_ptr<float>() + start, lp.data_ptr<float>() + start,
                    static_cast<float>(temperature), e.offset(start));
      at::Tensor dh = dhidden.narrow(0, start, n);
      if (fp32) {
        at::mm_out(dh, d, w32);
      } else {
        dh.copy_(at::mm(d, w32));
      }
      const at::Tensor h = a.h.narrow(0, start, n);
      if (weight_grad) dweight32.addmm_(d.t(), fp32 ? h : h.to(at::kFloat));
      if (want_bias) dbias32.add_(d.sum(0));
    }
  }
  at::Tensor dweight = weight_grad ? dweight32.to(weight.scalar_type()) : weight.new_empty({0});
  at::Tensor dbias = want_bias ? dbias32.to(bias->scalar_type()) : hidden.new_empty({0});
  return {dhidden.view(hidden.sizes()), dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(tapo, CPU, m) {
  m.impl("_logprob_rows", &logprob_rows);
  m.impl("_dlogits_rows", &dlogits_rows);
  m.impl("_logprob_from_hidden", &logprob_from_hidden);
  m.impl("_logprob_from_hidden_backward", &logprob_from_hidden_backward);
}

}  // namespace tapo
