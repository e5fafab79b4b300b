// Fused GRPO group advantage + clipped-ratio surrogate, forward and backward in one pass.
// Framework-free: raw pointers and sizes, no torch, no pybind11.
//
// For each row i (one completion) and token t with mask m:
//   d = clamp(logp - old, -20, 20); r = exp(d)  (GSPO: r = exp(mean_t d) for the whole row)
//   r = min(r, ratio_cap); l = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))
//   A < 0 and dual clip c: l = min(l, -A c);  token loss = l + kl_coef * kl(logp, ref)
// and dL/dlogp is written in the same pass, already scaled by the aggregation weight of
// the row (token-mean: 1/M; seq-mean-token-mean: 1/(S M_i); seq-mean-token-sum: 1/S;
// seq-mean-token-sum-norm: 1/(S L)). Cost per token: reads 2 (3 with a reference policy)
// values and a mask byte, writes one value in the input dtype (bf16 / fp16 rounded to
// nearest even in the kernel, no fp32 [N, T] and no cast pass); about 40 flops and one exp
// (two with k3). GSPO with token advantages: every token gets r_seq * mean_s(m_s dldr_s).
#ifndef MTGRPO_GRPO_LOSS_H
#define MTGRPO_GRPO_LOSS_H

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

namespace mtgrpo {

enum class DType : int { F32 = 0, F64 = 1, BF16 = 2, F16 = 3 };

enum class LossAgg : int {
  TokenMean = 0,
  SeqMeanTokenMean = 1,
  SeqMeanTokenSum = 2,
  SeqMeanTokenSumNorm = 3,
  TokenSum = 4
};

enum class AdvScale : int { Group = 0, Batch = 1, None = 2 };

// The per-token policy-loss functors of grpo_forms.h (one per form; "gpg" and "vespo" share
// kFormLogpWeighted, with the row constant 1 and VESPO's gamma weight). Python's registry
// (ops/grpo_loss.py POLICY_LOSSES) maps each policy_loss name to one of these ids.
enum FormId : int { kFormVanilla = 0, kFormCispo = 1, kFormSapo = 2, kFormLogpWeighted = 3, kFormGeoMean = 4 };
constexpr int kNumForms = 5;

// Token-level importance-sampling correction of the train / rollout mismatch (TRL
// vllm_importance_sampling_mode token_*, verl rollout_is="token"): w = exp(old - rollout),
// truncated to [is_lo, is_hi] or zeroed outside it. Sequence-level modes arrive as a per-row
// weight (is_row) computed before the token pass.
enum IsMode : int { kIsOff = 0, kIsTruncate = 1, kIsMask = 2 };

// Per-row statistics written by the kernel (float64, row-major [N, kRowStats]).
enum RowStat : int {
  kPgSum = 0,       // sum_t m * clipped surrogate (no KL)
  kKlSum,           // sum_t m * kl
  kRatioSum,        // sum_t m * ratio
  kNegLogRatioSum,  // sum_t m * (old - logp), clamped: approximate KL to the old policy
  kClipLow,         // tokens with ratio < 1 - eps_low and A < 0
  kClipHigh,        // tokens with ratio > 1 + eps_high and A > 0
  kDualClip,        // tokens where the dual clip is active
  kLossContrib,     // this row's share of the aggregated loss
  kTokens,          // sum_t m
  kIsRatioSum,      // sum_t m * the importance-sampling weight applied (1 without a correction)
  kIsClipped,       // tokens whose token-level IS weight was truncated or masked
  kRowStats
};

struct LossParams {
  double eps_low = 0.2, eps_high = 0.2;
  double dual_clip = INFINITY;  // +inf: off
  double ratio_cap = INFINITY;  // +inf: off
  double kl_coef = 0.0;
  int kl_estimator = 0;    // 0: no KL term, 1: k1, 2: k2, 3: k3
  bool seq_level = false;  // GSPO sequence-level ratio
  LossAgg agg = LossAgg::TokenMean;
  double num_tokens = 0.0;               // > 0: global token count of token-mean
  double norm_length = 0.0;              // L of seq-mean-token-sum-norm (> 0)
  bool seq_count_all = false;            // seq-mean modes: count every row, not only non-empty
  int form = kFormVanilla;               // FormId
  double tau_pos = 1.0, tau_neg = 1.05;  // SAPO temperatures
  int is_mode = kIsOff;                  // IsMode (token-level IS correction)
  double is_lo = 0.0, is_hi = INFINITY;  // its bounds
};

struct AdvParams {
  AdvScale scale = AdvScale::Group;
  double eps = 1e-6;
  bool unbiased = true;
  bool singleton_raw = false;
  double clip = 0.0;  // <= 0: off
};

constexpr double kLogRatioClamp = 20.0;
constexpr int kKlAny = -1;  // the float kernel's KL template argument "the kind chosen per call"
constexpr double kKlLogClamp = 20.0;
constexpr double kKlValueClamp = 10.0;

// ---- scalar conversions (branch-free so loops vectorise) -------------------------------
inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

inline float bf16_to_float(uint16_t h) {
  return bits_to_float(static_cast<uint32_t>(h) << 16);
}

inline float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  // Shift exponent+mantissa into float position and rescale by 2^112: exact for normal
  // and subnormal halves; inf/nan get the all-ones exponent.
  const float mag = bits_to_float(em << 13) * 0x1p112f;
  const uint32_t special = (em << 13) | 0x7f800000u;
  const uint32_t bits = (em >= 0x7c00u ? special : float_to_bits(mag)) | sign;
  return bits_to_float(bits);
}

struct Bf16 {
  uint16_t v;
};
struct F16 {
  uint16_t v;
};
inline float to_compute(float x) {
  return x;
}
inline double to_compute(double x) {
  return x;
}
inline float to_compute(Bf16 x) {
  return bf16_to_float(x.v);
}
inline float to_compute(F16 x) {
  return f16_to_float(x.v);
}

// exp for |x| <= 88 with Cephes' polynomial (about 1 ulp); written so that GCC vectorises it.
inline float vexp(float x) {
  x = std::min(std::max(x, -87.3f), 88.0f);
  const float fn = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - fn * 0.693359375f;
  r = r + fn * 2.12194440e-4f;
  // the same operations in the same order as the vector vexp (Estrin's scheme)
  const float r2 = r * r;
  const float q0 = r * 1.6666665459e-1f + 5.0000001201e-1f;
  const float q1 = r * 8.3334519073e-3f + 4.1665795894e-2f;
  const float q2 = r * 1.9875691500e-4f + 1.3981999507e-3f;
  const float r4 = r2 * r2;
  const float y = ((q0 + r2 * q1) + r4 * q2) * r2 + r + 1.0f;
  const int32_t e = static_cast<int32_t>(fn) + 127;
  return y * bits_to_float(static_cast<uint32_t>(e) << 23);
}
inline double vexp(double x) {
  return std::exp(x);
}

