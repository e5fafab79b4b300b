// Standalone probe of the C++ GRPO loss kernel for bench/cost_model.py: the extension's own
// per-ISA translation units (csrc/grpo_loss_avx512.cpp, _avx2.cpp, included below) compiled with
// the extension's flags, one out-of-line function per (ISA, mode) so that each mode's token loop
// can be disassembled and counted, plus a timing entry (the span loop over an [N, T] buffer,
// 1 thread) and a clock probe (a chain of dependent adds: one cycle each). Built as a shared
// library and called through ctypes; not part of the extension.
#define MTGRPO_COST_MODEL_PROBE 1
#include "../../csrc/grpo_loss_avx2.cpp"
#include "../../csrc/grpo_loss_avx512.cpp"

#include <chrono>

using namespace mtgrpo;

// Modes: 0 plain clip, 1 dual clip, 2 KL k3, 3 GSPO (sequence ratio), 4 token IS truncate.
#define MTGRPO_PROBE(NS, ATTR)                                                                                 \
  extern "C" ATTR __attribute__((noinline)) void probe_##NS##_plain(const FloatJob& J, int64_t a, int64_t b) { \
    NS::items_impl<float, 0, false, false, kFormVanilla, false>(J, a, b);                                      \
  }                                                                                                            \
  extern "C" ATTR __attribute__((noinline)) void probe_##NS##_k3(const FloatJob& J, int64_t a, int64_t b) {    \
    NS::items_impl<float, 3, false, false, kFormVanilla, false>(J, a, b);                                      \
  }                                                                                                            \
  extern "C" ATTR __attribute__((noinline)) void probe_##NS##_gspo(const FloatJob& J, int64_t a, int64_t b) {  \
    NS::items_impl<float, 0, false, true, kFormVanilla, false>(J, a, b);                                       \
  }                                                                                                            \
  extern "C" ATTR __attribute__((noinline)) void probe_##NS##_is(const FloatJob& J, int64_t a, int64_t b) {    \
    NS::items_impl<float, kKlAny, false, false, kFormVanilla, true>(J, a, b);                                  \
  }

#define AVX512_ATTR __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi,bmi2")))
#define AVX2_ATTR __attribute__((target("avx2,fma,bmi,bmi2")))
MTGRPO_PROBE(isa_avx512, AVX512_ATTR)
MTGRPO_PROBE(isa_avx2, AVX2_ATTR)

namespace {
using Fn = void (*)(const FloatJob&, int64_t, int64_t);
Fn pick(int isa, int mode) {
  // dual clip runs the plain loop (the dual clip is a select on a per-call constant)
  static const Fn t[2][4] = {{probe_isa_avx512_plain, probe_isa_avx512_k3, probe_isa_avx512_gspo, probe_isa_avx512_is},
                             {probe_isa_avx2_plain, probe_isa_avx2_k3, probe_isa_avx2_gspo, probe_isa_avx2_is}};
  const int m = mode == 2 ? 1 : (mode == 3 ? 2 : (mode == 4 ? 3 : 0));
  return t[isa][m];
}
}  // namespace

// Seconds per call of the float kernel's main pass over [n, T] fp32 tokens (1 thread, median
// of `reps`), mode as above; the caller supplies the buffers (lp, old, ref, roll, grad [n*T],
// mask [n*T] bytes, part [n * kRowStats]).
extern "C" double probe_time(int isa, int mode, int64_t n, int64_t T, const float* lp, const float* old,
                             const float* ref, const float* roll, const uint8_t* mk, float* grad, double* part,
                             int reps) {
  static LossParams p;
  p = LossParams{};
  if (mode == 1) p.dual_clip = 3.0;
  if (mode == 2) {
    p.kl_estimator = 3;
    p.kl_coef = 0.04;
  }
  if (mode == 3) p.seq_level = true;
  if (mode == 4) {
    p.is_mode = kIsTruncate;
    p.is_hi = 2.0;
  }
  std::vector<double> a_row(n), w_row(n, 1.0 / (n * T)), rc(n, 1.0), isw(n, 1.0);
  std::vector<float> r_seq(n, 1.05f), seq_coef(n, 0.0f);
  for (int64_t i = 0; i < n; ++i) a_row[i] = (i % 3) - 1.0;
  const FloatJob J{DType::F32,
                   lp,
                   old,
                   mk,
                   mode == 2 ? ref : nullptr,
                   mode == 4 ? roll : nullptr,
                   nullptr,
                   a_row.data(),
                   w_row.data(),
                   rc.data(),
                   isw.data(),
                   r_seq.data(),
                   seq_coef.data(),
                   T,
                   T,
                   1,
                   p.kl_estimator,
                   kFormVanilla,
                   false,
                   mode == 3,
                   &p,
                   grad,
                   part,
                   nullptr,
                   nullptr};
  const Fn f = pick(isa, mode);
  std::vector<double> ts;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f(J, 0, n);
    ts.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

// Core clock in GHz: 4 `iters` dependent register-register adds take 4 `iters` cycles (an add of
// an immediate would not do: Golden Cove's renamer folds chains of those). The best of `reps`
// short runs, so that a run the scheduler interrupted (a busy machine) does not count.
extern "C" double probe_clock_ghz(int64_t iters, int reps) {
  double best = 0.0;
  for (int r = 0; r < reps; ++r) {
    uint64_t x = 1;
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < iters; ++i) asm volatile("add %0, %0\n\tadd %0, %0\n\tadd %0, %0\n\tadd %0, %0" : "+r"(x));
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, 4.0 * static_cast<double>(iters) / s / 1e9);
  }
  return best;
}
