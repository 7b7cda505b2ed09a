// CPU kernels of tapo::policy_loss, tapo::policy_loss_backward and tapo::policy_loss_with_grad
// (docs/math.md, sections 3-4): the semantics of reference.py::policy_loss and of autograd
// through it, and the autograd of tapo::policy_loss for CPU tensors (AutogradCPU).
//
// Design: OpenMP (at::parallel_for) over rows; inside a row, an explicit 8 x fp32 / 4 x fp64
// vector loop over tokens (GCC vector extensions, an AVX2 build picked at run time; one
// instantiation per algorithm and KL term, so the loop has no per-token branches). Per-row
// results are kept per row and reduced serially in row order (deterministic for any thread
// count), in fp64 (the kernel's dtype only inside blocks of 16 vectors).
//   forward : one pass over the tokens (GSPO: a row pass for log s_i first, the row is then
//             in cache). The TAPO lift is applied in the loop; a NaN/inf probe (x * 0) is
//             accumulated there too, and only if it fires is each input checked on its own,
//             so bad input still gets the reference's first error.
//   backward: a pass for the row mask counts (the aggregation weights need them), then the
//             token pass writing d loss / d logp (recomputing the forward's token math).
//   with_grad: the backward's mask-count pass, then the forward's token pass, which also
//             writes d loss / d logp (d loss = 1) from the same token math; the forward's
//             checks and aggregation follow. Loss and metrics equal the forward's, the
//             gradient the backward's for grad_loss = 1, bit for bit.
//   autograd: with logp requiring grad, the forward runs with_grad and saves only the
//             gradient; the backward is grad_out * grad_logp (one multiply, no token math).
// Tokens are assumed to be mostly in mask (masked tokens are computed and multiplied by 0,
// like the reference). The exponentials bound the token passes, not memory. Measured on a
// shared, noisy 2-core AMD EPYC VM (two threads; ranges of medians over repeated runs of 200)
// at B=64, T=1024 fp32, per-token advantages, k3 KL, the lift, token-mean:
//   plain forward (no grad)           grpo 126-231 us, gspo 110-213 us, sapo 186-278 us
//   policy_loss_backward              grpo 120-250 us, gspo 100-194 us, sapo 145-262 us
//   fwd+bwd through autograd          grpo 189-319 us, gspo 174-295 us, sapo 241-370 us
//     (with the Python autograd kernel and a separate backward: 355-640, 312-616, 424-756 us;
//      the floor, a clone of logp plus a read of the other inputs, is 59-66 us)
//   B=2, T=16 fwd+bwd through autograd: 25-57 us (112-237 us with the Python autograd kernel)
//
// Gradient semantics are torch's: maximum/minimum split the gradient 0.5/0.5 on exact ties,
// clamp passes it at its bounds inclusive and zero outside (log-ratio clamp [-20, 20], PPO
// clip, GSPO clamp(max=10), k3 clamps). Scalars meet fp32 tensors as fp32 (torch's rule for a
// Python float against a float32 tensor). fp32 exponentials use a Cephes-style polynomial
// (about 1 ulp, like torch's vectorised exp); fp64 uses std::exp lane by lane.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "tapo_common.h"
#include "tapo_vec.h"

namespace tapo {
namespace {

enum class Algo { kGrpo, kGspo, kSapo, kGspoSeq };
enum class KlType { kK1, kK2, kK3 };
enum class Agg { kTokenMean, kSeqMeanTokenMean, kSeqMeanTokenSum, kSeqMeanTokenSumNorm, kTokenSum };

// ---------------------------------------------------------------------------------------------
// the arguments of a call, and their validation (tapo_kernels/_checks.py::check_policy_loss,
// same messages)
// ---------------------------------------------------------------------------------------------

// The arguments of one call of tapo::policy_loss, tapo::policy_loss_backward or
// tapo::policy_loss_with_grad: the top schema().arguments().size() entries of the boxed stack,
// read by name through the op's schema (tapo_kernels/_library.py generates the schemas from
// tapo_kernels/knobs.py). The kernels never list the knobs positionally: each knob the C++
// uses is read by name once, where check_policy_loss_args fills LossOptions, and a schema
// argument nobody reads is ignored. The references point into the stack (valid until the
// arguments are dropped).
class LossArgs {
 public:
  LossArgs(const c10::OperatorHandle& op, const torch::jit::Stack& stack)
      : schema_(op.schema()), args_(torch::jit::last(stack, schema_.arguments().size())) {}

  size_t size() const { return args_.size(); }

  // A scan of the schema (FunctionSchema::argumentIndexWithName, with the length and the first
  // character compared before the rest: the names of one length mostly differ there).
  const c10::IValue& operator[](std::string_view name) const {
    const std::vector<c10::Argument>& arguments = schema_.arguments();
    for (size_t i = 0; i < arguments.size(); ++i) {
      const std::string& candidate = arguments[i].name();
      if (candidate.size() == name.size() && candidate[0] == name[0] && candidate == name) {
        return args_[i];
      }
    }
    TORCH_INTERNAL_ASSERT(false, schema_.name(), " has no argument ", name);
  }
  const at::Tensor& tensor(std::string_view name) const { return (*this)[name].toTensor(); }
  // An optional tensor: nullptr when None.
  const at::Tensor* optional_tensor(std::string_view name) const {
    const c10::IValue& v = (*this)[name];
    return v.isNone() ? nullptr : &v.toTensor();
  }
  double number(std::string_view name) const { return (*this)[name].toDouble(); }
  std::optional<double> optional_number(std::string_view name) const {
    const c10::IValue& v = (*this)[name];
    return v.isNone() ? std::nullopt : std::optional<double>(v.toDouble());
  }

  // Replaces the arguments on the stack by the op's results (a tensor or a tuple of them).
  template <typename Results>
  void return_on(torch::jit::Stack* stack, Results&& results) const {
    torch::jit::drop(*stack, args_.size());
    torch::jit::pack(*stack, std::forward<Results>(results));
  }