// ---- group advantages -----------------------------------------------------------------
// rewards[N] (already checked finite), group_ids[N]. Writes adv[N] and, per row, whether
// its group is a zero-advantage group (all rewards equal) and whether the row is its
// group's first member (lowest index): row_flat[N], row_leader[N].
template <typename R>
void group_advantages(const R* rewards, const int64_t* group_ids, int64_t n, const AdvParams& p, double* adv,
                      uint8_t* row_flat, uint8_t* row_leader) {
  if (n <= 0) return;
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return group_ids[a] < group_ids[b]; });
  const double ddof = p.unbiased ? 1.0 : 0.0;
  double bstd = 0.0;
  if (p.scale == AdvScale::Batch) {
    double s = 0.0;
    for (int64_t i = 0; i < n; ++i) s += static_cast<double>(rewards[i]);
    const double mu = s / static_cast<double>(n);
    double ss = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const double dv = rewards[i] - mu;
      ss += dv * dv;
    }
    bstd = static_cast<double>(n) > ddof ? std::sqrt(ss / (static_cast<double>(n) - ddof)) : 0.0;
  }
  int64_t start = 0;
  while (start < n) {
    int64_t end = start + 1;
    const int64_t g = group_ids[order[start]];
    while (end < n && group_ids[order[end]] == g) ++end;
    const int64_t cnt = end - start;
    double s = 0.0, lo = INFINITY, hi = -INFINITY;
    for (int64_t j = start; j < end; ++j) {
      const double v = static_cast<double>(rewards[order[j]]);
      s += v;
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
    double mean = s / static_cast<double>(cnt);
    double ss = 0.0;
    for (int64_t j = start; j < end; ++j) {
      const double dv = rewards[order[j]] - mean;
      ss += dv * dv;
    }
    double sd = std::sqrt(ss / std::max(static_cast<double>(cnt) - ddof, 1.0));
    const bool single = cnt == 1;
    if (single && p.singleton_raw) {
      mean = 0.0;
      sd = 1.0;
    }
    const bool flat = (lo == hi) && !(single && p.singleton_raw);
    const double denom = p.scale == AdvScale::Group ? sd + p.eps : (p.scale == AdvScale::Batch ? bstd + p.eps : 1.0);
    for (int64_t j = start; j < end; ++j) {
      const int64_t i = order[j];
      double a = flat ? 0.0 : (static_cast<double>(rewards[i]) - mean) / denom;
      if (p.clip > 0.0) a = std::min(std::max(a, -p.clip), p.clip);
      adv[i] = a;
      row_flat[i] = flat ? 1 : 0;
      row_leader[i] = j == start ? 1 : 0;  // stable sort: the group's lowest index comes first
    }
    start = end;
  }
}

// ---- the per-token forms, scalar instantiation (the float64 path) -------------------------
namespace scalar {
template <typename V>
inline V sel(bool m, V a, V b) {
  return m ? a : b;
}
template <typename V>
inline V vmin(V a, V b) {
  return std::min(a, b);
}
template <typename V>
inline V vmax(V a, V b) {
  return std::max(a, b);
}
inline double vexp(double x) {
  return std::exp(x);
}
inline float vexp(float x) {
  return mtgrpo::vexp(x);
}
#include "mtgrpo/grpo_forms.h"
}  // namespace scalar

template <typename C>
scalar::FormConsts<C, bool> form_consts(const LossParams& p) {
  return {static_cast<C>(1.0 - p.eps_low),
          static_cast<C>(1.0 + p.eps_high),
          static_cast<C>(p.dual_clip),
          static_cast<C>(p.eps_low),
          static_cast<C>(p.eps_high),
          static_cast<C>(p.tau_pos),
          static_cast<C>(p.tau_neg),
          C(0),
          C(1),
          C(4),
          false};
}

// Per-row constants of the token loop (scalar path).
template <typename C>
struct RowConsts {
  C a_row, r_seq, seq_coef, rc, is_row, cap, beta, w, is_lo, is_hi;
  int is_mode;
  scalar::FormConsts<C, bool> k;
};

// ---- the row kernel ---------------------------------------------------------------------

// One token: writes its gradient and adds its contributions to `acc` ([kRowStats][lanes]).
// The form F (grpo_forms.h) gives the loss and its derivatives; this function adds what every
// form shares: the log-ratio clamp, the ratio cap, GSPO's sequence ratio, the IS weight and
// the KL term. Branch-free (selects only) apart from uniform tests, so the lane loop vectorises.
template <typename In, typename C, int KL, bool TOK_ADV, bool SEQ, int F>
inline __attribute__((always_inline)) void grpo_token(const In* __restrict lp, const In* __restrict old,
                                                      const uint8_t* __restrict mk, const In* __restrict ref,
                                                      const In* __restrict roll, const C* __restrict adv_tok, int64_t t,
                                                      const RowConsts<C>& c, C* __restrict grad, C* __restrict acc,
                                                      int lanes, int j) {
  const C lim = static_cast<C>(kLogRatioClamp), klim = static_cast<C>(kKlLogClamp),
          kval = static_cast<C>(kKlValueClamp);
  const bool on = mk[t] != 0;
  const C x = to_compute(lp[t]);
  const C o = to_compute(old[t]);
  const C d = x - o;
  const C dc = std::min(std::max(d, -lim), lim);
  const C din = (d >= -lim && d <= lim) ? C(1) : C(0);
  const C a = TOK_ADV ? adv_tok[t] * c.a_row : c.a_row;  // a_row: the sequence weight then
  C r = SEQ ? c.r_seq : vexp(dc);
  const C cap_grad = r <= c.cap ? C(1) : C(0);
  r = std::min(r, c.cap);
  const scalar::FormArgs<C, bool> fa{a, r, x, d, c.rc, a<C(0), a> C(0)};
  const auto f = scalar::PolicyForm<F>::eval(fa, c.k);
  // GSPO with token advantages: every token's log-ratio enters the one sequence ratio
  // through its mean, so d loss / d logp_t = r_seq * din_t * mean_s(m_s dldr_s) (seq_coef),
  // not this token's own dldr (issue 16 item 1). With one advantage per row all dldr_s
  // are equal and the two coincide.
  C g = ((SEQ && TOK_ADV && F == kFormVanilla) ? c.seq_coef : f.dldr) * r * cap_grad * din + f.dldx;
  C wi = c.is_row, isc = C(0);
  if (c.is_mode != kIsOff) {
    const C u = std::min(std::max(o - to_compute(roll[t]), -lim), lim);
    const C raw = vexp(u);
    const bool keep = raw >= c.is_lo && raw <= c.is_hi;
    const C wt = c.is_mode == kIsTruncate ? std::min(std::max(raw, c.is_lo), c.is_hi) : (keep ? raw : C(0));
    isc = keep ? C(0) : C(1);
    wi = wi * wt;
  }
  const C l = f.l * wi;
  g = g * wi;
  C kl = C(0);
  if constexpr (KL == 1) {
    kl = x - to_compute(ref[t]);
    g += c.beta;
  } else if constexpr (KL == 2) {
    const C v = x - to_compute(ref[t]);
    kl = C(0.5) * v * v;
    g += c.beta * v;
  } else if constexpr (KL == 3) {
    const C u = to_compute(ref[t]) - x;
    const C uc = std::min(std::max(u, -klim), klim);
    const C e = vexp(uc);
    const C k3 = e - uc - C(1);
    const C kin = (u >= -klim && u <= klim && k3 <= kval && k3 >= -kval) ? C(1) : C(0);
    kl = std::min(std::max(k3, -kval), kval);
    g += c.beta * (C(1) - e) * kin;
  }
  grad[t] = on ? c.w * g : C(0);
  acc[0 * lanes + j] += on ? l : C(0);
  acc[1 * lanes + j] += on ? kl : C(0);
  acc[2 * lanes + j] += on ? r : C(0);
  acc[3 * lanes + j] += on ? -dc : C(0);
  acc[4 * lanes + j] += (on && f.clo) ? C(1) : C(0);
  acc[5 * lanes + j] += (on && f.chi) ? C(1) : C(0);
  acc[6 * lanes + j] += (on && f.du) ? C(1) : C(0);
  acc[7 * lanes + j] += on ? l + c.beta * kl : C(0);
  acc[8 * lanes + j] += on ? C(1) : C(0);
  acc[9 * lanes + j] += on ? wi : C(0);
  acc[10 * lanes + j] += on ? isc : C(0);
}

