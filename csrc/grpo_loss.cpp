// Glue of the fused GRPO loss on the CPU: argument checks (ValueError naming the
// argument), dtype dispatch, OpenMP over rows. The arithmetic is in mtgrpo/grpo_loss.h.
// No FMA contraction: GCC contracts a * b + c into one fused multiply-add where the target
// has FMA (the AVX2 and AVX-512 versions, grpo_loss_avx2.cpp / grpo_loss_avx512.cpp) but not in the baseline x86-64
// version, so the same source rounded differently per ISA (token-level losses differed in the last bits between avx2
// and baseline). Without contraction every version computes the same bits.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif
#include "grpo_loss_isa.h"  // the header also emits the float kernel for the baseline target (mtgrpo::vec)

// The float kernel for AVX-512 and AVX2+FMA lives in grpo_loss_avx512.cpp / grpo_loss_avx2.cpp
// (whole kernel compiled under the target, see the header), chosen once at load time from the
// CPU's features: one build runs on any x86-64. Elsewhere (or with Clang) only the baseline
// version exists.

#include <cstdlib>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "common.h"

namespace py = pybind11;
using namespace mtgrpo;

namespace {

struct RowsArgs {
  const void* lp;
  const void* old;
  const uint8_t* mk;
  const void* ref;
  const void* roll;      // [N, T] rollout log-probs (token-level IS correction) or null
  const void* adv_tok;   // [N, T] token advantages (compute dtype) or null
  const double* a_row;   // per-row advantage (or per-row multiplier of token advantages)
  const double* w_row;   // per-row aggregation weight
  const double* rc_row;  // per-row constant of the form (1 where it has none)
  const double* is_row;  // per-row sequence-level IS weight (1: none)
  int64_t T;
  DType dt;
  int kl;
  int form;
  bool tok_adv;
  bool seq;
  const LossParams* p;
  void* grad;
  double* rowstats;
};

template <typename In, typename C, int KL, bool TOK, bool SEQ, int F>
inline __attribute__((always_inline)) void rows_impl(const RowsArgs& A, int64_t r0, int64_t r1) {
  const int64_t T = A.T;
  for (int64_t i = r0; i < r1; ++i) {
    const size_t off = static_cast<size_t>(i) * static_cast<size_t>(T);
    grpo_row<In, C, KL, TOK, SEQ, F>(
        static_cast<const In*>(A.lp) + off, static_cast<const In*>(A.old) + off, A.mk + off,
        A.ref ? static_cast<const In*>(A.ref) + off : nullptr, A.roll ? static_cast<const In*>(A.roll) + off : nullptr,
        TOK ? static_cast<const C*>(A.adv_tok) + off : nullptr, static_cast<C>(A.a_row[i]), static_cast<C>(A.rc_row[i]),
        static_cast<C>(A.is_row[i]), T, *A.p, static_cast<C>(A.w_row[i]), static_cast<C*>(A.grad) + off,
        A.rowstats + i * kRowStats);
  }
}

// The form, chosen once per call outside the token loop (see float_items in the header).
template <typename In, typename C, int KL, bool TOK>
inline __attribute__((always_inline)) void rows_form(const RowsArgs& A, int64_t r0, int64_t r1) {
  switch (A.form) {
    case kFormCispo:
      if (A.seq)
        rows_impl<In, C, KL, TOK, true, kFormCispo>(A, r0, r1);
      else
        rows_impl<In, C, KL, TOK, false, kFormCispo>(A, r0, r1);
      break;
    case kFormSapo:
      rows_impl<In, C, KL, TOK, false, kFormSapo>(A, r0, r1);
      break;
    case kFormLogpWeighted:
      rows_impl<In, C, KL, TOK, false, kFormLogpWeighted>(A, r0, r1);
      break;
    case kFormGeoMean:
      rows_impl<In, C, KL, TOK, false, kFormGeoMean>(A, r0, r1);
      break;
    default:
      if (A.seq)
        rows_impl<In, C, KL, TOK, true, kFormVanilla>(A, r0, r1);
      else
        rows_impl<In, C, KL, TOK, false, kFormVanilla>(A, r0, r1);
      break;
  }
}

template <typename In, typename C, int KL>
inline __attribute__((always_inline)) void rows_kl(const RowsArgs& A, int64_t r0, int64_t r1) {
  if (A.tok_adv)
    rows_form<In, C, KL, true>(A, r0, r1);
  else
    rows_form<In, C, KL, false>(A, r0, r1);
}

template <typename In, typename C>
inline __attribute__((always_inline)) void rows_in(const RowsArgs& A, int64_t r0, int64_t r1) {
  switch (A.kl) {
    case 1:
      rows_kl<In, C, 1>(A, r0, r1);
      break;
    case 2:
      rows_kl<In, C, 2>(A, r0, r1);
      break;
    case 3:
      rows_kl<In, C, 3>(A, r0, r1);
      break;
    default:
      rows_kl<In, C, 0>(A, r0, r1);
      break;
  }
}

// ---- float kernel selection ------------------------------------------------------------
// Best version for this CPU; MTGRPO_CPU_ISA=avx512|avx2|baseline lowers the choice (tests,
// benchmarks), never above what the CPU supports.
FloatKernels pick_float_kernels() {
  const char* env = std::getenv("MTGRPO_CPU_ISA");
  const std::string want = env ? env : "";
#ifdef MTGRPO_X86_DISPATCH
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
                    __builtin_cpu_supports("bmi2");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  if (avx512 && (want.empty() || want == "avx512")) return float_kernels_avx512();
  if (avx2 && (want.empty() || want == "avx512" || want == "avx2")) return float_kernels_avx2();
#endif
  return {vec::float_items, vec::float_seq_items, vec::float_coef_items, "baseline"};
}

const FloatKernels& float_kernels() {
  static const FloatKernels k = pick_float_kernels();
  return k;
}

void rows_double(const RowsArgs& A, int64_t r0, int64_t r1) {
  rows_in<double, double>(A, r0, r1);
}

DType parse_dtype(const std::string& s) {
  if (s == "float32") return DType::F32;
  if (s == "float64") return DType::F64;
  if (s == "bfloat16") return DType::BF16;
  if (s == "float16") return DType::F16;
  fail("dtype: expected 'float32', 'float64', 'bfloat16' or 'float16', got '", s, "'");
}

size_t itemsize(DType d) {
  return d == DType::F64 ? 8 : (d == DType::F32 ? 4 : 2);
}

ArrayView check_2d(const py::handle& a, const char* name, int64_t N, int64_t T, size_t item, bool out = false) {
  auto b = checked_view(a, name, 2, out);
  if (b.shape[0] != N || b.shape[1] != T)
    fail(name, ": expected shape [", N, ", ", T, "], got [", b.shape[0], ", ", b.shape[1], "]");
  if (static_cast<size_t>(b.itemsize) != item) fail(name, ": expected ", item, "-byte elements, got ", b.itemsize);
  return b;
}

ArrayView check_1d(const py::handle& a, const char* name, int64_t N, size_t item, bool out = false) {
  auto b = checked_view(a, name, 1, out);
  if (b.shape[0] != N) fail(name, ": expected shape [", N, "], got [", b.shape[0], "]");
  if (static_cast<size_t>(b.itemsize) != item) fail(name, ": expected ", item, "-byte elements, got ", b.itemsize);
  return b;
}

template <typename R>
void check_finite(const R* v, int64_t n, const char* name) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(static_cast<double>(v[i])))
      fail(name, ": non-finite value ", static_cast<double>(v[i]), " at index ", i);
}