 private:
  const c10::FunctionSchema& schema_;
  at::ArrayRef<c10::IValue> args_;
};

struct LossOptions {
  Algo algo;
  KlType kl_type;
  Agg agg;
  double eps_low, eps_high, dual_clip_c, tau_pos, tau_neg, kl_coef;
  std::optional<double> norm_const, global_count;
};

// A string knob: its value among `choices`, else ValueError "unknown <name> '<value>'; expected
// one of (...)".
template <typename Enum, size_t K>
Enum parse_choice(const LossArgs& args, std::string_view name,
                  const std::pair<const char*, Enum> (&choices)[K]) {
  const std::string_view value = args[name].toStringView();
  for (const auto& [choice, e] : choices) {
    if (value == choice) return e;
  }
  std::string expected = "(";
  for (size_t i = 0; i < K; ++i) {
    expected += (i ? ", '" : "'") + std::string(choices[i].first) + "'";
  }
  expected += ")";
  TORCH_CHECK_VALUE(false, "unknown ", name, " ", py_str_repr(value), "; expected one of ",
                    expected);
  return choices[0].second;  // not reached
}

// A number knob: its value if ok(value), else ValueError "<name> must be <phrase>, got <value>"
// (a Range of knobs.py).
template <typename Ok>
double number_knob(const LossArgs& args, std::string_view name, Ok ok, const char* phrase) {
  const double v = args.number(name);
  TORCH_CHECK_VALUE(ok(v), name, " must be ", phrase, ", got ", v);
  return v;
}

bool at_least_0(double v) { return finite32(v) && v >= 0.0; }
bool above_0(double v) { return finite32(v) && v > 0.0; }

// Checks the arguments of a call and reads the knobs into LossOptions: the only place that
// reads a knob. Order: the string knobs, the tensors, the number knobs.
LossOptions check_policy_loss_args(const LossArgs& args) {
  static const std::pair<const char*, Algo> kAlgos[] = {{"grpo", Algo::kGrpo},
                                                        {"gspo", Algo::kGspo},
                                                        {"sapo", Algo::kSapo},
                                                        {"gspo-seq", Algo::kGspoSeq}};
  static const std::pair<const char*, Agg> kAggs[] = {
      {"token-mean", Agg::kTokenMean},
      {"seq-mean-token-mean", Agg::kSeqMeanTokenMean},
      {"seq-mean-token-sum", Agg::kSeqMeanTokenSum},
      {"seq-mean-token-sum-norm", Agg::kSeqMeanTokenSumNorm},
      {"token-sum", Agg::kTokenSum}};
  static const std::pair<const char*, KlType> kKlTypes[] = {
      {"k1", KlType::kK1}, {"k2", KlType::kK2}, {"k3", KlType::kK3}};
  LossOptions opt;
  opt.algo = parse_choice(args, "algo", kAlgos);
  opt.agg = parse_choice(args, "agg", kAggs);
  opt.kl_type = parse_choice(args, "kl_type", kKlTypes);

  const at::Tensor& logp = args.tensor("logp");
  const at::Tensor& old_logp = args.tensor("old_logp");
  const at::Tensor& advantages = args.tensor("advantages");
  const at::Tensor& mask = args.tensor("mask");
  const at::Tensor* ref = args.optional_tensor("ref_logp");
  const at::Tensor* map = args.optional_tensor("call_map");
  const at::Tensor* dlt = args.optional_tensor("call_delta");
  const at::Tensor* weight = args.optional_tensor("importance_weight");
  check_same_device({{"logp", &logp},
                     {"old_logp", &old_logp},
                     {"advantages", &advantages},
                     {"mask", &mask},
                     {"ref_logp", ref},
                     {"call_map", map},
                     {"call_delta", dlt},
                     {"importance_weight", weight}});
  TORCH_CHECK_VALUE(logp.dim() == 2, "logp must be 2-D (B, T), got shape ",
                    shape_repr(logp.sizes()));
  const int64_t B = logp.size(0);
  const int64_t T = logp.size(1);
  check_dtype("logp", logp, {at::kFloat, at::kDouble});
  const at::ScalarType dtype = logp.scalar_type();
  for (const auto& [name, t] :
       {std::make_pair("old_logp", &old_logp), std::make_pair("ref_logp", ref),
        std::make_pair("importance_weight", weight)}) {
    if (t == nullptr) continue;
    check_shape(name, *t, {B, T});
    check_dtype(name, *t, {dtype});
  }
  TORCH_CHECK_VALUE(
      advantages.sizes() == at::IntArrayRef({B}) || advantages.sizes() == at::IntArrayRef({B, T}),
      "advantages must have shape (", B, ",) or (", B, ", ", T, "), got ",
      shape_repr(advantages.sizes()));
  check_dtype("advantages", advantages, {dtype});
  check_shape("mask", mask, {B, T});
  check_dtype("mask", mask, {at::kBool, dtype});
  TORCH_CHECK_VALUE((map == nullptr) == (dlt == nullptr),
                    "call_map and call_delta must be given together");
  if (map != nullptr) {
    check_shape("call_map", *map, {B, T});
    check_dtype("call_map", *map, {at::kInt});
    TORCH_CHECK_VALUE(dlt->dim() == 1, "call_delta must be 1-D (N,), got shape ",
                      shape_repr(dlt->sizes()));
    check_dtype("call_delta", *dlt, {dtype});
  }

  opt.eps_low = number_knob(args, "eps_low", at_least_0, "finite and >= 0");
  opt.eps_high = number_knob(args, "eps_high", at_least_0, "finite and >= 0");
  TORCH_CHECK_VALUE(opt.eps_low < 1.0,
                    "eps_low must be < 1 (the ratio floor 1 - eps_low must stay positive), got ",
                    opt.eps_low);
  opt.dual_clip_c = number_knob(
      args, "dual_clip_c", [](double v) { return finite32(v) && (v == 0.0 || v > 1.0); },
      "0 (off) or > 1");
  opt.tau_pos = number_knob(args, "tau_pos", above_0, "finite and > 0");
  opt.tau_neg = number_knob(args, "tau_neg", above_0, "finite and > 0");
  opt.kl_coef = number_knob(args, "kl_coef", finite32, "finite");
  TORCH_CHECK_VALUE(!(opt.kl_coef != 0.0 && ref == nullptr), "kl_coef != 0 needs ref_logp");
  for (auto [name, v] : {std::make_pair("norm_const", &opt.norm_const),
                         std::make_pair("global_count", &opt.global_count)}) {
    *v = args.optional_number(name);
    TORCH_CHECK_VALUE(!v->has_value() || above_0(**v), name, " must be finite and > 0, got ",
                      v->value_or(0.0));
  }
  return opt;
}
// ---------------------------------------------------------------------------------------------
// per-token math, shared by the forward and the backward
// ---------------------------------------------------------------------------------------------

// Knobs in the kernel's dtype (rounded as torch rounds a Python float against the tensor),
// broadcast once per call.
template <typename scalar_t>
struct Consts {
  using V = typename Vec<scalar_t>::V;
  bool dual;  // grpo with dual_clip_c > 1
  V lo, hi;  // 1 - eps_low, 1 + eps_high
  V dual_c;
  V tau_pos, tau_neg, c4_pos, c4_neg;  // c4 = 4 / tau, computed in scalar_t
  V kl_coef;
};

template <typename scalar_t>
Consts<scalar_t> make_consts(const LossOptions& o) {
  using V = typename Vec<scalar_t>::V;
  const auto tau_pos = static_cast<scalar_t>(o.tau_pos);
  const auto tau_neg = static_cast<scalar_t>(o.tau_neg);
  Consts<scalar_t> c;
  c.dual = o.algo == Algo::kGrpo && o.dual_clip_c > 1.0;
  c.lo = splat<V>(static_cast<scalar_t>(1.0 - o.eps_low));
  c.hi = splat<V>(static_cast<scalar_t>(1.0 + o.eps_high));
  c.dual_c = splat<V>(static_cast<scalar_t>(o.dual_clip_c));
  c.tau_pos = splat<V>(tau_pos);
  c.tau_neg = splat<V>(tau_neg);
  c.c4_pos = splat<V>(static_cast<scalar_t>(scalar_t(4) / tau_pos));
  c.c4_neg = splat<V>(static_cast<scalar_t>(scalar_t(4) / tau_neg));
  c.kl_coef = splat<V>(static_cast<scalar_t>(o.kl_coef));
  return c;
}

template <typename scalar_t>
struct TokenVec {
  using V = typename Vec<scalar_t>::V;
  using I = typename Vec<scalar_t>::I;
  V loss;     // per-token loss (policy term + kl_coef * KL)
  V ratio;    // r (s_it for GSPO)
  V kl;       // KL estimate (0 without ref_logp)
  I clipped;  // PPO clip strictly active
  I dual;     // dual clip strictly active (never together with `clipped`)
  V dloss;    // d loss / d logp of this token (GSPO-seq: its KL term only)
  V dl_dr;    // d (policy loss) / d r
};

// The KL term of a kernel variant: none (no ref_logp) or one estimator.
enum class KlTerm { kNone, kK1, kK2, kK3 };

// row_ratio / row_dratio: GSPO's s_it and d s_it / d logp_t (constant over the row). The
// algorithm and the KL term are template parameters so each variant's loop is branch-free.
template <typename scalar_t, Algo kAlgo, KlTerm kKl>
TAPO_INLINE TokenVec<scalar_t> token_math(const Consts<scalar_t>& c, typename Vec<scalar_t>::V lp,
                                          typename Vec<scalar_t>::V old,
                                          typename Vec<scalar_t>::V a,
                                          typename Vec<scalar_t>::V ref,
                                          typename Vec<scalar_t>::V row_ratio,
                                          typename Vec<scalar_t>::V row_dratio) {
  using V = typename Vec<scalar_t>::V;
  using I = typename Vec<scalar_t>::I;
  const V zero = splat<V>(scalar_t(0)), one = splat<V>(scalar_t(1)), half = splat<V>(scalar_t(0.5));
  TokenVec<scalar_t> out;

  V dratio;  // d r / d logp
  if constexpr (kAlgo == Algo::kGspo || kAlgo == Algo::kGspoSeq) {
    out.ratio = row_ratio;
    dratio = row_dratio;
  } else {
    const V diff = lp - old;
    const V lim = splat<V>(scalar_t(20));
    const I lr_inside = (diff >= -lim) & (diff <= lim);
    out.ratio = vexp(vclamp(diff, -lim, lim));
    dratio = lr_inside ? out.ratio : zero;
  }
  const V r = out.ratio;
  const V na = -a;

  V dl_dr;  // d (policy loss) / d r
  if constexpr (kAlgo == Algo::kSapo) {
    const I pos = a > zero;
    const V tau = pos ? c.tau_pos : c.tau_neg;
    const V c4 = pos ? c.c4_pos : c.c4_neg;
    const V sig = one / (one + vexp(-(tau * (r - one))));
    out.loss = na * sig * c4;
    dl_dr = na * c4 * (sig * (one - sig)) * tau;
    out.clipped = I{};
    out.dual = I{};
  } else {
    const V lo = c.lo, hi = c.hi;
    const V l1 = na * r;
    const V l2 = na * vclamp(r, lo, hi);
    const I in_clip = (r >= lo) & (r <= hi);
    const I gt = l1 > l2, lt = l1 < l2, eq = l1 == l2;
    out.loss = gt ? l1 : l2;  // torch.maximum
    out.clipped = lt;
    out.dual = I{};
    const V w1 = gt ? one : (eq ? half : zero);  // maximum's gradient split
    const V w2 = lt ? one : (eq ? half : zero);
    dl_dr = w1 * na + w2 * (in_clip ? na : zero);
    if (c.dual) {
      const I neg = a < zero;
      const V l3 = na * c.dual_c;
      const V wm = out.loss < l3 ? one : (out.loss == l3 ? half : zero);  // minimum's split
      dl_dr = neg ? dl_dr * wm : dl_dr;
      const I dual_on = neg & (l3 < out.loss);
      out.loss = dual_on ? l3 : out.loss;
      out.dual = dual_on;
    }
  }
  out.dl_dr = dl_dr;
  // GSPO-seq: r depends on every token of the row; the row pass adds that part (gspo_seq_pass)
  out.dloss = kAlgo == Algo::kGspoSeq ? zero : dl_dr * dratio;

  if constexpr (kKl != KlTerm::kNone) {
    const V d = ref - lp;
    V dkl;  // d KL / d logp
    if constexpr (kKl == KlTerm::kK1) {
      out.kl = -d;
      dkl = one;
    } else if constexpr (kKl == KlTerm::kK2) {
      out.kl = half * d * d;
      dkl = -d;
    } else {
      const V lim_d = splat<V>(scalar_t(20)), lim_k = splat<V>(scalar_t(10));
      const V dc = vclamp(d, -lim_d, lim_d);
      const V ed = vexp(dc);
      const V e = ed - dc - one;
      out.kl = vclamp(e, -lim_k, lim_k);
      const I inside = (d >= -lim_d) & (d <= lim_d) & (e >= -lim_k) & (e <= lim_k);
      dkl = inside ? -(ed - one) : zero;
    }
    const V coef = c.kl_coef;
    out.loss = out.loss + coef * out.kl;
    out.dloss = out.dloss + coef * dkl;
  } else {
    out.kl = zero;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// row kernels
// ---------------------------------------------------------------------------------------------

// One row's inputs. `adv` is per token (T values) or null, then `adv_row` is the row's value.
template <typename scalar_t>
struct RowIn {
  const scalar_t* logp;
  const scalar_t* old;
  const scalar_t* ref;  // null without ref_logp
  const scalar_t* adv;
  scalar_t adv_row;
  const scalar_t* mask_f;  // float mask, or
  const uint8_t* mask_b;   // bool mask
  const int32_t* map;      // TAPO call map (null without one)
  const scalar_t* delta;   // its call_delta, N values
  const scalar_t* weight;  // importance_weight (null without one)
  int64_t N;
  int64_t T;
};

// Value problems found by the passes, raised after them in the reference's order.
// Masked tokens (mask == 0) contribute exactly 0 whatever their inputs: the passes read
// their inputs as 0, so NaN or inf there is neither an error nor a NaN in the result.
constexpr uint32_t kMaybeNonfinite = 1, kBadMap = 2, kBadMask = 4, kBadWeight = 8;

struct RowStats {
  double loss = 0, clipped = 0, ratio = 0, kl = 0, lifted = 0, mask = 0, dual = 0, ppo_kl = 0;
  uint32_t bad = 0;
};

// Loads lane block [t, t + W) of a row; `count` < W pads the rest (zeros: finite, mask 0;
// call map -1: no call).
template <typename scalar_t>
struct RowLoader {
  using VT = Vec<scalar_t>;
  using V = typename VT::V;
  using I = typename VT::I;
  static constexpr int W = VT::kWidth;

  TAPO_INLINE static V load(const scalar_t* p, int64_t t, int count) {
    if (count == W) return vload<V>(p + t);
    scalar_t buf[W] = {};
    for (int k = 0; k < count; ++k) buf[k] = p[t + k];
    return vload<V>(buf);
  }
  TAPO_INLINE static V mask(const RowIn<scalar_t>& in, int64_t t, int count) {
    if (in.mask_f != nullptr) return load(in.mask_f, t, count);
    typename VT::B b;
    if (count == W) {
      std::memcpy(&b, in.mask_b + t, sizeof(b));
    } else {
      uint8_t buf[W] = {};
      for (int k = 0; k < count; ++k) buf[k] = in.mask_b[t + k];
      std::memcpy(&b, buf, sizeof(b));
    }
    return __builtin_convertvector(b != 0, V) * splat<V>(scalar_t(-1));  // -1 (true) -> 1
  }
  TAPO_INLINE static I call_index(const int32_t* map, int64_t t, int count) {
    typename VT::M v;
    if (count == W) {
      std::memcpy(&v, map + t, sizeof(v));
    } else {
      int32_t buf[W];
      for (int k = 0; k < W; ++k) buf[k] = k < count ? map[t + k] : -1;
      std::memcpy(&v, buf, sizeof(v));
    }
    return __builtin_convertvector(v, I);
  }
};

// The TAPO lift of reference.apply_lift on one lane block: a' = min(0, a + delta[call_map])
// where a call covers the token and a < 0. `lifted` marks a' != a; `bad_map` the lanes whose
// call index is out of range (never read).
template <typename scalar_t>
TAPO_INLINE typename Vec<scalar_t>::V lift_advantages(const RowIn<scalar_t>& in, int64_t t,
                                                      int count, typename Vec<scalar_t>::V a,
                                                      typename Vec<scalar_t>::I& lifted,
                                                      typename Vec<scalar_t>::I& bad_map) {
  using VT = Vec<scalar_t>;
  using V = typename VT::V;
  using I = typename VT::I;
  const I idx = RowLoader<scalar_t>::call_index(in.map, t, count);
  const I n = splat<I>(in.N);
  bad_map |= (idx < -1) | (idx >= n);
  const V zero = V{};
  const I need = (idx >= 0) & (idx < n) & (a < zero);  // covered by a call, negative
  bool any = false;
  for (int k = 0; k < VT::kWidth; ++k) any |= need[k] != 0;
  if (!any) {  // no lane to lift (most blocks): skip the gather
    lifted = I{};
    return a;
  }
  V d = V{};
  for (int k = 0; k < VT::kWidth; ++k) d[k] = in.delta[need[k] ? idx[k] : 0];
  const V lifted_a = need ? vmin(a + d, zero) : a;
  lifted = lifted_a != a;
  return lifted_a;
}

// One lane block's inputs. Masked lanes (mask == 0) read every input as 0, so they contribute
// exactly 0 whatever they hold. Flags float masks outside [0, 1] in `bad_mask` and negative
// importance weights in `bad_weight`; `w` is the weight (1 without one); `probe` turns
// NaN when an input (or the mask) is NaN or inf: x * 0 is NaN exactly then (or when the sum
// overflows: a false alarm that the precise checks after the pass clear).
template <typename scalar_t>
struct TokenIn {
  typename Vec<scalar_t>::V m, lp, old, a, ref, w;
  typename Vec<scalar_t>::I live;
};

template <typename scalar_t, KlTerm kKl>
TAPO_INLINE TokenIn<scalar_t> load_tokens(const RowIn<scalar_t>& in, int64_t t, int count,
                                          typename Vec<scalar_t>::V a_row,
                                          typename Vec<scalar_t>::I& bad_mask,
                                          typename Vec<scalar_t>::I& bad_weight,
                                          typename Vec<scalar_t>::V& probe) {
  using V = typename Vec<scalar_t>::V;
  using L = RowLoader<scalar_t>;
  const V zero = V{}, one = splat<V>(scalar_t(1));
  TokenIn<scalar_t> x;
  x.m = L::mask(in, t, count);
  x.live = x.m != zero;
  x.lp = x.live ? L::load(in.logp, t, count) : zero;
  x.old = x.live ? L::load(in.old, t, count) : zero;
  x.a = x.live ? (in.adv != nullptr ? L::load(in.adv, t, count) : a_row) : zero;
  x.ref = kKl != KlTerm::kNone && in.ref != nullptr ? (x.live ? L::load(in.ref, t, count) : zero)
                                                    : zero;
  bad_mask |= (x.m < zero) | (x.m > one);
  if (in.weight != nullptr) {
    x.w = x.live ? L::load(in.weight, t, count) : zero;
    bad_weight |= x.w < zero;
    probe += ((x.lp + x.old) + (x.a + x.ref) + (x.m + x.w)) * zero;
  } else {
    x.w = one;
    probe += ((x.lp + x.old) + (x.a + x.ref) + x.m) * zero;
  }
  return x;
}

// GSPO: log s_i = masked mean of the clamped log-ratio (fp64 sums); s_it = exp(min(log s_i,
// 10)) and d s_it / d logp_t = s_it where log s_i <= 10 (the clamp's bound is inclusive).
template <typename scalar_t>
TAPO_INLINE void gspo_row_ratio(const RowIn<scalar_t>& in, scalar_t& ratio, scalar_t& dratio,
                                double* row_n = nullptr) {
  using VT = Vec<scalar_t>;
  using V = typename VT::V;
  using D = typename VT::D;
  using L = RowLoader<scalar_t>;
  constexpr int W = VT::kWidth;
  constexpr int64_t kBlock = 16 * W;
  const V lim = splat<V>(scalar_t(20));
  D acc_lr{}, acc_m{};
  for (int64_t t0 = 0; t0 < in.T; t0 += kBlock) {
    V s_lr{}, s_m{};
    const int64_t t1 = std::min(in.T, t0 + kBlock);
    for (int64_t t = t0; t < t1; t += W) {
      const int count = static_cast<int>(std::min<int64_t>(W, t1 - t));
      const V m = L::mask(in, t, count);
      const auto live = m != V{};
      const V lr = L::load(in.logp, t, count) - L::load(in.old, t, count);
      s_lr += (live ? vclamp(lr, -lim, lim) : V{}) * m;
      s_m += m;
    }
    acc_lr += __builtin_convertvector(s_lr, D);
    acc_m += __builtin_convertvector(s_m, D);
  }
  double sum_lr = 0.0, sum_m = 0.0;
  for (int k = 0; k < W; ++k) {
    sum_lr += acc_lr[k];
    sum_m += acc_m[k];
  }
  const auto log_s = static_cast<scalar_t>(sum_lr / std::max(sum_m, 1.0));
  ratio = std::exp(std::min(log_s, scalar_t(10)));
  dratio = log_s <= scalar_t(10) ? ratio : scalar_t(0);
  if (row_n != nullptr) *row_n = std::max(sum_m, 1.0);
}

// GSPO-seq's policy-gradient part of one row: log s_i = sum_t m_t clamp(lr_t, +-20) / n_i, so
// d loss / d logp_t = coef * m_t [|lr_t| <= 20] with coef = row_grad * dr/dlog s * S / n_i and
// S = sum_t m_t d l_t / d r (summed by the token pass). Added to the gradient the token pass
// wrote (the KL term).
template <typename scalar_t>
TAPO_INLINE void gspo_seq_pass(const RowIn<scalar_t>& in, scalar_t coef, scalar_t* grad) {
  using VT = Vec<scalar_t>;
  using V = typename VT::V;
  using L = RowLoader<scalar_t>;
  constexpr int W = VT::kWidth;
  const V lim = splat<V>(scalar_t(20)), c = splat<V>(coef), zero{};
  for (int64_t t = 0; t < in.T; t += W) {
    const int count = static_cast<int>(std::min<int64_t>(W, in.T - t));
    const V m = L::mask(in, t, count);
    const auto live = m != zero;
    const V lr = live ? L::load(in.logp, t, count) - L::load(in.old, t, count) : zero;
    const V add = live & (lr >= -lim) & (lr <= lim) ? c * m : zero;
    const V g = L::load(grad, t, count) + add;
    if (count == W) {
      vstore(grad + t, g);
    } else {
      for (int k = 0; k < count; ++k) grad[t + k] = g[k];
    }
  }
}

// The forward's token pass of one row. With kGrad it also writes d loss / d logp of the row
// (row_grad * mask * d L / d logp, the same expression as backward_row_body) from the same
// token math: the value-and-gradient op's single pass.
template <typename scalar_t, Algo kAlgo, KlTerm kKl, bool kGrad>
TAPO_INLINE RowStats forward_row_body(const RowIn<scalar_t>& in, const Consts<scalar_t>& c,
                                      scalar_t row_grad, scalar_t* grad) {
  using VT = Vec<scalar_t>;
  using V = typename VT::V;
  using I = typename VT::I;
  using D = typename VT::D;
  using L = RowLoader<scalar_t>;
  constexpr int W = VT::kWidth;
  constexpr int64_t kBlock = 16 * W;  // tokens summed in the kernel's dtype before fp64
  scalar_t gspo_ratio = 0, gspo_dratio = 0;
  double row_n = 1.0;
  if constexpr (kAlgo == Algo::kGspo || kAlgo == Algo::kGspoSeq) {
    gspo_row_ratio(in, gspo_ratio, gspo_dratio, &row_n);
  }
  const V row_ratio = splat<V>(gspo_ratio), row_dratio = splat<V>(gspo_dratio);
  D acc_loss{}, acc_clip{}, acc_ratio{}, acc_kl{}, acc_lift{}, acc_mask{}, acc_dual{}, acc_pkl{};
  D acc_seq{};  // GSPO-seq: sum_t m_t d l_t / d r
  I bad_map{}, bad_mask{}, bad_weight{};
  V probe{};
  const V zero = splat<V>(scalar_t(0)), one = splat<V>(scalar_t(1));
  const V lim = splat<V>(scalar_t(20));
  const V a_row = splat<V>(in.adv_row);
  const V g_row = splat<V>(row_grad);
  for (int64_t t0 = 0; t0 < in.T; t0 += kBlock) {
    V s_loss{}, s_clip{}, s_ratio{}, s_kl{}, s_lift{}, s_mask{}, s_dual{}, s_pkl{};
    const int64_t t1 = std::min(in.T, t0 + kBlock);
    for (int64_t t = t0; t < t1; t += W) {
      const int count = static_cast<int>(std::min<int64_t>(W, t1 - t));
      const TokenIn<scalar_t> x =
          load_tokens<scalar_t, kKl>(in, t, count, a_row, bad_mask, bad_weight, probe);
      const V m = x.m, lp = x.lp, old = x.old, ref = x.ref;
      const auto live = x.live;
      V a = x.a;
      if (in.map != nullptr) {
        I lifted;
        a = lift_advantages(in, t, count, a, lifted, bad_map);
        s_lift += (lifted ? one : zero) * m;
      }
      if (in.weight != nullptr) a = a * x.w;  // the weighted policy-gradient term
      const TokenVec<scalar_t> tok =
          token_math<scalar_t, kAlgo, kKl>(c, lp, old, a, ref, row_ratio, row_dratio);
      if constexpr (kGrad) {
        const V g = live ? g_row * m * tok.dloss : zero;  // exactly 0 at masked tokens
        if (count == W) {
          vstore(grad + t, g);
        } else {
          for (int k = 0; k < count; ++k) grad[t + k] = g[k];
        }
      }
      s_loss += tok.loss * m;
      s_clip += (tok.clipped ? one : zero) * m;
      s_dual += (tok.dual ? one : zero) * m;
      if constexpr (kAlgo == Algo::kGspoSeq && kGrad) {  // in fp64, as the backward sums it
        acc_seq += __builtin_convertvector(live ? tok.dl_dr * m : zero, D);
      }
      s_pkl += vclamp(old - lp, -lim, lim) * m;  // ppo_kl: the negated token log-ratio
      s_ratio += tok.ratio * m;
      if constexpr (kKl != KlTerm::kNone) s_kl += tok.kl * m;
      s_mask += m;
    }
    acc_loss += __builtin_convertvector(s_loss, D);
    acc_clip += __builtin_convertvector(s_clip, D);
    acc_ratio += __builtin_convertvector(s_ratio, D);
    acc_kl += __builtin_convertvector(s_kl, D);
    acc_lift += __builtin_convertvector(s_lift, D);
    acc_mask += __builtin_convertvector(s_mask, D);
    acc_dual += __builtin_convertvector(s_dual, D);
    acc_pkl += __builtin_convertvector(s_pkl, D);
  }
  RowStats s;
  for (int k = 0; k < W; ++k) {
    s.loss += acc_loss[k];
    s.clipped += acc_clip[k];
    s.ratio += acc_ratio[k];
    s.kl += acc_kl[k];
    s.lifted += acc_lift[k];
    s.mask += acc_mask[k];
    s.dual += acc_dual[k];
    s.ppo_kl += acc_pkl[k];
    s.bad |= (probe[k] != probe[k] ? kMaybeNonfinite : 0u) | (bad_map[k] ? kBadMap : 0u) |
             (bad_mask[k] ? kBadMask : 0u) | (bad_weight[k] ? kBadWeight : 0u);
  }
  if constexpr (kAlgo == Algo::kGspoSeq && kGrad) {
    double seq = 0.0;
    for (int k = 0; k < W; ++k) seq += acc_seq[k];
    gspo_seq_pass(in, static_cast<scalar_t>(row_grad * gspo_dratio * (seq / row_n)), grad);
  }
  return s;
}

// Writes d loss / d logp of one row; returns the row's call-map flags (out-of-range indices).
template <typename scalar_t, Algo kAlgo, KlTerm kKl>
TAPO_INLINE uint32_t backward_row_body(const RowIn<scalar_t>& in, const Consts<scalar_t>& c,
                                       scalar_t row_grad, scalar_t* grad) {
  using VT = Vec<scalar_t>;
  using V = typename VT::V;
  using I = typename VT::I;
  using L = RowLoader<scalar_t>;
  constexpr int W = VT::kWidth;
  using D = typename VT::D;
  scalar_t gspo_ratio = 0, gspo_dratio = 0;
  double row_n = 1.0;
  if constexpr (kAlgo == Algo::kGspo || kAlgo == Algo::kGspoSeq) {
    gspo_row_ratio(in, gspo_ratio, gspo_dratio, &row_n);
  }
  const V row_ratio = splat<V>(gspo_ratio), row_dratio = splat<V>(gspo_dratio);
  const V zero = splat<V>(scalar_t(0)), one = splat<V>(scalar_t(1));
  const V a_row = splat<V>(in.adv_row);
  const V g_row = splat<V>(row_grad);
  I bad_map{}, bad_mask{}, bad_weight{};
  V probe{};
  D acc_seq{};  // GSPO-seq: sum_t m_t d l_t / d r
  for (int64_t t = 0; t < in.T; t += W) {
    const int count = static_cast<int>(std::min<int64_t>(W, in.T - t));
    const TokenIn<scalar_t> x =
        load_tokens<scalar_t, kKl>(in, t, count, a_row, bad_mask, bad_weight, probe);
    const V m = x.m, lp = x.lp, old = x.old, ref = x.ref;
    const auto live = x.live;
    V a = x.a;
    if (in.map != nullptr) {
      I lifted;
      a = lift_advantages(in, t, count, a, lifted, bad_map);
    }
    if (in.weight != nullptr) a = a * x.w;
    const TokenVec<scalar_t> tok =
        token_math<scalar_t, kAlgo, kKl>(c, lp, old, a, ref, row_ratio, row_dratio);
    const V g = live ? g_row * m * tok.dloss : zero;  // exactly 0 at masked tokens
    if constexpr (kAlgo == Algo::kGspoSeq)
      acc_seq += __builtin_convertvector(live ? tok.dl_dr * m : zero, D);
    if (count == W) {
      vstore(grad + t, g);
    } else {
      for (int k = 0; k < count; ++k) grad[t + k] = g[k];
    }
  }
  if constexpr (kAlgo == Algo::kGspoSeq) {
    double seq = 0.0;
    for (int k = 0; k < W; ++k) seq += acc_seq[k];
    gspo_seq_pass(in, static_cast<scalar_t>(row_grad * gspo_dratio * (seq / row_n)), grad);
  }
  uint32_t bad = 0;
  for (int k = 0; k < W; ++k) {
    bad |= (bad_map[k] ? kBadMap : 0u) | (bad_mask[k] ? kBadMask : 0u) |
           (bad_weight[k] ? kBadWeight : 0u) | (probe[k] != probe[k] ? kMaybeNonfinite : 0u);
  }
  return bad;
}

template <typename scalar_t>
using ForwardRowFn = RowStats (*)(const RowIn<scalar_t>&, const Consts<scalar_t>&);
template <typename scalar_t>
using BackwardRowFn = uint32_t (*)(const RowIn<scalar_t>&, const Consts<scalar_t>&, scalar_t,
                                   scalar_t*);
template <typename scalar_t>
using ForwardGradRowFn = RowStats (*)(const RowIn<scalar_t>&, const Consts<scalar_t>&, scalar_t,
                                      scalar_t*);

template <typename scalar_t, Algo kAlgo, KlTerm kKl>
RowStats forward_row_generic(const RowIn<scalar_t>& in, const Consts<scalar_t>& c) {
  return forward_row_body<scalar_t, kAlgo, kKl, false>(in, c, scalar_t(0), nullptr);
}
template <typename scalar_t, Algo kAlgo, KlTerm kKl>
__attribute__((target("avx2"))) RowStats forward_row_avx2(const RowIn<scalar_t>& in,
                                                          const Consts<scalar_t>& c) {
  return forward_row_body<scalar_t, kAlgo, kKl, false>(in, c, scalar_t(0), nullptr);
}
template <typename scalar_t, Algo kAlgo, KlTerm kKl>
RowStats forward_grad_row_generic(const RowIn<scalar_t>& in, const Consts<scalar_t>& c,
                                  scalar_t row_grad, scalar_t* grad) {
  return forward_row_body<scalar_t, kAlgo, kKl, true>(in, c, row_grad, grad);
}
template <typename scalar_t, Algo kAlgo, KlTerm kKl>
__attribute__((target("avx2"))) RowStats forward_grad_row_avx2(const RowIn<scalar_t>& in,
                                                               const Consts<scalar_t>& c,
                                                               scalar_t row_grad, scalar_t* grad) {
  return forward_row_body<scalar_t, kAlgo, kKl, true>(in, c, row_grad, grad);
}
template <typename scalar_t, Algo kAlgo, KlTerm kKl>
uint32_t backward_row_generic(const RowIn<scalar_t>& in, const Consts<scalar_t>& c,
                              scalar_t row_grad, scalar_t* grad) {
  return backward_row_body<scalar_t, kAlgo, kKl>(in, c, row_grad, grad);
}
template <typename scalar_t, Algo kAlgo, KlTerm kKl>
__attribute__((target("avx2"))) uint32_t backward_row_avx2(const RowIn<scalar_t>& in,
                                                           const Consts<scalar_t>& c,
                                                           scalar_t row_grad, scalar_t* grad) {
  return backward_row_body<scalar_t, kAlgo, kKl>(in, c, row_grad, grad);
}

// Sum of one row's mask (the backward's first pass): integers for a bool mask, kernel-dtype
// lanes for a float mask.
template <typename scalar_t>
TAPO_INLINE double mask_sum_body(const scalar_t* mask_f, const uint8_t* mask_b, int64_t T) {
  if (mask_b != nullptr) {
    uint64_t count = 0;
    for (int64_t t = 0; t < T; ++t) count += mask_b[t] != 0;
    return static_cast<double>(count);
  }
  using VT = Vec<scalar_t>;
  using V = typename VT::V;
  using D = typename VT::D;
  constexpr int W = VT::kWidth;
  constexpr int64_t kBlock = 16 * W;
  D acc{};
  for (int64_t t0 = 0; t0 < T; t0 += kBlock) {
    V block{};
    const int64_t t1 = std::min(T, t0 + kBlock);
    for (int64_t t = t0; t < t1; t += W) {
      block += RowLoader<scalar_t>::load(mask_f, t, static_cast<int>(std::min<int64_t>(W, t1 - t)));
    }
    acc += __builtin_convertvector(block, D);
  }
  double sum = 0.0;
  for (int k = 0; k < W; ++k) sum += acc[k];
  return sum;
}

template <typename scalar_t>
double mask_sum_generic(const scalar_t* mask_f, const uint8_t* mask_b, int64_t T) {
  return mask_sum_body(mask_f, mask_b, T);
}
template <typename scalar_t>
__attribute__((target("avx2"))) double mask_sum_avx2(const scalar_t* mask_f, const uint8_t* mask_b,
                                                     int64_t T) {
  return mask_sum_body(mask_f, mask_b, T);
}

// The row kernels of one (algorithm, KL term) variant, for this CPU.
template <typename scalar_t>
struct RowKernels {
  ForwardRowFn<scalar_t> forward;
  BackwardRowFn<scalar_t> backward;
  ForwardGradRowFn<scalar_t> forward_grad;
};

template <typename scalar_t, Algo kAlgo, KlTerm kKl>
RowKernels<scalar_t> row_kernels_for() {
  if (cpu_has_avx2()) {
    return {&forward_row_avx2<scalar_t, kAlgo, kKl>, &backward_row_avx2<scalar_t, kAlgo, kKl>,
            &forward_grad_row_avx2<scalar_t, kAlgo, kKl>};
  }
  return {&forward_row_generic<scalar_t, kAlgo, kKl>, &backward_row_generic<scalar_t, kAlgo, kKl>,
          &forward_grad_row_generic<scalar_t, kAlgo, kKl>};
}

template <typename scalar_t, Algo kAlgo>
RowKernels<scalar_t> row_kernels_for(KlTerm kl) {
  switch (kl) {
    case KlTerm::kNone: return row_kernels_for<scalar_t, kAlgo, KlTerm::kNone>();
    case KlTerm::kK1: return row_kernels_for<scalar_t, kAlgo, KlTerm::kK1>();
    case KlTerm::kK2: return row_kernels_for<scalar_t, kAlgo, KlTerm::kK2>();
    case KlTerm::kK3: return row_kernels_for<scalar_t, kAlgo, KlTerm::kK3>();
  }
  return row_kernels_for<scalar_t, kAlgo, KlTerm::kNone>();
}

template <typename scalar_t>
RowKernels<scalar_t> row_kernels(const LossOptions& opt, bool has_ref) {
  KlTerm kl = KlTerm::kNone;
  if (has_ref) {
    kl = opt.kl_type == KlType::kK1   ? KlTerm::kK1
         : opt.kl_type == KlType::kK2 ? KlTerm::kK2
                                      : KlTerm::kK3;
  }
  switch (opt.algo) {
    case Algo::kGrpo: return row_kernels_for<scalar_t, Algo::kGrpo>(kl);
    case Algo::kGspo: return row_kernels_for<scalar_t, Algo::kGspo>(kl);
    case Algo::kSapo: return row_kernels_for<scalar_t, Algo::kSapo>(kl);
    case Algo::kGspoSeq: return row_kernels_for<scalar_t, Algo::kGspoSeq>(kl);
  }
  return row_kernels_for<scalar_t, Algo::kGrpo>(kl);
}

// ---------------------------------------------------------------------------------------------
// the ops
// ---------------------------------------------------------------------------------------------

// Contiguous inputs and the per-row preparation shared by both directions.
template <typename scalar_t>
struct LossBatch {
  int64_t B = 0, T = 0, N = 0;
  at::Tensor logp_t, old_t, adv_t, mask_t, ref_t, map_t, delta_t, weight_t;
  const scalar_t* logp = nullptr;
  const scalar_t* old = nullptr;
  const scalar_t* adv = nullptr;
  bool adv_per_token = false;
  const scalar_t* mask_f = nullptr;
  const uint8_t* mask_b = nullptr;
  const scalar_t* ref = nullptr;
  const int32_t* map = nullptr;
  const scalar_t* delta = nullptr;
  const scalar_t* weight = nullptr;

  explicit LossBatch(const LossArgs& args) {
    const at::Tensor* ref_in = args.optional_tensor("ref_logp");
    const at::Tensor* map_in = args.optional_tensor("call_map");
    const at::Tensor& logp_in = args.tensor("logp");
    B = logp_in.size(0);
    T = logp_in.size(1);
    logp_t = logp_in.contiguous();
    old_t = args.tensor("old_logp").contiguous();
    adv_t = args.tensor("advantages").contiguous();
    mask_t = args.tensor("mask").contiguous();
    logp = logp_t.data_ptr<scalar_t>();
    old = old_t.data_ptr<scalar_t>();
    adv = adv_t.data_ptr<scalar_t>();
    adv_per_token = adv_t.dim() == 2;
    if (mask_t.scalar_type() == at::kBool) {
      mask_b = reinterpret_cast<const uint8_t*>(mask_t.data_ptr<bool>());
    } else {
      mask_f = mask_t.data_ptr<scalar_t>();
    }
    if (ref_in != nullptr) {
      ref_t = ref_in->contiguous();
      ref = ref_t.data_ptr<scalar_t>();
    }
    if (map_in != nullptr) {
      map_t = map_in->contiguous();
      delta_t = args.tensor("call_delta").contiguous();
      map = map_t.data_ptr<int32_t>();
      delta = delta_t.data_ptr<scalar_t>();
      N = delta_t.numel();
    }
    if (const at::Tensor* weight_in = args.optional_tensor("importance_weight")) {
      weight_t = weight_in->contiguous();
      weight = weight_t.data_ptr<scalar_t>();
    }
  }

  RowIn<scalar_t> row(int64_t i) const {
    RowIn<scalar_t> in;
    const int64_t base = i * T;
    in.logp = logp + base;
    in.old = old + base;
    in.ref = ref != nullptr ? ref + base : nullptr;
    in.mask_f = mask_f != nullptr ? mask_f + base : nullptr;
    in.mask_b = mask_b != nullptr ? mask_b + base : nullptr;
    in.adv = adv_per_token ? adv + base : nullptr;
    in.adv_row = adv_per_token ? scalar_t(0) : adv[i];
    in.map = map != nullptr ? map + base : nullptr;
    in.delta = delta;
    in.weight = weight != nullptr ? weight + base : nullptr;
    in.N = N;
    in.T = T;
    return in;
  }
};

// The value checks after a pass, in the reference's order (masked tokens are exempt). Runs
// its precise scans only when the pass flagged something.
template <typename scalar_t>
void check_values(const LossBatch<scalar_t>& batch, uint32_t bad) {
  const int64_t B = batch.B, T = batch.T;
  const auto live = [&](int64_t k) {
    return batch.mask_b != nullptr ? batch.mask_b[k] != 0 : batch.mask_f[k] != scalar_t(0);
  };
  const auto finite_where_live = [&](const scalar_t* x) {
    for (int64_t k = 0; k < B * T; ++k) {
      if (live(k) && !std::isfinite(x[k])) return false;
    }
    return true;
  };
  if (bad & (kMaybeNonfinite | kBadMask)) {
    if (batch.mask_f != nullptr) {
      TORCH_CHECK_VALUE(all_finite(batch.mask_f, B * T), "mask contains NaN or inf");
      for (int64_t k = 0; k < B * T; ++k) {
        TORCH_CHECK_VALUE(batch.mask_f[k] >= scalar_t(0) && batch.mask_f[k] <= scalar_t(1),
                          "mask values must be in [0, 1]");
      }
    }
    TORCH_CHECK_VALUE(finite_where_live(batch.logp),
                      "logp contains NaN or inf at a token with "
                      "mask != 0");
    TORCH_CHECK_VALUE(finite_where_live(batch.old),
                      "old_logp contains NaN or inf at a token with "
                      "mask != 0");
    bool adv_ok = true;
    if (batch.adv_per_token) {
      adv_ok = finite_where_live(batch.adv);
    } else {
      for (int64_t i = 0; i < B && adv_ok; ++i) {
        for (int64_t t = 0; t < T; ++t) {
          if (live(i * T + t)) {
            adv_ok = std::isfinite(batch.adv[i]);
            break;
          }
        }
      }
    }
    TORCH_CHECK_VALUE(adv_ok, "advantages contains NaN or inf at a token with mask != 0");
    if (batch.ref != nullptr) {
      TORCH_CHECK_VALUE(finite_where_live(batch.ref),
                        "ref_logp contains NaN or inf at a token "
                        "with mask != 0");
    }
    if (batch.weight != nullptr) {
      TORCH_CHECK_VALUE(finite_where_live(batch.weight),
                        "importance_weight contains NaN or inf at a token with mask != 0");
    }
  }
  if (bad & kBadWeight) {
    TORCH_CHECK_VALUE(false, "importance_weight must be >= 0 at every token with mask != 0");
  }
  if (batch.delta != nullptr) {
    TORCH_CHECK_VALUE(all_finite(batch.delta, batch.N), "call_delta contains NaN or inf");
  }
  TORCH_CHECK_VALUE(!(bad & kBadMap),
                    "call_map out of range: entries must be -1 or in [0, N=", batch.N, ")");
}

int64_t row_grain(int64_t T) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(T, 1)); }

// The forward's value checks, aggregation and metrics from its per-row results.
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> finish_forward(const LossBatch<scalar_t>& batch,
                                                  const LossOptions& opt,
                                                  const std::vector<RowStats>& rows) {
  const int64_t B = batch.B, T = batch.T;
  // value checks, raised in the reference's order: the pass only flags rows that may hold a
  // NaN or inf; then each input is checked on its own
  uint32_t bad = 0;
  for (const RowStats& s : rows) bad |= s.bad;
  check_values(batch, bad);

  // aggregation (reference.aggregate) and metrics, in fp64 and row order
  double total_mask = 0, total_loss = 0, clipped = 0, ratio = 0, kl = 0, lifted = 0, dual = 0;
  double ppo_kl = 0;
  double seq_sum = 0, nonempty = 0;
  const double norm = opt.norm_const.value_or(static_cast<double>(std::max<int64_t>(T, 1)));
  for (const RowStats& s : rows) {
    total_mask += s.mask;
    total_loss += s.loss;
    clipped += s.clipped;
    ratio += s.ratio;
    kl += s.kl;
    lifted += s.lifted;
    dual += s.dual;
    ppo_kl += s.ppo_kl;
    if (s.mask > 0) {
      nonempty += 1;
      switch (opt.agg) {
        case Agg::kSeqMeanTokenMean: seq_sum += s.loss / std::max(s.mask, 1.0); break;
        case Agg::kSeqMeanTokenSum: seq_sum += s.loss; break;
        case Agg::kSeqMeanTokenSumNorm: seq_sum += s.loss / norm; break;
        case Agg::kTokenMean:
        case Agg::kTokenSum: break;
      }
    }
  }
  double loss;
  if (opt.agg == Agg::kTokenMean) {
    loss = total_loss / opt.global_count.value_or(std::max(total_mask, 1.0));
  } else if (opt.agg == Agg::kTokenSum) {
    loss = total_loss / opt.global_count.value_or(1.0);
  } else {
    loss = seq_sum / opt.global_count.value_or(std::max(nonempty, 1.0));
  }
  const double count = std::max(total_mask, 1.0);
  at::Tensor metrics = at::empty({6}, batch.logp_t.options().dtype(at::kFloat));
  float* mp = metrics.data_ptr<float>();
  mp[0] = static_cast<float>(clipped / count);
  mp[1] = static_cast<float>(ratio / count);
  mp[2] = static_cast<float>(kl / count);
  mp[3] = static_cast<float>(lifted / count);
  mp[4] = static_cast<float>(dual / count);
  mp[5] = static_cast<float>(ppo_kl / count);
  return {at::scalar_tensor(loss, batch.logp_t.options()), metrics};
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> policy_loss_impl(const LossBatch<scalar_t>& batch,
                                                    const LossOptions& opt) {
  const int64_t B = batch.B, T = batch.T;
  const Consts<scalar_t> consts = make_consts<scalar_t>(opt);
  const ForwardRowFn<scalar_t> forward_row =
      row_kernels<scalar_t>(opt, batch.ref != nullptr).forward;
  std::vector<RowStats> rows(B);
  at::parallel_for(0, B, row_grain(T), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) rows[i] = forward_row(batch.row(i), consts);
  });
  return finish_forward(batch, opt, rows);
}

// d loss / d L[i, t] of each row (before the mask), from a pass over the row mask counts
// (reference.aggregate's weights).
struct AggWeights {
  std::vector<double> row_mask;
  double total_mask = 0.0, nonempty = 0.0, norm = 1.0, seq_denom = 1.0;
  Agg agg = Agg::kTokenMean;
  std::optional<double> global_count;

