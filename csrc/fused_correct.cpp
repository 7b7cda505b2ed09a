// CPU kernel of tapo::fused_correct (docs/math.md, section 2), the semantics of
// tapo_kernels/reference.py::fused_correct.
//
// Design: the op is memory-bound on the (B, T) advantages, so they are read once and
// `corrected` written once, in one parallel region: thread 0 makes the plan of the call part
// (checks, buckets, tasks) while the other threads copy the rows no lift can touch; then all
// threads take similarity tasks, then the rest of those rows, and after a barrier the failing
// rows are copied with the lifts of their spans applied while the row is in cache. Copies are
// memcpy followed by the NaN/inf check of the (cached) source.
// The call part is small: valid calls of successful rows (candidates) and of failing rows
// are bucketed by (scope, tool) with a counting sort, then ordered by (key, row, call index)
// (a sort only where calls did not arrive row by row). A failing call's candidates are then
// one contiguous range, and the calls of one pool trajectory are contiguous inside it.
// Blocks of 4 failing calls sharing a range are one task (taken in runs of 16): a blocked
// fp32 dot-product kernel (or a vectorised IoU) fills their similarity rows, then a scan per
// call gives s_k, w_k, T_k. Tuned for group scope (small ranges, the copy dominates); batch
// scope is compute-bound, O(failing x candidates x D).
// Measured on a shared 2-core AMD EPYC VM (the benchmark batch: B=512, T=8192, N=4096, D=256,
// groups of 8, half the rows failing, ~2,070 failing calls, ~29,000 similarity pairs):
// 0.8-1.2 ms against 0.3-0.45 ms for advantages.clone() in the same loop. Phases
// (instrumented): the plan 0.23-0.30 ms on thread 0 (a third of it the finite check of the
// 4 MiB call_params), similarity tasks 0.3-0.4 ms on both threads, the copies the rest. The
// op's working set (advantages, output, parameters) exceeds this CPU's 32 MiB L3 while a
// clone's stays in it. A streaming copy (non-temporal stores) and prefetching whole candidate
// rows were tried and gave no consistent gain.
//
// Numerics: similarities in fp32 like the reference (`params.to(float32)`); dot products
// use 16 partial sums in a fixed order (exact, hence equal to the reference, when products
// and sums are exact in fp32, e.g. parameters on a 1/8 grid); IoU repeats the reference's
// operations one for one (no fused multiply-add anywhere); comparisons with theta and
// alpha_min and the product with beta use the scalars rounded to fp32, as torch does for a
// float32 tensor against a Python float; the support sum of A_j is accumulated in fp64.
#include <Python.h>

#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "tapo_common.h"

#if defined(__SSE2__)
#include <emmintrin.h>  // _mm_pause
#endif