// C: compute type (float or double). KL: 0 none, 1 k1, 2 k2, 3 k3. TOK_ADV: advantages per
// token. SEQ: GSPO sequence-level ratio. F: the form (FormId). `w` is the row's aggregation
// weight, `rc` the form's row constant, `is_row` the row's sequence-level IS weight (1: none).
// Tokens are processed in blocks of kLanes with one accumulator per lane (the sum order is
// fixed: lane-wise, then lanes folded in order), which GCC vectorises without -ffast-math.
template <typename In, typename C, int KL, bool TOK_ADV, bool SEQ, int F>
inline __attribute__((always_inline)) void grpo_row(const In* __restrict lp, const In* __restrict old,
                                                    const uint8_t* __restrict mk, const In* __restrict ref,
                                                    const In* __restrict roll, const C* __restrict adv_tok, C a_row,
                                                    C rc, C is_row, int64_t T, const LossParams& p, C w,
                                                    C* __restrict grad, double* out) {
  constexpr int kLanes = 16;
  const C lo = static_cast<C>(1.0 - p.eps_low), hi = static_cast<C>(1.0 + p.eps_high);
  const C cap = static_cast<C>(p.ratio_cap), dual = static_cast<C>(p.dual_clip);
  const C lim = static_cast<C>(kLogRatioClamp);
  alignas(64) C acc[kRowStats * kLanes];
  for (int k = 0; k < kRowStats * kLanes; ++k) acc[k] = C(0);
  C r_seq = C(1);
  if constexpr (SEQ) {
    alignas(64) C sd[kLanes] = {}, cnt[kLanes] = {};
    int64_t t0 = 0;
    for (; t0 + kLanes <= T; t0 += kLanes) {
#pragma GCC ivdep
      for (int j = 0; j < kLanes; ++j) {
        const int64_t t = t0 + j;
        const C dc = std::min(std::max(to_compute(lp[t]) - to_compute(old[t]), -lim), lim);
        sd[j] += mk[t] ? dc : C(0);
        cnt[j] += mk[t] ? C(1) : C(0);
      }
    }
    for (int64_t t = t0; t < T; ++t) {
      const C dc = std::min(std::max(to_compute(lp[t]) - to_compute(old[t]), -lim), lim);
      sd[0] += mk[t] ? dc : C(0);
      cnt[0] += mk[t] ? C(1) : C(0);
    }
    C s = C(0), c = C(0);
    for (int j = 0; j < kLanes; ++j) {
      s += sd[j];
      c += cnt[j];
    }
    r_seq = vexp(s / std::max(c, C(1)));
  }
  C seq_coef = C(0);
  if constexpr (SEQ && TOK_ADV) {  // mean over the row's tokens of d loss_t / d r (see grpo_token)
    const C rr = std::min(r_seq, cap);
    const C rc = std::min(std::max(rr, lo), hi);
    C s = C(0), c = C(0);
    for (int64_t t = 0; t < T; ++t) {
      if (!mk[t]) continue;
      const C a = adv_tok[t] * a_row;
      const C l1 = -a * rr, l2 = -a * rc;
      const bool use1 = l1 >= l2;
      C dldr = use1 ? -a : C(0);
      const C l = use1 ? l1 : l2;
      if ((a < C(0)) && (-a * dual < l)) dldr = C(0);
      s += dldr;
      c += C(1);
    }
    seq_coef = s / std::max(c, C(1));
  }
  const RowConsts<C> rcs{a_row,
                         r_seq,
                         seq_coef,
                         rc,
                         is_row,
                         cap,
                         static_cast<C>(p.kl_coef),
                         w,
                         static_cast<C>(p.is_lo),
                         static_cast<C>(p.is_hi),
                         p.is_mode,
                         form_consts<C>(p)};
  int64_t t0 = 0;
  for (; t0 + kLanes <= T; t0 += kLanes) {
#pragma GCC ivdep
    for (int j = 0; j < kLanes; ++j)
      grpo_token<In, C, KL, TOK_ADV, SEQ, F>(lp, old, mk, ref, roll, adv_tok, t0 + j, rcs, grad, acc, kLanes, j);
  }
  for (int64_t t = t0; t < T; ++t)
    grpo_token<In, C, KL, TOK_ADV, SEQ, F>(lp, old, mk, ref, roll, adv_tok, t, rcs, grad, acc, kLanes, 0);
  double tot[kRowStats];
  for (int k = 0; k < kRowStats; ++k) {
    double s = 0.0;
    for (int j = 0; j < kLanes; ++j) s += static_cast<double>(acc[k * kLanes + j]);
    tot[k] = s;
  }
  out[kPgSum] = tot[0];
  out[kKlSum] = tot[1];
  out[kRatioSum] = tot[2];
  out[kNegLogRatioSum] = tot[3];
  out[kClipLow] = tot[4];
  out[kClipHigh] = tot[5];
  out[kDualClip] = tot[6];
  out[kLossContrib] = static_cast<double>(w) * tot[7];
  out[kTokens] = tot[8];
  out[kIsRatioSum] = tot[9];
  out[kIsClipped] = tot[10];
}

// Aggregation weight of a row with `row_tokens` tokens, given the batch's token count
// and the number of sequences counted by the seq-mean modes.
inline double row_weight(const LossParams& p, double row_tokens, double total_tokens, double n_seq, int64_t T) {
  switch (p.agg) {
    case LossAgg::TokenMean:
      return 1.0 / (p.num_tokens > 0 ? p.num_tokens : std::max(total_tokens, 1.0));
    case LossAgg::SeqMeanTokenMean:
      return row_tokens > 0 ? 1.0 / (std::max(n_seq, 1.0) * row_tokens) : 0.0;
    case LossAgg::SeqMeanTokenSum:
      return 1.0 / std::max(n_seq, 1.0);
    case LossAgg::SeqMeanTokenSumNorm:
      return 1.0 / (std::max(n_seq, 1.0) * (p.norm_length > 0 ? p.norm_length : static_cast<double>(T)));
    case LossAgg::TokenSum:
      return 1.0;
  }
  return 0.0;
}