  template <typename scalar_t>
  AggWeights(const LossBatch<scalar_t>& batch, const LossOptions& opt)
      : row_mask(batch.B, 0.0), agg(opt.agg), global_count(opt.global_count) {
    const int64_t B = batch.B, T = batch.T;
    at::parallel_for(0, B, row_grain(T), [&](int64_t lo, int64_t hi) {
      const auto mask_sum = cpu_has_avx2() ? &mask_sum_avx2<scalar_t> : &mask_sum_generic<scalar_t>;
      for (int64_t i = lo; i < hi; ++i) {
        row_mask[i] = mask_sum(batch.mask_f != nullptr ? batch.mask_f + i * T : nullptr,
                               batch.mask_b != nullptr ? batch.mask_b + i * T : nullptr, T);
      }
    });
    for (int64_t i = 0; i < B; ++i) {
      total_mask += row_mask[i];
      nonempty += row_mask[i] > 0 ? 1.0 : 0.0;
    }
    norm = opt.norm_const.value_or(static_cast<double>(std::max<int64_t>(T, 1)));
    seq_denom = opt.global_count.value_or(std::max(nonempty, 1.0));
  }

  double operator()(int64_t i) const {
    switch (agg) {
      case Agg::kTokenMean: return 1.0 / global_count.value_or(std::max(total_mask, 1.0));
      case Agg::kTokenSum: return 1.0 / global_count.value_or(1.0);
      case Agg::kSeqMeanTokenMean:
        return row_mask[i] > 0 ? 1.0 / (std::max(row_mask[i], 1.0) * seq_denom) : 0.0;
      case Agg::kSeqMeanTokenSum: return row_mask[i] > 0 ? 1.0 / seq_denom : 0.0;
      case Agg::kSeqMeanTokenSumNorm: return row_mask[i] > 0 ? 1.0 / (norm * seq_denom) : 0.0;
    }
    return 0.0;
  }
};

// The setup of a token pass that writes d loss / d logp: the aggregation weights (pass 1, over
// the row mask counts), the knobs in the kernel's dtype, the row kernels of the variant and the
// gradient, a new (B, T) tensor.
template <typename scalar_t>
struct GradPass {
  AggWeights row_weight;
  Consts<scalar_t> consts;
  RowKernels<scalar_t> kernels;
  at::Tensor grad;
  scalar_t* g;