// Group advantages alone (backend "cpu" of group_advantages).
void group_advantages_cpu(const py::handle& rewards, const py::handle& group_ids, const py::handle& adv_out,
                          const py::handle& row_flat, const py::handle& row_leader, const std::string& scale,
                          double eps, bool unbiased, bool singleton_raw, double clip) {
  auto rb = checked_view(rewards, "rewards", 1);
  const int64_t N = rb.shape[0];
  auto gb = check_1d(group_ids, "group_ids", N, 8);
  auto ab = check_1d(adv_out, "adv_out", N, 8, true);
  auto fb = check_1d(row_flat, "row_flat", N, 1, true);
  auto lb = check_1d(row_leader, "row_leader", N, 1, true);
  AdvParams ap;
  if (scale == "group")
    ap.scale = AdvScale::Group;
  else if (scale == "batch")
    ap.scale = AdvScale::Batch;
  else if (scale == "none")
    ap.scale = AdvScale::None;
  else
    fail("scale: expected 'group', 'batch' or 'none', got '", scale, "'");
  if (!(eps >= 0.0) || !std::isfinite(eps)) fail("eps: expected a finite value >= 0, got ", eps);
  if (!std::isfinite(clip)) fail("clip: expected a finite value (<= 0 for no clip), got ", clip);
  ap.eps = eps;
  ap.unbiased = unbiased;
  ap.singleton_raw = singleton_raw;
  ap.clip = clip;
  const auto* gid = static_cast<const int64_t*>(gb.ptr);
  auto* adv = static_cast<double*>(ab.ptr);
  auto* fl = static_cast<uint8_t*>(fb.ptr);
  auto* ld = static_cast<uint8_t*>(lb.ptr);
  if (rb.itemsize == 8 && rb.kind == 'f') {
    check_finite(static_cast<const double*>(rb.ptr), N, "rewards");
    py::gil_scoped_release nogil;
    group_advantages(static_cast<const double*>(rb.ptr), gid, N, ap, adv, fl, ld);
  } else if (rb.itemsize == 4 && rb.kind == 'f') {
    check_finite(static_cast<const float*>(rb.ptr), N, "rewards");
    py::gil_scoped_release nogil;
    group_advantages(static_cast<const float*>(rb.ptr), gid, N, ap, adv, fl, ld);
  } else {
    fail("rewards: expected float32 or float64, got dtype kind '", rb.kind, "' of ", rb.itemsize, " bytes");
  }
}