// One call of the float kernel: rows split into spans of `seg` tokens ("items": row-major,
// ceil(T / seg) per row) so that one long row also spreads over threads. Item k writes
// grad of its span and its statistics part[k * 9 .. +9] (kLossContrib not yet weighted);
// with SEQ the pre-pass writes seq_part[k * 2 .. +2] (sum of clamped log-ratios, count)
// and the main pass reads the row's GSPO ratio from r_seq[row]; with SEQ and token
// advantages a second pre-pass writes coef_part[k] (sum of m * d loss / d r) and the main
// pass reads the row's mean from seq_coef[row].
struct FloatJob {
  DType dt;
  const void* lp;
  const void* old;
  const uint8_t* mk;
  const void* ref;
  const void* roll;       // [N, T] rollout log-probs (token-level IS correction) or null
  const float* adv_tok;   // [N, T] or null
  const double* a_row;    // [N]
  const double* w_row;    // [N]
  const double* rc_row;   // [N] the form's row constant (1 where the form has none)
  const double* is_row;   // [N] sequence-level IS weight (1: none)
  const float* r_seq;     // [N] (SEQ main pass)
  const float* seq_coef;  // [N] (SEQ with token advantages: mean d loss / d r of the row)
  int64_t T, seg, nseg;
  int kl;
  int form;  // FormId
  bool tok_adv, seq;
  const LossParams* p;
  void* grad;  // [N, T] in the input dtype (float, Bf16 or F16)
  double* part;
  double* seq_part;
  double* coef_part;
};

}  // namespace mtgrpo

#endif  // MTGRPO_GRPO_LOSS_H

// ---- the float row kernel with explicit vectors ------------------------------------------
// GCC/Clang generic vectors: blocks of 16 tokens as one zmm (AVX-512), two ymm (AVX2) or
// four xmm (SSE2/NEON) per operation. The ISA is the one in force where this section is compiled: it is
// emitted once as namespace mtgrpo::vec (the translation unit's target), and again each
// time this header is included with MTGRPO_VEC_NS defined (the glue does so under
// `#pragma GCC target(...)` for AVX-512 and AVX2 and picks one at run time). A target
// attribute on the caller alone is not enough: GCC lowers the vector operations of each
// helper in the helper's own target before inlining, and the result is scalar code.
// Every token operation above is mirrored lane-wise with the same operation order and the same min/max/select
// conventions, so a lane computes what grpo_token computes. Statistics are accumulated per lane in float and folded in
// a fixed order (lanes 0..15 of the 16-token block, in double), the same order for every ISA.
#if defined(__GNUC__) || defined(__clang__)
#if defined(MTGRPO_VEC_NS)
#define MTGRPO_VEC_EMIT 1
#elif !defined(MTGRPO_GRPO_LOSS_VEC_PORTABLE)
#define MTGRPO_GRPO_LOSS_VEC_PORTABLE 1
#define MTGRPO_VEC_NS vec
#define MTGRPO_VEC_NS_DEFAULTED 1
#define MTGRPO_VEC_EMIT 1
#endif
#endif

#ifdef MTGRPO_VEC_EMIT
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte vectors never cross a call (all inlined)
#endif
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#ifndef MTGRPO_VINL
#define MTGRPO_VINL inline __attribute__((always_inline))
#define MTGRPO_VLAMBDA __attribute__((always_inline))
#endif
namespace mtgrpo {
namespace MTGRPO_VEC_NS {

// Native vector width (floats) of the target in force: MTGRPO_VEC_WIDTH when the includer
// sets it (GCC does not define __AVX2__ etc. under `#pragma GCC target` in C++), else from
// the command-line target. Vectors wider than the target would get their comparisons
// lowered element by element. A block is always 16 tokens = kU vectors of kW lanes.
#if defined(MTGRPO_VEC_WIDTH)
constexpr int kW = MTGRPO_VEC_WIDTH;
#elif defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
constexpr int kW = 16;
#elif defined(__AVX2__)
constexpr int kW = 8;
#else
constexpr int kW = 4;
#endif
static_assert(kW == 4 || kW == 8 || kW == 16, "MTGRPO_VEC_WIDTH: 4, 8 or 16");
// x86 intrinsics for the few operations GCC's generic vectors lower poorly (see vmin, load_mask):
// MTGRPO_VEC_X86 = the vector width in floats on x86-64 (the baseline is SSE2: 4), 0 elsewhere.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(MTGRPO_VEC_WIDTH)
#define MTGRPO_VEC_X86 MTGRPO_VEC_WIDTH
#elif defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define MTGRPO_VEC_X86 16
#elif defined(__AVX2__)
#define MTGRPO_VEC_X86 8
#else
#define MTGRPO_VEC_X86 4
#endif
#else
#define MTGRPO_VEC_X86 0
#endif
constexpr int kBlock = 16;
constexpr int kU = kBlock / kW;
typedef float vf __attribute__((vector_size(4 * kW)));
typedef int32_t vi __attribute__((vector_size(4 * kW)));
typedef uint32_t vu __attribute__((vector_size(4 * kW)));
typedef uint8_t vb __attribute__((vector_size(kW)));
typedef uint16_t vh __attribute__((vector_size(2 * kW)));

MTGRPO_VINL vf splat(float x) {
  return vf{} + x;
}
// std::min(a, b) = b < a ? b : a and std::max(a, b) = a < b ? b : a. x86's minps(x, y) is
// exactly x < y ? x : y (NaN and signed zeros included), so on x86 each is one instruction with
// the operands in this order: the same bits as the generic expression, which GCC otherwise
// lowers as a compare and a blend in some contexts.
#if MTGRPO_VEC_X86
MTGRPO_VINL vf vmin(vf a, vf b) {
#if MTGRPO_VEC_X86 == 16
  return (vf)_mm512_min_ps((__m512)b, (__m512)a);
#elif MTGRPO_VEC_X86 == 8
  return (vf)_mm256_min_ps((__m256)b, (__m256)a);
#else
  return (vf)_mm_min_ps((__m128)b, (__m128)a);
#endif
}
MTGRPO_VINL vf vmax(vf a, vf b) {
#if MTGRPO_VEC_X86 == 16
  return (vf)_mm512_max_ps((__m512)b, (__m512)a);
#elif MTGRPO_VEC_X86 == 8
  return (vf)_mm256_max_ps((__m256)b, (__m256)a);
#else
  return (vf)_mm_max_ps((__m128)b, (__m128)a);
#endif
}
#else
MTGRPO_VINL vf vmin(vf a, vf b) {
  return b < a ? b : a;
}
MTGRPO_VINL vf vmax(vf a, vf b) {
  return a < b ? b : a;
}
#endif
// The row's sign masks are loop-invariant; GCC hoists them and then rebuilds `mask & sign`
// lane by lane from bytes in memory (about 100 scalar instructions per block). Passing them
// through an empty asm keeps them in vector registers: one compare per use instead.
MTGRPO_VINL void opaque(vi& x, vi& y) {
#if MTGRPO_VEC_X86
  asm("" : "+v"(x), "+v"(y));
#else
  (void)x;
  (void)y;
#endif
}
MTGRPO_VINL vf sel(vi m, vf a, vf b) {
  return m ? a : b;
}
MTGRPO_VINL vf ones_if(vi m) {
  return (vf)(m & (vi)splat(1.0f));
}  // m ? 1 : 0
// acc + (m ? v : 0), written as a select of the sum: one masked add with AVX-512. The same bits
// as adding the zeroed value: acc is never -0 (it starts at +0 and +0 + -0 = +0), so acc + 0 = acc.
MTGRPO_VINL void acc_add(vf& acc, vi m, vf v) {
  acc = m ? acc + v : acc;
}
MTGRPO_VINL void acc_count(vf& acc, vi m) {
  acc = m ? acc + 1.0f : acc;
}

MTGRPO_VINL vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
MTGRPO_VINL vf load(const Bf16* p) {
#if MTGRPO_VEC_X86 == 16
  return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
#elif MTGRPO_VEC_X86 == 8
  return (vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
#else
  vh h;
  std::memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vu) << 16);
#endif
}
MTGRPO_VINL vf load(const F16* p) {  // lane-wise f16_to_float
  vh h;
  std::memcpy(&h, p, sizeof h);
  const vu x = __builtin_convertvector(h, vu);
  const vu sign = (x & 0x8000u) << 16;
  const vu em = x & 0x7fffu;
  const vf mag = (vf)(em << 13) * 0x1p112f;
  const vu special = (em << 13) | 0x7f800000u;
  const vu bits = (((vi)em >= 0x7c00) ? special : (vu)mag) | sign;
  return (vf)bits;
}
MTGRPO_VINL vi load_mask(const uint8_t* p) {  // byte != 0, widened to a lane mask (vpmovzxbd on x86)
#if MTGRPO_VEC_X86 == 16
  return (vi)_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))) != 0;