  GradPass(const LossBatch<scalar_t>& batch, const LossOptions& opt)
      : row_weight(batch, opt),
        consts(make_consts<scalar_t>(opt)),
        kernels(row_kernels<scalar_t>(opt, batch.ref != nullptr)),
        grad(at::empty({batch.B, batch.T}, batch.logp_t.options())),
        g(grad.data_ptr<scalar_t>()) {}
};

template <typename scalar_t>
at::Tensor policy_loss_backward_impl(const LossBatch<scalar_t>& batch, const LossOptions& opt,
                                     double grad_loss) {
  const int64_t B = batch.B, T = batch.T;
  const GradPass<scalar_t> p(batch, opt);
  // pass 2: the token gradients
  const BackwardRowFn<scalar_t> backward_row = p.kernels.backward;
  std::atomic<uint32_t> flags{0};
  at::parallel_for(0, B, row_grain(T), [&](int64_t lo, int64_t hi) {
    uint32_t bad = 0;
    for (int64_t i = lo; i < hi; ++i) {
      bad |= backward_row(batch.row(i), p.consts,
                          static_cast<scalar_t>(grad_loss * p.row_weight(i)), p.g + i * T);
    }
    flags.fetch_or(bad, std::memory_order_relaxed);
  });
  check_values(batch, flags.load());
  return p.grad;
}

// Loss, metrics and d loss / d logp (for d loss = 1): the mask-count pass for the aggregation
// weights, then one token pass computing both (GSPO: its row pass first, per row). The value
// checks and the aggregation are the forward's; the gradient equals the backward's for
// grad_loss = 1 bit for bit.
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> policy_loss_with_grad_impl(
    const LossBatch<scalar_t>& batch, const LossOptions& opt) {
  const int64_t B = batch.B, T = batch.T;
  const GradPass<scalar_t> p(batch, opt);
  const ForwardGradRowFn<scalar_t> forward_grad_row = p.kernels.forward_grad;
  std::vector<RowStats> rows(B);
  at::parallel_for(0, B, row_grain(T), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      rows[i] = forward_grad_row(batch.row(i), p.consts, static_cast<scalar_t>(p.row_weight(i)),
                                 p.g + i * T);
    }
  });
  auto [loss, metrics] = finish_forward(batch, opt, rows);
  return {loss, metrics, p.grad};
}