// The 32-byte vector helpers are always inlined, so no vector crosses a call boundary in the
// build without AVX; GCC's note about that ABI is moot here.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace tapo {
namespace {

constexpr int64_t kSimCosine = 0;
constexpr int64_t kSimIou = 1;

// Similarities of kFailBlock failing calls against C candidate calls, out[f * C + c] =
// <p_f, q_c> in fp32. Each dot product uses 16 independent partial sums and a fixed reduction
// tree, so the result does not depend on the instruction set the function is compiled for
// (and is exact, hence equal to the reference, whenever the products and partial sums are
// exact in fp32). Blocking over failing calls reuses each candidate load kFailBlock times.
constexpr int kFailBlock = 4;
constexpr int kLanes = 16;

using Vec8 = float __attribute__((vector_size(32)));  // GCC vector extensions
using Vec4 = float __attribute__((vector_size(16)));

__attribute__((always_inline)) inline Vec8 load8(const float* ptr) {
  Vec8 v;
  std::memcpy(&v, ptr, sizeof(v));
  return v;
}

__attribute__((always_inline)) inline Vec8 splat8(float x) { return x - Vec8{}; }
// torch.minimum / torch.maximum on non-NaN lanes (minps / maxps)
__attribute__((always_inline)) inline Vec8 min8(Vec8 a, Vec8 b) { return a < b ? a : b; }
__attribute__((always_inline)) inline Vec8 max8(Vec8 a, Vec8 b) { return a > b ? a : b; }

// Lane k of (lo, hi) holds partial sum k (k < 8) or k + 8; the tree adds lanes k and k + 8,
// then k and k + 4, k and k + 2, k and k + 1 (a fixed order).
__attribute__((always_inline)) inline float reduce_lanes(Vec8 lo, Vec8 hi) {
  const Vec8 v = lo + hi;
  const Vec4 w =
      __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  const Vec4 x = w + __builtin_shufflevector(w, w, 2, 3, 2, 3);
  return x[0] + x[1];
}

__attribute__((always_inline)) inline void dot_block_body(const float* const* fail_rows,
                                                          const float* const* cand_rows, int64_t C,
                                                          int64_t D, float* out) {
  static_assert(kLanes == 16, "two 8-lane vectors per failing call");
  const float* p[kFailBlock];
  for (int f = 0; f < kFailBlock; ++f) p[f] = fail_rows[f];
  const int64_t d_main = D - D % kLanes;
  const int64_t d_tail = D - d_main;
  // The last D % 16 elements, zero padded: lanes past D add exact zeros.
  float p_tail[kFailBlock][kLanes] = {};
  for (int f = 0; f < kFailBlock; ++f) {
    for (int64_t k = 0; k < d_tail; ++k) p_tail[f][k] = p[f][d_main + k];
  }
  for (int64_t c = 0; c < C; ++c) {
    const float* __restrict q = cand_rows[c];
    if (c + 1 < C) __builtin_prefetch(cand_rows[c + 1]);
    Vec8 lo[kFailBlock], hi[kFailBlock];
    for (int f = 0; f < kFailBlock; ++f) lo[f] = hi[f] = Vec8{};
    for (int64_t i = 0; i < d_main; i += kLanes) {
      const Vec8 q_lo = load8(q + i), q_hi = load8(q + i + 8);
      for (int f = 0; f < kFailBlock; ++f) {
        lo[f] += load8(p[f] + i) * q_lo;
        hi[f] += load8(p[f] + i + 8) * q_hi;
      }
    }
    if (d_tail) {
      float q_tail[kLanes] = {};
      for (int64_t k = 0; k < d_tail; ++k) q_tail[k] = q[d_main + k];
      const Vec8 q_lo = load8(q_tail), q_hi = load8(q_tail + 8);
      for (int f = 0; f < kFailBlock; ++f) {
        lo[f] += load8(p_tail[f]) * q_lo;
        hi[f] += load8(p_tail[f] + 8) * q_hi;
      }
    }
    for (int f = 0; f < kFailBlock; ++f) out[f * C + c] = reduce_lanes(lo[f], hi[f]);
  }
}

void dot_block_generic(const float* const* fail_rows, const float* const* cand_rows, int64_t C,
                       int64_t D, float* out) {
  dot_block_body(fail_rows, cand_rows, C, D, out);
}

// AVX2 without FMA: wider vectors, the same operations (no contraction), the same result.
__attribute__((target("avx2"))) void dot_block_avx2(const float* const* fail_rows,
                                                    const float* const* cand_rows, int64_t C,
                                                    int64_t D, float* out) {
  dot_block_body(fail_rows, cand_rows, C, D, out);
}

using DotBlockFn = void (*)(const float* const*, const float* const*, int64_t, int64_t, float*);

DotBlockFn pick_dot_block() { return cpu_has_avx2() ? &dot_block_avx2 : &dot_block_generic; }

// Candidate boxes (x1, y1, x2, y2) = p[:4] and their areas, one array per coordinate.
struct BoxesSoA {
  std::vector<float> x1, y1, x2, y2, area;
  void resize(int64_t n) {
    for (auto* v : {&x1, &y1, &x2, &y2, &area}) v->assign(n, 0.0f);
  }
  void set(int64_t c, const float* p) {
    x1[c] = p[0];
    y1[c] = p[1];
    x2[c] = p[2];
    y2[c] = p[3];
    area[c] = std::max(p[2] - p[0], 0.0f) * std::max(p[3] - p[1], 0.0f);
  }
};

// out[c] = IoU(box, candidate lo + c) for c < C, operation for operation as
// reference.pairwise_similarity (fp32, no fused multiply-add, so lane by lane the same IEEE
// results), 0 when the union is empty. Eight candidates per step.
__attribute__((always_inline)) inline void iou_row_body(const float* box, const BoxesSoA& cands,
                                                        int64_t lo, int64_t C, float* out) {
  const Vec8 ax1 = splat8(box[0]), ay1 = splat8(box[1]), ax2 = splat8(box[2]), ay2 = splat8(box[3]);
  const Vec8 zero = splat8(0.0f);
  const Vec8 area_a = splat8(std::max(box[2] - box[0], 0.0f) * std::max(box[3] - box[1], 0.0f));
  auto step = [&](int64_t c, Vec8 bx1, Vec8 by1, Vec8 bx2, Vec8 by2, Vec8 area_b) {
    const Vec8 iw = max8(min8(ax2, bx2) - max8(ax1, bx1), zero);
    const Vec8 ih = max8(min8(ay2, by2) - max8(ay1, by1), zero);
    const Vec8 inter = iw * ih;
    const Vec8 uni = area_a + area_b - inter;
    return uni > zero ? inter / (uni > zero ? uni : splat8(1.0f)) : zero;
  };
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    const int64_t i = lo + c;
    const Vec8 iou = step(c, load8(&cands.x1[i]), load8(&cands.y1[i]), load8(&cands.x2[i]),
                          load8(&cands.y2[i]), load8(&cands.area[i]));
    std::memcpy(out + c, &iou, sizeof(iou));
  }
  if (c < C) {  // the last few candidates, padded with empty boxes (results unused)
    float lanes[5][8] = {};
    for (int64_t k = 0; c + k < C; ++k) {
      const int64_t i = lo + c + k;
      lanes[0][k] = cands.x1[i];
      lanes[1][k] = cands.y1[i];
      lanes[2][k] = cands.x2[i];
      lanes[3][k] = cands.y2[i];
      lanes[4][k] = cands.area[i];
    }
    const Vec8 iou = step(c, load8(lanes[0]), load8(lanes[1]), load8(lanes[2]), load8(lanes[3]),
                          load8(lanes[4]));
    for (int64_t k = 0; c + k < C; ++k) out[c + k] = iou[k];
  }
}