#elif MTGRPO_VEC_X86 == 8
  return (vi)_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))) != 0;
#else
  vb m;
  std::memcpy(&m, p, sizeof m);
  return __builtin_convertvector(m, vi) != 0;
#endif
}
MTGRPO_VINL void store(float* p, vf v) {
  std::memcpy(p, &v, sizeof v);
}
// float -> bfloat16, round to nearest even (as torch's .to(torch.bfloat16) for non-NaN values).
MTGRPO_VINL void store(Bf16* p, vf v) {
  vu u = (vu)v;
  u = u + 0x7fffu + ((u >> 16) & 1u);
  const vh h = __builtin_convertvector(u >> 16, vh);
  std::memcpy(p, &h, sizeof h);
}
// float -> float16, round to nearest even, lane-wise with integer and one float add (the
// subnormal case rounds through the FPU's own RNE): the same bits on every ISA. Overflow -> inf.
MTGRPO_VINL void store(F16* p, vf v) {
  const vu x = (vu)v;
  const vu sign = (x >> 16) & 0x8000u;
  const vu ax = x & 0x7fffffffu;
  const vu denorm_magic = vu{} + (((127u - 15u) + (23u - 10u) + 1u) << 23);
  const vu sub = (vu)((vf)ax + (vf)denorm_magic) - denorm_magic;  // |x| < 2^-14
  const vu odd = (ax >> 13) & 1u;
  const vu nrm = (ax + ((15u - 127u) << 23) + 0xfffu + odd) >> 13;  // 2^-14 <= |x| < 65520
  const vu big = (vu)(((vi)ax > (vi)(vu{} + 0x7f800000u)) ? (vi)(vu{} + 0x7e00u) : (vi)(vu{} + 0x7c00u));
  vu o = ((vi)ax >= (vi)(vu{} + ((127u + 16u) << 23))) ? big : (((vi)ax < (vi)(vu{} + (113u << 23))) ? sub : nrm);
  o |= sign;
  const vh h = __builtin_convertvector(o, vh);
  std::memcpy(p, &h, sizeof h);
}