// ---------------------------------------------------------------------------------------------
// the CPU kernels of the ops (boxed: they read their arguments by name, LossArgs)
// ---------------------------------------------------------------------------------------------

// Runs kernel(batch, args, opt) in the dtype of logp on the arguments of a call on the stack
// and replaces them by its results.
template <typename Kernel>
void run_loss_kernel(const c10::OperatorHandle& op, torch::jit::Stack* stack, Kernel kernel) {
  const LossArgs args(op, *stack);
  const LossOptions opt = check_policy_loss_args(args);
  args.return_on(
      stack, AT_DISPATCH_FLOATING_TYPES(args.tensor("logp").scalar_type(), "tapo_policy_loss", [&] {
        return kernel(LossBatch<scalar_t>(args), args, opt);
      }));
}

void policy_loss_cpu(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  run_loss_kernel(op, stack, [](const auto& batch, const LossArgs&, const LossOptions& opt) {
    return policy_loss_impl(batch, opt);
  });
}

// The structure is re-checked here, and the values with the same flags as the forward (a
// direct call of the backward gets the same errors).
void policy_loss_backward_cpu(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  run_loss_kernel(op, stack, [](const auto& batch, const LossArgs& args, const LossOptions& opt) {
    const at::Tensor& grad_loss = args.tensor("grad_loss");
    TORCH_CHECK_VALUE(grad_loss.numel() == 1, "grad_loss must have one element, got shape ",
                      shape_repr(grad_loss.sizes()));
    return policy_loss_backward_impl(batch, opt, grad_loss.item<double>());
  });
}

