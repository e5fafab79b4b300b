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
// values and a mask byte, writes one float; about 40 flops and one exp (two with k3).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

namespace mtgrpo {

enum class DType : int { F32 = 0, F64 = 1, BF16 = 2, F16 = 3 };

enum class LossAgg : int { TokenMean = 0, SeqMeanTokenMean = 1, SeqMeanTokenSum = 2, SeqMeanTokenSumNorm = 3 };

enum class AdvScale : int { Group = 0, Batch = 1, None = 2 };

// Per-row statistics written by the kernel (float64, row-major [N, kRowStats]).
enum RowStat : int {
  kPgSum = 0,      // sum_t m * clipped surrogate (no KL)
  kKlSum,          // sum_t m * kl
  kRatioSum,       // sum_t m * ratio
  kNegLogRatioSum, // sum_t m * (old - logp), clamped: approximate KL to the old policy
  kClipLow,        // tokens with ratio < 1 - eps_low and A < 0
  kClipHigh,       // tokens with ratio > 1 + eps_high and A > 0
  kDualClip,       // tokens where the dual clip is active
  kLossContrib,    // this row's share of the aggregated loss
  kTokens,         // sum_t m
  kRowStats
};

struct LossParams {
  double eps_low = 0.2, eps_high = 0.2;
  double dual_clip = INFINITY;   // +inf: off
  double ratio_cap = INFINITY;   // +inf: off
  double kl_coef = 0.0;
  int kl_estimator = 0;          // 0: no KL term, 1: k1, 2: k2, 3: k3
  bool seq_level = false;        // GSPO sequence-level ratio
  LossAgg agg = LossAgg::TokenMean;
  double num_tokens = 0.0;       // > 0: global token count of token-mean
  double norm_length = 0.0;      // L of seq-mean-token-sum-norm (> 0)
  bool seq_count_all = false;    // seq-mean modes: count every row, not only non-empty
};

struct AdvParams {
  AdvScale scale = AdvScale::Group;
  double eps = 1e-6;
  bool unbiased = true;
  bool singleton_raw = false;
  double clip = 0.0;  // <= 0: off
};

constexpr double kLogRatioClamp = 20.0;
constexpr double kKlLogClamp = 20.0;
constexpr double kKlValueClamp = 10.0;

// ---- scalar conversions (branch-free so loops vectorise) -------------------------------
inline float bits_to_float(uint32_t b) { float f; std::memcpy(&f, &b, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t b; std::memcpy(&b, &f, 4); return b; }

inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

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

struct Bf16 { uint16_t v; };
struct F16 { uint16_t v; };
inline float to_compute(float x) { return x; }
inline double to_compute(double x) { return x; }
inline float to_compute(Bf16 x) { return bf16_to_float(x.v); }
inline float to_compute(F16 x) { return f16_to_float(x.v); }

// exp for |x| <= 88 with Cephes' polynomial (about 1 ulp); written so that GCC vectorises it.
inline float vexp(float x) {
  x = std::min(std::max(x, -87.3f), 88.0f);
  const float fn = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - fn * 0.693359375f;
  r = r + fn * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t e = static_cast<int32_t>(fn) + 127;
  return y * bits_to_float(static_cast<uint32_t>(e) << 23);
}
inline double vexp(double x) { return std::exp(x); }

// ---- group advantages -----------------------------------------------------------------
// rewards[N] (already checked finite), group_ids[N]. Writes adv[N] and, per row, whether
// its group is a zero-advantage group (all rewards equal) and whether the row is its
// group's first member (lowest index): row_flat[N], row_leader[N].
template <typename R>
void group_advantages(const R* rewards, const int64_t* group_ids, int64_t n, const AdvParams& p,
                      double* adv, uint8_t* row_flat, uint8_t* row_leader) {
  if (n <= 0) return;
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return group_ids[a] < group_ids[b]; });
  const double ddof = p.unbiased ? 1.0 : 0.0;
  double bstd = 0.0;
  if (p.scale == AdvScale::Batch) {
    double s = 0.0;
    for (int64_t i = 0; i < n; ++i) s += static_cast<double>(rewards[i]);
    const double mu = s / static_cast<double>(n);
    double ss = 0.0;
    for (int64_t i = 0; i < n; ++i) { const double dv = rewards[i] - mu; ss += dv * dv; }
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
      s += v; lo = std::min(lo, v); hi = std::max(hi, v);
    }
    double mean = s / static_cast<double>(cnt);
    double ss = 0.0;
    for (int64_t j = start; j < end; ++j) { const double dv = rewards[order[j]] - mean; ss += dv * dv; }
    double sd = std::sqrt(ss / std::max(static_cast<double>(cnt) - ddof, 1.0));
    const bool single = cnt == 1;
    if (single && p.singleton_raw) { mean = 0.0; sd = 1.0; }
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

// ---- the row kernel ---------------------------------------------------------------------
// C: compute type (float or double). KL: 0 none, 1 k1, 2 k2, 3 k3. TOK_ADV: advantages per
// token. SEQ: GSPO sequence-level ratio. `w` is the row's aggregation weight.
template <typename In, typename C, int KL, bool TOK_ADV, bool SEQ>
inline __attribute__((always_inline)) void grpo_row(
    const In* __restrict lp, const In* __restrict old, const uint8_t* __restrict mk, const In* __restrict ref,
    const C* __restrict adv_tok, C a_row, int64_t T, const LossParams& p, C w, C* __restrict grad, double* out) {
  const C lo = static_cast<C>(1.0 - p.eps_low), hi = static_cast<C>(1.0 + p.eps_high);
  const C cap = static_cast<C>(p.ratio_cap), dual = static_cast<C>(p.dual_clip);
  const C beta = static_cast<C>(p.kl_coef);
  const C lim = static_cast<C>(kLogRatioClamp), klim = static_cast<C>(kKlLogClamp), kval = static_cast<C>(kKlValueClamp);
  C r_seq = C(1);
  if constexpr (SEQ) {
    C sd = C(0), cnt = C(0);
#pragma omp simd reduction(+ : sd, cnt)
    for (int64_t t = 0; t < T; ++t) {
      const C d = to_compute(lp[t]) - to_compute(old[t]);
      const C dc = std::min(std::max(d, -lim), lim);
      sd += mk[t] ? dc : C(0);
      cnt += mk[t] ? C(1) : C(0);
    }
    r_seq = vexp(sd / std::max(cnt, C(1)));
  }
  C s_pg = 0, s_kl = 0, s_r = 0, s_nd = 0, s_lo = 0, s_hi = 0, s_du = 0, s_loss = 0, s_m = 0;
#pragma omp simd reduction(+ : s_pg, s_kl, s_r, s_nd, s_lo, s_hi, s_du, s_loss, s_m)
  for (int64_t t = 0; t < T; ++t) {
    const bool on = mk[t] != 0;
    const C x = to_compute(lp[t]);
    const C d = x - to_compute(old[t]);
    const C dc = std::min(std::max(d, -lim), lim);
    const C din = (d >= -lim && d <= lim) ? C(1) : C(0);
    const C a = TOK_ADV ? adv_tok[t] * a_row : a_row;  // a_row: the sequence weight
    C r = SEQ ? r_seq : vexp(dc);
    const C cap_grad = r <= cap ? C(1) : C(0);
    r = std::min(r, cap);
    const C rc = std::min(std::max(r, lo), hi);
    const C l1 = -a * r, l2 = -a * rc;
    const bool use1 = l1 >= l2;
    C l = use1 ? l1 : l2;
    C dldr = use1 ? -a : C(0);
    const C l3 = -a * dual;
    const bool du = (a < C(0)) && (l3 < l);
    l = du ? l3 : l;
    dldr = du ? C(0) : dldr;
    C g = dldr * r * cap_grad * din;
    C kl = C(0);
    if constexpr (KL == 1) {
      kl = x - to_compute(ref[t]);
      g += beta;
    } else if constexpr (KL == 2) {
      const C v = x - to_compute(ref[t]);
      kl = C(0.5) * v * v;
      g += beta * v;
    } else if constexpr (KL == 3) {
      const C u = to_compute(ref[t]) - x;
      const C uc = std::min(std::max(u, -klim), klim);
      const C e = vexp(uc);
      const C k3 = e - uc - C(1);
      const C kin = (u >= -klim && u <= klim && k3 <= kval && k3 >= -kval) ? C(1) : C(0);
      kl = std::min(std::max(k3, -kval), kval);
      g += beta * (C(1) - e) * kin;
    }
    const C lt = l + beta * kl;
    grad[t] = on ? w * g : C(0);
    s_pg += on ? l : C(0);
    s_kl += on ? kl : C(0);
    s_r += on ? r : C(0);
    s_nd += on ? -dc : C(0);
    s_lo += (on && r < lo && a < C(0)) ? C(1) : C(0);
    s_hi += (on && r > hi && a > C(0)) ? C(1) : C(0);
    s_du += (on && du) ? C(1) : C(0);
    s_loss += on ? lt : C(0);
    s_m += on ? C(1) : C(0);
  }
  out[kPgSum] = s_pg;
  out[kKlSum] = s_kl;
  out[kRatioSum] = s_r;
  out[kNegLogRatioSum] = s_nd;
  out[kClipLow] = s_lo;
  out[kClipHigh] = s_hi;
  out[kDualClip] = s_du;
  out[kLossContrib] = static_cast<double>(w) * static_cast<double>(s_loss);
  out[kTokens] = s_m;
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
  }
  return 0.0;
}

}  // namespace mtgrpo