void iou_row_generic(const float* box, const BoxesSoA& cands, int64_t lo, int64_t C, float* out) {
  iou_row_body(box, cands, lo, C, out);
}
__attribute__((target("avx2"))) void iou_row_avx2(const float* box, const BoxesSoA& cands,
                                                  int64_t lo, int64_t C, float* out) {
  iou_row_body(box, cands, lo, C, out);
}

void iou_row(const float* box, const BoxesSoA& cands, int64_t lo, int64_t C, float* out) {
  if (cpu_has_avx2()) {
    iou_row_avx2(box, cands, lo, C, out);
  } else {
    iou_row_generic(box, cands, lo, C, out);
  }
}

// dst[0, n) = src[0, n); returns whether a source value is NaN or inf. memcpy, then the
// check on the source while it is still in cache: measured on a 2-core AMD EPYC VM at
// 512 x 8192 fp32, 2 threads, row by row, this costs what the memcpy alone costs (230 us),
// while one fused pass with non-temporal SSE or AVX2 stores took 390-410 us and one with
// regular vector stores 290 us.
inline bool copy_segment(const float* __restrict src, float* __restrict dst, int64_t n) {
  if (n <= 0) return false;
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
  return any_nonfinite(src, n);
}

// dst[0, n) = the TAPO lift min(a + d, 0) of src[0, n) on negative values, src elsewhere
// (reference.apply_lift). Branch-free so that it vectorises.
__attribute__((always_inline)) inline void lift_body(const float* __restrict src,
                                                     float* __restrict dst, int64_t n, float d) {
  for (int64_t i = 0; i < n; ++i) {
    const float a = src[i];
    const float up = a + d;
    const float lifted = up < 0.0f ? up : 0.0f;
    dst[i] = a < 0.0f ? lifted : a;
  }
}
void lift_segment_generic(const float* src, float* dst, int64_t n, float d) {
  lift_body(src, dst, n, d);
}
__attribute__((target("avx2"))) void lift_segment_avx2(const float* src, float* dst, int64_t n,
                                                       float d) {
  lift_body(src, dst, n, d);
}
inline void lift_segment(const float* src, float* dst, int64_t n, float d) {
  cpu_has_avx2() ? lift_segment_avx2(src, dst, n, d) : lift_segment_generic(src, dst, n, d);
}

// A short wait while another thread finishes the plan.
inline void spin_pause() {
#if defined(__SSE2__)
  _mm_pause();
#endif
}

// A valid call of a successful row (a candidate) or of a failing row, with its sort key
// inside its scope bucket.
struct CallKey {
  int64_t tool, key, row, call;
  bool same_match(const CallKey& o) const { return tool == o.tool && key == o.key; }
  bool match_less(const CallKey& o) const { return std::tie(tool, key) < std::tie(o.tool, o.key); }
  bool operator<(const CallKey& o) const {
    return std::tie(tool, key, row, call) < std::tie(o.tool, o.key, o.row, o.call);
  }
};

// Up to kFailBlock failing calls fails[first, first + count) sharing the candidate range
// cands[cand_lo, cand_hi).
struct Task {
  int64_t first, count, cand_lo, cand_hi;
};

struct Span {
  int64_t row, start, end, call;
};