// Fused forward + backward. Inputs are C-contiguous arrays; outputs are preallocated:
// grad[N, T] (the input dtype: bf16 / fp16 gradients are rounded once, in the kernel), rowstats[N, kRowStats]
// float64, adv_out[N] float64, row_flat[N] / row_leader[N] uint8 (filled when rewards are given), and
// optionally loss_out (the sum of the rows' loss shares, in row order, rounded once to the compute dtype).
// Returns whether every row statistic is finite (false: a NaN at an unmasked token, or a non-finite
// loss term; the caller raises, naming the inputs). Given advantages, rewards and seq_weights are
// checked finite here, in the pass that reads them (ValueError naming the argument).
bool grpo_loss_fwd_bwd_cpu(py::object logprobs, py::object old_logprobs, py::object mask, py::object advantages,
                           py::object rewards, py::object group_ids, py::object seq_weights, py::object ref_logprobs,
                           const std::string& dtype, py::object grad, py::array rowstats, py::array adv_out,
                           py::array row_flat, py::array row_leader, py::object rollout_logprobs, py::object row_coef,
                           py::object is_row,
                           // advantage options (fused path)
                           const std::string& adv_scale, double adv_eps, bool adv_unbiased, bool adv_singleton_raw,
                           double adv_clip,
                           // loss options
                           double eps_low, double eps_high, double dual_clip, double ratio_cap, double kl_coef,
                           int kl_estimator, bool seq_level, int loss_agg, double num_tokens, double norm_length,
                           bool seq_count_all,
                           // policy-loss form and importance-sampling correction
                           int form, double tau_pos, double tau_neg, int is_mode, double is_lo, double is_hi,
                           // optional: the loss (0-d or [1] array of the compute dtype) written here
                           py::object loss_out) {
  const DType dt = parse_dtype(dtype);
  const size_t item = itemsize(dt);
  const size_t citem = dt == DType::F64 ? 8 : 4;
  auto lb = checked_view(logprobs, "logprobs", 2);
  const int64_t N = lb.shape[0], T = lb.shape[1];
  if (static_cast<size_t>(lb.itemsize) != item) fail("logprobs: expected ", item, "-byte elements for ", dtype);
  auto ob = check_2d(old_logprobs, "old_logprobs", N, T, item);
  auto mb = check_2d(mask, "mask", N, T, 1);
  auto gb = check_2d(grad, "grad", N, T, item, true);  // the input dtype: written once, never cast
  auto sb = checked_view(rowstats, "rowstats", 2, true);
  if (sb.shape[0] != N || sb.shape[1] != kRowStats || sb.itemsize != 8)
    fail("rowstats: expected float64 [", N, ", ", static_cast<int>(kRowStats), "]");
  auto ab = check_1d(adv_out, "adv_out", N, 8, true);
  auto fb = check_1d(row_flat, "row_flat", N, 1, true);
  auto ldb = check_1d(row_leader, "row_leader", N, 1, true);
  void* loss_ptr = nullptr;
  if (!loss_out.is_none()) {
    auto a = loss_out.cast<py::array>();
    if (!a.writeable()) fail("loss_out: expected a writable array");
    ArrayView b{a.mutable_data(), {1, 1}, a.itemsize(), a.size(), 'f'};
    if (b.size != 1 || static_cast<size_t>(b.itemsize) != citem)
      fail("loss_out: expected one ", citem, "-byte element (the compute dtype), got ", b.size, " of ", b.itemsize);
    loss_ptr = b.ptr;
  }

  if (!(eps_low >= 0.0 && eps_low < 1.0)) fail("clip_eps_low: expected a value in [0, 1), got ", eps_low);
  if (!(eps_high >= 0.0) || !std::isfinite(eps_high))
    fail("clip_eps_high: expected a finite value >= 0, got ", eps_high);
  if (!(dual_clip > 1.0)) fail("dual_clip: expected a value > 1 (inf for off), got ", dual_clip);
  if (!(ratio_cap > 0.0)) fail("ratio_cap: expected a value > 0 (inf for off), got ", ratio_cap);
  if (!std::isfinite(kl_coef)) fail("kl_coef: expected a finite value, got ", kl_coef);
  if (kl_estimator < 0 || kl_estimator > 3) fail("kl_estimator: expected 0..3, got ", kl_estimator);
  if (loss_agg < 0 || loss_agg > 4) fail("loss_agg: expected 0..4, got ", loss_agg);
  if (form < 0 || form >= kNumForms) fail("form: expected 0..", kNumForms - 1, ", got ", form);
  if (seq_level && form != kFormVanilla && form != kFormCispo)
    fail("importance_level: the sequence ratio exists for the 'vanilla' and 'cispo' forms only, got form ", form);
  if (!(tau_pos > 0.0) || !std::isfinite(tau_pos)) fail("tau_pos: expected a finite value > 0, got ", tau_pos);
  if (!(tau_neg > 0.0) || !std::isfinite(tau_neg)) fail("tau_neg: expected a finite value > 0, got ", tau_neg);
  if (is_mode < 0 || is_mode > 2) fail("is_mode: expected 0 (off), 1 (truncate) or 2 (mask), got ", is_mode);
  if (!(is_lo >= 0.0) || !std::isfinite(is_lo)) fail("is_lo: expected a finite value >= 0, got ", is_lo);
  if (!(is_hi >= is_lo)) fail("is_hi: expected a value >= is_lo (inf for none), got ", is_hi);
  if (!(num_tokens >= 0.0) || !std::isfinite(num_tokens))
    fail("num_tokens: expected a finite value >= 0, got ", num_tokens);
  if (!(norm_length >= 0.0) || !std::isfinite(norm_length))
    fail("norm_length: expected a finite value >= 0, got ", norm_length);

  LossParams p;
  p.eps_low = eps_low;
  p.eps_high = eps_high;
  p.dual_clip = dual_clip;
  p.ratio_cap = ratio_cap;
  p.kl_coef = kl_coef;
  p.kl_estimator = kl_estimator;
  p.seq_level = seq_level;
  p.agg = static_cast<LossAgg>(loss_agg);
  p.num_tokens = num_tokens;
  p.norm_length = norm_length;
  p.seq_count_all = seq_count_all;
  p.form = form;
  p.tau_pos = tau_pos;
  p.tau_neg = tau_neg;
  p.is_mode = is_mode;
  p.is_lo = is_lo;
  p.is_hi = is_hi;

  const void* ref_ptr = nullptr;
  if (kl_estimator > 0) {
    if (ref_logprobs.is_none()) fail("ref_logprobs: required when kl_estimator > 0");
    auto rb = check_2d(ref_logprobs, "ref_logprobs", N, T, item);
    ref_ptr = rb.ptr;
  }
  const void* roll_ptr = nullptr;
  if (is_mode != kIsOff) {
    if (rollout_logprobs.is_none()) fail("rollout_logprobs: required with a token-level IS correction (is_mode > 0)");
    auto rb = check_2d(rollout_logprobs, "rollout_logprobs", N, T, item);
    roll_ptr = rb.ptr;
  }
  // Per-row constants: the form's (GMPO's ratio, VESPO's weight) and the sequence IS weight.
  std::vector<double> rc(static_cast<size_t>(N), 1.0), isw(static_cast<size_t>(N), 1.0);
  auto row_vec = [&](const py::object& o, const char* name, std::vector<double>& out) {
    if (o.is_none()) return;
    auto b = check_1d(o, name, N, 8);
    const auto* v = static_cast<const double*>(b.ptr);
    for (int64_t i = 0; i < N; ++i) {
      if (!std::isfinite(v[i])) fail(name, ": non-finite value at index ", i);
      out[static_cast<size_t>(i)] = v[i];
    }
  };
  row_vec(row_coef, "row_coef", rc);
  row_vec(is_row, "is_row", isw);

  // Advantages: given ([N] or [N, T], compute dtype) or computed from rewards + group_ids.
  auto* adv = static_cast<double*>(ab.ptr);
  const void* adv_tok = nullptr;
  bool tok_adv = false;
  if (!advantages.is_none()) {
    if (!rewards.is_none() || !group_ids.is_none())
      fail("advantages: give either advantages or rewards + group_ids, not both");
    const py::handle& a = advantages;
    if (ndim_of(a) == 2) {
      auto tb = check_2d(a, "advantages", N, T, citem);
      if (citem == 8)
        check_finite(static_cast<const double*>(tb.ptr), N * T, "advantages");
      else
        check_finite(static_cast<const float*>(tb.ptr), N * T, "advantages");
      adv_tok = tb.ptr;
      tok_adv = true;
      for (int64_t i = 0; i < N; ++i) adv[i] = 1.0;
    } else {
      auto vb = check_1d(a, "advantages", N, citem);
      if (citem == 8)
        check_finite(static_cast<const double*>(vb.ptr), N, "advantages");
      else
        check_finite(static_cast<const float*>(vb.ptr), N, "advantages");
      for (int64_t i = 0; i < N; ++i)
        adv[i] = citem == 8 ? static_cast<const double*>(vb.ptr)[i] : static_cast<const float*>(vb.ptr)[i];
    }
    std::memset(fb.ptr, 0, static_cast<size_t>(N));
    std::memset(ldb.ptr, 0, static_cast<size_t>(N));
  } else {
    if (rewards.is_none() || group_ids.is_none()) fail("rewards: advantages=None needs rewards and group_ids");
    group_advantages_cpu(rewards, group_ids, adv_out, row_flat, row_leader, adv_scale, adv_eps, adv_unbiased,
                         adv_singleton_raw, adv_clip);
  }
  if (!seq_weights.is_none()) {
    auto wb = check_1d(seq_weights, "seq_weights", N, citem);
    for (int64_t i = 0; i < N; ++i) {
      const double w = citem == 8 ? static_cast<const double*>(wb.ptr)[i] : static_cast<const float*>(wb.ptr)[i];
      if (!std::isfinite(w)) fail("seq_weights: non-finite value at index ", i);
      adv[i] *= w;
    }
  }

  const auto* mk = static_cast<const uint8_t*>(mb.ptr);
  auto* stats = static_cast<double*>(sb.ptr);
  std::vector<double> w_row(static_cast<size_t>(N));
  {
    py::gil_scoped_release nogil;
    // Work items of the float kernel: rows cut into spans of kSeg tokens (a fixed size, so
    // the result does not depend on the thread count); short rows are one item, 4 at a time.
    constexpr int64_t kSeg = 8192;
    const bool f64 = dt == DType::F64;
    const int64_t nseg = (T + kSeg - 1) / kSeg;
    const int64_t items = N * nseg;
    const int64_t chunk = nseg > 1 ? 1 : 4;
    std::vector<double> row_tok(static_cast<size_t>(N));
    std::vector<double> part(!f64 && nseg > 1 ? static_cast<size_t>(items) * kRowStats : 0);
    std::vector<double> seq_part(!f64 && seq_level ? static_cast<size_t>(items) * 2 : 0);
    std::vector<float> r_seq(!f64 && seq_level ? static_cast<size_t>(N) : 0);
    const bool seq_tok = !f64 && seq_level && tok_adv;  // GSPO with token advantages: second pre-pass
    std::vector<double> coef_part(seq_tok ? static_cast<size_t>(items) : 0);
    std::vector<float> seq_coef(seq_tok ? static_cast<size_t>(N) : 0);
    const RowsArgs A{lb.ptr,       ob.ptr,    mk,         ref_ptr, roll_ptr, adv_tok,      adv,
                     w_row.data(), rc.data(), isw.data(), T,       dt,       kl_estimator, form,
                     tok_adv,      seq_level, &p,         gb.ptr,  stats};
    const FloatJob J{dt,
                     lb.ptr,
                     ob.ptr,
                     mk,
                     ref_ptr,
                     roll_ptr,
                     static_cast<const float*>(adv_tok),
                     adv,
                     w_row.data(),
                     rc.data(),
                     isw.data(),
                     r_seq.data(),
                     seq_coef.data(),
                     T,
                     kSeg,
                     nseg,
                     kl_estimator,
                     form,
                     tok_adv,
                     seq_level,
                     &p,
                     gb.ptr,
                     nseg > 1 ? part.data() : stats,
                     seq_part.data(),
                     coef_part.data()};
    const FloatKernels& K = float_kernels();
    // One parallel region for all passes: waking the worker threads once per call, not once
    // per pass, matters on a busy machine (each wake-up can wait for a scheduler tick).
    // Below kParallelMinTokens the region has one thread (no wake-up at all): a 4 x 8 call
    // took a median 11 ms with 2 threads on the loaded 2-core machine (issue 25), since its
    // second thread waited for a busy core; one thread does 16K tokens in ~50-100 us.
    constexpr int64_t kParallelMinTokens = 16384;
#pragma omp parallel if (N * T >= kParallelMinTokens)
    {
      // Pass 1: tokens per row (1 byte per token), then the rows' aggregation weights.
#pragma omp for schedule(static)
      for (int64_t i = 0; i < N; ++i) {
        const uint8_t* m = mk + static_cast<size_t>(i) * static_cast<size_t>(T);
        int64_t c = 0;
#pragma omp simd reduction(+ : c)
        for (int64_t t = 0; t < T; ++t) c += m[t] != 0;
        row_tok[i] = static_cast<double>(c);
      }
#pragma omp single
      {
        double total = 0.0, nonempty = 0.0;
        for (int64_t i = 0; i < N; ++i) {
          total += row_tok[i];
          nonempty += row_tok[i] > 0 ? 1.0 : 0.0;
        }
        const double n_seq = seq_count_all ? static_cast<double>(N) : nonempty;
        for (int64_t i = 0; i < N; ++i) w_row[i] = row_weight(p, row_tok[i], total, n_seq, T);
      }
      // Pass 2: the fused forward + backward.
      if (f64) {  // the correctness path: scalar, whole rows
        constexpr int64_t kChunk = 4;
#pragma omp for schedule(dynamic, 1)
        for (int64_t r0 = 0; r0 < N; r0 += kChunk) rows_double(A, r0, std::min(N, r0 + kChunk));
      } else {
        if (seq_level) {  // GSPO: the row's mean log-ratio first
#pragma omp for schedule(dynamic, 1)
          for (int64_t k0 = 0; k0 < items; k0 += chunk) K.seq_items(J, k0, std::min(items, k0 + chunk));
#pragma omp single
          for (int64_t i = 0; i < N; ++i) {
            double s = 0.0, c = 0.0;
            for (int64_t j = 0; j < nseg; ++j) {
              s += seq_part[2 * (i * nseg + j)];
              c += seq_part[2 * (i * nseg + j) + 1];
            }
            r_seq[i] = vexp(static_cast<float>(s / std::max(c, 1.0)));
          }
          if (seq_tok) {  // the row's mean d loss / d r at its sequence ratio (spans folded in order)
#pragma omp for schedule(dynamic, 1)
            for (int64_t k0 = 0; k0 < items; k0 += chunk) K.coef_items(J, k0, std::min(items, k0 + chunk));
#pragma omp single
            for (int64_t i = 0; i < N; ++i) {
              double s = 0.0, c = 0.0;
              for (int64_t j = 0; j < nseg; ++j) {
                s += coef_part[i * nseg + j];
                c += seq_part[2 * (i * nseg + j) + 1];
              }
              seq_coef[i] = static_cast<float>(s / std::max(c, 1.0));
            }
          }
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t k0 = 0; k0 < items; k0 += chunk) K.items(J, k0, std::min(items, k0 + chunk));
      }
    }
    if (!f64) {  // rows' statistics: spans folded in order, the loss share weighted
      for (int64_t i = 0; i < N; ++i) {
        double* out = stats + i * kRowStats;
        if (nseg > 1) {
          for (int c = 0; c < kRowStats; ++c) {
            double s = 0.0;
            for (int64_t j = 0; j < nseg; ++j) s += part[static_cast<size_t>(i * nseg + j) * kRowStats + c];
            out[c] = s;
          }
        }
        out[kLossContrib] *= static_cast<double>(static_cast<float>(w_row[i]));
      }
    }
  }
  bool finite = true;
  double loss = 0.0;
  for (int64_t i = 0; i < N; ++i) {
    const double* out = stats + i * kRowStats;
    for (int c = 0; c < kRowStats; ++c) finite = finite && std::isfinite(out[c]);
    loss += out[kLossContrib];
  }
  if (loss_ptr != nullptr) {
    if (citem == 8)
      *static_cast<double*>(loss_ptr) = loss;
    else
      *static_cast<float*>(loss_ptr) = static_cast<float>(loss);
  }
  return finite;
}

}  // namespace