void policy_loss_with_grad_cpu(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  run_loss_kernel(op, stack, [](const auto& batch, const LossArgs&, const LossOptions& opt) {
    return policy_loss_with_grad_impl(batch, opt);
  });
}

// ---------------------------------------------------------------------------------------------
// autograd of tapo::policy_loss on CPU tensors
// ---------------------------------------------------------------------------------------------
//
// Registered at AutogradCPU, which takes precedence over the Python autograd kernel registered
// at the Autograd alias (that one stays for CUDA and for the reference build). When logp needs
// a gradient the forward runs tapo::policy_loss_with_grad (value and gradient in one token
// pass) and saves only d loss / d logp; the backward scales it by the incoming gradient.
// Otherwise the op runs below autograd as tapo::policy_loss. Both calls go through the
// dispatcher, so tracing (FakeTensor, torch.compile) records the ops, not this kernel. The
// kernel is boxed: it passes the arguments on as they are (tapo::policy_loss_with_grad takes
// the same ones), reading only logp.

const c10::OperatorHandle& policy_loss_with_grad_op() {
  static const c10::OperatorHandle op = [] {
    auto& dispatcher = c10::Dispatcher::singleton();
    c10::OperatorHandle with_grad = dispatcher.findSchemaOrThrow("tapo::policy_loss_with_grad", "");
    TORCH_INTERNAL_ASSERT(
        with_grad.schema().arguments() ==
            dispatcher.findSchemaOrThrow("tapo::policy_loss", "").schema().arguments(),
        "tapo::policy_loss_with_grad must take the arguments of tapo::policy_loss");
    return with_grad;
  }();
  return op;
}