// Orders `calls` by (scope, tool) with a stable counting sort, then by CallKey inside each
// bucket (skipped when the bucket is already ordered: calls usually arrive row by row), so
// that the calls of one (scope, tool, key) are contiguous and ordered by (row, call index).
// Returns the first index of each scope (size num_scopes + 1).
std::vector<int64_t> sort_calls(std::vector<CallKey>& calls, const std::vector<int32_t>& scope,
                                int64_t num_scopes, int64_t num_tools) {
  // (scope, tool) buckets when there are not too many of them, else scope buckets
  const bool by_tool = num_scopes * num_tools <= 4 * static_cast<int64_t>(calls.size()) + 1024;
  const int64_t tools = by_tool ? num_tools : 1;
  auto bucket_of = [&](const CallKey& c) { return scope[c.row] * tools + (by_tool ? c.tool : 0); };
  std::vector<int64_t> offsets(num_scopes * tools + 1, 0);
  for (const auto& c : calls) ++offsets[bucket_of(c) + 1];
  for (size_t i = 1; i < offsets.size(); ++i) offsets[i] += offsets[i - 1];
  std::vector<CallKey> sorted(calls.size());
  std::vector<int64_t> fill(offsets.begin(), offsets.end() - 1);
  for (const auto& c : calls) sorted[fill[bucket_of(c)]++] = c;
  for (size_t i = 0; i + 1 < offsets.size(); ++i) {
    const auto first = sorted.begin() + offsets[i], last = sorted.begin() + offsets[i + 1];
    if (!std::is_sorted(first, last)) std::sort(first, last);
  }
  calls.swap(sorted);
  std::vector<int64_t> scope_offsets(num_scopes + 1);
  for (int64_t sc = 0; sc <= num_scopes; ++sc) scope_offsets[sc] = offsets[sc * tools];
  return scope_offsets;
}