void register_grpo_loss(py::module_& m) {
  m.attr("GRPO_ROW_STATS") = static_cast<int>(kRowStats);
  m.def(
      "grpo_loss_cpu_isa", [] { return std::string(float_kernels().isa); },
      "Instruction set of the float GRPO loss kernel picked for this CPU: 'avx512', 'avx2' or 'baseline'.");
  m.def("group_advantages_cpu", &group_advantages_cpu, py::arg("rewards"), py::arg("group_ids"), py::arg("adv_out"),
        py::arg("row_flat"), py::arg("row_leader"), py::kw_only(), py::arg("scale") = "group", py::arg("eps") = 1e-6,
        py::arg("unbiased") = true, py::arg("singleton_raw") = false, py::arg("clip") = 0.0,
        "Group-relative advantages over ragged groups (float64 out).");
  m.def("grpo_loss_fwd_bwd_cpu", &grpo_loss_fwd_bwd_cpu, py::arg("logprobs"), py::arg("old_logprobs"), py::arg("mask"),
        py::arg("advantages"), py::arg("rewards"), py::arg("group_ids"), py::arg("seq_weights"),
        py::arg("ref_logprobs"), py::arg("dtype"), py::arg("grad"), py::arg("rowstats"), py::arg("adv_out"),
        py::arg("row_flat"), py::arg("row_leader"), py::arg("rollout_logprobs") = py::none(),
        py::arg("row_coef") = py::none(), py::arg("is_row") = py::none(), py::arg("adv_scale") = "group",
        py::arg("adv_eps") = 1e-6, py::arg("adv_unbiased") = true, py::arg("adv_singleton_raw") = false,
        py::arg("adv_clip") = 0.0, py::arg("eps_low") = 0.2, py::arg("eps_high") = 0.2, py::arg("dual_clip") = INFINITY,
        py::arg("ratio_cap") = INFINITY, py::arg("kl_coef") = 0.0, py::arg("kl_estimator") = 0,
        py::arg("seq_level") = false, py::arg("loss_agg") = 0, py::arg("num_tokens") = 0.0,
        py::arg("norm_length") = 0.0, py::arg("seq_count_all") = false, py::arg("form") = 0, py::arg("tau_pos") = 1.0,
        py::arg("tau_neg") = 1.05, py::arg("is_mode") = 0, py::arg("is_lo") = 0.0, py::arg("is_hi") = INFINITY,
        py::arg("loss_out") = py::none(),
        "Fused GRPO loss forward + backward on the CPU (see mtgrpo/grpo_loss.h). Every argument may be given "
        "by position (the small-call path does: no keyword matching). Returns whether every row statistic is "
        "finite.");
}
