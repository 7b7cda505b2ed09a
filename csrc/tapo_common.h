// Shared helpers of the tapo CPU kernels: validation that raises the same errors, with the
// same messages, as tapo_kernels/_checks.py (ValueError for values and shapes, TypeError for
// dtypes), and the Python-style formatting those messages need (tuples, dtypes, floats).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>

// 32-byte vectors live inside always-inlined helpers only (see tapo_vec.h).
#pragma GCC diagnostic ignored "-Wpsabi"

namespace tapo {

// Python's tuple(t.shape): "()", "(3,)", "(2, 3)".
inline std::string shape_repr(at::IntArrayRef shape) {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(shape[i]);
  }
  if (shape.size() == 1) out += ",";
  return out + ")";
}

// str(torch.<dtype>) without the "torch." prefix.
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    case at::kComplexFloat: return "complex64";
    case at::kComplexDouble: return "complex128";
    default: {
      std::string name = c10::toString(t);
      for (auto& ch : name) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
      return name;
    }
  }
}

// Python's repr(str) for the plain option strings the ops take.
inline std::string py_str_repr(c10::string_view s) {
  return "'" + std::string(s.data(), s.size()) + "'";
}

inline void check_dtype(const char* name, const at::Tensor& t,
                        std::initializer_list<at::ScalarType> allowed) {
  for (auto d : allowed) {
    if (t.scalar_type() == d) return;
  }
  std::string names;
  for (auto d : allowed) {
    if (!names.empty()) names += "/";
    names += dtype_name(d);
  }
  TORCH_CHECK_TYPE(false, name, " must have dtype ", names, ", got ", dtype_name(t.scalar_type()));
}

inline void check_shape(const char* name, const at::Tensor& t, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape_repr(shape), ", got ",
                    shape_repr(t.sizes()));
}

struct NamedTensor {
  const char* name;
  const at::Tensor* tensor;  // nullptr: an absent optional argument
};

inline std::string device_repr(const at::Device& d) { return d.str(); }

// All given tensors on the device of the first one.
inline void check_same_device(std::initializer_list<NamedTensor> named) {
  const NamedTensor* first = nullptr;
  for (const auto& nt : named) {
    if (nt.tensor == nullptr) continue;
    if (first == nullptr) {
      first = &nt;
      continue;
    }
    TORCH_CHECK_VALUE(nt.tensor->device() == first->tensor->device(),
                      "all tensors must be on one device: ", first->name, " is on ",
                      device_repr(first->tensor->device()), ", ", nt.name, " is on ",
                      device_repr(nt.tensor->device()));
  }
}

// IEEE single/double: finite iff the exponent bits are not all ones. Integer tests keep the
// loops branch-free so the compiler vectorises them.
inline bool bits_finite(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return (u & 0x7f800000u) != 0x7f800000u;
}

inline bool bits_finite(double x) {
  uint64_t u;
  std::memcpy(&u, &x, sizeof(u));
  return (u & 0x7ff0000000000000ull) != 0x7ff0000000000000ull;
}

// Whether any of data[0, n) is NaN or inf. Branch-free so that it vectorises; an AVX2 build
// is picked at run time where the CPU has it (the result is the same either way).
template <typename scalar_t>
__attribute__((always_inline)) inline bool any_nonfinite_body(const scalar_t* data, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= !bits_finite(data[i]);
  return bad != 0;
}

// fp32: the largest magnitude bit pattern (sign cleared) is >= that of inf exactly when a
// value is NaN or inf; four independent unsigned-max accumulators keep the loop at the speed
// of the loads (a single OR chain runs at one vector per cycle at best).
__attribute__((always_inline)) inline bool any_nonfinite_f32_body(const float* data, int64_t n) {
  using U = uint32_t __attribute__((vector_size(32)));
  constexpr int64_t W = 8;
  const U abs_bits = U{} + 0x7fffffffu;
  U m0{}, m1{}, m2{}, m3{};
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    U a, b, c, d;
    std::memcpy(&a, data + i, sizeof(U));
    std::memcpy(&b, data + i + W, sizeof(U));
    std::memcpy(&c, data + i + 2 * W, sizeof(U));
    std::memcpy(&d, data + i + 3 * W, sizeof(U));
    a &= abs_bits;
    b &= abs_bits;
    c &= abs_bits;
    d &= abs_bits;
    m0 = m0 > a ? m0 : a;
    m1 = m1 > b ? m1 : b;
    m2 = m2 > c ? m2 : c;
    m3 = m3 > d ? m3 : d;
  }
  m0 = m0 > m1 ? m0 : m1;
  m2 = m2 > m3 ? m2 : m3;
  m0 = m0 > m2 ? m0 : m2;
  uint32_t top = 0;
  for (int k = 0; k < W; ++k) top = top > m0[k] ? top : m0[k];
  for (; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, data + i, sizeof(u));
    u &= 0x7fffffffu;
    top = top > u ? top : u;
  }
  return top >= 0x7f800000u;
}

inline bool any_nonfinite_generic(const float* data, int64_t n) {
  return any_nonfinite_f32_body(data, n);
}
__attribute__((target("avx2"))) inline bool any_nonfinite_avx2(const float* data, int64_t n) {
  return any_nonfinite_f32_body(data, n);
}
inline bool any_nonfinite_generic(const double* data, int64_t n) {
  return any_nonfinite_body(data, n);
}
__attribute__((target("avx2"))) inline bool any_nonfinite_avx2(const double* data, int64_t n) {
  return any_nonfinite_body(data, n);
}

// Whether the AVX2 builds of the kernels run. TAPO_NATIVE_ISA=generic forces the baseline
// builds (the tests compare both).
inline bool cpu_has_avx2() {
  static const bool has = [] {
    const char* isa = std::getenv("TAPO_NATIVE_ISA");
    if (isa != nullptr && std::string(isa) == "generic") return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return has;
}

template <typename scalar_t>
bool any_nonfinite(const scalar_t* data, int64_t n) {
  return cpu_has_avx2() ? any_nonfinite_avx2(data, n) : any_nonfinite_generic(data, n);
}

// A double knob that stays finite in float32 (the kernels compute in fp32): |v| <= FLT_MAX.
inline bool finite32(double v) {
  return std::isfinite(v) && std::fabs(v) <= static_cast<double>(std::numeric_limits<float>::max());
}

// Torch's tensor.isfinite().all() on a contiguous floating tensor (parallel, one pass).
template <typename scalar_t>
bool all_finite(const scalar_t* data, int64_t n) {
  std::atomic<bool> ok{true};
  at::parallel_for(0, n, 1 << 16, [&](int64_t lo, int64_t hi) {
    if (any_nonfinite(data + lo, hi - lo)) ok.store(false, std::memory_order_relaxed);
  });
  return ok.load();
}

}  // namespace tapo