void check_fused_correct_args(const at::Tensor& advantages, const at::Tensor& seq_advantages,
                              const at::Tensor& group_ids, const at::Tensor& call_seq,
                              const at::Tensor& call_start, const at::Tensor& call_end,
                              const at::Tensor& call_tool, const at::Tensor& call_key,
                              const at::Tensor& call_params, const at::Tensor& tool_sim_kind,
                              double theta, double alpha_min, double beta) {
  check_same_device({{"advantages", &advantages},
                     {"seq_advantages", &seq_advantages},
                     {"group_ids", &group_ids},
                     {"call_seq", &call_seq},
                     {"call_start", &call_start},
                     {"call_end", &call_end},
                     {"call_tool", &call_tool},
                     {"call_key", &call_key},
                     {"call_params", &call_params},
                     {"tool_sim_kind", &tool_sim_kind}});
  TORCH_CHECK_VALUE(advantages.dim() == 2, "advantages must be 2-D (B, T), got shape ",
                    shape_repr(advantages.sizes()));
  const int64_t B = advantages.size(0);
  TORCH_CHECK_VALUE(B != 0, "advantages has no rows: the batch is empty");
  check_dtype("advantages", advantages, {at::kFloat});
  check_dtype("seq_advantages", seq_advantages, {at::kFloat});
  check_shape("seq_advantages", seq_advantages, {B});
  check_dtype("group_ids", group_ids, {at::kLong});
  check_shape("group_ids", group_ids, {B});
  TORCH_CHECK_VALUE(call_seq.dim() == 1, "call_seq must be 1-D (N,), got shape ",
                    shape_repr(call_seq.sizes()));
  const int64_t N = call_seq.size(0);
  const std::pair<const char*, const at::Tensor*> int_args[] = {{"call_seq", &call_seq},
                                                                {"call_start", &call_start},
                                                                {"call_end", &call_end},
                                                                {"call_tool", &call_tool},
                                                                {"call_key", &call_key}};
  for (const auto& [name, t] : int_args) {
    check_dtype(name, *t, {at::kLong});
    check_shape(name, *t, {N});
  }
  TORCH_CHECK_VALUE(call_params.dim() == 2 && call_params.size(0) == N,
                    "call_params must have shape (N=", N, ", D), got ",
                    shape_repr(call_params.sizes()));
  check_dtype("call_params", call_params, {at::kFloat, at::kHalf, at::kBFloat16});
  TORCH_CHECK_VALUE(tool_sim_kind.dim() == 1, "tool_sim_kind must be 1-D (num_tools,), got shape ",
                    shape_repr(tool_sim_kind.sizes()));
  check_dtype("tool_sim_kind", tool_sim_kind, {at::kLong});
  TORCH_CHECK_VALUE(std::isfinite(theta) && theta >= 0.0 && theta <= 1.0,
                    "theta must be in [0, 1], got ", theta);
  // alpha_min gates the confidence s_k * cov_k, which lies in [0, 1] (docs/math.md, 2.4)
  TORCH_CHECK_VALUE(std::isfinite(alpha_min) && alpha_min >= 0.0 && alpha_min <= 1.0,
                    "alpha_min must be in [0, 1], got ", alpha_min);
  TORCH_CHECK_VALUE(finite32(beta) && beta >= 0.0, "beta must be finite and >= 0, got ", beta);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_correct_cpu(
    const at::Tensor& advantages, const at::Tensor& seq_advantages, const at::Tensor& group_ids,
    const at::Tensor& call_seq, const at::Tensor& call_start, const at::Tensor& call_end,
    const at::Tensor& call_tool, const at::Tensor& call_key, const at::Tensor& call_params,
    const at::Tensor& tool_sim_kind, double theta, double alpha_min, double beta, bool batch_scope,
    bool coverage) {
  check_fused_correct_args(advantages, seq_advantages, group_ids, call_seq, call_start, call_end,
                           call_tool, call_key, call_params, tool_sim_kind, theta, alpha_min, beta);
  const int64_t B = advantages.size(0);
  const int64_t T = advantages.size(1);
  const int64_t N = call_seq.size(0);
  const int64_t D = call_params.size(1);

  const at::Tensor kinds_t = tool_sim_kind.contiguous();
  const int64_t num_tools = kinds_t.numel();
  const int64_t* kinds = kinds_t.data_ptr<int64_t>();
  for (int64_t t = 0; t < num_tools; ++t) {
    TORCH_CHECK_VALUE(kinds[t] == kSimCosine || kinds[t] == kSimIou,
                      "tool_sim_kind entries must be 0 (cosine) or 1 (iou)");
  }

  // The advantages are read once, by the copy into `corrected` (copy and NaN check fused);
  // the lifted spans are read again at the end. A value check that fails first confirms the
  // advantages are finite, so the first error raised is the reference's first error.
  const at::Tensor adv_t = advantages.contiguous();
  const float* adv = adv_t.data_ptr<float>();
  auto check_value = [&](bool ok, const char* message) {
    if (!ok) {
      TORCH_CHECK_VALUE(all_finite(adv, B * T), "advantages contains NaN or inf");
      TORCH_CHECK_VALUE(false, message);
    }
  };
  const at::Tensor seq_adv_t = seq_advantages.contiguous();
  const float* seq_adv = seq_adv_t.data_ptr<float>();
  check_value(all_finite(seq_adv, B), "seq_advantages contains NaN or inf");

  at::Tensor corrected = at::empty({B, T}, adv_t.options());
  at::Tensor delta = at::zeros({N}, adv_t.options());
  at::Tensor confidence = at::zeros({N}, adv_t.options());
  at::Tensor witness = at::full({N}, -1, adv_t.options().dtype(at::kLong));

  // Inputs of the call part in fp32 / contiguous form (ATen work stays outside the parallel
  // region below).
  const at::Tensor params_t = call_params.scalar_type() == at::kFloat
                                  ? call_params.contiguous()
                                  : call_params.to(at::kFloat).contiguous();
  const float* params = params_t.data_ptr<float>();
  const at::Tensor seq_t = call_seq.contiguous(), start_t = call_start.contiguous(),
                   end_t = call_end.contiguous(), tool_t = call_tool.contiguous(),
                   key_t = call_key.contiguous(), gid_t = group_ids.contiguous();
  const int64_t* seq = seq_t.data_ptr<int64_t>();
  const int64_t* start = start_t.data_ptr<int64_t>();
  const int64_t* end = end_t.data_ptr<int64_t>();
  const int64_t* tool = tool_t.data_ptr<int64_t>();
  const int64_t* key = key_t.data_ptr<int64_t>();
  const int64_t* gid = gid_t.data_ptr<int64_t>();

  // ---- the plan of the call part: checks, scopes, candidates, failing calls, tasks ---------
  std::vector<int32_t> scope;
  std::vector<int64_t> pool_size;  // successful rows per scope
  std::vector<CallKey> cands, fails;
  std::vector<Task> tasks;
  int64_t max_range = 0;
  std::vector<const float*> cand_rows;  // candidates in sorted order, structure of arrays
  std::vector<int64_t> cand_call, cand_row;
  BoxesSoA cand_boxes;  // the IoU tools' boxes and areas
  std::vector<int64_t> lift_offsets, lift_calls;  // per failing row: its calls by start

  auto plan = [&]() {
    if (N == 0) return;
    check_value(all_finite(params, N * D), "call_params contains NaN or inf");
    // One scan collects every index problem; they are raised in the reference's order.
    bool seq_bad = false, span_bad = false, order_bad = false, tool_bad = false;
    bool any_valid = false, any_iou = false;
    for (int64_t k = 0; k < N; ++k) {
      seq_bad |= seq[k] < 0 || seq[k] >= B;
      span_bad |= start[k] < 0 || end[k] > T;
      order_bad |= start[k] > end[k];
      tool_bad |= tool[k] >= num_tools;
      any_valid |= tool[k] >= 0;
      any_iou |= tool[k] >= 0 && tool[k] < num_tools && kinds[tool[k]] == kSimIou;
    }
    const std::string seq_msg =
        "call_seq out of range: every entry must be in [0, B=" + std::to_string(B) + ")";
    check_value(!seq_bad, seq_msg.c_str());
    const std::string span_msg =
        "call span out of range: need 0 <= call_start and call_end <= T=" + std::to_string(T);
    check_value(!span_bad, span_msg.c_str());
    check_value(!order_bad, "call span with call_start > call_end");
    const std::string tool_msg = "call_tool out of range: valid tool ids are [0, " +
                                 std::to_string(num_tools) + "), < 0 marks an invalid call";
    check_value(!tool_bad, tool_msg.c_str());
    check_value(!(any_valid && D == 0), "call_params must have D >= 1");
    const std::string iou_msg =
        "call_params needs D >= 4 for iou tools (a box is 4 numbers), got D=" + std::to_string(D);
    check_value(!(any_iou && D < 4), iou_msg.c_str());
    {
      // Non-empty spans ordered by (row, start); neighbours in one row must not overlap. Calls
      // usually arrive in that order, so the sort is mostly skipped.
      std::vector<Span> spans;
      spans.reserve(N);
      for (int64_t k = 0; k < N; ++k) {
        if (end[k] > start[k]) spans.push_back({seq[k], start[k], end[k], k});
      }
      auto by_row_start = [](const Span& x, const Span& y) {
        return std::tie(x.row, x.start) < std::tie(y.row, y.start);
      };
      if (!std::is_sorted(spans.begin(), spans.end(), by_row_start)) {
        std::sort(spans.begin(), spans.end(), by_row_start);
      }
      for (size_t i = 1; i < spans.size(); ++i) {
        const Span& a = spans[i - 1];
        const Span& b = spans[i];
        if (b.row == a.row && b.start < a.end) {
          const std::string msg = "call_start/call_end: overlapping call spans in row " +
                                  std::to_string(a.row) + " ([" + std::to_string(a.start) + ", " +
                                  std::to_string(a.end) + ") and [" + std::to_string(b.start) +
                                  ", " + std::to_string(b.end) +
                                  ")): each token may belong to at most one call";
          check_value(false, msg.c_str());
        }
      }
      // the spans a lift may rewrite (valid calls of failing rows), by row and start (CSR)
      lift_offsets.assign(B + 1, 0);
      for (const Span& span : spans) {
        if (tool[span.call] >= 0 && seq_adv[span.row] < 0.0f) ++lift_offsets[span.row + 1];
      }
      for (int64_t b = 0; b < B; ++b) lift_offsets[b + 1] += lift_offsets[b];
      lift_calls.resize(lift_offsets[B]);
      int64_t filled = 0;
      for (const Span& span : spans) {
        if (tool[span.call] >= 0 && seq_adv[span.row] < 0.0f) lift_calls[filled++] = span.call;
      }
    }

    // Dense scope index per row (prompt group, or 0 for the whole batch).
    scope.assign(B, 0);
    int64_t num_scopes = 1;
    if (!batch_scope) {
      std::vector<int64_t> ids(gid, gid + B);
      if (!std::is_sorted(ids.begin(), ids.end())) std::sort(ids.begin(), ids.end());
      ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
      num_scopes = static_cast<int64_t>(ids.size());
      for (int64_t b = 0; b < B; ++b) {
        const auto rank = std::lower_bound(ids.begin(), ids.end(), gid[b]) - ids.begin();
        scope[b] = static_cast<int32_t>(rank);
      }
    }
    pool_size.assign(num_scopes, 0);
    for (int64_t b = 0; b < B; ++b) {
      if (seq_adv[b] > 0.0f) ++pool_size[scope[b]];
    }

    cands.reserve(N);
    fails.reserve(N);
    for (int64_t k = 0; k < N; ++k) {
      if (tool[k] < 0) continue;
      const float a = seq_adv[seq[k]];
      if (a > 0.0f) cands.push_back({tool[k], key[k], seq[k], k});
      if (a < 0.0f) fails.push_back({tool[k], key[k], seq[k], k});
    }
    if (fails.empty()) return;
    // Inside a scope, candidates of one (tool, key) form a run ordered by (row, call index):
    // the calls of one pool trajectory are contiguous. Failing calls are grouped the same way
    // so that a block of them shares one candidate range.
    const std::vector<int64_t> cand_offsets = sort_calls(cands, scope, num_scopes, num_tools);
    const std::vector<int64_t> fail_offsets = sort_calls(fails, scope, num_scopes, num_tools);

    for (int64_t s = 0; s < num_scopes; ++s) {
      int64_t lo = cand_offsets[s];
      const int64_t cand_end = cand_offsets[s + 1];
      for (int64_t f = fail_offsets[s]; f < fail_offsets[s + 1];) {
        int64_t run_end = f + 1;
        while (run_end < fail_offsets[s + 1] && fails[run_end].same_match(fails[f])) ++run_end;
        while (lo < cand_end && cands[lo].match_less(fails[f])) ++lo;
        int64_t hi = lo;
        while (hi < cand_end && cands[hi].same_match(fails[f])) ++hi;
        max_range = std::max(max_range, hi - lo);
        for (int64_t first = f; first < run_end; first += kFailBlock) {
          tasks.push_back({first, std::min<int64_t>(kFailBlock, run_end - first), lo, hi});
        }
        f = run_end;
        lo = hi;
      }
    }
    const int64_t n_cand = static_cast<int64_t>(cands.size());
    cand_rows.resize(n_cand);
    cand_call.resize(n_cand);
    cand_row.resize(n_cand);
    bool any_iou_cand = false;
    for (int64_t c = 0; c < n_cand; ++c) {
      cand_rows[c] = params + cands[c].call * D;
      cand_call[c] = cands[c].call;
      cand_row[c] = cands[c].row;
      any_iou_cand |= kinds[cands[c].tool] == kSimIou;
    }
    if (any_iou_cand) {
      cand_boxes.resize(n_cand);
      for (int64_t c = 0; c < n_cand; ++c) {
        if (kinds[cands[c].tool] == kSimIou) cand_boxes.set(c, cand_rows[c]);
      }
    }
  };

  // ---- one task: s_k, w_k, T_k, conf_k, d_k of up to kFailBlock failing calls -------------
  // fp32 scalars, as torch rounds a Python float against a float32 tensor.
  // similarities within 2^-20 below theta reach it (reference.SIM_TOL): the fp32 cosine of a
  // vector with itself is 1 +- 1 ulp, and theta = 1 must match identical calls everywhere
  const float theta_f = static_cast<float>(theta) - 0x1p-20f;
  const float alpha_f = static_cast<float>(alpha_min);
  const float beta_f = static_cast<float>(beta);
  static const DotBlockFn dot_block = pick_dot_block();
  float* out_delta = delta.data_ptr<float>();
  float* out_conf = confidence.data_ptr<float>();
  int64_t* out_witness = witness.data_ptr<int64_t>();

  auto run_task = [&](const Task& task, std::vector<float>& sims, std::vector<int64_t>& segments) {
    const int64_t C = task.cand_hi - task.cand_lo;
    const CallKey* block = fails.data() + task.first;
    const float* fail_rows[kFailBlock];
    for (int f = 0; f < kFailBlock; ++f) {
      // a short block repeats its last call (results unused) to keep one kernel shape
      fail_rows[f] = params + block[std::min<int64_t>(f, task.count - 1)].call * D;
    }
    if (C > 0 && kinds[block[0].tool] == kSimIou) {
      for (int64_t f = 0; f < task.count; ++f) {
        iou_row(fail_rows[f], cand_boxes, task.cand_lo, C, sims.data() + f * C);
      }
    } else if (C > 0) {
      dot_block(fail_rows, cand_rows.data() + task.cand_lo, C, D, sims.data());
      // cosine clamped to [0, 1] (reference.pairwise_similarity)
      // (a NaN from an fp32 overflow of unnormalised vectors counts as 0, as in the reference)
      for (int64_t i = 0; i < task.count * C; ++i) {
        sims[i] = sims[i] > 0.0f ? std::min(sims[i], 1.0f) : 0.0f;
      }
    }
    // the pool trajectories of the range: runs of one row (shared by the block)
    segments.clear();
    for (int64_t c = 0; c < C; ++c) {
      if (c == 0 || cand_row[task.cand_lo + c] != cand_row[task.cand_lo + c - 1]) {
        segments.push_back(c);
      }
    }
    segments.push_back(C);

    for (int64_t f = 0; f < task.count; ++f) {
      const CallKey& call = block[f];
      const float* sim = sims.data() + f * C;
      float best = -1.0f;  // s_k; every candidate similarity is >= 0
      int64_t n_support = 0;  // |T_k|
      double support_adv = 0.0;  // sum of A_j over T_k
      for (size_t g = 0; g + 1 < segments.size(); ++g) {
        float row_best = sim[segments[g]];  // m_kj
        for (int64_t c = segments[g] + 1; c < segments[g + 1]; ++c) {
          row_best = std::max(row_best, sim[c]);
        }
        best = std::max(best, row_best);
        if (row_best >= theta_f) {
          ++n_support;
          support_adv += seq_adv[cand_row[task.cand_lo + segments[g]]];
        }
      }
      int64_t best_call = std::numeric_limits<int64_t>::max();  // w_k: lowest index at s_k
      for (int64_t c = 0; c < C; ++c) {
        const int64_t k = cand_call[task.cand_lo + c];
        best_call = (sim[c] == best && k < best_call) ? k : best_call;
      }

      const float s = C > 0 ? best : 0.0f;
      const int64_t pool = pool_size[scope[call.row]];
      const float cov = pool > 0 ? static_cast<float>(n_support) / static_cast<float>(pool) : 0.0f;
      const float a_bar =
          n_support > 0 ? static_cast<float>(support_adv) / static_cast<float>(n_support) : 0.0f;
      const float conf = coverage ? s * cov : s;  // coverage off: the ablation conf = s
      const bool gate = s >= theta_f && conf >= alpha_f;
      out_delta[call.call] = gate ? beta_f * conf * a_bar : 0.0f;
      out_conf[call.call] = conf;
      out_witness[call.call] = C > 0 ? best_call : -1;
    }
  };

  // ---- one parallel region: the copy overlaps the plan and the similarities ----------------
  // Thread 0 makes the plan (serial) while the other threads copy the rows that no lift can
  // touch (successful and zero-advantage rows) into `corrected`, with the NaN/inf check and,
  // for large outputs, non-temporal stores (as memcpy does for clone). Then every thread takes
  // similarity tasks and the rest of those rows; after a barrier (every d_k is known) the
  // failing rows are copied with the lifts of their spans in the same pass. The plan's errors
  // are caught here and raised after the region.
  float* out = corrected.data_ptr<float>();
  std::vector<int64_t> free_rows, failing_rows;
  free_rows.reserve(B);
  for (int64_t b = 0; b < B; ++b) (seq_adv[b] < 0.0f ? failing_rows : free_rows).push_back(b);
  const int64_t rows_per_chunk = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(T, 1));
  std::atomic<int64_t> next_free{0}, next_failing{0}, next_task{0};
  std::atomic<bool> planned{false}, finite{true};
  std::exception_ptr plan_error;
  // A row: the copy (with the NaN/inf check) then, when `lifts` (failing rows, after the
  // barrier: the plan and every d_k are final), the lifts of its spans while the row is still
  // in cache. Free rows are copied while the plan is being made, so they never read it.
  auto copy_row = [&](int64_t row, bool lifts) {
    const float* src = adv + row * T;
    float* dst = out + row * T;
    const bool bad = copy_segment(src, dst, T);
    if (lifts && !lift_offsets.empty()) {
      for (int64_t i = lift_offsets[row]; i < lift_offsets[row + 1]; ++i) {
        const int64_t k = lift_calls[i];
        const float d = out_delta[k];
        if (d != 0.0f) lift_segment(src + start[k], dst + start[k], end[k] - start[k], d);
      }
    }
    return bad;
  };
  // copies chunks of `rows` until none is left (or, with `until_planned`, the plan is made)
  auto copy_rows = [&](const std::vector<int64_t>& rows, std::atomic<int64_t>& next, bool lifts,
                       bool until_planned) {
    const int64_t n = static_cast<int64_t>(rows.size());
    bool bad = false;
    while (!(until_planned && planned.load(std::memory_order_acquire))) {
      const int64_t lo = next.fetch_add(rows_per_chunk, std::memory_order_relaxed);
      if (lo >= n) break;
      for (int64_t i = lo; i < std::min(n, lo + rows_per_chunk); ++i)
        bad |= copy_row(rows[i], lifts);
    }
    if (bad) finite.store(false, std::memory_order_relaxed);
  };
  const int64_t n_chunks = (B + rows_per_chunk - 1) / rows_per_chunk;
  const int n_threads =
      static_cast<int>(std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(n_chunks, 2)));
  const bool parallel = n_threads > 1 && (B * T >= (int64_t{1} << 16) || N >= 256);