// Lane-wise vexp(float): floor with one rounding instruction where the ISA has one (AVX2,
// AVX-512), else through truncation and a fix-up (exact for |z| < 2^31): the same value.
MTGRPO_VINL vf vexp(vf x) {
  x = vmin(vmax(x, splat(-87.3f)), splat(88.0f));
  const vf z = x * 1.44269504088896341f + 0.5f;  // in [-125.5, 127.5]: never -0
#if MTGRPO_VEC_X86 == 16
  const vf fn = (vf)_mm512_roundscale_ps((__m512)z, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
#elif MTGRPO_VEC_X86 == 8
  const vf fn = (vf)_mm256_round_ps((__m256)z, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
#else
  vf fn = __builtin_convertvector(__builtin_convertvector(z, vi), vf);
  fn = fn > z ? fn - 1.0f : fn;
#endif
  vf r = x - fn * 0.693359375f;
  r = r + fn * 2.12194440e-4f;
  // Cephes' polynomial by Estrin's scheme (three independent pairs, then r^2 and r^4): a
  // dependency chain of 8 operations where Horner's has 14; the chain, not the port count, was
  // what bounded the token loop (bench/cost_model.py)
  const vf r2 = r * r;
  const vf q0 = r * 1.6666665459e-1f + 5.0000001201e-1f;
  const vf q1 = r * 8.3334519073e-3f + 4.1665795894e-2f;
  const vf q2 = r * 1.9875691500e-4f + 1.3981999507e-3f;
  const vf r4 = r2 * r2;
  const vf y = ((q0 + r2 * q1) + r4 * q2) * r2 + r + 1.0f;
  const vi e = __builtin_convertvector(fn, vi) + 127;
  return y * (vf)(e << 23);
}

#include "mtgrpo/grpo_forms.h"  // the per-token forms for this ISA's vectors

struct Consts {
  vf cap, beta, w, a_row, r_seq, seq_coef, rc, is_row, is_lo, is_hi;
  bool is_trunc;
  int kl;  // the KL kind of the call (0 none, 1 k1, 2 k2, 3 k3): k1 / k2 share one instantiation,
           // and with KL = kKlAny the kind is chosen per call (see items_in)
  FormConsts<vf, vi> k;
};

// Per-lane statistics of a span. Only what the mode needs is accumulated (each is a masked add
// per block): the KL sum and the loss + KL sum only with a KL term (without one the latter is the
// loss sum), the IS weight sums only with a token-level IS correction (without one the weight is
// the row's constant: its sum is that constant times the token count, taken in span()).
struct Acc {
  vf s[kRowStats];
};

// The KL penalty of a block: k1 (kl = v) or k2 (kl = v^2 / 2), c.kl choosing; v = x - ref.
MTGRPO_VINL void kl_k12(vf x, vf ref, const Consts& c, vf& kl, vf& g) {
  const vf v = x - ref;
  if (c.kl == 2) {
    kl = 0.5f * v * v;
    g += c.beta * v;
  } else {
    kl = v;
    g += c.beta;
  }
}

// k3 = exp(ref - x) - (ref - x) - 1 with the log-ratio and the value clamped (grpo_token).
MTGRPO_VINL void kl_k3(vf x, vf ref, const Consts& c, vf& kl, vf& g) {
  const float klim_s = static_cast<float>(kKlLogClamp), kval_s = static_cast<float>(kKlValueClamp);
  const vf klim = splat(klim_s), nklim = splat(-klim_s), kval = splat(kval_s), nkval = splat(-kval_s);
  const vf u = ref - x;
  const vf uc = vmin(vmax(u, nklim), klim);
  const vf e = vexp(uc);
  const vf k3 = e - uc - 1.0f;
  const vf kin = ones_if((u >= nklim) & (u <= klim) & (k3 <= kval) & (k3 >= nkval));
  kl = vmin(vmax(k3, nkval), kval);
  g += c.beta * (1.0f - e) * kin;
}

// kW tokens starting at the given pointers (grpo_token on each lane). IS: a token-level IS
// correction reads the rollout log-probs (a template parameter, so the loop has no branch).
template <typename In, int KL, bool TOK_ADV, bool SEQ, int F, bool IS>
MTGRPO_VINL void block(const In* __restrict lp, const In* __restrict old, const uint8_t* __restrict mk,
                       const In* __restrict ref, const In* __restrict roll, const float* __restrict adv_tok,
                       const Consts& c, In* __restrict grad, Acc& acc) {
  const vf lim = splat(static_cast<float>(kLogRatioClamp));
  const vf nlim = splat(-static_cast<float>(kLogRatioClamp));
  const vi on = load_mask(mk);
  const vf x = load(lp);
  const vf o = load(old);
  const vf d = x - o;
  const vf dc = vmin(vmax(d, nlim), lim);
  const vf din = ones_if((d >= nlim) & (d <= lim));
  const vf a = TOK_ADV ? load(adv_tok) * c.a_row : c.a_row;
  vi a_neg = a < 0.0f, a_pos = a > 0.0f;
  if constexpr (!TOK_ADV) opaque(a_neg, a_pos);
  vf r = SEQ ? c.r_seq : vexp(dc);
  const vf cap_grad = ones_if(r <= c.cap);
  r = vmin(r, c.cap);
  const FormArgs<vf, vi> fa{a, r, x, d, c.rc, a_neg, a_pos};
  const FormOut<vf, vi> f = PolicyForm<F>::eval(fa, c.k);
  vf g = ((SEQ && TOK_ADV && F == kFormVanilla) ? c.seq_coef : f.dldr) * r * cap_grad * din + f.dldx;  // grpo_token
  vf wi = c.is_row;
  vi keep = ~vi{};
  if constexpr (IS) {  // the token-level IS weight exp(old - rollout), truncated or masked
    const vf raw = vexp(vmin(vmax(o - load(roll), nlim), lim));
    keep = (raw >= c.is_lo) & (raw <= c.is_hi);
    const vf wt = c.is_trunc ? vmin(vmax(raw, c.is_lo), c.is_hi) : sel(keep, raw, vf{});
    wi = wi * wt;
  }
  const vf l = f.l * wi;
  g = g * wi;
  vf kl = vf{};
  if constexpr (KL == kKlAny) {  // the KL kind chosen per call (c.kl), the code of the cases below
    if (c.kl == 1 || c.kl == 2)
      kl_k12(x, load(ref), c, kl, g);
    else if (c.kl == 3)
      kl_k3(x, load(ref), c, kl, g);
  } else if constexpr (KL == 1 || KL == 2) {  // k1 or k2 (c.kl), a per-call choice
    kl_k12(x, load(ref), c, kl, g);
  } else if constexpr (KL == 3) {
    kl_k3(x, load(ref), c, kl, g);
  }
  store(grad, sel(on, c.w * g, vf{}));
  acc_add(acc.s[kPgSum], on, l);
  acc_add(acc.s[kRatioSum], on, r);
  acc_add(acc.s[kNegLogRatioSum], on, -dc);
  acc_count(acc.s[kClipLow], on & f.clo);
  acc_count(acc.s[kClipHigh], on & f.chi);
  acc_count(acc.s[kDualClip], on & f.du);
  acc_count(acc.s[kTokens], on);
  if constexpr (KL != 0) {
    acc_add(acc.s[kKlSum], on, kl);
    acc_add(acc.s[kLossContrib], on, l + c.beta * kl);
  }
  if constexpr (IS) {
    acc_add(acc.s[kIsRatioSum], on, wi);
    acc_count(acc.s[kIsClipped], on & ~keep);
  }
}

MTGRPO_VINL double fold(vf v, double s = 0.0) {  // s + lanes 0..kW-1, in order
  for (int j = 0; j < kW; ++j) s += static_cast<double>(v[j]);
  return s;
}

// Tokens [t0, t1) of one row (pointers at the row start): writes grad[t0, t1) and the
// span's statistics part[kRowStats] (part[kLossContrib] not yet multiplied by the row weight).
// `roll` is read only with a token-level IS correction (IS: p.is_mode != kIsOff).
template <typename In, int KL, bool TOK_ADV, bool SEQ, int F, bool IS>
MTGRPO_VINL void span(const In* __restrict lp, const In* __restrict old, const uint8_t* __restrict mk,
                      const In* __restrict ref, const In* __restrict roll, const float* __restrict adv_tok, float a_row,
                      float r_seq, float seq_coef, float rc, float is_row, int64_t t0, int64_t t1, const LossParams& p,
                      float w, In* __restrict grad, double* part) {
  Consts c;
  c.k.lo = splat(static_cast<float>(1.0 - p.eps_low));
  c.k.hi = splat(static_cast<float>(1.0 + p.eps_high));
  c.k.dual = splat(static_cast<float>(p.dual_clip));
  c.k.eps_lo = splat(static_cast<float>(p.eps_low));
  c.k.eps_hi = splat(static_cast<float>(p.eps_high));
  c.k.tau_pos = splat(static_cast<float>(p.tau_pos));
  c.k.tau_neg = splat(static_cast<float>(p.tau_neg));
  c.k.zero = vf{};
  c.k.one = splat(1.0f);
  c.k.four = splat(4.0f);
  c.k.never = vi{};
  c.cap = splat(static_cast<float>(p.ratio_cap));
  c.beta = splat(static_cast<float>(p.kl_coef));
  c.w = splat(w);
  c.a_row = splat(a_row);
  c.r_seq = splat(r_seq);
  c.seq_coef = splat(seq_coef);
  c.rc = splat(rc);
  c.is_row = splat(is_row);
  c.is_lo = splat(static_cast<float>(p.is_lo));
  c.is_hi = splat(static_cast<float>(p.is_hi));
  c.is_trunc = p.is_mode == kIsTruncate;
  c.kl = ref != nullptr ? p.kl_estimator : 0;
  if constexpr (KL == kKlAny) {  // no reference policy: read lp in its place (never used, c.kl = 0)
    if (ref == nullptr) ref = lp;
  }
  // Lane j of a 16-token block is lane j % kW of sub-vector j / kW; one accumulator set per
  // sub-vector (separate variables, not an array, so they stay in registers).
  Acc a0, a1, a2, a3;
  for (int k = 0; k < kRowStats; ++k) a0.s[k] = a1.s[k] = a2.s[k] = a3.s[k] = vf{};
  auto blk = [&](int64_t u, const In* lpp, const In* oldp, const uint8_t* mkp, const In* refp, const In* rollp,
                 const float* advp, In* gp, Acc& acc) MTGRPO_VLAMBDA {
    block<In, KL, TOK_ADV, SEQ, F, IS>(lpp + u, oldp + u, mkp + u, KL ? refp + u : nullptr, IS ? rollp + u : nullptr,
                                       TOK_ADV ? advp + u : nullptr, c, gp + u, acc);
  };
  int64_t t = t0;
  for (; t + kBlock <= t1; t += kBlock) {
    blk(t, lp, old, mk, ref, roll, adv_tok, grad, a0);
    if constexpr (kU >= 2) blk(t + kW, lp, old, mk, ref, roll, adv_tok, grad, a1);
    if constexpr (kU >= 4) {
      blk(t + 2 * kW, lp, old, mk, ref, roll, adv_tok, grad, a2);
      blk(t + 3 * kW, lp, old, mk, ref, roll, adv_tok, grad, a3);
    }
  }
  const int64_t rem = t1 - t;
  if (rem > 0) {  // tail: the same block on zero-padded copies (padding is masked out)
    alignas(64) In lpb[kBlock], oldb[kBlock], refb[kBlock], rollb[kBlock];
    alignas(64) float advb[kBlock];
    alignas(64) In gb[kBlock];
    alignas(16) uint8_t mkb[kBlock];
    std::memset(static_cast<void*>(lpb), 0, sizeof lpb);
    std::memset(static_cast<void*>(oldb), 0, sizeof oldb);
    std::memset(static_cast<void*>(refb), 0, sizeof refb);
    std::memset(static_cast<void*>(rollb), 0, sizeof rollb);
    std::memset(advb, 0, sizeof advb);
    std::memset(mkb, 0, sizeof mkb);
    const size_t n = static_cast<size_t>(rem);
    std::memcpy(static_cast<void*>(lpb), lp + t, n * sizeof(In));
    std::memcpy(static_cast<void*>(oldb), old + t, n * sizeof(In));
    std::memcpy(mkb, mk + t, n);
    if constexpr (KL != 0) std::memcpy(static_cast<void*>(refb), ref + t, n * sizeof(In));
    if constexpr (IS) std::memcpy(static_cast<void*>(rollb), roll + t, n * sizeof(In));
    if constexpr (TOK_ADV) std::memcpy(advb, adv_tok + t, n * sizeof(float));
    blk(0, lpb, oldb, mkb, refb, rollb, advb, gb, a0);
    if constexpr (kU >= 2) blk(kW, lpb, oldb, mkb, refb, rollb, advb, gb, a1);
    if constexpr (kU >= 4) {
      blk(2 * kW, lpb, oldb, mkb, refb, rollb, advb, gb, a2);
      blk(3 * kW, lpb, oldb, mkb, refb, rollb, advb, gb, a3);
    }
    std::memcpy(static_cast<void*>(grad + t), static_cast<const void*>(gb), n * sizeof(In));
  }
  for (int k = 0; k < kRowStats; ++k) {
    double sum = 0.0;
    sum = fold(a0.s[k], sum);
    if constexpr (kU >= 2) sum = fold(a1.s[k], sum);
    if constexpr (kU >= 4) sum = fold(a3.s[k], fold(a2.s[k], sum));
    part[k] = sum;
  }
  if constexpr (KL == 0) {  // not accumulated (see Acc): no KL term, so the loss share is the loss sum
    part[kKlSum] = 0.0;
    part[kLossContrib] = part[kPgSum];
  }
  if constexpr (!IS) {  // every token carries the row's constant weight
    part[kIsRatioSum] = static_cast<double>(is_row) * part[kTokens];
    part[kIsClipped] = 0.0;
  }
}

// GSPO pre-pass over tokens [t0, t1): sum of the masked clamped log-ratios and the count.
template <typename In>
MTGRPO_VINL void seq_span(const In* __restrict lp, const In* __restrict old, const uint8_t* __restrict mk, int64_t t0,
                          int64_t t1, double* sum_cnt) {
  const vf lim = splat(static_cast<float>(kLogRatioClamp));
  const vf nlim = splat(-static_cast<float>(kLogRatioClamp));
  vf s0 = vf{}, s1 = vf{}, s2 = vf{}, s3 = vf{}, c0 = vf{}, c1 = vf{}, c2 = vf{}, c3 = vf{};
  auto sub = [&](int64_t tu, vf& sv, vf& cv) MTGRPO_VLAMBDA {
    const vi on = load_mask(mk + tu);
    const vf dc = vmin(vmax(load(lp + tu) - load(old + tu), nlim), lim);
    sv += sel(on, dc, vf{});
    cv += ones_if(on);
  };
  int64_t t = t0;
  for (; t + kBlock <= t1; t += kBlock) {
    sub(t, s0, c0);
    if constexpr (kU >= 2) sub(t + kW, s1, c1);
    if constexpr (kU >= 4) {
      sub(t + 2 * kW, s2, c2);
      sub(t + 3 * kW, s3, c3);
    }
  }
  double ss = fold(s3, fold(s2, fold(s1, fold(s0)))), cc = fold(c3, fold(c2, fold(c1, fold(c0))));
  for (; t < t1; ++t) {
    if (!mk[t]) continue;
    const float lim_s = static_cast<float>(kLogRatioClamp);
    const float dc = std::min(std::max(to_compute(lp[t]) - to_compute(old[t]), -lim_s), lim_s);
    ss += dc;
    cc += 1.0;
  }
  sum_cnt[0] = ss;
  sum_cnt[1] = cc;
}

// GSPO with token advantages, second pre-pass over tokens [t0, t1) of a row: the masked sum
// of d loss / d r at the row's (capped) sequence ratio, lane-wise as in block().
MTGRPO_VINL void coef_span(const uint8_t* __restrict mk, const float* __restrict adv_tok, float a_row, float r_seq,
                           int64_t t0, int64_t t1, const LossParams& p, double* out) {
  const vf lo = splat(static_cast<float>(1.0 - p.eps_low)), hi = splat(static_cast<float>(1.0 + p.eps_high));
  const vf r = vmin(splat(r_seq), splat(static_cast<float>(p.ratio_cap)));
  const vf rc = vmin(vmax(r, lo), hi);
  const vf dual = splat(static_cast<float>(p.dual_clip)), arow = splat(a_row);
  vf s0 = vf{}, s1 = vf{}, s2 = vf{}, s3 = vf{};
  auto sub = [&](const uint8_t* m, const float* av, vf& sv) MTGRPO_VLAMBDA {
    const vi on = load_mask(m);
    const vf a = load(av) * arow;
    const vf neg_a = -a;
    const vf l1 = neg_a * r, l2 = neg_a * rc;
    const vi use1 = l1 >= l2;
    const vf l = sel(use1, l1, l2);
    vf dldr = sel(use1, neg_a, vf{});
    const vi du = (a < 0.0f) & (neg_a * dual < l);
    dldr = sel(du, vf{}, dldr);
    sv += sel(on, dldr, vf{});
  };
  int64_t t = t0;
  for (; t + kBlock <= t1; t += kBlock) {
    sub(mk + t, adv_tok + t, s0);
    if constexpr (kU >= 2) sub(mk + t + kW, adv_tok + t + kW, s1);
    if constexpr (kU >= 4) {
      sub(mk + t + 2 * kW, adv_tok + t + 2 * kW, s2);
      sub(mk + t + 3 * kW, adv_tok + t + 3 * kW, s3);
    }
  }
  if (t < t1) {  // tail on zero-padded copies (padding is masked out)
    alignas(64) float advb[kBlock];
    alignas(16) uint8_t mkb[kBlock];
    std::memset(advb, 0, sizeof advb);
    std::memset(mkb, 0, sizeof mkb);
    const size_t n = static_cast<size_t>(t1 - t);
    std::memcpy(advb, adv_tok + t, n * sizeof(float));
    std::memcpy(mkb, mk + t, n);
    sub(mkb, advb, s0);
    if constexpr (kU >= 2) sub(mkb + kW, advb + kW, s1);
    if constexpr (kU >= 4) {
      sub(mkb + 2 * kW, advb + 2 * kW, s2);
      sub(mkb + 3 * kW, advb + 3 * kW, s3);
    }
  }
  *out = fold(s3, fold(s2, fold(s1, fold(s0))));
}

// Items [k0, k1) of a FloatJob (see FloatJob). Non-template entry points, so that each
// inclusion under a `#pragma GCC target` region compiles the whole kernel for that ISA.
template <typename In, int KL, bool TOK, bool SEQ, int F, bool IS>
MTGRPO_VINL void items_impl(const FloatJob& J, int64_t k0, int64_t k1) {
  const int64_t T = J.T;
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t i = k / J.nseg;
    const int64_t t0 = (k - i * J.nseg) * J.seg;
    const int64_t t1 = std::min(T, t0 + J.seg);
    const size_t off = static_cast<size_t>(i) * static_cast<size_t>(T);
    span<In, KL, TOK, SEQ, F, IS>(static_cast<const In*>(J.lp) + off, static_cast<const In*>(J.old) + off, J.mk + off,
                                  (KL != 0 && J.ref) ? static_cast<const In*>(J.ref) + off : nullptr,
                                  IS ? static_cast<const In*>(J.roll) + off : nullptr, TOK ? J.adv_tok + off : nullptr,
                                  static_cast<float>(J.a_row[i]), SEQ ? J.r_seq[i] : 1.0f,
                                  (SEQ && TOK) ? J.seq_coef[i] : 0.0f, static_cast<float>(J.rc_row[i]),
                                  static_cast<float>(J.is_row[i]), t0, t1, *J.p, static_cast<float>(J.w_row[i]),
                                  static_cast<In*>(J.grad) + off, J.part + k * kRowStats);
  }
}

// The form is chosen here, once per call, outside the token loop. GSPO's sequence ratio (SEQ)
// exists for the ratio forms "vanilla" and "cispo" only (validated in Python).
template <typename In, int KL, bool TOK, bool IS>
MTGRPO_VINL void items_form(const FloatJob& J, int64_t k0, int64_t k1) {
  switch (J.form) {
    case kFormCispo:
      if (J.seq)
        items_impl<In, KL, TOK, true, kFormCispo, IS>(J, k0, k1);
      else
        items_impl<In, KL, TOK, false, kFormCispo, IS>(J, k0, k1);
      break;
    case kFormSapo:
      items_impl<In, KL, TOK, false, kFormSapo, IS>(J, k0, k1);
      break;
    case kFormLogpWeighted:
      items_impl<In, KL, TOK, false, kFormLogpWeighted, IS>(J, k0, k1);
      break;
    case kFormGeoMean:
      items_impl<In, KL, TOK, false, kFormGeoMean, IS>(J, k0, k1);
      break;
    default:
      if (J.seq)
        items_impl<In, KL, TOK, true, kFormVanilla, IS>(J, k0, k1);
      else
        items_impl<In, KL, TOK, false, kFormVanilla, IS>(J, k0, k1);
      break;
  }
}

template <typename In, int KL, bool IS>
MTGRPO_VINL void items_kl(const FloatJob& J, int64_t k0, int64_t k1) {
  if (J.tok_adv)
    items_form<In, KL, true, IS>(J, k0, k1);
  else
    items_form<In, KL, false, IS>(J, k0, k1);
}

// Instantiations: without a token-level IS correction one per KL kind (none, k1 / k2 sharing one
// with a per-call flag, k3); with one, a single instantiation choosing the KL kind per block
// (KL = kKlAny, a predictable branch): IS with a KL penalty is a rare mix, and each
// instantiation of the token loop costs compile time (7 forms x 2 advantage kinds x 3 dtypes).
template <typename In>
MTGRPO_VINL void items_in(const FloatJob& J, int64_t k0, int64_t k1) {
  if (J.p->is_mode != kIsOff) {
    items_kl<In, kKlAny, true>(J, k0, k1);
    return;
  }
  switch (J.kl) {
    case 1:
    case 2:
      items_kl<In, 1, false>(J, k0, k1);
      break;
    case 3:
      items_kl<In, 3, false>(J, k0, k1);
      break;
    default:
      items_kl<In, 0, false>(J, k0, k1);
      break;
  }
}

inline void float_items(const FloatJob& J, int64_t k0, int64_t k1) {
  switch (J.dt) {
    case DType::BF16:
      items_in<Bf16>(J, k0, k1);
      break;
    case DType::F16:
      items_in<F16>(J, k0, k1);
      break;
    default:
      items_in<float>(J, k0, k1);
      break;
  }
}

template <typename In>
MTGRPO_VINL void seq_items_in(const FloatJob& J, int64_t k0, int64_t k1) {
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t i = k / J.nseg;
    const int64_t t0 = (k - i * J.nseg) * J.seg;
    const size_t off = static_cast<size_t>(i) * static_cast<size_t>(J.T);
    seq_span<In>(static_cast<const In*>(J.lp) + off, static_cast<const In*>(J.old) + off, J.mk + off, t0,
                 std::min(J.T, t0 + J.seg), J.seq_part + 2 * k);
  }
}