// forward(logp, args): args are all the arguments of tapo::policy_loss (logp among them), a
// non-variable argument to autograd, so logp is the only input of the graph.
class PolicyLossFunction : public torch::autograd::Function<PolicyLossFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& /*logp*/,
                                                torch::jit::Stack args) {
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      policy_loss_with_grad_op().callBoxed(&args);
    }
    // args: loss, metrics, d loss / d logp
    ctx->save_for_backward({args[2].toTensor()});
    ctx->mark_non_differentiable({args[1].toTensor()});
    return {args[0].toTensor(), args[1].toTensor()};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    torch::autograd::variable_list grads(2);  // logp, args (none)
    const at::Tensor& grad_loss = grad_outputs[0];
    if (grad_loss.defined() && ctx->needs_input_grad(0)) {
      grads[0] = grad_loss * ctx->get_saved_variables()[0];
    }
    return grads;
  }
};

void policy_loss_autograd_cpu(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const LossArgs args(op, *stack);
  const at::Tensor logp = args.tensor("logp");
  if (at::GradMode::is_enabled() && logp.requires_grad()) {
    torch::jit::Stack inputs(std::make_move_iterator(stack->end() - args.size()),
                             std::make_move_iterator(stack->end()));
    torch::autograd::variable_list out = PolicyLossFunction::apply(logp, std::move(inputs));
    args.return_on(stack, std::make_tuple(std::move(out[0]), std::move(out[1])));
    return;
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  op.callBoxed(stack);
}

}  // namespace

TORCH_LIBRARY_IMPL(tapo, CPU, m) {
  m.impl("policy_loss", torch::CppFunction::makeFromBoxedFunction<&policy_loss_cpu>());
  m.impl("policy_loss_backward",
         torch::CppFunction::makeFromBoxedFunction<&policy_loss_backward_cpu>());
  m.impl("policy_loss_with_grad",
         torch::CppFunction::makeFromBoxedFunction<&policy_loss_with_grad_cpu>());
}

TORCH_LIBRARY_IMPL(tapo, AutogradCPU, m) {
  m.impl("policy_loss", torch::CppFunction::makeFromBoxedFunction<&policy_loss_autograd_cpu>());
}

}  // namespace tapo