#pragma omp parallel num_threads(n_threads) if (parallel)
  {
    if (omp_get_thread_num() == 0) {
      try {
        plan();
      } catch (...) {
        plan_error = std::current_exception();
      }
      planned.store(true, std::memory_order_release);
    } else {
      copy_rows(free_rows, next_free, false, true);
      while (!planned.load(std::memory_order_acquire)) spin_pause();
    }
    if (!plan_error && !tasks.empty()) {
      std::vector<float> sims(kFailBlock * max_range);  // this thread's similarity block
      std::vector<int64_t> segments;
      const int64_t n_tasks = static_cast<int64_t>(tasks.size());
      // runs of kTaskRun tasks: neighbouring tasks write neighbouring outputs (no false
      // sharing between threads) and the counter is touched less often
      constexpr int64_t kTaskRun = 16;
      for (int64_t lo = next_task.fetch_add(kTaskRun, std::memory_order_relaxed); lo < n_tasks;
           lo = next_task.fetch_add(kTaskRun, std::memory_order_relaxed)) {
        for (int64_t ti = lo; ti < std::min(n_tasks, lo + kTaskRun); ++ti) {
          run_task(tasks[ti], sims, segments);
        }
      }
    }
    copy_rows(free_rows, next_free, false, false);
#pragma omp barrier
    copy_rows(failing_rows, next_failing, true, false);
  }
  TORCH_CHECK_VALUE(finite.load(), "advantages contains NaN or inf");
  if (plan_error) std::rethrow_exception(plan_error);
  return std::make_tuple(corrected, delta, confidence, witness);
}

TORCH_LIBRARY_IMPL(tapo, CPU, m) { m.impl("fused_correct", &fused_correct_cpu); }

}  // namespace tapo

// The extension is imported for its side effect (the registration above); Python needs a
// module object all the same.
static PyModuleDef tapo_native_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "Native CPU kernels of the tapo ops, registered with the torch dispatcher on import.", -1,
    nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&tapo_native_module); }