// GSPO second pre-pass (token advantages) over items [k0, k1).
inline void float_coef_items(const FloatJob& J, int64_t k0, int64_t k1) {
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t i = k / J.nseg;
    const int64_t t0 = (k - i * J.nseg) * J.seg;
    const size_t off = static_cast<size_t>(i) * static_cast<size_t>(J.T);
    coef_span(J.mk + off, J.adv_tok + off, static_cast<float>(J.a_row[i]), J.r_seq[i], t0, std::min(J.T, t0 + J.seg),
              *J.p, J.coef_part + k);
  }
}

// GSPO pre-pass over items [k0, k1).
inline void float_seq_items(const FloatJob& J, int64_t k0, int64_t k1) {
  switch (J.dt) {
    case DType::BF16:
      seq_items_in<Bf16>(J, k0, k1);
      break;
    case DType::F16:
      seq_items_in<F16>(J, k0, k1);
      break;
    default:
      seq_items_in<float>(J, k0, k1);
      break;
  }
}
}  // namespace MTGRPO_VEC_NS
}  // namespace mtgrpo
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#undef MTGRPO_VEC_EMIT
#undef MTGRPO_VEC_X86
#ifdef MTGRPO_VEC_NS_DEFAULTED
#undef MTGRPO_VEC_NS
#undef MTGRPO_VEC_NS_DEFAULTED
#endif
#endif  // MTGRPO_VEC_EMIT
